"""Torch twins of ``preprocess`` (threshold, tiling, stitching) for the inference process.

On a GPU the inference process thresholds and tiles pages on the device (one uint8 upload
per page). Kept in its own module so that the fetch and post-processing processes, which
use the numpy/cv2 versions, never pay for importing torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bec.ldv1.preprocess import BLOCK_SIZE, C, TILE, gaussian_kernel, tile_count


def _white(dtype: torch.dtype) -> float | int:
    return 1.0 if dtype.is_floating_point else 255


def _blur_axis(x: torch.Tensor, kernel: list[float], dim: int, size: int) -> torch.Tensor:
    """Symmetric 1-D filter along ``dim`` of an already replicate-padded tensor.

    Written as shifted multiply-adds rather than ``conv2d`` on purpose: cuDNN runs fp32
    convolutions in TF32 by default, whose ~10-bit mantissa moves the local mean by up
    to ~0.1 grey level and flips far more pixels than the 99.9 % agreement allows.
    Elementwise ops are exact fp32 on every device; pairing the symmetric taps halves
    the passes, and in-place accumulation into one buffer keeps memory traffic low
    (on CPU this is as fast as ``conv2d``). The taps are Python floats so the loop never
    waits on the device.
    """
    half = len(kernel) // 2
    out = x.narrow(dim, half, size) * kernel[half]
    pair = torch.empty_like(out)
    for i in range(half):  # loop over kernel taps, not pixels
        torch.add(x.narrow(dim, i, size), x.narrow(dim, 2 * half - i, size), out=pair)
        out.add_(pair, alpha=kernel[i])
    return out


def adaptive_threshold_torch(gray: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`adaptive_threshold` for uint8 H×W or N×H×W on any device.

    cv2 blurs the image as float32 with a 31-tap Gaussian (replicate border), converts
    the mean back to uint8 with round-half-to-even, and keeps a pixel white when
    ``src − mean > −C``. The same steps here agree with cv2 on all but a handful of
    pixels whose float mean lands within float error of a .5 boundary.
    """
    if gray.dtype != torch.uint8 or gray.dim() not in (2, 3):
        raise ValueError(f"expected a uint8 H×W or N×H×W tensor, got {gray.dtype} {tuple(gray.shape)}")
    squeeze = gray.dim() == 2
    img = gray.unsqueeze(0) if squeeze else gray
    _, h, w = img.shape
    kernel = [float(k) for k in gaussian_kernel()]
    half = BLOCK_SIZE // 2
    src = img.to(torch.float32).unsqueeze(1)  # N×1×H×W for F.pad's replicate mode
    padded = F.pad(src, (half, half, half, half), mode="replicate").squeeze(1)
    rows = _blur_axis(padded, kernel, dim=2, size=w)  # (N, H+2h, W)
    mean = _blur_axis(rows, kernel, dim=1, size=h)  # (N, H, W)
    mean_u8 = torch.round(mean).clamp_(0, 255).to(torch.int16)
    out = (img.to(torch.int16) - mean_u8 > -C).to(torch.uint8).mul_(255)
    return out.squeeze(0) if squeeze else out


def tile_frame_torch(binary: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """Torch twin of :func:`tile_frame` (same order and padding, stays on its device)."""
    h, w = binary.shape
    rows, cols = tile_count(h, w, tile)
    padded = binary.new_full((rows * tile, cols * tile), _white(binary.dtype))
    padded[:h, :w] = binary
    return padded.reshape(rows, tile, cols, tile).permute(0, 2, 1, 3).reshape(rows * cols, tile, tile)


def stitch_torch(tiles: torch.Tensor, rows: int, cols: int, height: int, width: int) -> torch.Tensor:
    """Torch twin of :func:`stitch`."""
    n, t, t2 = tiles.shape
    if n != rows * cols or t != t2:
        raise ValueError(f"{n} tiles of {t}×{t2} cannot form a {rows}×{cols} grid")
    full = tiles.reshape(rows, cols, t, t).permute(0, 2, 1, 3).reshape(rows * t, cols * t)
    return full[:height, :width].contiguous()
