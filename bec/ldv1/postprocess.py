"""ldv1 output side: line mask → the page's correction, then ordered lines on the corrected page.

The model gives a per-pixel line probability on the analysed *frame* (the page scaled by
:func:`bec.ldv1.preprocess.frame_size`). A page takes one or two passes:

1. The first pass's mask gives the page's skew and, on the page straightened by it, how bent
   its lines are (:mod:`bec.ldv1.dewarp`). :func:`plan_correction` decides: a page skewed by
   ``SECOND_PASS_SKEW`` or more is rotated, a bent page is rotated by its skew (if any) and
   dewarped by a thin-plate spline, anything else is final as it is.
2. A corrected page goes through the model again on the corrected frame
   (:func:`bec.ldv1.correction.correct_frame`); its contours come from that pass.

Coordinates leave this module on the **corrected page** at the original image's scale: the
page that the archive's readers rebuild from the original and the row's ``rotation_angle``,
``tps_points`` and ``tps_alpha`` (:mod:`bec.ldv1.correction`). A page that was not
corrected *is* its original. Contours are then grouped into text lines
(:mod:`bec.ldv1.linegroups`): ``line_index`` per contour, ordered top to bottom.

Conventions (one place, tested both ways):

* Pixel ``i`` covers the continuous interval ``[i, i+1)``; its centre is ``i + 0.5``.
  Scaling maps continuous coordinates by ``original / frame``, so a frame pixel maps to
  the block of original pixels it was resampled from (cv2.resize uses the same
  half-pixel alignment).
* Skew angles are in degrees, **positive when the text lines rise to the right**
  (counter-clockwise on screen). A page measured at ``+a`` is straightened by the contract's
  rotation ``rotation_angle = -a`` (``cv2.getRotationMatrix2D`` turns content
  counter-clockwise for positive angles).

Speck rules (module constants, overridable per call): a contour is kept only if its
bounding-box width is at least 2 % of the frame width (≥ 4 px) and its polygon area at
least 0.01 % of the frame area (≥ 16 px²). Real lines are long horizontal bands: on a
4096×512 pecha frame that means ≥ 82 px wide (about two syllables) and ≥ 210 px²;
isolated dots, stray marks and vertical border streaks fall below one of the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from bec.ldv1 import dewarp
from bec.ldv1.correction import (DEFAULT_TPS_ALPHA, NONE, Correction, frame_rotation,
                                 frame_to_original_affine, map_points)
from bec.ldv1.linegroups import Gutter, column_gutters, group_lines, marginal_lines, row_links

MIN_WIDTH_FRAC = 0.02
#: Width in frame pixels of the cut across a band that bridges a column gutter.
BRIDGE_CUT = 3
MIN_WIDTH_PX = 4
MIN_AREA_FRAC = 1e-4
MIN_AREA_PX = 16.0

#: The skew is clamped to ±MAX_SKEW: beyond it the estimate is more likely wrong than
#: the page, and one corrective rotation of 5° leaves any remainder for a later look.
MAX_SKEW = 5.0
#: Below this the page counts as straight (the estimate's own noise is about this).
MIN_SKEW = 0.3
#: From this skew on, a page is rotated and inferred again (DESIGN §7).
SECOND_PASS_SKEW = 3.0
#: Contours tilted more than this are not text lines at a correctable skew
#: (vertical streaks, page borders): they take no part in the estimate.
SKEW_WINDOW = 2 * MAX_SKEW
#: Contours this far (degrees) from the length-weighted median are outliers.
SKEW_TRIM = 1.0
#: Only elongated rectangles carry a direction; a squarish blob's angle is noise.
MIN_ELONGATION = 2.0
#: approxPolyDP tolerance in frame pixels: removes staircase points, keeps the shape.
SIMPLIFY_EPSILON = 1.0


@dataclass
class PageLines:
    """The lines of one page, in line order (top to bottom, each line left to right).

    ``contours`` and ``boxes`` are on the corrected page at the original image's scale
    (the original itself when ``correction`` is the identity); ``frame_contours`` are the
    same (simplified) contours in the analysed frame's pixels.
    """

    contours: list[np.ndarray]  # each K×2 int32 (x, y)
    boxes: np.ndarray  # L×4 int32 (x, y, w, h)
    angle: float  # skew measured on this mask, degrees (0 when below MIN_SKEW)
    correction: Correction = NONE  # applied to the frame before this mask's pass
    frame_size: tuple[int, int] = (0, 0)  # (w, h) of the analysed frame
    original_size: tuple[int, int] = (0, 0)  # (w, h) of the original image
    frame_contours: list[np.ndarray] = field(default_factory=list)  # K×2 int32, frame px
    line_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))

    @property
    def count(self) -> int:
        return len(self.contours)

    @property
    def nb_lines(self) -> int:
        return int(self.line_index.max()) + 1 if len(self.line_index) else 0


# --------------------------------------------------------------------------- geometry


def frame_to_original(points: np.ndarray, frame_size: tuple[int, int],
                      original_size: tuple[int, int]) -> np.ndarray:
    """Map frame pixel positions to original-scale pixel positions (K×2 float,
    pixel-centre convention). The frame may be corrected: the corrected page has the
    original's size, so the same scaling holds."""
    return map_points(points, frame_to_original_affine(frame_size, original_size))


