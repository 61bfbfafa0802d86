"""The corrected page: the frame that ldv1's contours are in, as the archive's readers rebuild it.

The archive's readers (its OCR jobs, its Spark/Athena tables) take a row of the ldv1 Parquet
and rebuild the page its contours belong to from the original image:

1. rotate the original by ``rotation_angle`` degrees about ``(w/2, h/2)`` with
   ``cv2.getRotationMatrix2D``, same size, bilinear (skipped when the angle is null);
2. when ``tps_points`` is set, warp that rotated image with a thin-plate spline: output
   pixel ``(y, x)`` samples the rotated image at ``f(y, x)``, where ``f`` is
   ``tps.ThinPlateSpline(tps_alpha).fit(out_yx, in_yx)`` (PyPI ``thin-plate-spline``), bilinear.

:func:`corrected_page` is exactly that reader, kept here so the gallery, the tests and the
OCR job rebuild pages the same way. The worker never warps an original: it works on the
page's *frame* (the original scaled down for the model), so :func:`correct_frame` applies the
same correction to a frame, conjugated by the frame↔original scaling, and the second pass's
contours need only that scaling to land on the reader's corrected page.

Pixel convention: pixel ``i`` is centred on ``i`` (what ``cv2.warpAffine``,
``cv2.remap`` and ``scipy.ndimage.map_coordinates`` index by); a frame pixel ``p`` covers the
original's ``(p + 0.5)·s − 0.5`` with ``s = original / frame`` per axis (``cv2.resize``'s
half-pixel alignment).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: The thin-plate spline's smoothing, as the archive's readers default it.
DEFAULT_TPS_ALPHA = 0.5
#: The spline is evaluated on a grid of this many frame pixels and interpolated between:
#: a page's bend varies over hundreds of pixels, so the error is far below a pixel, and
#: evaluating every pixel would cost 256× more (9 ms → 2 ms on a 2139×512 frame here).
TPS_GRID_STEP = 16


@dataclass(frozen=True)
class Correction:
    """How a page was corrected before its final pass: the Parquet row's three columns.

    ``rotation_angle`` is in degrees, the angle given to ``cv2.getRotationMatrix2D`` (positive
    turns the content counter-clockwise as displayed); None when the page was not rotated.
    ``tps_points`` is N×4 ``[in_y, in_x, out_y, out_x]`` in original-image pixels (``in``: the
    rotated image, ``out``: the corrected page), four fixed image corners included; None when
    the page was not dewarped.
    """

    rotation_angle: float | None = None
    tps_points: np.ndarray | None = None
    tps_alpha: float | None = None

    @property
    def rotated(self) -> bool:
        return self.rotation_angle is not None

    @property
    def dewarped(self) -> bool:
        return self.tps_points is not None

    @property
    def identity(self) -> bool:
        return not self.rotated and not self.dewarped


NONE = Correction()


# --------------------------------------------------------------------------- the reader


def original_rotation(size: tuple[int, int], angle: float) -> np.ndarray:
    """The contract's 2×3 rotation of an original of ``size`` (w, h): original → rotated."""
    w, h = size
    return cv2.getRotationMatrix2D((w / 2.0, h / 2.0), float(angle), 1.0)


def fit_tps(points: np.ndarray, alpha: float):
    """The spline a reader fits: from corrected-page (out) points to rotated-image (in) points.

    Fitted in float64 whatever the stored type: the kernel ``r² log r`` reaches 1e7 on a page,
    and a float32 solve of that system loses pixels.
    """
    import tps  # the readers' package; imported here so a worker that never dewarps skips it

    pts = np.asarray(points, dtype=np.float64).reshape(-1, 4)
    return tps.ThinPlateSpline(float(alpha)).fit(pts[:, 2:4], pts[:, 0:2])


