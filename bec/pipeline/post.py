"""Post-processing process: line mask → ordered line contours, boxes, skew.

A page skewed by 3° or more goes round once more: its grayscale frame is rotated in
place (in the slot), thresholded again, and handed back to inference as pass 2; the
second mask is mapped back through the rotation, so coordinates are always in the
original image's pixels.
"""
from __future__ import annotations

import time

from bec.ldv1.postprocess import find_lines, needs_second_pass, rotate_frame
from bec.pipeline import slots as S
from bec.pipeline.child import ChildContext
from bec.ldv1.preprocess import adaptive_threshold_into
from bec.pipeline.messages import FrameReady, MaskReady, PageDone
from bec.pipeline.slots import encode_result


class Post:
    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        self.second_pass_angle = float(ctx.pipeline.config["second_pass_angle"])
        self.threshold_in_fetch = ctx.pipeline.threshold_in_fetch

    def handle(self, msg: MaskReady) -> None:
        pool = self.ctx.slots
        row = pool.table[msg.slot]
        if int(row["gen"]) != msg.gen or int(row["state"]) != S.POST:
            return
        started = time.perf_counter()
        h, w = int(row["frame_h"]), int(row["frame_w"])
        pass_no, rotation = int(row["pass_no"]), float(row["rotation"])
        row["busy"] = 1  # a crash now is this page's doing (see Controller.scan)
        try:
            lines = find_lines(pool.mask(msg.slot, h, w), (int(row["orig_w"]), int(row["orig_h"])),
                               rotation=rotation)
        except Exception as exc:
            row["busy"] = 0
            self.ctx.log.exception("post-processing failed")
            self.ctx.fail_page(msg.slot, msg.gen, "post", "postprocess_error", f"{type(exc).__name__}: {exc}")
            return
        row["busy"] = 0
        if pass_no == 1 and abs(lines.angle) >= self.second_pass_angle and needs_second_pass(lines.angle):
            self._second_pass(msg, lines.angle, h, w)
            row["post_ms"] = row["post_ms"] + (time.perf_counter() - started) * 1000
            return
        skew = rotation if pass_no == 2 else lines.angle
        payload = encode_result(lines.contours, lines.boxes, rotation, skew)
        if len(payload) > pool.layout.area_bytes:
            self.ctx.fail_page(msg.slot, msg.gen, "post", "postprocess_error",
                               f"{len(lines.contours)} contours do not fit a slot")
            return
        if int(row["gen"]) != msg.gen:
            return
        pool.write_result(msg.slot, payload)
        row["post_ms"] = row["post_ms"] + (time.perf_counter() - started) * 1000
        self.ctx.hand_over(msg.slot, msg.gen, S.DONE, "controller", PageDone(msg.slot, msg.gen))

    def _second_pass(self, msg: MaskReady, angle: float, h: int, w: int) -> None:
        pool = self.ctx.slots
        frame = pool.frame(msg.slot, h, w)
        frame[...] = rotate_frame(frame, angle)
        row = pool.table[msg.slot]
        if self.threshold_in_fetch:
            adaptive_threshold_into(frame, pool.mask(msg.slot, h, w))
        row["binary_ready"] = int(self.threshold_in_fetch)
        row["pass_no"] = 2
        row["rotation"] = angle
        role = f"infer-{msg.slot % self.ctx.pipeline.n_infer}"
        self.ctx.hand_over(msg.slot, msg.gen, S.INFER, role, FrameReady(msg.slot, msg.gen))


def run(ctx: ChildContext) -> None:
    post = Post(ctx)
    ctx.ready()
    for msg in ctx.inbox():
        if isinstance(msg, MaskReady):
            post.handle(msg)
