"""Train the small line model on generated pages, on CPU, within a session.

``python -m bec.tools.train_ldv1 [--out PATH] [--seed N] [--steps N] [--minutes M]``
``python -m bec.tools.train_ldv1 --eval N [--out PATH]``  (score a checkpoint, no training)

Pages come from :mod:`bec.tools.synth`: real Tibetan script in Debian's Tibetan fonts,
laid out as the archive's kinds of page (pecha prints, woodblocks, manuscripts, book
pages, tables of contents) and captured as photographs, scans or bilevel scans; gray
captures take a JPEG round trip most of the time. Each is taken through the same
front half of the contract as at inference (frame → adaptive threshold → /255) and
the model learns the frame-sized line mask from random crops, so it never sees
anything the pipeline would not feed it. Without the fonts (or ``uharfbuzz`` /
``freetype-py``) the command says what to install and exits 1.

Seeds: page ``i`` of a run with ``--seed s`` uses seed ``(s·100003 + i) mod 900000``;
seeds 900000–999999 are held out for the end-of-training check, and evaluation
(``--eval``, :mod:`bec.tools.evaluate_ldv1`, the tests) uses seeds ≥ 1000000. No page the
model is scored on was ever trained on.

Generation runs in one DataLoader worker process, in parallel with the optimiser; the
main loop keeps a pool of recent frames and draws several crops from each, since a page
costs more to draw than one crop costs to learn from.

Cost: the defaults run ``--minutes 40`` of wall time on two CPU cores (about 0.3 s a
step of 8 crops of 256×512 when the cores are free; on a busy machine fewer steps fit,
and the learning rate anneals by whichever of steps and minutes runs out first). The
shipped ``weights/small.pth`` is ``nice -n 10 python -m bec.tools.train_ldv1`` (its
checkpoint records the steps it reached under ``trained``).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from bec.tools.evaluate_ldv1 import (DEFAULT_WEIGHTS, evaluate, run_evaluation, summarise)
from bec.ldv1.preprocess import adaptive_threshold, frame_size
from bec.ldv1.smallnet import ARCH_NAME, SmallLineNet
from bec.tools.synth import EVAL_SEED_START, encode_jpeg, generate_page, missing_fonts

TRAIN_SEEDS = 900_000          # training page seeds are in [0, TRAIN_SEEDS)
VALID_SEED_START = 900_000     # held-out check at the end of training: [900000, 1000000)
HARD_WEIGHT = 2.0              # extra loss weight on ink that belongs to no line
SEAM_CROPS = 0.35              # share of crops with a border at a line's end or band
JPEG_SHARE = 0.7               # gray captures that take a JPEG round trip
#: 1.3× the CPU time per tile of the first shipped model (23 ms): a wider context
#: stage with one more dilation (16, at 1/16 scale) sees across a pecha's string-hole
#: gaps and a book line's wide spaces.
ARCH_KWARGS: dict = {"widths": [16, 32, 48, 128], "dilations": [1, 2, 4, 8, 16, 2, 1],
                     "wide_kernel": 9, "decoder_width": 32}


def page_seed(run_seed: int, index: int) -> int:
    """Seed of the ``index``-th training page of a run (always < ``TRAIN_SEEDS``)."""
    return (run_seed * 100_003 + index) % TRAIN_SEEDS


class Sample(NamedTuple):
    """One training page, in frame pixels."""

    binary: np.ndarray     # uint8 thresholded frame (0 ink, 255 paper)
    mask: np.ndarray       # uint8 0/1 line bands
    hard: np.ndarray       # uint8 0/1 ink that belongs to no line (see hard_negatives)
    band_h: float          # median band height
    ends: np.ndarray       # L×4 float32: (x, y) of each band's left end, then right end


def training_sample(seed: int) -> Sample:
    """Generate training page ``seed`` and prepare it as the model will see it."""
    rng = np.random.default_rng(seed)
    page = generate_page(rng)
    gray = page.image
    if page.style == "gray" and rng.random() < JPEG_SHARE:     # JPEG artefacts, as in archives
        data = encode_jpeg(gray, rgb=bool(rng.random() < 0.5), quality=int(rng.integers(40, 96)))
        gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    h, w = gray.shape
    fw, fh = frame_size(w, h)
    mask = page.line_mask.astype(np.uint8) * 255
    if (fw, fh) != (w, h):
        # Either filter may be used by whoever resizes pages: learn both.
        interp = cv2.INTER_AREA if rng.random() < 0.5 else cv2.INTER_LINEAR
        gray = cv2.resize(gray, (fw, fh), interpolation=interp)
        mask = cv2.resize(mask, (fw, fh), interpolation=cv2.INTER_AREA)
    mask = (mask > 127).astype(np.uint8)
    binary = adaptive_threshold(gray)
    band_h = band_height(mask)
    return Sample(binary, mask, hard_negatives(binary, mask, band_h), band_h, band_ends(mask))


def band_height(mask: np.ndarray) -> float:
    """Median thickness of a page's line bands (≈ its glyph height), frame pixels."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n < 2:
        return 0.0
    thickness = stats[1:, cv2.CC_STAT_AREA] / np.maximum(stats[1:, cv2.CC_STAT_WIDTH], 1)
    return float(np.median(thickness))


