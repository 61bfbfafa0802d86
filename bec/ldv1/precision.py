"""Turning a loaded model into an inference module for one device and precision.

Why fold BatchNorm: in eval mode a BatchNorm that directly follows a conv is an affine
map per output channel, so it can be absorbed into that conv's weights and bias. That
removes a pass over every activation (faster) and, more importantly for half precision,
does the normalisation arithmetic once in fp32 (here in fp64, then stored as fp32)
instead of in fp16/bf16 on every call: ``(x - mean) / sqrt(var + eps)`` with tiny
variances is exactly where half precision loses digits. A normalisation layer that
cannot be folded is wrapped so that it computes in fp32 and hands back the module's
dtype.

Which BatchNorm "directly follows" which conv is read from a ``torch.fx`` trace (exact:
the BatchNorm's only input is the conv's output and nothing else uses that output).
Modules that cannot be traced fall back to ``nn.Sequential`` containers, whose order is
their semantics; anything else is left unfolded (correct, just not as fast).

fp16 on CPU: many CPU kernels have no fp16 path or run it far slower than fp32, so on a
CPU device ``"fp16"`` falls back to fp32 with a ``RuntimeWarning`` (shown once per
calling location by Python's default warning filter). ``resolve_dtype`` tells callers
which dtype to feed; the returned module also carries it as ``input_dtype``.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx
from torch import nn

from bec.errors import ModelError
from bec.ldv1.config import precision_on

__all__ = ["PRECISIONS", "fold_batchnorm", "prepare_for_inference", "resolve_dtype"]

PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def resolve_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype a module prepared for (device, precision) computes in and expects."""
    if precision not in PRECISIONS:
        raise ModelError(
            f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}"
        )
    return PRECISIONS[precision_on(torch.device(device).type, precision)]


# ----------------------------------------------------------------- BatchNorm folding


def _foldable(bn: nn.Module) -> bool:
    return (
        type(bn) is nn.BatchNorm2d
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
    )


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv ← bn ∘ conv, computed in fp64 and stored in the conv's (fp32) dtype."""
    dtype = conv.weight.dtype
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    conv.weight.copy_(weight.to(dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    else:
        conv.bias.copy_(bias.to(dtype))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _pairs_from_trace(module: nn.Module) -> list[tuple[str, str]] | None:
    """(conv name, bn name) pairs from an fx trace, or None if the module won't trace."""
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # control flow on values, unsupported ops…: use the fallback
        return None
    mods = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable(mods.get(node.target)):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(src.target), nn.Conv2d)
            and len(src.users) == 1  # the conv's output feeds nothing but this BN
            and calls[src.target] == 1  # and neither module is called elsewhere
            and calls[node.target] == 1
            and mods[src.target].out_channels == mods[node.target].num_features
        ):
            pairs.append((src.target, node.target))
    return pairs


def _last_conv(module: nn.Module, name: str) -> str | None:
    """Name of the Conv2d whose output is ``module``'s output, through nested Sequentials."""
    if isinstance(module, nn.Conv2d):
        return name
    if isinstance(module, nn.Sequential) and len(module):
        last = str(len(module) - 1)
        return _last_conv(module[-1], f"{name}.{last}")
    return None


def _pairs_from_sequentials(module: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, seq in module.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{name}." if name else ""
        for i in range(len(seq) - 1):
            conv = _last_conv(seq[i], f"{prefix}{i}")
            bn = seq[i + 1]
            if conv is not None and _foldable(bn):
                pairs.append((conv, f"{prefix}{i + 1}"))
    return pairs


def fold_batchnorm(module: nn.Module) -> int:
    """Fold, in place, every eval-mode BatchNorm2d that directly follows a Conv2d.

    The BatchNorm is replaced by ``nn.Identity``. ``module`` must be in eval mode and
    fp32. Returns how many were folded.
    """
    pairs = _pairs_from_trace(module)
    if pairs is None:
        pairs = _pairs_from_sequentials(module)
    folded = 0
    for conv_name, bn_name in pairs:
        conv = module.get_submodule(conv_name)
        bn = module.get_submodule(bn_name)
        if conv.out_channels != bn.num_features:
            continue
        _fold_into(conv, bn)
        _set_submodule(module, bn_name, nn.Identity())
        folded += 1
    return folded


# ----------------------------------------------------------------- fp32 normalisation


class Fp32Norm(nn.Module):
    """Runs a normalisation layer in fp32 inside a half-precision model."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def _keep_norms_fp32(module: nn.Module) -> None:
    names = [n for n, m in module.named_modules() if n and isinstance(m, _NORMS)]
    for name in names:  # outer-first order; norms have no child norms, so no clashes
        _set_submodule(module, name, Fp32Norm(module.get_submodule(name)))


# ----------------------------------------------------------------- entry point


def prepare_for_inference(
    module: nn.Module,
    device: torch.device,
    precision: str,
    channels_last: bool = True,
    compile_model: bool = False,
) -> nn.Module:
    """A copy of ``module`` in eval mode on ``device``, computing in ``precision``.

    Call it under ``torch.inference_mode()`` with float inputs of
    ``resolve_dtype(device, precision)`` (also ``returned.input_dtype``); with
    ``channels_last`` the inputs are best passed in that memory format too. The input
    module is not modified (it is deep-copied first), so a ``LoadedModel`` can be
    prepared for several devices. ``compile_model`` wraps the result in
    ``torch.compile``, which compiles lazily on the first call.
    """
    device = torch.device(device)
    dtype = resolve_dtype(device, precision)  # raises ModelError on unknown precision
    if precision == "fp16" and dtype == torch.float32:
        warnings.warn(
            "fp16 is not supported efficiently on CPU; running the model in fp32 instead",
            RuntimeWarning,
            stacklevel=2,
        )
    model = copy.deepcopy(module).cpu().float().eval()
    fold_batchnorm(model)
    model = model.to(device=device, dtype=dtype)
    if dtype != torch.float32:
        _keep_norms_fp32(model)
        model = model.to(device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.requires_grad_(False)
    model.eval()
    model.input_dtype = dtype
    if compile_model:
        compiled = torch.compile(model)
        compiled.input_dtype = dtype
        return compiled
    return model
