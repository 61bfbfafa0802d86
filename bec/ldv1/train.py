"""Train the small line model on generated pages, on CPU, in a few minutes.

``python -m bec.ldv1.train [--out PATH] [--seed N] [--steps N] [--minutes M]``
``python -m bec.ldv1.train --eval N [--out PATH]``  (score a checkpoint, no training)

Pages come from :mod:`bec.ldv1.synth`, half gray (half of those JPEG-compressed), half
fax-like bilevel. Each is taken through the same front half of the contract as at
inference (frame → adaptive threshold → /255) and the model learns the frame-sized line
mask from random crops, so it never sees anything the pipeline would not feed it.

Seeds: page ``i`` of a run with ``--seed s`` uses seed ``(s·100003 + i) mod 900000``;
seeds 900000–999999 are held out for the end-of-training check, and evaluation
(``--eval``, :mod:`bec.ldv1.evaluate`, the tests) uses seeds ≥ 1000000. No page the
model is scored on was ever trained on.

Generation runs in one DataLoader worker process, in parallel with the optimiser; the
main loop keeps a pool of recent frames and draws several crops from each, since a page
costs more to draw than one crop costs to learn from.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from bec.ldv1.evaluate import (DEFAULT_WEIGHTS, evaluate, run_evaluation, summarise)
from bec.ldv1.preprocess import adaptive_threshold, frame_size
from bec.ldv1.smallnet import ARCH_NAME, SmallLineNet
from bec.ldv1.synth import EVAL_SEED_START, encode_jpeg, generate_page

TRAIN_SEEDS = 900_000          # training page seeds are in [0, TRAIN_SEEDS)
VALID_SEED_START = 900_000     # held-out check at the end of training: [900000, 1000000)
ARCH_KWARGS: dict = {"widths": [16, 32, 48, 96], "dilations": [1, 2, 4, 8, 2, 1],
                     "wide_kernel": 9, "decoder_width": 24}


def page_seed(run_seed: int, index: int) -> int:
    """Seed of the ``index``-th training page of a run (always < ``TRAIN_SEEDS``)."""
    return (run_seed * 100_003 + index) % TRAIN_SEEDS


def training_sample(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(thresholded uint8 frame, uint8 frame-sized line mask, side reach) of one page."""
    rng = np.random.default_rng(seed)
    style = "bilevel" if rng.random() < 0.5 else "gray"
    page = generate_page(rng, style=style)
    gray = page.image
    if style == "gray" and rng.random() < 0.5:          # JPEG artefacts, as in archives
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
    return adaptive_threshold(gray), mask, side_reach(mask)


def side_reach(mask: np.ndarray) -> int:
    """How far a band is continued to a crop side: 1.5 × the page's band (glyph) height,
    just over the widest gap inside a line and well under the page margins."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n < 2:
        return 0
    thickness = stats[1:, cv2.CC_STAT_AREA] / np.maximum(stats[1:, cv2.CC_STAT_WIDTH], 1)
    return int(1.5 * float(np.median(thickness))) + 2


class _Pages(IterableDataset):
    """Endless stream of training samples for one run (one worker process)."""

    def __init__(self, run_seed: int) -> None:
        self.run_seed = run_seed

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        i = 0
        while True:
            yield training_sample(page_seed(self.run_seed, i))
            i += 1


def _as_is(sample: tuple[np.ndarray, np.ndarray, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep samples as numpy arrays (the default would turn them into tensors)."""
    return sample


def _crop(rng: random.Random, binary: np.ndarray, mask: np.ndarray, reach: int,
          ch: int, cw: int) -> tuple[np.ndarray, np.ndarray]:
    """Random ch×cw crop; frames smaller than that are padded white (as tiles are)."""
    h, w = binary.shape
    if h < ch or w < cw:
        ph, pw = max(h, ch), max(w, cw)
        b2 = np.full((ph, pw), 255, np.uint8)
        m2 = np.zeros((ph, pw), np.uint8)
        b2[:h, :w], m2[:h, :w] = binary, mask
        binary, mask, h, w = b2, m2, ph, pw
    y, x = rng.randint(0, h - ch), rng.randint(0, w - cw)
    b, m = binary[y:y + ch, x:x + cw], _extend_to_sides(mask[y:y + ch, x:x + cw], reach)
    if rng.random() < 0.5:                   # lines read the same mirrored left-right
        b, m = b[:, ::-1], m[:, ::-1]
    return b, m


def _extend_to_sides(mask: np.ndarray, reach: int) -> np.ndarray:
    """Copy of a crop's mask whose bands reaching within ``reach`` px of the left or
    right border are continued to that border (``reach``: :func:`side_reach`).

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
    bce = F.binary_cross_entropy_with_logits(logits, target, weight.expand_as(target))
    bce = bce * (weight.numel() / weight.sum())
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
          lr: float, threads: int, pool_size: int = 48, valid_pages: int = 24) -> dict:
    """Train from scratch until ``steps`` or ``minutes`` run out; save; return the record."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = random.Random(seed)
    # channels_last runs oneDNN's faster convolution kernels (≈1.6× per step on CPU).
    model = SmallLineNet(**ARCH_KWARGS).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    stream = iter(DataLoader(_Pages(seed), batch_size=None, num_workers=1, prefetch_factor=4,
                             collate_fn=_as_is))
    pool: list[tuple[np.ndarray, np.ndarray, int]] = []
    ch, cw = crop
    weight = _edge_weight(ch, cw)
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
        # Fresh pages: one per step, more while the pool is filling.
        for _ in range(1 if len(pool) >= 8 else 4):
            sample = next(stream)
            pages += 1
            if len(pool) < pool_size:
                pool.append(sample)
            else:
                pool[rng.randrange(pool_size)] = sample
        crops = [_crop(rng, *pool[rng.randrange(len(pool))], ch, cw) for _ in range(batch)]
        x = torch.from_numpy(np.stack([c[0] for c in crops]).astype(np.float32) / 255.0)
        x = x[:, None].expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(np.stack([c[1] for c in crops]).astype(np.float32))[:, None]
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
               "torch": str(torch.__version__)}
    save(model, out, trained)
    print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) after {step} steps, "
          f"{train_s / 60:.1f} min", flush=True)
    return trained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="wall-clock cap; the learning rate anneals by whichever of "
                             "steps and minutes runs out first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=str, default="256x512", help="HxW, multiples of 32")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval", type=int, default=0, metavar="N",
                        help="only evaluate --out on N unseen pages (seeds ≥ 1000000)")
    args = parser.parse_args(argv)
    if args.eval:
        run_evaluation(args.out, args.eval, threads=args.threads)
        return 0
    ch, cw = (int(v) for v in args.crop.lower().split("x"))
    if ch % 32 or cw % 32:
        parser.error("--crop sides must be multiples of 32")
    train(args.out, args.seed, args.steps, args.minutes, args.batch, (ch, cw), args.lr,
          args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
