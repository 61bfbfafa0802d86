"""SmallLineNet: the project's own small line-segmentation network.

It exists so that the demo and the tests show real line detection on CPU without the
production DeepLabV3+ weights (DESIGN §7). It honours the same contract as the
production model — N×3×H×W thresholded pages in [0, 1] (white = 1) in, N×1×H×W logits
out — so every part of the pipeline runs unchanged with either.

Why this shape:

* The three input channels are identical copies of one thresholded page, so they are
  averaged and inverted first (ink = 1, paper = 0): zero padding then reads as paper,
  like the white padding of edge tiles, and the stem is three times cheaper.
* Text lines are long horizontal bands that must stay one connected component across
  the gaps between syllables and across tile seams, while short marks (page numbers,
  frame rules, blotches) must not become lines. At 1/16 resolution a stack of residual
  blocks with depthwise 1×k convolutions dilated along x gives a receptive field wider
  than a tile for little compute; vertical context stays local (a few glyph heights),
  which is what separates neighbouring lines.
* The decoder only goes back to 1/4 resolution (bands are tens of pixels tall) and the
  logits are upsampled bilinearly, which keeps a 512×512 tile well under 100 ms on one
  CPU core.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SmallLineNet", "ARCH_NAME"]

ARCH_NAME = "bec-small-v1"


def _sep(ch: int) -> nn.Sequential:
    """Depthwise-separable 3×3 conv + BN + ReLU (a third of a dense conv's CPU time)."""
    return nn.Sequential(
        nn.Conv2d(ch, ch, 3, padding=1, groups=ch, bias=False),
        nn.Conv2d(ch, ch, 1, bias=False),
        nn.BatchNorm2d(ch),
        nn.ReLU(inplace=True),
    )


def _cbr(cin: int, cout: int, kernel: tuple[int, int] = (3, 3), stride: int = 1,
         dilation: tuple[int, int] = (1, 1)) -> nn.Sequential:
    pad = ((kernel[0] - 1) // 2 * dilation[0], (kernel[1] - 1) // 2 * dilation[1])
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _WideBlock(nn.Module):
    """Residual block of two depthwise-separable convolutions.

    The first is 1×k and dilated along x only (context along the line), the second 3×3
    (a little vertical context). Depthwise + pointwise keeps a 96-channel block at a
    fraction of a dense conv's cost; CPU time, not parameters, is the budget here.
    The wide conv pads by replication: at a tile seam a cut line then looks as if it
    went on, instead of meeting a wall of zeros that would make its band fade out and
    break one line into two components.
    """

    def __init__(self, ch: int, kernel: int, dilation: int) -> None:
        super().__init__()
        pad = (kernel - 1) // 2 * dilation
        self.wide = nn.Sequential(
            nn.Conv2d(ch, ch, (1, kernel), padding=(0, pad), dilation=(1, dilation),
                      groups=ch, bias=False, padding_mode="replicate"),
            nn.Conv2d(ch, ch, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True))
        self.local = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1, groups=ch, bias=False),
            nn.Conv2d(ch, ch, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.local(self.wide(x)), inplace=True)


class SmallLineNet(nn.Module):
    """Compact encoder–decoder: N×3×H×W in [0, 1] → N×1×H×W line logits.

    H and W must be multiples of 16 (tiles are 512, training crops multiples of 32).
    All constructor arguments are plain ints / lists so they can be stored in the
    checkpoint's ``arch_kwargs`` as JSON-like data and loaded with
    ``torch.load(weights_only=True)``.
    """

    def __init__(self, widths: list[int] | tuple[int, ...] = (16, 32, 48, 96),
                 dilations: list[int] | tuple[int, ...] = (1, 2, 4, 8, 2, 1),
                 wide_kernel: int = 9, decoder_width: int = 24) -> None:
        super().__init__()
        c1, c2, c3, c4 = (int(c) for c in widths)
        self.stem = _cbr(1, c1, stride=2)                                   # 1/2
        self.down2 = _cbr(c1, c2, stride=2)                                 # 1/4
        self.down3 = nn.Sequential(_cbr(c2, c3, stride=2), _sep(c3))        # 1/8
        self.down4 = _cbr(c3, c4, stride=2)                                 # 1/16
        self.context = nn.Sequential(*[_WideBlock(c4, int(wide_kernel), int(d))
                                       for d in dilations])
        self.up3 = nn.Sequential(_cbr(c4 + c3, c3, (1, 1)), _sep(c3))       # 1/8
        self.up2 = nn.Sequential(_cbr(c3 + c2, decoder_width, (1, 1)),
                                 _sep(decoder_width))                       # 1/4
        self.head = nn.Conv2d(decoder_width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"input height and width must be multiples of 16, got {h}x{w}")
        ink = 1.0 - x.mean(dim=1, keepdim=True)
        s2 = self.down2(self.stem(ink))
        s3 = self.down3(s2)
        y = self.context(self.down4(s3))
        y = F.interpolate(y, size=s3.shape[-2:], mode="bilinear", align_corners=False)
        y = self.up3(torch.cat([y, s3], 1))
        y = F.interpolate(y, size=s2.shape[-2:], mode="bilinear", align_corners=False)
        y = self.up2(torch.cat([y, s2], 1))
        return F.interpolate(self.head(y), size=(h, w), mode="bilinear", align_corners=False)
