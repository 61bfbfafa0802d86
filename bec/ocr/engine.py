"""The OCR process (the ocr kind's "infer" role): frame in a slot → text lines → controller.

One per core, each single-threaded (``OMP_THREAD_LIMIT=1``, set before libtesseract loads:
its OpenMP teams would otherwise fight the other OCR processes for the cores). A page is
read either whole, with Tesseract's layout analysis, or line by line from a line-detection
job's output, which the controller wrote into the slot's mask area before the fetch:

1. rebuild the corrected page (rotation, then dewarp: ``bec.ldv1.correction``);
2. cut out each text line (``bec.ocr.cutting``), time counted as ``cut``;
3. read each line as a single line, time counted as ``ocr``.

Per-page failures (no usable lines, the image changed since ldv1 ran, an engine error) are
page errors with a stage and type, decided here.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # before tesserocr loads libtesseract

import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from bec.observe import metrics  # noqa: E402
from bec.errors import PageError  # noqa: E402
from bec.ocr import metrics as ocr_metrics  # noqa: E402
from bec.ocr.cutting import cut_lines  # noqa: E402
from bec.ocr.tesseract import Engine, find_language_data  # noqa: E402
from bec.pipeline import slots as S  # noqa: E402
from bec.pipeline.child import ChildContext  # noqa: E402
from bec.pipeline.messages import FrameReady, PageDone  # noqa: E402
from bec.pipeline.slots import decode_result, encode_result  # noqa: E402


class Reader:
    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        cfg = ctx.pipeline.config
        self.cfg = cfg
        self.lines_from: str | None = cfg["lines_from"]
        self.min_confidence = float(cfg["min_confidence"])
        self.margin = float(cfg["line_margin"])
        self.engine = Engine(find_language_data(cfg["lang"], cfg["tessdata"]), cfg["lang"], cfg["psm"],
                             cfg["line_psm"], cfg["dpi"])
        self.engine.read_page(np.full((32, 32), 255, np.uint8))  # load the model's weights now
        self.busy = metrics.BusyWindow(f"cpu:{ctx.spec.role.rsplit('-', 1)[1]}")

    def handle(self, msg: FrameReady) -> None:
        pool = self.ctx.slots
        row = pool.table[msg.slot]
        if int(row["gen"]) != msg.gen or int(row["state"]) != S.INFER:
            return  # stale: the slot was recovered and reassigned
        started = time.perf_counter()
        try:
            lines, source, cut_s = self._read(msg.slot, row)
        except PageError as exc:
            self.ctx.fail_page(msg.slot, msg.gen, exc.stage, exc.kind, str(exc))
            return
        except Exception as exc:  # an engine failure fails its page, not the process
            self.ctx.log.exception("OCR of a page failed")
            self.ctx.fail_page(msg.slot, msg.gen, "ocr", "ocr_error", f"{type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - started
        kept = [line for line in lines if line[0] and line[1] >= self.min_confidence]
        ocr_metrics.DROPPED.inc(len(lines) - len(kept))
        ocr_metrics.LINES.labels(source).inc(len(kept))
        ocr_metrics.CHARACTERS.inc(sum(len("".join(line[0].split())) for line in kept))
        if kept:
            from bec.ocr.tesseract import mean_confidence

            ocr_metrics.CONFIDENCE.observe(mean_confidence([(t[0], t[1]) for t in kept]))
        payload = encode_result({"lines": kept, "line_source": source})
        if len(payload) > pool.layout.area_bytes:
            self.ctx.fail_page(msg.slot, msg.gen, "ocr", "ocr_error", f"{len(kept)} lines do not fit a slot")
            return
        if int(row["gen"]) != msg.gen:
            return
        pool.write_result(msg.slot, payload)
        row["infer_ms"] = (elapsed - cut_s) * 1000
        row["post_ms"] = cut_s * 1000
        self.busy.add(elapsed)
        metrics.INFER_BUSY.inc(elapsed)
        self.report_busy()
        self.ctx.hand_over(msg.slot, msg.gen, S.DONE, "controller", PageDone(msg.slot, msg.gen))

    def _read(self, slot: int, row: np.void) -> tuple[list[tuple], str, float]:
        """(lines as (text, confidence, line_index, x, y, w, h) in original pixels, their
        source, seconds spent cutting lines)."""
        pool = self.ctx.slots
        fh, fw = int(row["frame_h"]), int(row["frame_w"])
        ow, oh = int(row["orig_w"]), int(row["orig_h"])
        frame = pool.frame(slot, fh, fw)
        sx, sy = fw / max(1, ow), fh / max(1, oh)  # frame ÷ original (1 unless scaled to fit a slot)
        if not self.lines_from:
            found = self.engine.read_page(frame)
            return [(line.text, line.confidence, rank, *_to_original(line.box, sx, sy))
                    for rank, line in enumerate(found)], "page", 0.0
        started = time.perf_counter()
        given = decode_result(pool.read_result(slot)) if int(row["result_len"]) else None
        crops = self._cut(frame, given, row["etag"].decode() or None, (ow, oh))
        cut_s = time.perf_counter() - started
        lines = []
        for crop in crops:
            text, confidence = self.engine.read_line(crop.image)
            lines.append((text, confidence, crop.line_index, *_to_original(crop.box, sx, sy)))
        return lines, "ldv1", cut_s

    def _cut(self, frame: np.ndarray, given: dict[str, Any] | None, etag: str | None,
             original: tuple[int, int]) -> list[Any]:
        from bec.ldv1.correction import Correction, correct_frame

        job = self.lines_from
        if given is None:
            raise PageError("lines", "no_lines", f"no {job} row was handed over for this page")
        if not given["ok"]:
            raise PageError("lines", "no_lines", f"{job} failed on this page ({given['error']})")
        if given["source_etag"] and etag and given["source_etag"] != etag:
            raise PageError("lines", "image_changed", f"the image changed since {job} read it "
                            f"(ETag {etag}, {job} read {given['source_etag']}): run {job} again")
        # The reader's corrected page (bec.ldv1.correction.corrected_page), computed as the
        # worker's second pass computes it: the spline on a grid of 8 px, one remap. Measured
        # on a dewarped 1539×513 pecha: 3.0 s → 0.02 s (18 s on a 3000×900 page), the same
        # page within interpolation (mean 1.2 gray levels apart, none by more than 64).
        correction = Correction(given["rotation_angle"], given["tps_points"], given["tps_alpha"])
        page = correct_frame(frame, correction, original)  # the frame is the original, or it scaled
        sx, sy = frame.shape[1] / max(1, original[0]), frame.shape[0] / max(1, original[1])
        contours = [np.round(c * (sx, sy)).astype(np.int32) for c in given["contours"]] \
            if (sx != 1.0 or sy != 1.0) else given["contours"]
        return cut_lines(page, contours, given["line_index"], self.margin)

    def report_busy(self) -> None:
        """Share of wall time this process spends reading pages, over a window of a few seconds."""
        self.busy.report()


def _to_original(box: tuple[int, int, int, int], sx: float, sy: float) -> tuple[int, int, int, int]:
    x, y, w, h = box
    if sx == 1.0 and sy == 1.0:
        return int(x), int(y), int(w), int(h)
    return int(round(x / sx)), int(round(y / sy)), int(round(w / sx)), int(round(h / sy))


def run(ctx: ChildContext) -> None:
    reader = Reader(ctx)
    ocr_metrics.start_series()
    ctx.ready()
    for msg in ctx.inbox(on_idle=reader.report_busy):
        if isinstance(msg, FrameReady):
            reader.handle(msg)
    reader.engine.close()
