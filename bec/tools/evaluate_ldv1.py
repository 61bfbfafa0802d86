"""Score a line model on generated pages it has never seen: exact line counts.

``python -m bec.tools.evaluate_ldv1 [--weights PATH] [--pages N] [--start SEED]``

The model is run through the whole production contract (DESIGN §7), with the shared
pre- and post-processing code, so the score is what the pipeline would get:
grayscale page → frame → adaptive threshold → /255 → white-padded 512 tiles → model →
stitch → sigmoid > 0.85 → :func:`~bec.ldv1.postprocess.find_lines`; a page whose skew
is 3° or more is rotated and run again, as the pipeline does.

Pages come from :func:`bec.tools.synth.page_for_seed` with seeds ≥
``EVAL_SEED_START`` (training never uses those), every kind and capture drawn from the
seed. Gray pages take a JPEG round trip first (alternately RGB-tinted and plain gray),
like the archives the tests build; bilevel pages would be G4 TIFFs, which are lossless.

Lines are counted by :func:`count_lines` alone, here and on real pages
(:mod:`bec.tools.evaluate_real`), so both scores always mean the same thing.
"""
from __future__ import annotations

import argparse
import io
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn

from bec.ldv1 import SHIPPED_WEIGHTS
from bec.ldv1.correction import correct_frame
from bec.ldv1.postprocess import PageLines, find_lines, plan_correction
from bec.ldv1.preprocess import TILE, adaptive_threshold, frame_size, stitch, tile_frame
from bec.tools.synth import EVAL_SEED_START, encode_jpeg, page_for_seed

__all__ = ["DEFAULT_WEIGHTS", "LINE_THRESHOLD", "to_frame", "predict_mask", "detect_lines",
           "archive_round_trip", "evaluate", "PageResult", "count_lines"]

DEFAULT_WEIGHTS = SHIPPED_WEIGHTS
LINE_THRESHOLD = 0.85


def count_lines(page_lines: PageLines) -> int:
    """The number of text lines found on a page: what every score here compares with the
    truth. The Parquet's ``nb_lines``: contours grouped into text lines (a line split at a
    shad, a string hole or an inset counts once)."""
    return page_lines.nb_lines


def to_frame(gray: np.ndarray) -> np.ndarray:
    """Resize a grayscale page to its analysed frame (area filter when shrinking)."""
    h, w = gray.shape
    fw, fh = frame_size(w, h)
    if (fw, fh) == (w, h):
        return gray
    interp = cv2.INTER_AREA if fw * fh < w * h else cv2.INTER_LINEAR
    return cv2.resize(gray, (fw, fh), interpolation=interp)


