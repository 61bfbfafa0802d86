"""The page generator (``bec.tools.synth``): its promises to the model, the tests and the demo.

The small model is trained on these pages and every end-to-end test reads them, so the
generator's own contract is checked here: determinism, the kinds and captures asked
for, exact line labels (one band per line, numbered top down, still exact after a
known skew and bend), bilevel output, speed, encoders that Pillow reads back, and a
one-line message naming what to install when the fonts are missing. It is a tool, not
runtime: no module a worker imports may load it.
"""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("uharfbuzz")
from PIL import Image  # noqa: E402

from bec.tools import synth  # noqa: E402
from bec.tools.synth import (CAPTURES, KINDS, WIDE_KINDS, encode_jpeg,  # noqa: E402
                            encode_tiff_g4, generate_page, page_for_seed)


def test_same_seed_same_page_other_seed_other_page() -> None:
    a, b, c = page_for_seed(7), page_for_seed(7), page_for_seed(8)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.line_labels, b.line_labels)
    assert (a.n_lines, a.angle, a.bend, a.kind, a.capture) == (b.n_lines, b.angle, b.bend, b.kind, b.capture)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_can_be_asked_for_and_is_labelled_line_by_line(kind: str) -> None:
    """Labels are 1..n (no hole), each one band: one connected piece, numbered top down
    (a table of contents row by row), at least a few pixels tall."""
    for seed in range(3):
        page = page_for_seed(seed, kind)
        h, w = page.image.shape
        assert page.kind == kind and page.image.dtype == np.uint8
        assert page.line_labels.dtype == np.int16 and page.line_labels.shape == (h, w)
        assert page.line_mask.dtype == bool and np.array_equal(page.line_mask, page.line_labels > 0)
        if kind in WIDE_KINDS:
            assert w > 2.5 * h and 4 <= page.n_lines <= 9, (seed, page.n_lines)
        else:
            assert h > w and page.n_lines >= 10, (seed, page.n_lines)
        assert sorted(np.unique(page.line_labels)) == list(range(page.n_lines + 1))
        tops = []
        for k in range(1, page.n_lines + 1):
            band = (page.line_labels == k).astype(np.uint8)
            n, _, stats, _ = cv2.connectedComponentsWithStats(band, connectivity=8)
            assert n == 2, f"{kind} seed {seed}: line {k} is in {n - 1} pieces"
            assert stats[1, cv2.CC_STAT_HEIGHT] >= 4
            tops.append(np.nonzero(band.any(1))[0].mean())
        if kind != "toc":
            assert tops == sorted(tops), f"{kind} seed {seed}: lines not numbered top down"


@pytest.mark.parametrize("capture", CAPTURES)
def test_each_capture_can_be_asked_for(capture: str) -> None:
    page = page_for_seed(11, capture=capture)
    assert page.capture == capture and page.style == ("bilevel" if capture == "bilevel" else "gray")
    values = np.unique(page.image)
    if capture == "bilevel":
        assert set(values) <= {0, 255} and (page.image == 0).mean() > 0.005
    else:
        assert len(values) > 50


def _line_angle(labels: np.ndarray, k: int) -> float:
    ys, xs = np.nonzero(labels == k)
    slope = np.polyfit(xs.astype(np.float64), ys.astype(np.float64), 1)[0]
    return float(-np.degrees(np.arctan(slope)))          # y down: rising to the right is positive


@pytest.mark.parametrize("skew", [-4.0, -1.5, 0.0, 2.0, 5.0])
def test_known_skew_is_the_labels_angle(skew: float) -> None:
    """Positive = counter-clockwise (lines rise to the right), as postprocess measures it."""
    page = generate_page(np.random.default_rng(3), "pecha", "scan", skew=skew, bend=0.0, perspective=0.0)
    assert page.angle == skew
    longest = max(range(1, page.n_lines + 1), key=lambda k: np.count_nonzero(page.line_labels == k))
    assert abs(_line_angle(page.line_labels, longest) - skew) < 0.15


