"""The per-page work of the pipeline, as plain functions, for stage-alone runs and baselines.

Built from the very primitives the worker's processes use (``bec.edges.imaging``,
``bec.ldv1.preprocess``, the segmenter, ``find_lines``, ``bec.edges.artifacts``), so a stage
measured alone or a baseline loop does the same work as the pipeline does per page.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bec.edges import artifacts, imaging
from bec.edges.archive import volume_prefix  # noqa: F401 - re-exported for the benchmark
from bec.ldv1.config import Ldv1Config
from bec.ldv1.correction import NONE, Correction, correct_frame
from bec.ldv1.postprocess import find_lines, plan_correction
from bec.ldv1.preprocess import adaptive_threshold_into, stitch_into, tile_count, tile_frame
from bec.ldv1.kind import frame_for


@dataclass
class Frame:
    gray: np.ndarray
    binary: np.ndarray
    orig_w: int
    orig_h: int


def config(**overrides: Any) -> dict[str, Any]:
    return Ldv1Config.from_mapping({"use_gpu": False, "precision": "fp32", **overrides}).to_dict()


def decode_frame(data: bytes, cfg: dict[str, Any], force_pillow: bool = False) -> Frame:
    rule = frame_for(cfg, cfg["max_frame_width"] * cfg["max_frame_height"])
    if force_pillow:
        decoded = imaging._decode_pillow(data, int(cfg["max_image_pixels"]), imaging.sniff(data))
    else:
        decoded = imaging.decode(data, int(cfg["max_image_pixels"]), rule)
    fw, fh = rule(decoded.width, decoded.height)
    gray = np.empty((fh, fw), np.uint8)
    imaging.resize_into(decoded.gray, gray)
    binary = np.empty_like(gray)
    adaptive_threshold_into(gray, binary)
    return Frame(gray, binary, decoded.width, decoded.height)


def segment_frames(segmenter: Any, frames: list[Frame], tile: int, max_tiles: int,
                   into: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Stitched masks of ``frames``, batched as the inference process batches them.

    Pages are gathered until a batch holds ``max_tiles`` tiles, so the tile buffer stays the
    size of one batch: one buffer for a whole corpus (500 MB for 2,000 tiles) spent most of the
    measured time in first-touch page faults, a cost the pipeline never pays. For the same
    reason a stage-alone run passes ``into``: masks allocated (and touched) before the clock
    starts, as the pipeline stitches into slots of shared memory that exist before any page.
    """
    into = into if into is not None else [np.empty_like(f.binary) for f in frames]
    batch: list[tuple[Frame, np.ndarray]] = []
    tiles = 0
    for frame, out in zip(frames, into):
        batch.append((frame, out))
        tiles += tiles_of(frame, tile)
        if tiles >= max_tiles:
            _segment_batch(segmenter, batch, tile, max_tiles)
            batch, tiles = [], 0
    if batch:
        _segment_batch(segmenter, batch, tile, max_tiles)
    return into


def _segment_batch(segmenter: Any, batch: list[tuple[Frame, np.ndarray]], tile: int, max_tiles: int) -> None:
    import torch

    from bec.pipeline.inference import forward_tiles

    tiles = [tile_frame(f.binary, tile) for f, _ in batch]
    flat = torch.from_numpy(np.concatenate(tiles))
    chunk_size = forward_tiles(segmenter.device.type, max_tiles)
    outs = [segmenter.segment(chunk.to(segmenter.device)).cpu() for chunk in torch.split(flat, chunk_size)]
    masks_all = torch.cat(outs).numpy()
    at = 0
    for (f, out), t in zip(batch, tiles):
        rows, cols = tile_count(*f.binary.shape, tile)
        stitch_into(masks_all[at:at + len(t)], rows, cols, out)
        at += len(t)


def post(mask: np.ndarray, frame: Frame, filename: str = "p.jpg", correction: Correction = NONE,
         skew: float | None = None) -> tuple[artifacts.PageOutcome, Correction]:
    """find_lines (and on a first pass the correction plan), and the outcome row; returns
    (outcome, the correction a second pass needs: identity when none)."""
    size = (frame.orig_w, frame.orig_h)
    lines = find_lines(mask, size, correction)
    plan = plan_correction(mask, lines) if correction.identity else NONE
    h, w = mask.shape
    outcome = artifacts.PageOutcome(filename, True, "etag", width=frame.orig_w, height=frame.orig_h,
                                    frame_width=w, frame_height=h,
                                    rotation_angle=correction.rotation_angle,
                                    skew_angle=lines.angle if skew is None else skew,
                                    contours=lines.contours, boxes=lines.boxes,
                                    line_index=lines.line_index, tps_points=correction.tps_points,
                                    tps_alpha=correction.tps_alpha)
    return outcome, plan


def corrected(frame: Frame, plan: Correction) -> Frame:
    """The frame corrected for the second pass (as the post process does)."""
    gray = correct_frame(frame.gray, plan, (frame.orig_w, frame.orig_h))
    binary = np.empty_like(gray)
    adaptive_threshold_into(gray, binary)
    return Frame(gray, binary, frame.orig_w, frame.orig_h)


def process_pages(segmenter: Any, frames: list[Frame], cfg: dict[str, Any]) -> list[artifacts.PageOutcome]:
    """Inference and post-processing of frames, second passes included."""
    tile, max_tiles = int(cfg["tile_size"]), int(cfg["max_tiles_per_batch"])
    masks = segment_frames(segmenter, frames, tile, max_tiles)
    results = [post(m, f) for m, f in zip(masks, frames)]
    redo = [(i, corrected(frames[i], plan), plan) for i, (_, plan) in enumerate(results) if not plan.identity]
    outcomes = [o for o, _ in results]
    if redo:
        masks2 = segment_frames(segmenter, [f for _, f, _ in redo], tile, max_tiles)
        for (i, f, plan), m in zip(redo, masks2):
            outcomes[i] = post(m, f, correction=plan, skew=outcomes[i].skew_angle)[0]
    return outcomes


def tiles_of(frame: Frame, tile: int) -> int:
    rows, cols = tile_count(*frame.binary.shape, tile)
    return rows * cols
