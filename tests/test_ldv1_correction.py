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
from bec.ldv1.correction import correct_frame, corrected_page
from bec.tools.evaluate_ldv1 import DEFAULT_WEIGHTS, detect_lines, to_frame
from bec.ldv1.postprocess import find_lines, plan_correction
from bec.tools.synth import EVAL_SEED_START, generate_page

#: A straightened line's box is at most this many times its ink band's height.
STRAIGHT = 2.0
#: Share of a contour's area that must lie on its own line's band (a little dilated).
ON_ITS_LINE = 0.9


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(DEFAULT_WEIGHTS).module


def pecha(seed: int, style: str = "gray", **geometry: float):
    """A pecha page never trained on, its labels moved with it by the generator."""
    capture = "bilevel" if style == "bilevel" else "scan"
    page = generate_page(EVAL_SEED_START + seed, kind="pecha", capture=capture, **geometry)
    return page, page.line_labels


def band_height(labels: np.ndarray, line: int) -> float:
    """Median vertical thickness of a line's band (its columns' pixel counts)."""
    columns = (labels == line).sum(axis=0)
    return float(np.median(columns[columns > 0]))


def rebuilt_labels(labels: np.ndarray, correction) -> np.ndarray:
    """The labels carried through the reader's correction (nearest pixel: labels do not blend)."""
    return corrected_page(labels, correction.rotation_angle, correction.tps_points, correction.tps_alpha,
                          nearest=True)


def on_lines(lines, labels: np.ndarray) -> list[tuple[int, float, float]]:
    """Per contour: (its line, the share of its area on that line's band, box ÷ band height)."""
    near = cv2.dilate(labels.astype(np.uint16), np.ones((9, 9), np.uint8)).astype(np.int32)
    out = []
    for contour, box in zip(lines.contours, lines.boxes):
        inside = np.zeros(labels.shape, np.uint8)
        cv2.fillPoly(inside, [contour.reshape(-1, 1, 2)], 1)
        under = near[inside > 0]
        line = int(np.bincount(under[under > 0]).argmax()) if (under > 0).any() else 0
        share = float((under == line).mean()) if line else 0.0
        out.append((line, share, box[3] / band_height(labels, line) if line else np.inf))
    return out


def true_mask_lines(page_labels: np.ndarray):
    """The pipeline's correction logic driven by the *true* line mask instead of a model: the
    first pass sees the page's own bands, the second pass the bands of the frame as the
    worker corrects it. What comes out depends on the geometry alone."""
    h, w = page_labels.shape
    size = (w, h)
    frame_w, frame_h = to_frame(np.zeros((h, w), np.uint8)).shape[::-1]
    first_mask = cv2.resize((page_labels > 0).astype(np.uint8), (frame_w, frame_h), interpolation=cv2.INTER_NEAREST)
    first = find_lines(first_mask, size)
    plan = plan_correction(first_mask, first)
    if plan.identity:
        return first
    second_mask = correct_frame(first_mask * 255, plan, size, fill=0, interpolation=cv2.INTER_NEAREST) > 127
    return find_lines(second_mask, size, plan)


def bent_pecha(seed: int, style: str):
    flat, labels = pecha(seed, style, skew=0.0, bend=0.0)
    amplitude = 2.0 * np.median([band_height(labels, k) for k in range(1, flat.n_lines + 1)])
    return pecha(seed, style, skew=0.0, bend=amplitude if seed % 2 == 0 else -amplitude)


@pytest.mark.parametrize("seed,style", [(0, "gray"), (3, "bilevel"), (5, "gray"), (8, "bilevel")])
def test_a_bent_page_is_dewarped_and_its_lines_land_straight_on_the_readers_page(seed, style):
    """Geometry alone (the true line mask in place of a model): every contour lies on its own
    line of the page the reader rebuilds, straight, one text line each."""
    page, bent = bent_pecha(seed, style)
    h, w = bent.shape
    lines = true_mask_lines(bent)
    c = lines.correction
    assert c.dewarped and c.tps_alpha == pytest.approx(0.5)
    assert c.tps_points.shape[1] == 4 and len(c.tps_points) > 4
    corners = {(0.0, 0.0), (0.0, w - 1.0), (h - 1.0, 0.0), (h - 1.0, w - 1.0)}
    fixed = {(float(p[0]), float(p[1])) for p in c.tps_points if p[0] == p[2] and p[1] == p[3]}
    assert corners <= fixed  # the four image corners stay where they are
    found = on_lines(lines, rebuilt_labels(bent, c))
    assert all(line and share >= ON_ITS_LINE for line, share, _ in found), found
    assert max(ratio for *_, ratio in found) <= STRAIGHT
    assert lines.nb_lines == page.n_lines
    # The test can fail: the same page without its spline leaves its lines bent.
    unbent = find_lines(cv2.resize((bent > 0).astype(np.uint8), lines.frame_size, interpolation=cv2.INTER_NEAREST),
                        (w, h))
    assert max(ratio for *_, ratio in on_lines(unbent, bent)) > STRAIGHT


@pytest.mark.parametrize("extra", [4.5, -4.5, 4.0, -5.0])
def test_a_skewed_page_is_rotated_back_with_the_right_sign_onto_the_readers_page(extra):
    # The lines rise by `extra` (OpenCV's convention: positive rises to the right).
    page, skewed = pecha(10 + int(abs(extra) * 2), "gray" if extra > 0 else "bilevel", skew=extra, bend=0.0)
    lines = true_mask_lines(skewed)
    c = lines.correction
    assert c.rotated and not c.dewarped
    # The correction turns the page back: the opposite of its skew, within half a degree.
    assert c.rotation_angle == pytest.approx(-extra, abs=0.5)
    found = on_lines(lines, rebuilt_labels(skewed, c))
    assert all(line and share >= ON_ITS_LINE for line, share, _ in found), found
    assert max(ratio for *_, ratio in found) <= STRAIGHT
    assert lines.nb_lines == page.n_lines


@pytest.mark.parametrize("seed,style,geometry", [(0, "gray", "bent"), (3, "bilevel", "bent"),
                                                 (1, "gray", "skewed"), (2, "bilevel", "skewed")])
def test_the_shipped_model_on_bent_and_skewed_pages(model, seed, style, geometry):
    """The same through the shipped model: the page is corrected as it should be, and nearly
    all of what the model draws lies, straight, on the lines of the reader's page (the model
    may still merge two lines or mark a folio number: line counts are scored elsewhere)."""
    if geometry == "bent":
        page, truth = bent_pecha(seed, style)
    else:
        page, truth = pecha(20 + seed, style, skew=4.5 if seed % 2 else -4.5, bend=0.0)
    lines = detect_lines(model, page.image)
    c = lines.correction
    if geometry == "bent":
        assert c.dewarped
    else:
        assert c.rotation_angle == pytest.approx(-page.angle, abs=0.5)
    found = on_lines(lines, rebuilt_labels(truth, c))
    areas = np.array([cv2.contourArea(k.reshape(-1, 1, 2).astype(np.float32)) for k in lines.contours])
    on_own = np.array([share for _, share, _ in found])
    assert (areas * on_own).sum() >= 0.85 * areas.sum()
    assert all(ratio <= STRAIGHT for _, share, ratio in found if share >= ON_ITS_LINE)


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
