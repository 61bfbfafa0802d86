"""DeepLabV3+ / ResNet-34 / one class, in plain PyTorch.

The production line-detection checkpoints were trained with segmentation-models-pytorch
(``DeepLabV3Plus("resnet34", encoder_weights=None, classes=1)``). Depending on that
library (and on timm / torchvision, which it pulls in) only to rebuild one fixed network
would add hundreds of MB to the worker image and tie us to its release cycle, so this
module rebuilds the same network by hand. Module names and registration order are
chosen so that ``state_dict()`` is key-for-key identical to the library's, which lets
production checkpoints load with ``strict=True``; ``tests/fixtures/ldv1`` proves that
the function computed is the same too.

Layout (output stride 16):

* encoder: ResNet-34 without avgpool/fc; ``layer4`` keeps stride 1 and every conv in it
  is dilated by 2 (that is how the library turns stride 32 into 16 — note it dilates
  the first block's 3×3 conv as well, unlike torchvision's own option).
* decoder: ASPP on ``layer4`` (1×1 branch, three depthwise-separable 3×3 branches at
  rates 12/24/36, an image-pooling branch), projection to 256, a separable 3×3 conv;
  upsampled ×4 and concatenated with ``layer1`` projected to 48 channels; one more
  separable 3×3 conv.
* segmentation head: 1×1 conv to one logit, upsampled ×4 back to the input size.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

__all__ = ["DeepLabV3Plus", "ARCH_NAME"]

ARCH_NAME = "deeplabv3plus-resnet34"


def _check_input_size(x: torch.Tensor) -> None:
    """Reject sizes the reference library rejects, rather than silently diverge from it."""
    h, w = x.shape[-2:]
    if h % 16 or w % 16:
        raise ValueError(f"input height and width must be multiples of 16, got {h}x{w}")


# Keep the check a single opaque call under torch.fx, so the model stays symbolically
# traceable (precision.py uses a trace to find which BatchNorm follows which conv).
torch.fx.wrap("_check_input_size")


# --------------------------------------------------------------------------- encoder


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs with a residual connection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            # A dilated 1×1 conv is the same function as an undilated one; only its
            # stride matters here.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _stage(in_ch: int, out_ch: int, blocks: int, stride: int, dilation: int = 1) -> nn.Sequential:
    layers = [BasicBlock(in_ch, out_ch, stride=stride, dilation=dilation)]
    layers += [BasicBlock(out_ch, out_ch, dilation=dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet34Encoder(nn.Module):
    """ResNet-34 trunk returning the stride-4 (``layer1``) and stride-16 (``layer4``) maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, 3, stride=1)
        self.layer2 = _stage(64, 128, 4, stride=2)
        self.layer3 = _stage(128, 256, 6, stride=2)
        # Output stride 16: no stride in the last stage, dilation 2 in all its convs.
        self.layer4 = _stage(256, 512, 3, stride=1, dilation=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        high = self.layer4(self.layer3(self.layer2(low)))
        return low, high


# --------------------------------------------------------------------------- decoder


class SeparableConv2d(nn.Sequential):
    """Depthwise k×k conv followed by a pointwise 1×1 conv (keys ``0`` and ``1``)."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, padding: int = 1, dilation: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_ch, in_ch, kernel_size, padding=padding, dilation=dilation,
                groups=in_ch, bias=False,
            ),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
        )


def _conv_bn_relu(conv: nn.Module, out_ch: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ASPPPooling(nn.Sequential):
    """Image-level branch: global average → 1×1 conv → broadcast back to the map size."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        y = super().forward(x)
        # Upsampling a 1×1 map is a broadcast whatever the interpolation mode; expand
        # avoids an interpolation kernel call (and its fp16 support gaps on CPU).
        return y.expand(-1, -1, size[0], size[1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling with depthwise-separable atrous branches."""

    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, int, int]) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(nn.Conv2d(in_ch, out_ch, 1, bias=False), out_ch)]
        branches += [
            _conv_bn_relu(SeparableConv2d(in_ch, out_ch, 3, padding=r, dilation=r), out_ch)
            for r in rates
        ]
        branches.append(ASPPPooling(in_ch, out_ch))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(out_ch * len(branches), out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabV3PlusDecoder(nn.Module):
    """Fuses the ASPP context (stride 16) with ``layer1`` detail (stride 4)."""

    def __init__(
        self,
        high_ch: int = 512,
        low_ch: int = 64,
        out_ch: int = 256,
        rates: tuple[int, int, int] = (12, 24, 36),
    ) -> None:
        super().__init__()
        self.aspp = nn.Sequential(
            ASPP(high_ch, out_ch, rates),
            SeparableConv2d(out_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )
        self.block1 = _conv_bn_relu(nn.Conv2d(low_ch, 48, 1, bias=False), 48)
        self.block2 = _conv_bn_relu(SeparableConv2d(48 + out_ch, out_ch, 3, padding=1), out_ch)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        context = self.aspp(high)
        # The reference library upsamples with nn.UpsamplingBilinear2d (align_corners=True).
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.block2(torch.cat([context, self.block1(low)], dim=1))


# --------------------------------------------------------------------------- model


class DeepLabV3Plus(nn.Module):
    """The production ldv1 network: N×3×H×W in, N×classes×H×W logits out.

    H and W must be multiples of 16 (the encoder's output stride); tiles are 512×512.
    """

    def __init__(self, classes: int = 1) -> None:
        super().__init__()
        self.encoder = ResNet34Encoder()
        self.decoder = DeepLabV3PlusDecoder()
        # Key ``segmentation_head.0`` as in the library; index 1 is its (parameter-free)
        # upsampling, applied in forward() so the size always matches the input.
        self.segmentation_head = nn.Sequential(nn.Conv2d(256, classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input_size(x)
        h, w = x.shape[-2:]
        low, high = self.encoder(x)
        logits = self.segmentation_head(self.decoder(low, high))
        # nn.UpsamplingBilinear2d(scale_factor=4) in the library: align_corners=True.
        return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