def band_ends(mask: np.ndarray) -> np.ndarray:
    """(x, y) of the left and right end of every band (L×4 float32)."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    rows = []
    for c in contours:                     # one per line: a handful per page
        p = c.reshape(-1, 2).astype(np.float32)
        left, right = p[p[:, 0] == p[:, 0].min()], p[p[:, 0] == p[:, 0].max()]
        rows.append((*left.mean(0), *right.mean(0)))
    return np.asarray(rows, np.float32).reshape(-1, 4)


def hard_negatives(binary: np.ndarray, mask: np.ndarray, band_h: float) -> np.ndarray:
    """Pixels near ink that belongs to no line: frame rules, page marks, margin notes,
    blotches (uint8 0/1). Every false line the model found in development was one of
    these, so the loss weighs them more. Ink within a glyph height of a band (vowel
    marks, stacked letters) and isolated specks are left out."""
    ink = (binary == 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    big = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= 12)
    big = big[big > 0]
    ink = np.isin(labels, big).astype(np.uint8)
    g = max(3, int(band_h))
    near_ink = cv2.dilate(ink, np.ones((g // 2 * 2 + 1, g // 2 * 2 + 1), np.uint8))
    near_band = cv2.dilate(mask, np.ones((2 * g + 1, g + 1), np.uint8))
    return near_ink & (1 - near_band)


class _Pages(IterableDataset):
    """Endless stream of training samples for one run (one worker process)."""

    def __init__(self, run_seed: int) -> None:
        self.run_seed = run_seed

    def __iter__(self) -> Iterator[Sample]:
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        i = 0
        while True:
            yield training_sample(page_seed(self.run_seed, i))
            i += 1


def _as_is(sample: Sample) -> Sample:
    """Keep samples as numpy arrays (the default would turn them into tensors)."""
    return sample


def _crop(rng: random.Random, sample: Sample, ch: int,
          cw: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ch×cw crop (binary, mask, hard); small frames are padded white, as tiles are.

    Most crops are placed uniformly. ``SEAM_CROPS`` of them put a crop border where a
    tile seam hurts most: just before a line's end (the next tile sees only the last
    glyph or two), just after its start, or through its band (a row seam on a tall
    page). Uniform crops meet these cases too rarely to learn them in a short run,
    and each one missed is a line split in two.
    """
    binary, mask, hard, band_h, ends = sample
    reach = int(1.5 * band_h) + 2
    h, w = binary.shape
    if h < ch or w < cw:
        ph, pw = max(h, ch), max(w, cw)
        b2 = np.full((ph, pw), 255, np.uint8)
        m2 = np.zeros((ph, pw), np.uint8)
        h2 = np.zeros((ph, pw), np.uint8)
        b2[:h, :w], m2[:h, :w], h2[:h, :w] = binary, mask, hard
        binary, mask, hard, h, w = b2, m2, h2, ph, pw
    if len(ends) and rng.random() < SEAM_CROPS:
        x, y = _seam_crop_origin(rng, ends[rng.randrange(len(ends))], band_h, ch, cw)
        x, y = min(max(int(x), 0), w - cw), min(max(int(y), 0), h - ch)
    else:
        y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
    b, m = binary[y:y + ch, x:x + cw], _extend_to_sides(mask[y:y + ch, x:x + cw], reach)
    d = hard[y:y + ch, x:x + cw]
    if rng.random() < 0.5:                   # lines read the same mirrored left-right
        b, m, d = b[:, ::-1], m[:, ::-1], d[:, ::-1]
    return b, m, d


