"""ldv1 model layer: architecture parity, checkpoint loading, inference preparation.

Pure unit tests (no services). The production architecture is proven against the
reference fixture in ``tests/fixtures/ldv1``; checkpoints are written to a temporary
folder once per module because a DeepLabV3+ checkpoint is ~90 MB.
"""
from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from bec.errors import ModelError  # noqa: E402
from bec.ldv1 import checkpoint as ckpt  # noqa: E402
from bec.ldv1.checkpoint import LoadedModel, load_checkpoint, save_checkpoint  # noqa: E402
from bec.ldv1.deeplab import DeepLabV3Plus  # noqa: E402
from bec.ldv1.precision import fold_batchnorm, prepare_for_inference  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "ldv1"))
from ldv1_reference import check_model, fill_deterministic, reference_input  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    m = DeepLabV3Plus()
    m.load_state_dict(fill_deterministic(m.state_dict()))
    return m.eval()


@pytest.fixture(scope="module")
def tile() -> torch.Tensor:
    """One 128×128 crop of the reference input: small enough to keep tests quick."""
    return reference_input()[:1, :, :128, :128].contiguous()


@pytest.fixture(scope="module")
def expected(model: nn.Module, tile: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(tile)


@pytest.fixture(scope="module")
def prod_ckpt(model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as production training writes it: no arch, ``module.`` keys."""
    path = tmp_path_factory.mktemp("ckpt") / "prod.pth"
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 7}, path)
    return path


def _write_sd(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    torch.save({"state_dict": sd}, path)
    return path


# ------------------------------------------------------------------ architecture


def test_deeplab_matches_reference_library() -> None:
    check_model(DeepLabV3Plus())


def test_deeplab_rejects_sizes_not_multiple_of_16() -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        DeepLabV3Plus().eval()(torch.zeros(1, 3, 40, 48))


# ------------------------------------------------------------------ loading


def test_production_checkpoint_gives_identical_logits(
    prod_ckpt: Path, tile: torch.Tensor, expected: torch.Tensor
) -> None:
    loaded = load_checkpoint(prod_ckpt)
    assert isinstance(loaded, LoadedModel)
    assert loaded.arch == "deeplabv3plus-resnet34"
    assert loaded.file_name == "prod.pth"
    assert not loaded.module.training
    assert all(p.device.type == "cpu" for p in loaded.module.parameters())
    with torch.inference_mode():
        assert torch.equal(loaded.module(tile), expected)


def test_sha256_is_of_the_file_bytes(prod_ckpt: Path) -> None:
    assert load_checkpoint(str(prod_ckpt)).sha256 == hashlib.sha256(prod_ckpt.read_bytes()).hexdigest()


def test_bare_state_dict_loads(
    model: nn.Module, tmp_path: Path, tile: torch.Tensor, expected: torch.Tensor
) -> None:
    path = tmp_path / "bare.pth"
    torch.save(model.state_dict(), path)
    loaded = load_checkpoint(path)
    with torch.inference_mode():
        assert torch.equal(loaded.module(tile), expected)


def test_save_checkpoint_round_trip_with_registered_arch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def tiny(width: int = 4) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.Conv2d(width, 1, 1))

    monkeypatch.setitem(ckpt.ARCHITECTURES, "tiny-test", tiny)
    src = tiny(width=6)
    path = tmp_path / "tiny.pth"
    save_checkpoint(src, path, "tiny-test", {"width": 6}, prefix_module=True)
    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("module.") for k in raw["state_dict"])
    loaded = load_checkpoint(path)
    assert loaded.arch == "tiny-test"
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), src.eval()(x))


# ------------------------------------------------------------------ load errors


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match="does not exist") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ModelError, match="cannot be read: it is not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_reported(prod_ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    data = prod_ckpt.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot be read: the file is empty, truncated or corrupted"):
        load_checkpoint(path)


@pytest.mark.parametrize("obj", [[1, 2, 3], {"state_dict": "weights"}, {"epoch": 3, "lr": 0.1}])
def test_not_a_state_dict(obj: object, tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    with pytest.raises(ModelError, match="state dict"):
        load_checkpoint(path)


def test_unknown_arch(tmp_path: Path) -> None:
    path = tmp_path / "x.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "arch": "resnet9000"}, path)
    with pytest.raises(ModelError, match="unknown model architecture 'resnet9000'"):
        load_checkpoint(path)


def test_missing_key_is_named(model: nn.Module, tmp_path: Path) -> None:
    sd = dict(model.state_dict())
    del sd["decoder.aspp.0.convs.0.0.weight"]
    path = _write_sd(tmp_path / "missing.pth", sd)
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    assert str(err.value) == (
        "checkpoint does not fit deeplabv3plus-resnet34: "
        "missing key 'decoder.aspp.0.convs.0.0.weight'"
    )


def test_unexpected_key_and_shape_mismatch_are_named(model: nn.Module, tmp_path: Path) -> None:
    sd = dict(model.state_dict())
    sd["segmentation_head.0.weight"] = torch.zeros(2, 256, 1, 1)
    sd["segmentation_head.0.bias"] = torch.zeros(2)
    sd["extra.weight"] = torch.zeros(3)
    path = _write_sd(tmp_path / "wrong.pth", sd)
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith("checkpoint does not fit deeplabv3plus-resnet34:")
    assert "unexpected key 'extra.weight'" in msg
    assert "'segmentation_head.0.weight' has shape [2, 256, 1, 1]" in msg
    assert "[1, 256, 1, 1]" in msg and "(and 1 more)" in msg


# ------------------------------------------------------------------ precision


def test_batchnorm_folding_preserves_fp32_output(
    model: nn.Module, tile: torch.Tensor, expected: torch.Tensor
) -> None:
    prepared = prepare_for_inference(model, CPU, "fp32", channels_last=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "input was modified"
    with torch.inference_mode():
        out = prepared(tile.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.float32
    scale = float(expected.abs().max())
    assert float((out - expected).abs().max()) <= 1e-4 * max(1.0, scale)


def test_bf16_on_cpu_stays_close_to_fp32(
    model: nn.Module, tile: torch.Tensor, expected: torch.Tensor
) -> None:
    prepared = prepare_for_inference(model, CPU, "bf16")
    assert prepared.input_dtype == torch.bfloat16
    with torch.inference_mode():
        out = prepared(tile.to(torch.bfloat16)).float()
    # bf16 keeps 8 significant bits: ~0.4 % per op, a few % after ~50 layers.
    scale = float(expected.abs().max())
    assert float((out - expected).abs().max()) <= 0.05 * scale
    assert float(((out > 0) == (expected > 0)).float().mean()) >= 0.99


def test_unfoldable_norm_stays_fp32() -> None:
    torch.manual_seed(0)
    # The BatchNorm follows a ReLU, not a conv: it cannot be folded.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 1, 1))
    net[2].running_mean.uniform_(0, 1)
    net[2].running_var.uniform_(0.5, 2)
    net.eval()
    prepared = prepare_for_inference(net, CPU, "bf16")
    norms = [m for m in prepared.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 1 and norms[0].weight.dtype == torch.float32
    assert prepared[0].weight.dtype == torch.bfloat16
    x = torch.rand(2, 3, 16, 16)
    with torch.inference_mode():
        out = prepared(x.to(torch.bfloat16))
        ref = net(x)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).abs().max()) <= 0.05 * max(1.0, float(ref.abs().max()))


def test_fold_falls_back_to_sequential_order_when_untraceable() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
                return self.body(x)
            return self.body(-x)

    net = Gate()
    net.body[1].running_mean.uniform_(-1, 1)
    net.eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        ref = net(x)
    assert fold_batchnorm(net) == 1
    assert isinstance(net.body[1], nn.Identity)
    with torch.inference_mode():
        assert torch.allclose(net(x), ref, atol=1e-5)


def test_fp16_on_cpu_falls_back_to_fp32_with_warning() -> None:
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = prepare_for_inference(net, CPU, "fp16")
    assert [w.category for w in caught] == [RuntimeWarning]
    assert prepared.input_dtype == torch.float32
    assert prepared[0].weight.dtype == torch.float32


def test_unknown_precision_is_rejected() -> None:
    with pytest.raises(ModelError, match="unknown precision 'int8'"):
        prepare_for_inference(nn.Conv2d(1, 1, 1), CPU, "int8")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised by torch's own imports
def test_compile_model_wraps_lazily() -> None:
    net = nn.Sequential(nn.Conv2d(3, 2, 1)).eval()
    prepared = prepare_for_inference(net, CPU, "fp32", compile_model=True)
    assert prepared.input_dtype == torch.float32
    assert isinstance(prepared._orig_mod, nn.Sequential)  # compiled on first call only
