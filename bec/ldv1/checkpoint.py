"""Loading and saving ldv1 model checkpoints.

A checkpoint is a ``.pth`` file written by ``torch.save``. Two layouts are accepted:

* ``{"state_dict": {...}, ...}`` — what production training writes (other keys such as
  optimiser state are ignored), optionally with ``"arch"`` naming an entry of
  :data:`ARCHITECTURES` and ``"arch_kwargs"`` its constructor arguments;
* a bare state dict (every value a tensor).

Keys may carry the ``module.`` prefix that ``DataParallel`` training leaves behind.
Without ``"arch"`` the checkpoint is the production DeepLabV3+ / ResNet-34.

Loading is deliberately strict and safe: ``weights_only=True`` (a checkpoint is data,
never code to run), ``strict=True`` (a checkpoint that silently leaves layers at their
random initialisation would produce plausible-looking garbage), and every failure is a
one-sentence :class:`~bec.errors.ModelError` an operator can act on. The file is read
once and hashed from the same bytes that are loaded, so the recorded ``sha256`` is
exactly the model that ran.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bec.errors import ModelError

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_ARCH",
    "LoadedModel",
    "build_model",
    "load_checkpoint",
    "save_checkpoint",
]

DEFAULT_ARCH = "deeplabv3plus-resnet34"
_PREFIX = "module."


def _deeplabv3plus_resnet34(**kwargs: Any) -> nn.Module:
    from bec.ldv1.deeplab import DeepLabV3Plus

    return DeepLabV3Plus(**kwargs)


def _bec_small_v1(**kwargs: Any) -> nn.Module:
    # Imported lazily: smallnet is developed separately and may not exist yet.
    from bec.ldv1.smallnet import SmallLineNet

    return SmallLineNet(**kwargs)


#: Architecture name → factory taking the checkpoint's ``arch_kwargs``.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    DEFAULT_ARCH: _deeplabv3plus_resnet34,
    "bec-small-v1": _bec_small_v1,
}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to prepare for inference, with what identifies it in the results."""

    module: nn.Module  # eval mode, fp32, on CPU
    arch: str
    file_name: str
    sha256: str  # hex digest of the checkpoint file's bytes


def build_model(arch: str, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Instantiate a registered architecture, turning every failure into ``ModelError``."""
    factory = ARCHITECTURES.get(arch)
    if factory is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown model architecture {arch!r} (known: {known})")
    try:
        return factory(**dict(arch_kwargs or {}))
    except ImportError as exc:
        raise ModelError(f"model architecture {arch!r} is not available in this build ({exc})") from exc
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid arguments for model architecture {arch!r}: {exc}") from exc


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"model checkpoint {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"model checkpoint {str(path)!r} is a directory, not a file") from None
    except OSError as exc:
        raise ModelError(f"cannot read model checkpoint {str(path)!r}: {exc.strerror or exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _why_unreadable(exc: BaseException) -> str:
    """A short reason for a failed ``torch.load``. torch's own messages run to a
    paragraph and advise ``weights_only=False``, the one thing an operator must not do
    with a file of unknown origin."""
    text = str(exc)
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return f"it holds a Python object ({unsafe.group(1)}) that a safe load refuses"
    if isinstance(exc, EOFError) or "zip archive" in text or "central directory" in text:
        return "the file is empty, truncated or corrupted"
    if "Unsupported operand" in text or "load key" in text:
        return "it is not a PyTorch checkpoint"
    return f"it is not a readable PyTorch checkpoint ({_first_line(exc)})"


def _split(obj: Any, name: str) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """Return (state dict without prefixes, arch, arch_kwargs) from a loaded object."""
    if not isinstance(obj, Mapping):
        raise ModelError(
            f"model checkpoint {name!r} holds a {type(obj).__name__}, not a state dict"
        )
    if "state_dict" in obj:
        sd, arch, kwargs = obj["state_dict"], obj.get("arch", DEFAULT_ARCH), obj.get("arch_kwargs")
    else:
        sd, arch, kwargs = obj, DEFAULT_ARCH, None
    if not isinstance(sd, Mapping) or not sd:
        raise ModelError(f"model checkpoint {name!r} does not contain a state dict")
    bad = next((k for k, v in sd.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise ModelError(
            f"model checkpoint {name!r} is not a state dict: entry {bad!r} is not a tensor"
        )
    if not isinstance(arch, str):
        raise ModelError(f"model checkpoint {name!r} has a non-text 'arch' entry")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise ModelError(f"model checkpoint {name!r} has an 'arch_kwargs' entry that is not a dict")
    clean: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        key = key.removeprefix(_PREFIX)
        if key in clean:
            raise ModelError(f"model checkpoint {name!r} holds key {key!r} twice (with and without 'module.')")
        clean[key] = value
    return clean, arch, dict(kwargs)


def _check_fit(module: nn.Module, sd: Mapping[str, torch.Tensor], arch: str) -> None:
    """Name the first missing, unexpected and mis-shaped key, before load_state_dict does
    so in a multi-line message buried in a traceback."""
    expected = module.state_dict()
    problems: list[str] = []
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    for keys, what in ((missing, "missing key"), (unexpected, "unexpected key")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            problems.append(f"{what} {keys[0]!r}{more}")
    if shapes:
        k = shapes[0]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        problems.append(
            f"key {k!r} has shape {list(sd[k].shape)} but the model expects "
            f"{list(expected[k].shape)}{more}"
        )
    if problems:
        raise ModelError(f"checkpoint does not fit {arch}: " + "; ".join(problems))


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedModel:
    """Load a checkpoint into a fresh model of its architecture (eval mode, CPU, fp32)."""
    path = Path(path)
    data = _read_bytes(path)
    name = path.name
    try:
        obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types for bad files; all mean the same here
        raise ModelError(f"model checkpoint {name!r} cannot be read: {_why_unreadable(exc)}") from None
    sd, arch, kwargs = _split(obj, name)
    module = build_model(arch, kwargs)
    _check_fit(module, sd, arch)
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. a dtype that cannot be copied into a parameter
        raise ModelError(f"checkpoint does not fit {arch}: {_first_line(exc)}") from None
    module.float().eval()
    return LoadedModel(
        module=module, arch=arch, file_name=name, sha256=hashlib.sha256(data).hexdigest()
    )


def save_checkpoint(
    module: nn.Module,
    path: str | os.PathLike[str],
    arch: str,
    arch_kwargs: Mapping[str, Any] | None = None,
    prefix_module: bool = False,
) -> None:
    """Write ``module`` in the format :func:`load_checkpoint` reads.

    ``prefix_module=True`` writes ``module.``-prefixed keys, as production checkpoints
    have, so tests can exercise that path. The file appears atomically (temporary file
    then rename), so a crashed save never leaves a truncated checkpoint under ``path``.
    """
    if arch not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown model architecture {arch!r} (known: {known})")
    prefix = _PREFIX if prefix_module else ""
    sd = {prefix + k: v.detach().cpu() for k, v in module.state_dict().items()}
    payload = {"state_dict": sd, "arch": arch, "arch_kwargs": dict(arch_kwargs or {})}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide shipped weights from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
