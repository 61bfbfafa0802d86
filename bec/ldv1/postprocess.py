"""ldv1 output side: line mask → ordered line contours and boxes in original pixels.

The model gives a per-pixel line probability on the analysed *frame* (the page scaled
by :func:`bec.ldv1.preprocess.frame_size`, and – on a second pass – rotated by the skew
the first pass measured). Users want lines in the pixels of the image they own, so
every coordinate leaves this module mapped back through that rotation and scaling.

Conventions (one place, tested both ways):

* Pixel ``i`` covers the continuous interval ``[i, i+1)``; its centre is ``i + 0.5``.
  Scaling maps continuous coordinates by ``original / frame``, so a frame pixel maps to
  the block of original pixels it was resampled from (cv2.resize uses the same
  half-pixel alignment).
* Skew angles are in degrees, **positive when the text lines rise to the right**
  (counter-clockwise on screen) – the sign cv2.getRotationMatrix2D uses. A page
  measured at ``+a`` is straightened by rotating it by ``-a`` (:func:`rotate_frame`).

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

MIN_WIDTH_FRAC = 0.02
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
    """The lines of one page, top to bottom.

    ``contours`` and ``boxes`` are in original-image pixels; ``frame_contours`` are the
    same (simplified) contours in the analysed frame's pixels (the rotated frame on a
    second pass), for consumers that store frame coordinates.
    """

    contours: list[np.ndarray]  # each K×2 int32 (x, y), original pixels
    boxes: np.ndarray  # L×4 int32 (x, y, w, h), original pixels
    angle: float  # skew measured on this mask, degrees (0 when below MIN_SKEW)
    rotation: float = 0.0  # rotation already applied to the frame before inference
    frame_size: tuple[int, int] = (0, 0)  # (w, h) of the analysed frame
    original_size: tuple[int, int] = (0, 0)  # (w, h) of the original image
    frame_contours: list[np.ndarray] = field(default_factory=list)  # K×2 int32, frame px

    @property
    def count(self) -> int:
        return len(self.contours)


# --------------------------------------------------------------------------- geometry


def rotation_matrix(frame_size: tuple[int, int], angle: float) -> np.ndarray:
    """2×3 affine that :func:`rotate_frame` applies: frame pixel → rotated-frame pixel.

    The centre is ``((w−1)/2, (h−1)/2)`` in pixel indices, i.e. the exact middle of
    the image, so a round trip does not drift by half a pixel.
    """
    w, h = frame_size
    return cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), -float(angle), 1.0)


def rotate_frame(gray: np.ndarray, angle: float) -> np.ndarray:
    """Rotate a grayscale frame by ``-angle`` about its centre so skewed text becomes
    horizontal; same size, uncovered corners white (paper, not ink)."""
    if angle == 0:
        return gray
    h, w = gray.shape[:2]
    return cv2.warpAffine(
        gray,
        rotation_matrix((w, h), angle),
        (w, h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=255,
    )


def _apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def rotate_points(points: np.ndarray, frame_size: tuple[int, int], angle: float) -> np.ndarray:
    """Where frame pixels land in the frame rotated by :func:`rotate_frame` (K×2 float)."""
    return _apply_affine(rotation_matrix(frame_size, angle), points)


def unrotate_points(points: np.ndarray, frame_size: tuple[int, int], angle: float) -> np.ndarray:
    """Inverse of :func:`rotate_points`: rotated-frame pixels → unrotated frame pixels."""
    inverse = cv2.invertAffineTransform(rotation_matrix(frame_size, angle))
    return _apply_affine(inverse, points)


def frame_to_original(
    points: np.ndarray,
    frame_size: tuple[int, int],
    original_size: tuple[int, int],
    rotation: float = 0.0,
) -> np.ndarray:
    """Map pixel positions of the analysed frame (rotated by ``rotation`` if non-zero)
    to original-image pixel positions (K×2 float, pixel-centre convention)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if rotation:
        pts = unrotate_points(pts, frame_size, rotation)
    scale = np.array(original_size, dtype=np.float64) / np.array(frame_size, dtype=np.float64)
    return (pts + 0.5) * scale - 0.5


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


def needs_second_pass(angle: float) -> bool:
    """A page skewed by ``SECOND_PASS_SKEW`` or more is rotated and inferred again:
    the model was trained on straight lines and merges or breaks tilted ones."""
    return abs(angle) >= SECOND_PASS_SKEW


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


def find_lines(
    mask: np.ndarray,
    original_size: tuple[int, int],
    rotation: float = 0.0,
    *,
    min_width_frac: float = MIN_WIDTH_FRAC,
    min_area_frac: float = MIN_AREA_FRAC,
    simplify_epsilon: float | None = SIMPLIFY_EPSILON,
) -> PageLines:
    """Turn a frame's line mask into ordered lines in original-image pixels.

    ``mask`` is the H×W (bool/uint8, non-zero = line) mask of the analysed frame; that
    frame is the original of ``original_size`` (w, h) scaled to the mask's size and,
    when ``rotation`` is non-zero, rotated by :func:`rotate_frame` with that angle.
    """
    fh, fw = mask.shape
    frame = (fw, fh)
    found, _ = cv2.findContours(_as_uint8(mask), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)

    # Specks: the cheap bounding-box test first, the area only for the survivors.
    min_width = max(MIN_WIDTH_PX, min_width_frac * fw)
    min_area = max(MIN_AREA_PX, min_area_frac * fw * fh)
    kept = [c for c in found if cv2.boundingRect(c)[2] >= min_width]
    kept = [c for c in kept if cv2.contourArea(c) >= min_area]

    rects = [cv2.minAreaRect(c) for c in kept]
    angle = skew_from_rects(rects)

    # Top to bottom along the page's own vertical: on a skewed page a short line at
    # one end can sit higher in the image than the line above it, so sort by the
    # centre projected onto the normal of the measured skew (y + x·tan θ).
    if rects:
        centres = np.array([r[0] for r in rects], dtype=np.float64)
        key = centres[:, 1] + centres[:, 0] * math.tan(math.radians(angle))
        order = np.argsort(key, kind="stable")
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
        # [p·s, (p+1)·s) in the original, so the box edges are exact when unrotated.
        full = c.reshape(-1, 2).astype(np.float64)
        if rotation:
            full = unrotate_points(full, frame, rotation)
        lo = np.floor(np.round(full.min(axis=0) * scale, 6))
        hi = np.ceil(np.round((full.max(axis=0) + 1.0) * scale, 6))
        lo = np.clip(lo, 0, original_size)
        hi = np.clip(hi, 0, original_size)
        boxes[i] = (lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])

        simple = cv2.approxPolyDP(c, simplify_epsilon, True) if simplify_epsilon else c
        simple = simple.reshape(-1, 2)
        frame_contours.append(simple.astype(np.int32))
        mapped = frame_to_original(simple, frame, original_size, rotation)
        mapped = np.clip(np.floor(mapped + 0.5), 0, upper).astype(np.int32)
        contours.append(_drop_repeats(mapped))

    return PageLines(
        contours=contours,
        boxes=boxes,
        angle=angle,
        rotation=float(rotation),
        frame_size=frame,
        original_size=(int(orig_w), int(orig_h)),
        frame_contours=frame_contours,
    )
