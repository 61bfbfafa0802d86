"""The corrected page, tested the way the archive's readers use it.

Generated pages are skewed or bent by a *known* amount (their line labels move with them),
run through the shipped model with the pipeline's own correction logic, and then rebuilt
by the reader's recipe (:func:`bec.ldv1.correction.corrected_page`: cv2 rotation, then the
``tps`` package's spline and ``scipy.ndimage.map_coordinates``). Every contour must lie on
its own line's ink on that rebuilt page, and the lines must come out straight.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from bec.ldv1.checkpoint import load_checkpoint
from bec.ldv1.correction import corrected_page
from bec.ldv1.evaluate import DEFAULT_WEIGHTS, detect_lines, predict_mask, to_frame
from bec.ldv1.pagewarp import bend_page, labels_from_mask, skew_page
from bec.ldv1.postprocess import find_lines
from bec.ldv1.synth import EVAL_SEED_START, generate_page

#: A straightened line's box is at most this many times its ink band's height.
STRAIGHT = 2.0
#: Share of a contour's area that must lie on its own line's band (a little dilated).
ON_ITS_LINE = 0.9


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(DEFAULT_WEIGHTS).module


def pecha(seed: int, style: str = "gray"):
    page = generate_page(np.random.default_rng(EVAL_SEED_START + seed), style=style, wide_share=1.0)
    return page, labels_from_mask(page.line_mask)


def band_height(labels: np.ndarray, line: int) -> float:
    """Median vertical thickness of a line's band (its columns' pixel counts)."""
    columns = (labels == line).sum(axis=0)
    return float(np.median(columns[columns > 0]))


def rebuilt_labels(labels: np.ndarray, correction) -> np.ndarray:
    """The labels carried through the reader's correction (nearest pixel: labels do not blend)."""
    return corrected_page(labels, correction.rotation_angle, correction.tps_points, correction.tps_alpha,
                          nearest=True)


def check_on_ink_and_straight(lines, labels: np.ndarray) -> list[float]:
    """Each contour lies on one line's band of the rebuilt page; returns box/band ratios."""
    near = cv2.dilate(labels.astype(np.uint16), np.ones((9, 9), np.uint8)).astype(np.int32)
    ratios = []
    for contour, box in zip(lines.contours, lines.boxes):
        inside = np.zeros(labels.shape, np.uint8)
        cv2.fillPoly(inside, [contour.reshape(-1, 1, 2)], 1)
        under = near[inside > 0]
        line = int(np.bincount(under[under > 0]).argmax()) if (under > 0).any() else 0
        assert line and (under == line).mean() >= ON_ITS_LINE, \
            f"contour at {tuple(box)} is not on one line's ink ({(under == line).mean():.2f})"
        ratios.append(box[3] / band_height(labels, line))
    return ratios


@pytest.mark.parametrize("seed,style", [(0, "gray"), (3, "bilevel"), (5, "gray"), (8, "bilevel")])
def test_a_bent_page_is_dewarped_and_its_lines_come_out_straight(model, seed, style):
    page, labels = pecha(seed, style)
    amplitude = 2.0 * np.median([band_height(labels, k) for k in range(1, page.n_lines + 1)])
    image, bent = bend_page(page.image, labels, amplitude if seed % 2 == 0 else -amplitude)
    h, w = image.shape

    lines = detect_lines(model, image)
    c = lines.correction
    assert c.dewarped and c.tps_alpha == pytest.approx(0.5)
    assert c.tps_points.shape[1] == 4 and len(c.tps_points) > 4
    corners = {(0.0, 0.0), (0.0, w - 1.0), (h - 1.0, 0.0), (h - 1.0, w - 1.0)}
    fixed = {(float(p[0]), float(p[1])) for p in c.tps_points if p[0] == p[2] and p[1] == p[3]}
    assert corners <= fixed  # the four image corners stay where they are
    assert lines.nb_lines == page.n_lines
    ratios = check_on_ink_and_straight(lines, rebuilt_labels(bent, c))
    assert max(ratios) <= STRAIGHT

    # The test can fail: the same page without its spline leaves its lines bent.
    unbent = find_lines(predict_mask(model, to_frame(image)), (w, h))
    assert max(check_on_ink_and_straight(unbent, bent)) > STRAIGHT


@pytest.mark.parametrize("extra", [4.5, -4.5, 4.0, -5.0])
def test_a_skewed_page_is_rotated_back_with_the_right_sign(model, extra):
    page, labels = pecha(10 + int(abs(extra) * 2), "gray" if extra > 0 else "bilevel")
    # The generator skews its pages a little: turn by the rest, so the lines rise by `extra`
    # (OpenCV's convention: positive rises to the right).
    image, skewed = skew_page(page.image, labels, extra - page.angle)
    true_skew = extra

    lines = detect_lines(model, image)
    c = lines.correction
    assert c.rotated
    # The correction turns the page back: the opposite of its skew, within half a degree.
    assert c.rotation_angle == pytest.approx(-true_skew, abs=0.5)
    assert lines.nb_lines == page.n_lines
    ratios = check_on_ink_and_straight(lines, rebuilt_labels(skewed, c))
    assert max(ratios) <= STRAIGHT


def test_the_readmes_reader_rebuilds_the_same_page():
    """The ten lines of Python the README gives readers are the reader this project tests."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    start = text.index("```python\nimport cv2, numpy as np, tps")
    code = text[start + len("```python\n"):text.index("```", start + 10)]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    rng = np.random.default_rng(3)
    image = cv2.GaussianBlur((rng.random((300, 900)) * 255).astype(np.uint8), (0, 0), 3)
    points = np.array([[0, 0, 0, 0], [0, 899, 0, 899], [299, 0, 299, 0], [299, 899, 299, 899],
                       [150, 450, 140, 450], [120, 200, 130, 200]], np.float32)
    for row in ({"rotation_angle": None, "tps_points": None, "tps_alpha": None},
                {"rotation_angle": -3.5, "tps_points": None, "tps_alpha": None},
                {"rotation_angle": 4.0, "tps_points": points.tolist(), "tps_alpha": np.float16(0.5)}):
        theirs = scope["corrected_page"](image, row)
        ours = corrected_page(image, row["rotation_angle"], row["tps_points"], row["tps_alpha"])
        assert np.array_equal(theirs, ours)
