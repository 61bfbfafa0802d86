"""Bent lines: how bent a page is, and the thin-plate spline control points that straighten it.

Photographed folios and books bend: a line that is straight on the page rises and falls
across the photograph. The archive measured it this way, and BEC keeps the measure so its
verdicts mean the same: on each line, five vertical slices, each ``SLICE_WIDTH`` frame pixels
wide, at the start, ¼, ½, ¾ and the end of its bounding box give the centre y of the line's
band; a line is *bent* when the largest difference between those centres exceeds the band's
mean thickness.

Where the archive then took the five centres of a single line (the bent line whose bend is
closest to the mean), BEC takes every long, regular line as control points, each centre
mapped to its own line's mean height. One line straightens only its neighbourhood; the
lines near the top and bottom of a page bend differently from the middle one, and with
points on every line they straighten too. The four image corners stay fixed.

Robustness, because a spline through a wrong point makes a fold:

* only lines at least ``MIN_LINE_SHARE`` of the longest line are measured (short fragments
  give noisy centres), and only slices holding ink;
* a line whose band thickness varies more than ``MAX_THICKNESS_SPREAD`` between slices is
  not measured: that is two lines run together, or a line and a caption, not a bend;
* a page is dewarped when at least ``MIN_BENT_SHARE`` of its measured lines are bent (one
  odd line is not a bent page), and control points closer than half a band to one already
  taken are dropped (two near points with different targets make the spline swing).

Everything here is in the frame the caller gives (the first pass's mask, already rotated
when the page is to be rotated); :mod:`bec.ldv1.postprocess` maps the points to the
original-image pixels that the Parquet stores.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

SLICE_WIDTH = 40
SLICES = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_LINE_SHARE = 0.3
MAX_THICKNESS_SPREAD = 1.8
MIN_BENT_SHARE = 1 / 3
#: At most this many lines give control points (evenly spread), so the spline stays small.
MAX_CONTROL_LINES = 30


@dataclass(frozen=True)
class LineBend:
    """One measured line: slice centres (x, y) in frame pixels and its band thickness."""

    xs: np.ndarray
    ys: np.ndarray
    thickness: float

    @property
    def bend(self) -> float:
        return float(self.ys.max() - self.ys.min())

    @property
    def bent(self) -> bool:
        return self.bend > self.thickness


def measure_line(mask: np.ndarray, contour: np.ndarray) -> LineBend | None:
    """The five slice centres of one line's band (None when it cannot be measured)."""
    x, y, w, h = cv2.boundingRect(contour)
    if w < len(SLICES) * SLICE_WIDTH:
        return None
    band = np.zeros((h, w), np.uint8)
    cv2.drawContours(band, [contour], -1, 1, thickness=cv2.FILLED, offset=(-x, -y))
    band &= (mask[y:y + h, x:x + w] > 0).astype(np.uint8)
    rows = np.arange(h, dtype=np.float64)
    xs, ys, thick = [], [], []
    for share in SLICES:
        start = int(round(share * (w - SLICE_WIDTH)))
        cut = band[:, start:start + SLICE_WIDTH]
        per_row = cut.sum(axis=1, dtype=np.float64)
        total = per_row.sum()
        if total < SLICE_WIDTH:            # less than one row's worth of ink: a gap
            continue
        xs.append(x + start + SLICE_WIDTH / 2 - 0.5)
        ys.append(y + float(per_row @ rows) / total)
        thick.append(total / SLICE_WIDTH)
    if len(xs) < 3:
        return None
    thick_arr = np.array(thick)
    if thick_arr.max() > MAX_THICKNESS_SPREAD * max(thick_arr.min(), 1.0):
        return None
    return LineBend(np.array(xs), np.array(ys), float(thick_arr.mean()))


def measure_page(mask: np.ndarray, contours: list[np.ndarray]) -> list[LineBend]:
    """Measure every long line of a page."""
    if not contours:
        return []
    widths = np.array([cv2.boundingRect(c)[2] for c in contours])
    longest = widths.max()
    return [m for c, w in zip(contours, widths) if w >= MIN_LINE_SHARE * longest
            for m in [measure_line(mask, c)] if m is not None]


def is_bent(lines: list[LineBend]) -> bool:
    """The page verdict: enough of its measured lines are bent."""
    if not lines:
        return False
    bent = sum(line.bent for line in lines)
    return bent >= 1 and bent >= MIN_BENT_SHARE * len(lines)


def control_points(lines: list[LineBend]) -> np.ndarray:
    """N×4 ``[in_y, in_x, out_y, out_x]`` in frame pixels: every measured line's centres, each
    mapped to its line's mean height (the caller adds the fixed image corners)."""
    if len(lines) > MAX_CONTROL_LINES:
        keep = np.linspace(0, len(lines) - 1, MAX_CONTROL_LINES).round().astype(int)
        lines = [lines[i] for i in keep]
    min_gap = 0.5 * float(np.median([line.thickness for line in lines]))
    taken: list[tuple[float, float, float, float]] = []
    for line in sorted(lines, key=lambda item: -item.bend):
        target = float(line.ys.mean())
        for x, y in zip(line.xs, line.ys):
            if all(abs(x - tx) >= min_gap or abs(y - ty) >= min_gap for ty, tx, _, _ in taken):
                taken.append((float(y), float(x), target, float(x)))
    return np.array(taken, dtype=np.float64).reshape(-1, 4)
