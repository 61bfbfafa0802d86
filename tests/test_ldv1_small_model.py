"""The shipped small line model.

The demo and the end-to-end tests rely on ``bec/ldv1/weights/small.pth`` finding the
right number of lines on generated pages, so that is asserted here on pages the model
has never seen (seeds ≥ 1 000 000; training only uses seeds below), through the full
production contract (frame, threshold, tiles, model, stitch, p > 0.85, find_lines,
second pass on skewed pages). The generator's own promises are checked in
``test_synth.py``; the score on real pages is ``python -m bec.ldv1.evaluate_real``
(README, "The shipped line model").
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("uharfbuzz")

from bec.ldv1.synth import EVAL_SEED_START  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "bec" / "ldv1" / "weights" / "small.pth"
#: A block of unseen seeds kept apart from the one used while developing the model.
TEST_SEEDS = range(2 * EVAL_SEED_START, 2 * EVAL_SEED_START + 20)


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    from bec.ldv1.checkpoint import load_checkpoint

    if not WEIGHTS.exists():
        pytest.fail(f"shipped weights missing: {WEIGHTS} (python -m bec.ldv1.train)")
    return load_checkpoint(WEIGHTS).module


def test_shipped_checkpoint_is_small_and_self_describing(small_model: torch.nn.Module) -> None:
    assert WEIGHTS.stat().st_size <= 3_000_000
    raw = torch.load(WEIGHTS, weights_only=True, map_location="cpu")
    assert raw["arch"] == "bec-small-v1"
    assert isinstance(raw["arch_kwargs"], dict)
    assert raw["trained"]["steps"] > 0
    assert sum(p.numel() for p in small_model.parameters()) < 1_000_000


def test_small_model_output_contract(small_model: torch.nn.Module, two_threads: None) -> None:
    x = torch.ones(2, 3, 512, 512)
    with torch.inference_mode():
        y = small_model(x)
    assert y.shape == (2, 1, 512, 512) and y.dtype == torch.float32
    assert torch.sigmoid(y).max() < 0.85                  # a blank page has no lines


def test_small_model_counts_lines_on_unseen_pages(small_model: torch.nn.Module,
                                                  two_threads: None) -> None:
    from bec.ldv1.evaluate import evaluate

    results = evaluate(small_model, TEST_SEEDS)
    exact = [r.exact for r in results]
    wrong = [f"{r.seed} ({r.style}): {r.found}/{r.expected}" for r in results if not r.exact]
    assert sum(exact) >= 0.9 * len(exact), f"wrong line counts: {wrong}"
    assert {r.style for r in results} == {"gray", "bilevel"}