def _centre_rows(labels: np.ndarray, k: int) -> dict[int, float]:
    ys, xs = np.nonzero(labels == k)
    out: dict[int, list[int]] = {}
    for x, y in zip(xs.tolist(), ys.tolist()):
        out.setdefault(x, []).append(y)
    return {x: float(np.mean(v)) for x, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_known_bend_moves_the_lines_by_at_most_its_amplitude(seed: int) -> None:
    """The same page flat and bent by B px: each line's centre moves by a smooth profile
    whose largest displacement is B (reached within the text block, or nearly: the profile
    may peak at the page edge); the image grows by 2B to hold it."""
    bend = 24.0
    flat = generate_page(np.random.default_rng(seed), "manuscript", "scan", skew=0.0, bend=0.0, perspective=0.0)
    bent = generate_page(np.random.default_rng(seed), "manuscript", "scan", skew=0.0, bend=bend, perspective=0.0)
    assert bent.n_lines == flat.n_lines and bent.bend == bend
    offset = (bent.image.shape[0] - flat.image.shape[0]) / 2
    moves = []
    for k in range(1, flat.n_lines + 1):
        a, b = _centre_rows(flat.line_labels, k), _centre_rows(bent.line_labels, k)
        moves += [b[x] - a[x] - offset for x in a.keys() & b.keys()]
    moves = np.array(moves)
    assert 0.4 * bend <= np.abs(moves).max() <= bend + 2.0


def test_explicit_size_is_honoured_and_wide_sizes_give_pechas() -> None:
    page = generate_page(np.random.default_rng(5), capture="scan", width=2000, height=600)
    assert page.image.shape == page.line_labels.shape == (600, 2000)
    assert page.kind in WIDE_KINDS and page.n_lines >= 4
    small = generate_page(np.random.default_rng(5), capture="photo", width=800, height=300)
    assert small.image.shape == (300, 800) and small.n_lines >= 4


def test_unknown_kind_or_capture_is_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        generate_page(np.random.default_rng(0), "scroll")
    with pytest.raises(ValueError, match="capture"):
        generate_page(np.random.default_rng(0), capture="fax")


def test_missing_fonts_are_named_with_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                      capsys: pytest.CaptureFixture) -> None:
    from bec.tools import train_ldv1 as train
    from bec.tools.synth import fonts

    monkeypatch.setattr(fonts, "FONT_DIRS", (tmp_path,))
    fonts._find.cache_clear()
    try:
        problem = synth.missing_fonts()
        assert problem is not None and "apt-get install" in problem
        for package in ("fonts-tibetan-machine", "fonts-ddc-uchen", "fonts-monlam",
                        "fonts-sambhota-tsugring", "fonts-sambhota-yigchung"):
            assert package in problem
        with pytest.raises(synth.MissingFonts, match="fonts-monlam"):
            generate_page(np.random.default_rng(0))
        assert train.main(["--out", str(tmp_path / "x.pth"), "--steps", "1"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "apt-get install" in err and "Traceback" not in err
        assert not (tmp_path / "x.pth").exists()
    finally:
        fonts._find.cache_clear()


def test_no_worker_module_imports_the_generator() -> None:
    """The generator and the training script are tools: a worker's processes must not load
    them (nor HarfBuzz and FreeType), so a host without the synth extra or the fonts runs."""
    modules = ["bec.pipeline." + m for m in ("supervisor", "controller", "fetch", "inference", "post",
                                             "child", "slots", "messages", "heap")]
    modules += ["bec.ldv1." + m for m in ("preprocess", "preprocess_torch", "postprocess", "segmenter",
                                          "checkpoint", "smallnet", "deeplab", "precision", "config", "kind")]
    modules += ["bec.ocr.kind", "bec.cli.worker"]
    probe = ("import importlib, sys\n"
             f"for m in {modules!r}: importlib.import_module(m)\n"
             "print(' '.join(m for m in sys.modules if m.startswith(('bec.tools', "
             "'uharfbuzz', 'freetype'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == ""


# --------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("rgb", [False, True])
def test_jpeg_round_trip(rgb: bool) -> None:
    page = page_for_seed(0, capture="photo")
    data = encode_jpeg(page.image, rgb=rgb, quality=85)
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG" and img.mode == ("RGB" if rgb else "L")
    assert img.size == (page.image.shape[1], page.image.shape[0])
    back = np.asarray(img.convert("L"), dtype=np.float32)
    assert np.abs(back - page.image).mean() < 12.0


@pytest.mark.parametrize("dpi", [300, 600])
def test_tiff_g4_round_trip_is_lossless_for_bilevel_pages(dpi: int) -> None:
    page = generate_page(np.random.default_rng(1), capture="bilevel", dpi=dpi)
    assert page.dpi == dpi
    data = encode_tiff_g4(page.image, page.dpi)
    img = Image.open(io.BytesIO(data))
    assert img.format == "TIFF" and img.mode == "1"
    assert img.info.get("compression") == "group4"
    assert round(img.info["dpi"][0]) == dpi
    assert np.array_equal(np.asarray(img.convert("L")), page.image)
    assert len(data) < page.image.size / 8          # compressed, not raw bits
