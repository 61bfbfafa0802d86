"""The shipped small line model and the page generator it was trained on.

The demo and the end-to-end tests rely on ``bec/ldv1/weights/small.pth`` finding the
right number of lines on generated pecha pages, so that is asserted here on pages the
model has never seen (seeds ≥ 1 000 000; training only uses seeds below), through the
full production contract (frame, threshold, tiles, model, stitch, p > 0.85,
find_lines, second pass on skewed pages). The generator's own promises — determinism,
true bilevel output, one band per line, pecha proportions, encoders that Pillow reads
back — are checked first, since a broken generator would make that score meaningless.
"""
from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
from PIL import Image  # noqa: E402

from bec.ldv1.synth import (EVAL_SEED_START, encode_jpeg, encode_tiff_g4,  # noqa: E402
                            generate_page, page_for_seed)

WEIGHTS = Path(__file__).resolve().parents[1] / "bec" / "ldv1" / "weights" / "small.pth"
#: A block of unseen seeds kept apart from the one used while developing the model.
TEST_SEEDS = range(2 * EVAL_SEED_START, 2 * EVAL_SEED_START + 20)


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- generator


def test_same_seed_same_page_other_seed_other_page() -> None:
    a = generate_page(np.random.default_rng(7), "gray")
    b = generate_page(np.random.default_rng(7), "gray")
    c = generate_page(np.random.default_rng(8), "gray")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.line_mask, b.line_mask)
    assert (a.n_lines, a.angle) == (b.n_lines, b.angle)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_page_types_and_ranges() -> None:
    page = page_for_seed(3)
    assert page.style == "bilevel" and page_for_seed(4).style == "gray"
    assert page.image.dtype == np.uint8 and page.image.ndim == 2
    assert page.line_mask.dtype == bool and page.line_mask.shape == page.image.shape
    assert 3 <= page.n_lines <= 9 and abs(page.angle) <= 5.0


def test_bilevel_pages_are_black_and_white_only() -> None:
    for seed in range(5):
        page = generate_page(np.random.default_rng(seed), "bilevel")
        assert set(np.unique(page.image)) <= {0, 255}
        assert (page.image == 0).mean() > 0.005          # there is ink


def test_gray_pages_have_paper_tones() -> None:
    page = generate_page(np.random.default_rng(1), "gray")
    assert len(np.unique(page.image)) > 50
    assert 120 < np.median(page.image) < 250


def test_every_line_has_its_own_band() -> None:
    """One separate, non-trivial mask component per text line: the count to predict."""
    for seed in range(24):
        page = page_for_seed(seed)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(page.line_mask.astype(np.uint8), 8)
        assert n - 1 == page.n_lines, f"seed {seed}"
        widths, heights = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]
        assert (widths > 0.15 * page.image.shape[1]).all(), f"seed {seed}"
        assert (heights >= 8).all(), f"seed {seed}"


def test_mostly_wide_pecha_pages_with_some_book_pages() -> None:
    shapes = [page_for_seed(s).image.shape for s in range(40)]
    wide = [(h, w) for h, w in shapes if w > 2.5 * h]
    assert len(wide) >= 25 and len(wide) < 40
    for h, w in wide:
        assert 500 <= h <= 800 and 1800 <= w <= 2600


def test_explicit_size_is_honoured() -> None:
    page = generate_page(np.random.default_rng(5), "gray", width=2000, height=600)
    assert page.image.shape == (600, 2000)


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError, match="style"):
        generate_page(np.random.default_rng(0), "color")


def test_generation_is_quick() -> None:
    """Test archives of hundreds of pages are generated on the fly; guard against a
    per-pixel Python loop sneaking in (bound is loose: CI machines are shared)."""
    rng = np.random.default_rng(11)
    generate_page(rng, "gray", width=2600, height=800)
    times = []
    for style in ("gray", "bilevel", "gray", "bilevel", "gray"):
        t0 = time.perf_counter()
        generate_page(rng, style, width=2600, height=800)
        times.append(time.perf_counter() - t0)
    assert sorted(times)[2] < 0.25


# --------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("rgb", [False, True])
def test_jpeg_round_trip(rgb: bool) -> None:
    page = page_for_seed(0)
    data = encode_jpeg(page.image, rgb=rgb, quality=85)
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.mode == ("RGB" if rgb else "L")
    assert img.size == (page.image.shape[1], page.image.shape[0])
    back = np.asarray(img.convert("L"), dtype=np.float32)
    assert np.abs(back - page.image).mean() < 12.0


def test_tiff_g4_round_trip_is_lossless_for_bilevel_pages() -> None:
    page = page_for_seed(1)
    data = encode_tiff_g4(page.image)
    img = Image.open(io.BytesIO(data))
    assert img.format == "TIFF" and img.mode == "1"
    assert img.info.get("compression") == "group4"
    assert np.array_equal(np.asarray(img.convert("L")), page.image)
    assert len(data) < page.image.size / 8          # compressed, not raw bits


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