def corrected_page(image: np.ndarray, rotation_angle: float | None,
                   tps_points: np.ndarray | None, tps_alpha: float | None, *,
                   nearest: bool = False) -> np.ndarray:
    """Rebuild the corrected page from an original image (2-D gray or H×W×C), as readers do.

    ``nearest`` samples the nearest pixel instead of interpolating: for label images (which
    line each pixel belongs to), where a blend of two labels means nothing.
    """
    from scipy import ndimage

    out = np.asarray(image)
    h, w = out.shape[:2]
    order = 0 if nearest else 1
    if rotation_angle is not None:
        out = cv2.warpAffine(out, original_rotation((w, h), rotation_angle), (w, h),
                             flags=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    if tps_points is not None:
        spline = fit_tps(tps_points, DEFAULT_TPS_ALPHA if tps_alpha is None else tps_alpha)
        grid = np.indices((h, w), dtype=np.float64).reshape(2, -1).T      # (y, x) of every output pixel
        source = spline.transform(grid).T.reshape(2, h, w)
        if out.ndim == 2:
            out = ndimage.map_coordinates(out, source, order=order)
        else:
            out = np.stack([ndimage.map_coordinates(out[..., c], source, order=order)
                            for c in range(out.shape[2])], axis=-1)
    return out


# --------------------------------------------------------------------------- the frame


def frame_to_original_affine(frame_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """3×3: frame pixel → original pixel (per-axis scale with half-pixel alignment)."""
    sx = original_size[0] / frame_size[0]
    sy = original_size[1] / frame_size[1]
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def _h(m: np.ndarray) -> np.ndarray:
    return np.vstack([m, [0.0, 0.0, 1.0]])


def frame_rotation(frame_size: tuple[int, int], original_size: tuple[int, int], angle: float) -> np.ndarray:
    """2×3 rotation of a frame that matches the contract's rotation of its original."""
    a = frame_to_original_affine(frame_size, original_size)
    return (np.linalg.inv(a) @ _h(original_rotation(original_size, angle)) @ a)[:2]


def map_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2×3 or 3×3 affine to K×2 (x, y) points (float64 out)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ matrix[:2, :2].T + matrix[:2, 2]


def frame_sampling_map(correction: Correction, frame_size: tuple[int, int],
                       original_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` maps (x, y float32, frame-sized) from the corrected frame into the
    *unrotated* frame: rotation and spline in one resampling."""
    fw, fh = frame_size
    a = frame_to_original_affine(frame_size, original_size)
    a_inv = np.linalg.inv(a)
    step = TPS_GRID_STEP
    # Block centres, one block beyond the frame on every side: cv2.resize's half-pixel
    # bilinear upsampling then interpolates (never extrapolates) at every frame pixel, the
    # edges included (a map replicated at its border would shift the last pixels by up to
    # half a block: the map grows one pixel per pixel).
    nx, ny = -(-fw // step) + 2, -(-fh // step) + 2
    gx = (np.arange(nx) - 0.5) * step - 0.5
    gy = (np.arange(ny) - 0.5) * step - 0.5
    xx, yy = np.meshgrid(gx, gy)
    q = np.stack([xx.ravel(), yy.ravel()], axis=1)                      # corrected frame (x, y)
    p = map_points(q, a)                                                # corrected page, original px
    if correction.dewarped:
        spline = fit_tps(correction.tps_points, correction.tps_alpha or DEFAULT_TPS_ALPHA)
        p = spline.transform(p[:, ::-1])[:, ::-1]                       # rotated image, original px
    if correction.rotated:
        p = map_points(p, cv2.invertAffineTransform(original_rotation(original_size, correction.rotation_angle)))
    src = map_points(p, a_inv)                                          # unrotated frame px
    full = (nx * step, ny * step)
    map_x = cv2.resize(src[:, 0].reshape(ny, nx).astype(np.float32), full,
                       interpolation=cv2.INTER_LINEAR)[step:step + fh, step:step + fw]
    map_y = cv2.resize(src[:, 1].reshape(ny, nx).astype(np.float32), full,
                       interpolation=cv2.INTER_LINEAR)[step:step + fh, step:step + fw]
    return np.ascontiguousarray(map_x), np.ascontiguousarray(map_y)


def correct_frame(frame: np.ndarray, correction: Correction, original_size: tuple[int, int],
                  fill: int = 255, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """The frame of the corrected page: ``frame`` (the original scaled) rotated and dewarped
    like its original; uncovered pixels get ``fill`` (white paper, not ink)."""
    if correction.identity:
        return frame
    h, w = frame.shape[:2]
    if not correction.dewarped:
        return cv2.warpAffine(frame, frame_rotation((w, h), original_size, correction.rotation_angle),
                              (w, h), flags=interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    map_x, map_y = frame_sampling_map(correction, (w, h), original_size)
    return cv2.remap(frame, map_x, map_y, interpolation, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