@torch.inference_mode()
def predict_mask(model: nn.Module, frame: np.ndarray, batch: int = 8,
                 threshold: float = LINE_THRESHOLD) -> np.ndarray:
    """Line mask (bool, frame size) of a uint8 grayscale frame, per the model contract."""
    binary = adaptive_threshold(frame).astype(np.float32) * (1.0 / 255.0)
    tiles = tile_frame(binary, TILE)
    probs = np.empty(tiles.shape, np.float32)
    for i in range(0, len(tiles), batch):
        x = torch.from_numpy(tiles[i:i + batch])[:, None].expand(-1, 3, -1, -1)
        probs[i:i + batch] = torch.sigmoid(model(x))[:, 0].numpy()
    h, w = frame.shape
    rows, cols = -(-h // TILE), -(-w // TILE)
    return stitch(probs, rows, cols, h, w) > threshold


def detect_lines(model: nn.Module, gray: np.ndarray, second_pass: bool = True) -> PageLines:
    """Lines of a grayscale page on its corrected page, as the pipeline finds them: a
    skewed or bent page is corrected and run again."""
    frame = to_frame(gray)
    size = (gray.shape[1], gray.shape[0])
    mask = predict_mask(model, frame)
    lines = find_lines(mask, size)
    if second_pass:
        plan = plan_correction(mask, lines)
        if not plan.identity:
            lines = find_lines(predict_mask(model, correct_frame(frame, plan, size)), size, plan)
    return lines


def archive_round_trip(image: np.ndarray, seed: int, bilevel: bool) -> np.ndarray:
    """The page as a worker would decode it from a test archive (gray: lossy JPEG)."""
    if bilevel:
        return image
    data = encode_jpeg(image, rgb=(seed // 2) % 2 == 0, quality=85)
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


@dataclass
class PageResult:
    seed: int
    style: str
    kind: str
    expected: int
    found: int
    angle: float
    seconds: float      # wall time of the contract alone (decode and generation excluded)
    cpu_seconds: float  # process CPU time of the same (all threads)

    @property
    def exact(self) -> bool:
        return self.expected == self.found


def evaluate(model: nn.Module, seeds: range, verbose: bool = False) -> list[PageResult]:
    """Run the contract on the pages of ``seeds``; one result per page.

    Scoring on unseen pages means ``seeds`` starting at ``EVAL_SEED_START`` or above
    (:func:`run_evaluation` insists); training's held-out check passes its own range.
    """
    model.eval()
    results = []
    for seed in seeds:
        page = page_for_seed(seed)
        gray = archive_round_trip(page.image, seed, page.style == "bilevel")
        t0, c0 = time.perf_counter(), time.process_time()
        lines = detect_lines(model, gray)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        res = PageResult(seed, page.style, page.kind, page.n_lines, count_lines(lines), page.angle,
                         wall, cpu)
        results.append(res)
        if verbose:
            flag = "ok " if res.exact else "BAD"
            print(f"  {flag} seed={seed} {page.kind:10s} {page.capture:7s} {gray.shape[1]}x{gray.shape[0]} "
                  f"angle={page.angle:+.1f} lines {res.found}/{res.expected} "
                  f"{wall * 1000:.0f} ms", flush=True)
    return results


def summarise(results: list[PageResult]) -> dict[str, float]:
    """Exact-count rate overall, by style and by kind, and mean CPU seconds per page."""
    out: dict[str, float] = {"pages": float(len(results))}
    groups = ["all", "gray", "bilevel", *sorted({r.kind for r in results})]
    for group in groups:
        sel = [r for r in results if group in ("all", r.style, r.kind)]
        if sel:
            out[f"exact_{group}"] = sum(r.exact for r in sel) / len(sel)
    if results:
        out["s_per_page"] = float(np.mean([r.seconds for r in results]))
        out["cpu_s_per_page"] = float(np.mean([r.cpu_seconds for r in results]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--pages", type=int, default=100)
    parser.add_argument("--start", type=int, default=EVAL_SEED_START)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    run_evaluation(args.weights, args.pages, args.start, args.threads, not args.quiet)
    return 0


def run_evaluation(weights: Path, pages: int, start: int = EVAL_SEED_START,
                   threads: int = 2, verbose: bool = True) -> dict[str, float]:
    """Load a checkpoint, evaluate it and print the summary (shared with ``train --eval``)."""
    from bec.ldv1.checkpoint import load_checkpoint

    if start < EVAL_SEED_START:
        raise ValueError(f"evaluation seeds must be ≥ {EVAL_SEED_START} (training uses the rest)")
    torch.set_num_threads(threads)
    cv2.setNumThreads(1)
    model = load_checkpoint(weights).module
    results = evaluate(model, range(start, start + pages), verbose=verbose)
    summary = summarise(results)
    params = sum(p.numel() for p in model.parameters())
    print(f"weights {weights} ({weights.stat().st_size / 1e6:.2f} MB, {params} params), "
          f"seeds {start}..{start + pages - 1}")
    print("exact line count: " + ", ".join(
        f"{k[6:]} {v:.1%}" for k, v in summary.items() if k.startswith("exact_"))
        + f"; {summary.get('s_per_page', 0.0) * 1000:.0f} ms/page wall, "
        f"{summary.get('cpu_s_per_page', 0.0) * 1000:.0f} ms/page CPU ({threads} threads)")
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