def _seam_crop_origin(rng: random.Random, end: np.ndarray, band_h: float, ch: int,
                      cw: int) -> tuple[float, float]:
    """Top-left corner of a crop with one border at a hard place for ``end``'s line."""
    x0, y0, x1, y1 = (float(v) for v in end)
    kind = rng.randrange(4)
    if kind == 0:                                   # left border shortly before the end
        return x1 - rng.uniform(0, 4 * band_h), y1 - rng.uniform(0.2, 0.8) * ch
    if kind == 1:                                   # right border shortly after the start
        return x0 + rng.uniform(0, 4 * band_h) - cw, y0 - rng.uniform(0.2, 0.8) * ch
    xc = rng.uniform(x0, x1)                        # top or bottom border through the band
    yc = y0 + (y1 - y0) * (xc - x0) / max(x1 - x0, 1.0) + rng.uniform(-0.8, 0.8) * band_h
    return xc - rng.uniform(0.2, 0.8) * cw, (yc if kind == 2 else yc - ch)


def _extend_to_sides(mask: np.ndarray, reach: int) -> np.ndarray:
    """Copy of a crop's mask whose bands reaching within ``reach`` px of the left or
    right border are continued to that border (``reach``: 1.5 band heights).

    Tiles do not overlap, so a tile that starts in the gap between two syllables sees
    white and then glyphs — exactly what the start of a line after its margin looks
    like — while only the tile before it knows the line goes on. Trained on the true
    label, the model hedges (p ≈ 0.7 there) and the 0.85 cut splits the line in two.
    Settling the ambiguity the other way costs little: the reach is shorter than the
    page margins, so only a seam near a line's end can stretch its band (by less than
    ``reach``, to the seam), which changes no line count.
    """
    m = mask.copy()
    if reach <= 0:
        return m
    reach = min(reach, m.shape[1])
    cols = np.arange(reach)
    for side in (m[:, :reach], m[:, ::-1][:, :reach]):      # views into m
        hit = side.any(1)
        first = side.argmax(1)
        side |= (hit[:, None] & (cols[None, :] < first[:, None])).astype(m.dtype)
    return m


def _edge_weight(h: int, w: int, margin: int = 48, extra: float = 3.0) -> torch.Tensor:
    """1 inside, ``1 + extra`` within ``margin`` px of a crop border.

    At inference a line cut by a tile seam is seen by two tiles, each from one side; if
    either lets the band's probability dip under 0.85 at the seam, the line splits into
    two. Crop borders are exactly that situation, so they are learned harder.
    """
    near_y = torch.zeros(h, 1)
    near_x = torch.zeros(1, w)
    near_y[:margin], near_y[-margin:] = 1, 1
    near_x[:, :margin], near_x[:, -margin:] = 1, 1
    return (1 + extra * torch.maximum(near_y, near_x))[None, None]


