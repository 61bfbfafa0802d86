"""The model boundary of the pipeline: binary tiles in, line-mask tiles out.

The inference process knows nothing of architectures: it hands a ``Segmenter`` a batch
of thresholded tiles (uint8, 0 or 255, N×T×T, already on the segmenter's device) and
gets the line mask back (uint8 0/1, same shape). ``TorchSegmenter`` implements the ldv1
input contract around any checkpoint ``bec.ldv1.checkpoint`` loads; ``NullSegmenter``
does no model work at all, so benchmarks can measure the data plane alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from bec.ldv1.checkpoint import load_checkpoint
from bec.ldv1.precision import prepare_for_inference, resolve_dtype


class Segmenter(Protocol):
    tile: int
    device: torch.device
    identity: dict[str, str]

    def segment(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 N×T×T (0/255, white = 255) → uint8 N×T×T line mask (0/1)."""
        ...


@dataclass
class TorchSegmenter:
    """/255 → one channel repeated to 3 → model → sigmoid > threshold (DESIGN §7)."""

    module: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    identity: dict[str, str]
    tile: int = 512
    threshold: float = 0.85
    channels_last: bool = True
    _logit_threshold: float = field(init=False)

    def __post_init__(self) -> None:
        # sigmoid(x) > t  ⇔  x > log(t / (1 − t)): compare logits, skip the sigmoid.
        self._logit_threshold = math.log(self.threshold / (1.0 - self.threshold))

    @torch.inference_mode()
    def segment(self, tiles: torch.Tensor) -> torch.Tensor:
        x = tiles.to(self.dtype).div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
        logits = self.module(x)
        return (logits[:, 0] > self._logit_threshold).to(torch.uint8)


@dataclass
class NullSegmenter:
    """No model and no lines: the data plane (fetch, decode, tiling, slots, stitching,
    hand-overs, results, Parquet) measured alone.

    The mask is empty. An earlier null mask was the page's ink: every glyph became a
    contour, post-processing did ~10× a real model's contour work, squarish glyph
    clusters sent ~13 % of pages round a second pass, and the null run measured
    ``findContours`` instead of the data plane.
    """

    device: torch.device
    tile: int = 512
    identity: dict[str, str] = field(default_factory=lambda: {"name": "null", "sha256": "", "arch": "null"})

    def segment(self, tiles: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(tiles)


def load_segmenter(model_path: str, device: torch.device, precision: str = "fp32", *,
                   compile_model: bool = False, channels_last: bool = True,
                   threshold: float = 0.85, tile: int = 512) -> Segmenter:
    """Load a checkpoint (or ``null``) and prepare it for ``device`` and ``precision``."""
    if model_path == "null":
        return NullSegmenter(device, tile)
    loaded = load_checkpoint(model_path)
    module = prepare_for_inference(loaded.module, device, precision, channels_last=channels_last,
                                   compile_model=compile_model)
    identity = {"name": loaded.file_name, "sha256": loaded.sha256, "arch": loaded.arch}
    return TorchSegmenter(module, device, resolve_dtype(device, precision), identity, tile,
                          threshold, channels_last)


def warm_up(segmenter: Segmenter, batch: int = 2) -> None:
    """One forward pass at start (kernel selection, compile): never inside a volume."""
    tiles = torch.full((batch, segmenter.tile, segmenter.tile), 255, dtype=torch.uint8,
                       device=segmenter.device)
    segmenter.segment(tiles)
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize(segmenter.device)
