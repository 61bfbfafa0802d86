"""Post-processing process: line mask → the page's correction, then grouped lines.

First pass: the mask gives the page's skew and bend (:func:`plan_correction`). A page to
correct (skewed by ``second_pass_angle`` or more, or bent) goes round once more: its
grayscale frame is corrected in place in the slot (rotated and/or dewarped exactly as a
reader will rebuild the corrected page), thresholded again, and handed back to inference as
pass 2. The final pass's contours are on the corrected page at the original's scale, with
the correction that defines that page (``rotation_angle``, ``tps_points``, ``tps_alpha``).
"""
from __future__ import annotations

import math
import time

import numpy as np

from bec.ldv1.correction import NONE, Correction, correct_frame
from bec.ldv1.postprocess import find_lines, plan_correction
from bec.ldv1.preprocess import adaptive_threshold_into
from bec.pipeline import slots as S
from bec.pipeline.child import ChildContext
from bec.pipeline.messages import FrameReady, MaskReady, PageDone
from bec.pipeline.slots import encode_result


def store_correction(row: np.void, correction: Correction) -> None:
    """Keep a page's correction in its slot between the two passes."""
    row["rotation"] = math.nan if correction.rotation_angle is None else correction.rotation_angle
    points = correction.tps_points
    n = 0 if points is None else min(len(points), S.MAX_TPS_POINTS)
    row["tps_n"] = n
    row["tps_alpha"] = correction.tps_alpha or 0.0
    if n:
        row["tps"][:n] = points[:n]


def load_correction(row: np.void) -> Correction:
    rotation = float(row["rotation"])
    n = int(row["tps_n"])
    return Correction(None if math.isnan(rotation) else rotation,
                      np.array(row["tps"][:n], dtype=np.float32) if n else None,
                      float(row["tps_alpha"]) if n else None)


class Post:
    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        config = ctx.pipeline.config
        self.second_pass_angle = float(config["second_pass_angle"])
        self.dewarp = bool(config.get("dewarp", True))
        self.tps_alpha = float(config.get("tps_alpha", 0.5))
        self.threshold_in_fetch = ctx.pipeline.threshold_in_fetch

    def handle(self, msg: MaskReady) -> None:
        pool = self.ctx.slots
        row = pool.table[msg.slot]
        if int(row["gen"]) != msg.gen or int(row["state"]) != S.POST:
            return
        started = time.perf_counter()
        h, w = int(row["frame_h"]), int(row["frame_w"])
        original = (int(row["orig_w"]), int(row["orig_h"]))
        pass_no = int(row["pass_no"])
        correction = load_correction(row) if pass_no == 2 else NONE
        row["busy"] = 1  # a crash now is this page's doing (see Controller.scan)
        try:
            mask = pool.mask(msg.slot, h, w)
            lines = find_lines(mask, original, correction)
            if pass_no == 1:
                plan = plan_correction(mask, lines, second_pass_angle=self.second_pass_angle,
                                       dewarp_pages=self.dewarp, tps_alpha=self.tps_alpha)
                if not plan.identity:
                    self._second_pass(msg, plan, lines.angle, h, w, original)
                    row["post_ms"] = row["post_ms"] + (time.perf_counter() - started) * 1000
                    return
        except Exception as exc:
            row["busy"] = 0
            self.ctx.log.exception("post-processing failed")
            self.ctx.fail_page(msg.slot, msg.gen, "post", "postprocess_error", f"{type(exc).__name__}: {exc}")
            return
        row["busy"] = 0
        skew = float(row["skew"]) if pass_no == 2 else lines.angle
        payload = encode_result({
            "contours": lines.contours, "boxes": lines.boxes, "line_index": lines.line_index,
            "skew": skew, "rotation_angle": correction.rotation_angle,
            "tps_points": correction.tps_points, "tps_alpha": correction.tps_alpha,
        })
        if len(payload) > pool.layout.area_bytes:
            self.ctx.fail_page(msg.slot, msg.gen, "post", "postprocess_error",
                               f"{len(lines.contours)} contours do not fit a slot")
            return
        if int(row["gen"]) != msg.gen:
            return
        pool.write_result(msg.slot, payload)
        row["post_ms"] = row["post_ms"] + (time.perf_counter() - started) * 1000
        self.ctx.hand_over(msg.slot, msg.gen, S.DONE, "controller", PageDone(msg.slot, msg.gen))

    def _second_pass(self, msg: MaskReady, plan: Correction, skew: float, h: int, w: int,
                     original: tuple[int, int]) -> None:
        pool = self.ctx.slots
        frame = pool.frame(msg.slot, h, w)
        frame[...] = correct_frame(frame, plan, original)
        row = pool.table[msg.slot]
        if self.threshold_in_fetch:
            adaptive_threshold_into(frame, pool.mask(msg.slot, h, w))
        row["binary_ready"] = int(self.threshold_in_fetch)
        row["busy"] = 0
        row["pass_no"] = 2
        row["skew"] = skew
        store_correction(row, plan)
        role = f"infer-{msg.slot % self.ctx.pipeline.n_infer}"
        self.ctx.hand_over(msg.slot, msg.gen, S.INFER, role, FrameReady(msg.slot, msg.gen))


def run(ctx: ChildContext) -> None:
    post = Post(ctx)
    ctx.ready()
    for msg in ctx.inbox():
        if isinstance(msg, MaskReady):
            post.handle(msg)