def _loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted BCE for per-pixel confidence (the mask is cut at p > 0.85) plus soft
    Dice, which keeps thin bands of sparse pages from being traded away for background."""
    bce = F.binary_cross_entropy_with_logits(logits, target, weight, reduction="sum")
    bce = bce / weight.sum()
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return bce + dice.mean()


def save(model: torch.nn.Module, path: Path, trained: dict) -> None:
    """Write the checkpoint atomically in the layout ``checkpoint.load_checkpoint`` reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"arch": ARCH_NAME, "arch_kwargs": ARCH_KWARGS,
               "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
               "trained": trained}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train(out: Path, seed: int, steps: int, minutes: float, batch: int, crop: tuple[int, int],
          lr: float, threads: int, pool_size: int = 48, valid_pages: int = 24,
          command: str = "") -> dict:
    """Train from scratch until ``steps`` or ``minutes`` run out; save; return the record."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    # channels_last runs oneDNN's faster convolution kernels (≈1.6× per step on CPU).
    model = SmallLineNet(**ARCH_KWARGS).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    stream = iter(DataLoader(_Pages(seed), batch_size=None, num_workers=1, prefetch_factor=4,
                             collate_fn=_as_is))
    pool: list[Sample] = []
    ch, cw = crop
    edge_weight = _edge_weight(ch, cw)
    start = time.monotonic()
    budget = minutes * 60.0
    pages = step = 0
    avg = None
    warmup = 60
    print(f"training {ARCH_NAME} {ARCH_KWARGS} ({sum(p.numel() for p in model.parameters())} "
          f"params) for ≤{steps} steps / ≤{minutes:g} min, batch {batch}×{ch}×{cw}, "
          f"{threads} threads", flush=True)
    model.train()
    while step < steps:
        elapsed = time.monotonic() - start
        progress = max(step / steps, elapsed / budget)
        if progress >= 1.0:
            break
        # Fresh pages: four per step while the pool fills, then one every other step
        # (each page still gives ~16 random crops; drawing pages is the CPU's other job).
        for _ in range(4 if len(pool) < 8 else (step + 1) % 2):
            sample = next(stream)
            pages += 1
            if len(pool) < pool_size:
                pool.append(sample)
            else:
                pool[rng.randrange(pool_size)] = sample
        crops = [_crop(rng, pool[rng.randrange(len(pool))], ch, cw) for _ in range(batch)]
        x = torch.from_numpy(np.stack([c[0] for c in crops]).astype(np.float32) / 255.0)
        x = x[:, None].expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(np.stack([c[1] for c in crops]).astype(np.float32))[:, None]
        hard = torch.from_numpy(np.stack([c[2] for c in crops]).astype(np.float32))[:, None]
        weight = edge_weight * (1.0 + HARD_WEIGHT * hard)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        loss = _loss(model(x), y, weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 50 == 0 or step == 1:
            print(f"step {step:5d}  loss {avg:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"pages {pages}  {time.monotonic() - start:6.0f}s", flush=True)
    train_s = time.monotonic() - start
    del stream

    model = model.to(memory_format=torch.contiguous_format).eval()
    # Held-out *training-range* seeds: the evaluation range stays unseen by every choice.
    results = evaluate(model, range(VALID_SEED_START, VALID_SEED_START + valid_pages))
    summary = summarise(results)
    print(f"held-out check ({valid_pages} pages, seeds {VALID_SEED_START}+): "
          f"exact {summary.get('exact_all', 0):.1%}", flush=True)
    trained = {"seed": seed, "steps": step, "pages": pages, "seconds": round(train_s, 1),
               "batch": batch, "crop": [ch, cw], "lr": lr, "final_loss": round(float(avg or 0), 5),
               "train_seeds": f"[0, {TRAIN_SEEDS})", "eval_seeds": f">= {EVAL_SEED_START}",
               "valid_exact": round(summary.get("exact_all", 0.0), 4),
               "torch": str(torch.__version__), "command": command}
    save(model, out, trained)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) after {step} steps, "
          f"{train_s / 60:.1f} min", flush=True)
    return trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=9000)
    parser.add_argument("--minutes", type=float, default=40.0,
                        help="wall-clock cap; the learning rate anneals by whichever of "
                             "steps and minutes runs out first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=str, default="256x512", help="HxW, multiples of 32")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="only evaluate --out on N unseen pages (seeds ≥ 1000000)")
    args = parser.parse_args(argv)
    problem = missing_fonts()
    if problem:
        print(f"Error: {problem}", file=sys.stderr)
        return 1
    if args.eval:
        run_evaluation(args.out, args.eval, threads=args.threads)
        return 0
    ch, cw = (int(v) for v in args.crop.lower().split("x"))
    if ch % 32 or cw % 32:
        parser.error("--crop sides must be multiples of 32")
    command = "python -m bec.tools.train_ldv1 " + " ".join(argv if argv is not None else sys.argv[1:])
    train(args.out, args.seed, args.steps, args.minutes, args.batch, (ch, cw), args.lr,
          args.threads, command=command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