# --------------------------------------------------------------------------- skew


def _rect_skews(rects: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(skew°, long side, short side) per cv2.minAreaRect result, vectorised.

    cv2's ``angle`` is the image-space direction (y down) of the rectangle's *width*
    side, whatever range a given cv2 version reports it in; the long side's direction
    is that or that + 90°. Negating turns y-down angles into "rising to the right is
    positive"; the result is folded into [−90, 90) so a horizontal line is 0.
    """
    if not rects:
        empty = np.zeros(0)
        return empty, empty, empty
    arr = np.array([(r[1][0], r[1][1], r[2]) for r in rects], dtype=np.float64)
    rw, rh, a = arr[:, 0], arr[:, 1], arr[:, 2]
    direction = np.where(rw >= rh, a, a + 90.0)
    skew = np.mod(-direction + 90.0, 180.0) - 90.0
    return skew, np.maximum(rw, rh), np.minimum(rw, rh)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def skew_from_rects(rects: list[tuple]) -> float:
    """Robust page skew from the lines' minimum-area rectangles.

    Only elongated rectangles (long ≥ 2 × short) tilted at most ``SKEW_WINDOW`` take
    part; the length-weighted median picks the dominant direction, rectangles more
    than ``SKEW_TRIM`` from it are dropped, and the rest are averaged weighted by
    length (long lines give precise angles, short ones noisy). The result is clamped
    to ±``MAX_SKEW`` and reported as 0 below ``MIN_SKEW``.
    """
    skew, long_side, short_side = _rect_skews(rects)
    keep = (long_side >= MIN_ELONGATION * np.maximum(short_side, 1.0)) & (np.abs(skew) <= SKEW_WINDOW)
    if not keep.any():
        return 0.0
    skew, weight = skew[keep], long_side[keep]
    median = _weighted_median(skew, weight)
    near = np.abs(skew - median) <= SKEW_TRIM
    angle = float(np.average(skew[near], weights=weight[near]))
    angle = max(-MAX_SKEW, min(MAX_SKEW, angle))
    return 0.0 if abs(angle) < MIN_SKEW else angle


def estimate_skew(contours: list[np.ndarray]) -> float:
    """Page skew in degrees (rising to the right positive) from line contours."""
    return skew_from_rects([cv2.minAreaRect(_as_cv_contour(c)) for c in contours])


# --------------------------------------------------------------------------- lines


def _as_cv_contour(contour: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(contour).reshape(-1, 1, 2), dtype=np.int32)


def _drop_repeats(points: np.ndarray) -> np.ndarray:
    """Remove consecutive duplicate points (rounding can create them when upscaling)."""
    if len(points) < 2:
        return points
    changed = np.any(points != np.roll(points, 1, axis=0), axis=1)
    return points[changed] if changed.any() else points[:1]


def _as_uint8(mask: np.ndarray) -> np.ndarray:
    """The mask as findContours takes it (uint8, non-zero = line) without a copy where it
    already is one: the inference process writes 0/1 uint8 masks, and two passes over a
    page-sized mask (compare, convert) cost more than finding the few lines in it.
    (findContours has not modified its input since OpenCV 3.2.)"""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        mask = mask.view(np.uint8)
    if mask.dtype != np.uint8:
        mask = (mask > 0).astype(np.uint8)
    return np.ascontiguousarray(mask)


def _kept_contours(mask: np.ndarray, min_width_frac: float, min_area_frac: float) -> list[np.ndarray]:
    """External contours of the mask, specks dropped (the cheap box test first)."""
    fh, fw = mask.shape
    found, _ = cv2.findContours(_as_uint8(mask), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    min_width = max(MIN_WIDTH_PX, min_width_frac * fw)
    min_area = max(MIN_AREA_PX, min_area_frac * fw * fh)
    kept = [c for c in found if cv2.boundingRect(c)[2] >= min_width]
    return [c for c in kept if cv2.contourArea(c) >= min_area]


def _straightened_boxes(contours: list[np.ndarray], angle: float) -> np.ndarray:
    """(x0, y0, x1, y1) of each contour on the page's own axes: y measured along the normal
    of the skew (y + x·tan θ), so a slightly skewed page groups and orders like a straight one."""
    slope = math.tan(math.radians(angle))
    boxes = np.zeros((len(contours), 4))
    for i, c in enumerate(contours):
        pts = c.reshape(-1, 2).astype(np.float64)
        y = pts[:, 1] + pts[:, 0] * slope
        boxes[i] = (pts[:, 0].min(), y.min(), pts[:, 0].max() + 1.0, y.max() + 1.0)
    return boxes


def _cut_bridges(mask: np.ndarray, contours: list[np.ndarray], boxes: np.ndarray,
                 gutters: list[Gutter]) -> np.ndarray | None:
    """The mask with each band that runs across a column gutter cut there (a copy), or None
    when no band does. The cut is a clear strip ``BRIDGE_CUT`` pixels wide over that band's
    rows only: the other rows are split at the gutter already."""
    cut = None
    for contour, (x0, y0, x1, y1) in zip(contours, boxes):
        for g in gutters:
            if g.splits(x0 + BRIDGE_CUT, x1 - BRIDGE_CUT, (y0 + y1) / 2):
                if cut is None:
                    cut = _as_uint8(mask).copy()
                _, top, _, h = cv2.boundingRect(contour)
                a = int(round(g.x)) - BRIDGE_CUT // 2
                cut[top:top + h, max(a, 0):a + BRIDGE_CUT] = 0
    return cut


def find_lines(
    mask: np.ndarray,
    original_size: tuple[int, int],
    correction: Correction = NONE,
    *,
    min_width_frac: float = MIN_WIDTH_FRAC,
    min_area_frac: float = MIN_AREA_FRAC,
    simplify_epsilon: float | None = SIMPLIFY_EPSILON,
) -> PageLines:
    """Turn a frame's line mask into ordered, grouped lines on the corrected page.

    ``mask`` is the H×W (bool/uint8, non-zero = line) mask of the analysed frame; that
    frame is the original of ``original_size`` (w, h) scaled to the mask's size and, when
    ``correction`` is not the identity, corrected like the page (:func:`correct_frame`).
    """
    fh, fw = mask.shape
    frame = (fw, fh)
    kept = _kept_contours(mask, min_width_frac, min_area_frac)
    angle = skew_from_rects([cv2.minAreaRect(c) for c in kept])
    straight = _straightened_boxes(kept, angle)
    links = row_links(straight, frame)
    gutters = column_gutters(straight, frame, links)
    if gutters:  # cut what bridges them; the pieces, and every gap over a gutter, link anew
        cut = _cut_bridges(mask, kept, straight, gutters)
        if cut is not None:
            kept = _kept_contours(cut, min_width_frac, min_area_frac)
            straight = _straightened_boxes(kept, angle)
        links = None
    order, line_index = group_lines(straight, frame, gutters, links)
    marks = marginal_lines(straight[order], line_index, frame)
    if marks.any():  # marks outside the text block are no lines: drop them, renumber the rest
        keep = ~marks[line_index]
        order, line_index = order[keep], line_index[keep]
        line_index = (np.cumsum(~marks) - 1)[line_index].astype(np.int16)
    kept = [kept[i] for i in order]

    orig_w, orig_h = original_size
    scale = np.array(original_size, dtype=np.float64) / np.array(frame, dtype=np.float64)
    upper = np.array([orig_w - 1, orig_h - 1])
    contours: list[np.ndarray] = []
    frame_contours: list[np.ndarray] = []
    boxes = np.zeros((len(kept), 4), dtype=np.int32)
    for i, c in enumerate(kept):  # loop over lines (tens per page), not pixels
        # Box from the full contour (simplification may shave an extreme point): each
        # frame pixel p covers [p, p+1) in continuous frame coordinates, i.e.
        # [p·s, (p+1)·s) at the original's scale, so the box edges are exact.
        full = c.reshape(-1, 2).astype(np.float64)
        lo = np.floor(np.round(full.min(axis=0) * scale, 6))
        hi = np.ceil(np.round((full.max(axis=0) + 1.0) * scale, 6))
        lo = np.clip(lo, 0, original_size)
        hi = np.clip(hi, 0, original_size)
        boxes[i] = (lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])

        simple = cv2.approxPolyDP(c, simplify_epsilon, True) if simplify_epsilon else c
        simple = simple.reshape(-1, 2)
        frame_contours.append(simple.astype(np.int32))
        mapped = frame_to_original(simple, frame, original_size)
        mapped = np.clip(np.floor(mapped + 0.5), 0, upper).astype(np.int32)
        contours.append(_drop_repeats(mapped))

    return PageLines(
        contours=contours,
        boxes=boxes,
        angle=angle,
        correction=correction,
        frame_size=frame,
        original_size=(int(orig_w), int(orig_h)),
        frame_contours=frame_contours,
        line_index=line_index,
    )


# --------------------------------------------------------------------------- correction


def plan_correction(
    mask: np.ndarray,
    first: PageLines,
    *,
    second_pass_angle: float = SECOND_PASS_SKEW,
    dewarp_pages: bool = True,
    tps_alpha: float = DEFAULT_TPS_ALPHA,
) -> Correction:
    """What the first pass says to do with a page before its final pass.

    ``mask`` and ``first`` are the first pass's mask and lines. A bent page is rotated by
    its skew (when there is one: the pass is paid for anyway) and dewarped; a page skewed by
    ``second_pass_angle`` or more is rotated; anything else is final as it is (identity).
    Bend is measured on the page straightened by its skew: a skewed straight line would
    otherwise read as a bent one.
    """
    rotation = -first.angle if first.angle else None
    if dewarp_pages and first.count:
        points = _bend_points(mask, first, rotation)
        if points is not None:
            return Correction(rotation, points, float(tps_alpha))
    if rotation is not None and abs(first.angle) >= second_pass_angle:
        return Correction(rotation)
    return NONE


def _bend_points(mask: np.ndarray, first: PageLines, rotation: float | None) -> np.ndarray | None:
    """The page's control points in original pixels (corners included), or None when the
    page is not bent."""
    fh, fw = mask.shape
    frame, original = (fw, fh), first.original_size
    binary = _as_uint8(mask)
    if rotation is not None:
        binary = cv2.warpAffine(binary, frame_rotation(frame, original, rotation), frame,
                                flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        contours = _kept_contours(binary, MIN_WIDTH_FRAC, MIN_AREA_FRAC)
    else:
        contours = [c.reshape(-1, 1, 2) for c in first.frame_contours]
    lines = dewarp.measure_page(binary, contours)
    if not dewarp.is_bent(lines):
        return None
    points = dewarp.control_points(lines)                      # [in_y, in_x, out_y, out_x], frame px
    a = frame_to_original_affine(frame, original)
    ins = map_points(points[:, [1, 0]], a)[:, [1, 0]]
    outs = map_points(points[:, [3, 2]], a)[:, [1, 0]]
    w, h = original
    corners = np.array([[0.0, 0.0], [0.0, w - 1.0], [h - 1.0, 0.0], [h - 1.0, w - 1.0]])
    return np.vstack([np.hstack([ins, outs]), np.hstack([corners, corners])]).astype(np.float32)
