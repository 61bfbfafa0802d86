"""ldv1 input side: frame size, adaptive threshold, tiling and stitching.

The production line model was trained on pages prepared in one exact way (DESIGN §7):
grayscale frame → adaptive Gaussian threshold (block 31, C 15) → /255 → 512×512 tiles
padded with white. Any drift here (another blur kernel, black padding, another frame
size) silently changes what the model sees, so each step is pinned down in one place
and shared by the fetch processes (numpy/cv2, on CPU) and the inference process (torch,
in ``preprocess_torch``, kept apart so that only the inference process loads torch;
possibly on the GPU, where the threshold and the tiling can run on the device).

Everything is vectorised: tiling is a reshape/transpose, the torch blur is a handful of
whole-image multiply-adds; nothing loops over pixels in Python.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

TILE = 512
MAX_WIDTH = 4096
MAX_HEIGHT = 2048
#: A page wider than this many heights is a pecha: one long strip of text lines.
WIDE_RATIO = 2.5
BLOCK_SIZE = 31
C = 15


def _round_half_up(value: float) -> int:
    # Python's round() is banker's rounding; sizes are rounded the conventional way so
    # that e.g. 1000.5 px → 1001 on every platform and in every caller.
    return int(math.floor(value + 0.5))


def frame_size(
    width: int,
    height: int,
    tile: int = TILE,
    max_width: int = MAX_WIDTH,
    max_height: int = MAX_HEIGHT,
) -> tuple[int, int]:
    """Return the (width, height) of the analysed frame for a page of ``width × height``.

    * Wide pecha pages (``width > 2.5 × height``) are scaled – up or down – to a height
      of exactly one tile row, width proportional: the model then sees each page as one
      row of tiles, at the text scale it was trained on, and no tile is mostly padding.
      Their width is not capped (a 1:8 page gives an 8-tile strip).
    * Other pages fit within ``max_width × max_height`` keeping their aspect ratio, and
      are never upscaled (upscaling invents no detail and only costs tiles).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"page size must be positive, got {width}×{height}")
    if width > WIDE_RATIO * height:
        return max(1, _round_half_up(width * tile / height)), tile
    scale = min(1.0, max_width / width, max_height / height)
    if scale >= 1.0:
        return width, height
    fw = min(max_width, max(1, _round_half_up(width * scale)))
    fh = min(max_height, max(1, _round_half_up(height * scale)))
    return fw, fh


# --------------------------------------------------------------------------- threshold


def adaptive_threshold(gray: np.ndarray) -> np.ndarray:
    """Binarise a uint8 H×W grayscale frame exactly as the model's training data was."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a uint8 H×W image, got {gray.dtype} {gray.shape}")
    return cv2.adaptiveThreshold(
        gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, BLOCK_SIZE, C
    )


def gaussian_kernel(ksize: int = BLOCK_SIZE) -> np.ndarray:
    """The float32 1-D kernel ``cv2.getGaussianKernel(ksize, 0, CV_32F)`` returns.

    cv2 derives sigma from the size (``0.3·((k−1)·0.5 − 1) + 0.8`` = 5.0 for 31),
    computes the taps in double, rounds them to float32, sums the float32 taps and
    normalises; doing the same keeps the torch blur within float rounding of cv2's.
    """
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) * 0.5
    taps = np.exp(-0.5 / sigma**2 * x * x).astype(np.float32)
    total = taps.astype(np.float64).sum()
    return (taps.astype(np.float64) / total).astype(np.float32)


# --------------------------------------------------------------------------- tiling


def tile_count(frame_h: int, frame_w: int, tile: int = TILE) -> tuple[int, int]:
    """(rows, cols) of tiles covering a frame, the last row/column partly padding."""
    return -(-frame_h // tile), -(-frame_w // tile)


def _white(dtype: np.dtype) -> float | int:
    # White is 255 in uint8 frames and 1.0 once scaled to [0, 1]: padding must read as
    # paper, never as ink, or the model finds lines along the frame edge.
    return 1.0 if np.issubdtype(dtype, np.floating) else 255


def tile_frame(binary: np.ndarray, tile: int = TILE) -> np.ndarray:
    """Cut an H×W frame into N×tile×tile tiles, row-major, padded with white.

    Works for any dtype (uint8 pads with 255, floats with 1.0); returns a new
    contiguous array so tiles can be copied straight into shared memory or a batch.
    """
    h, w = binary.shape
    rows, cols = tile_count(h, w, tile)
    padded = np.full((rows * tile, cols * tile), _white(binary.dtype), dtype=binary.dtype)
    padded[:h, :w] = binary
    return np.ascontiguousarray(
        padded.reshape(rows, tile, cols, tile).transpose(0, 2, 1, 3).reshape(rows * cols, tile, tile)
    )


def stitch(tiles: np.ndarray, rows: int, cols: int, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`tile_frame`: N×t×t tiles (row-major) → height×width, padding cropped."""
    return stitch_into(tiles, rows, cols, np.empty((height, width), dtype=tiles.dtype))


def stitch_into(tiles: np.ndarray, rows: int, cols: int, out: np.ndarray) -> np.ndarray:
    """:func:`stitch` written straight into ``out`` (height×width, e.g. a shared-memory slot):
    each tile's visible part is copied once, with no padded intermediate."""
    n, t, t2 = tiles.shape
    height, width = out.shape
    if n != rows * cols or t != t2 or rows * t < height or cols * t < width:
        raise ValueError(f"{n} tiles of {t}×{t2} cannot form a {rows}×{cols} grid over {height}×{width}")
    for r in range(rows):
        y, h = r * t, min(t, height - r * t)
        for c in range(cols):
            x, w = c * t, min(t, width - c * t)
            out[y:y + h, x:x + w] = tiles[r * cols + c, :h, :w]
    return out


def adaptive_threshold_into(gray: np.ndarray, out: np.ndarray) -> None:
    """:func:`adaptive_threshold` written into ``out`` (e.g. a shared-memory slot), no copy."""
    cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY,
                          BLOCK_SIZE, C, dst=out)
