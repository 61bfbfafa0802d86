"""The shipped small line model.

The demo and the end-to-end tests rely on ``bec/ldv1/weights/small.pth`` finding the
right number of lines on generated pages, so that is asserted here on pages the model
has never seen (seeds ≥ 1 000 000; training only uses seeds below), through the full
production contract (frame, threshold, tiles, model, stitch, p > 0.85, find_lines,
second pass on skewed pages). The generator's own promises are checked in
``test_synth.py``; the score on real pages is ``python -m bec.tools.evaluate_real``
(README, "The shipped line model").
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
pytest.importorskip("uharfbuzz")

from bec.ldv1 import SHIPPED_WEIGHTS  # noqa: E402
from bec.tools.synth import EVAL_SEED_START  # noqa: E402

WEIGHTS = SHIPPED_WEIGHTS
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
        pytest.fail(f"shipped weights missing: {WEIGHTS} (python -m bec.tools.train_ldv1)")
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
    from bec.tools.evaluate_ldv1 import evaluate

    # The font-rendered pages (string holes, wide blanks, 40-line tables of contents) are far
    # harder than the stroke pages the first model scored 90 % on; counted as text lines
    # (contours grouped, marks outside the text dropped, bridged gutters cut: nb_lines) the
    # shipped model gets 18 of these 20 exact and all 20 within ±max(1, 10 %). This guards
    # that level with a page to spare; the score that matters is on real pages (README,
    # "The shipped line model").
    results = evaluate(small_model, TEST_SEEDS)
    exact = [r.exact for r in results]
    within = [abs(r.found - r.expected) <= max(1, 0.1 * r.expected) for r in results]
    wrong = [f"{r.seed} ({r.kind}, {r.style}): {r.found}/{r.expected}" for r in results if not r.exact]
    assert sum(exact) >= 17 and sum(within) >= 19, f"wrong line counts: {wrong}"
    assert {r.style for r in results} == {"gray", "bilevel"}
