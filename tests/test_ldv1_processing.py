"""Unit tests of ldv1's pre- and post-processing (pure functions, no services)."""
from __future__ import annotations

import math
import time

import cv2
import numpy as np
import pytest
import torch

from bec.ldv1.correction import Correction, correct_frame, corrected_page, frame_to_original_affine, map_points
from bec.ldv1.postprocess import (
    PageLines,
    estimate_skew,
    find_lines,
    frame_to_original,
    plan_correction,
)
from bec.ldv1.preprocess import (
    adaptive_threshold,
    frame_size,
    gaussian_kernel,
    stitch,
    stitch_into,
    tile_count,
    tile_frame,
)
from bec.ldv1.preprocess_torch import adaptive_threshold_torch, stitch_torch, tile_frame_torch

# --------------------------------------------------------------------------- helpers


def synthetic_page(width: int, height: int, n_lines: int, seed: int = 0) -> np.ndarray:
    """A grayscale page that looks like a scan: uneven paper, sensor noise and rows of
    glyph-like dark strokes, so the adaptive threshold sees realistic statistics."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paper = 200 + 30 * np.sin(xx / 400) + 15 * (yy / height)
    ink = np.zeros((height, width), np.uint8)
    pitch = height / (n_lines + 1)
    glyph_h = int(pitch * 0.45)
    for row in range(n_lines):  # drawing test data: loops over glyphs, not pixels
        y = int(pitch * (row + 0.7))
        x = 40
        while x < width - 60:
            gw = int(rng.integers(8, 30))
            top = y + int(rng.integers(0, max(2, glyph_h // 5)))
            cv2.rectangle(ink, (x, top), (x + gw, y + glyph_h), 255, int(rng.integers(1, 4)))
            x += gw + int(rng.integers(3, 15))
    ink = cv2.GaussianBlur(ink, (3, 3), 0).astype(np.float32) / 255
    page = paper * (1 - 0.75 * ink) + rng.normal(0, 6, (height, width))
    return np.clip(page, 0, 255).astype(np.uint8)


def rotate_about_centre(points: np.ndarray, frame_w: int, frame_h: int, angle: float) -> np.ndarray:
    """Rotate points counter-clockwise on screen (y down) by ``angle`` degrees about
    the frame centre: a horizontal line becomes one rising to the right for angle > 0."""
    cx, cy = (frame_w - 1) / 2, (frame_h - 1) / 2
    t = math.radians(angle)
    x, y = points[:, 0] - cx, points[:, 1] - cy
    return np.stack([cx + x * math.cos(t) + y * math.sin(t), cy - x * math.sin(t) + y * math.cos(t)], axis=1)


def band(frame_w, frame_h, x0, x1, yc, thickness, angle) -> np.ndarray:
    corners = np.array(
        [[x0, yc - thickness / 2], [x1, yc - thickness / 2], [x1, yc + thickness / 2], [x0, yc + thickness / 2]]
    )
    return rotate_about_centre(corners, frame_w, frame_h, angle)


def centroid(contour: np.ndarray) -> np.ndarray:
    m = cv2.moments(contour.reshape(-1, 1, 2).astype(np.float32))
    return np.array([m["m10"] / m["m00"], m["m01"] / m["m00"]])


def draw(mask: np.ndarray, polygon: np.ndarray) -> None:
    # Sub-pixel polygon (shift=4) so small angles are drawn faithfully.
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)


def lines_mask(frame_w=2048, frame_h=512, n=5, angle=0.0, specks=True):
    """N filled bands at ``angle`` plus specks that must be dropped; returns the mask
    and the per-band masks (ground truth for boxes)."""
    mask = np.zeros((frame_h, frame_w), np.uint8)
    singles = []
    spacing = 80
    first = (frame_h - (n - 1) * spacing) / 2
    for i in range(n):
        poly = band(frame_w, frame_h, 224, frame_w - 224, first + i * spacing, 30, angle)
        one = np.zeros_like(mask)
        draw(one, poly)
        singles.append(one)
        mask |= one
    if specks:
        for x, y in [(60, 50), (70, 300), (1990, 200), (1985, 470)]:
            cv2.circle(mask, (x, y), 4, 1, -1)  # dots
        cv2.rectangle(mask, (100, 450), (112, 456), 1, -1)  # a short dash
        cv2.rectangle(mask, (frame_w - 8, 20), (frame_w - 4, frame_h - 20), 1, -1)  # border streak
    return mask, singles


# --------------------------------------------------------------------------- frame size


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((6000, 1500), (2048, 512)),  # wide pecha: one tile row, downscaled
        ((1500, 400), (1920, 512)),  # wide pecha smaller than a tile row: upscaled to it
        ((2500, 1000), (2500, 1000)),  # ratio exactly 2.5 is not "wide": fits, untouched
        ((1500, 2500), (1229, 2048)),  # tall page: height-bound
        ((10000, 8000), (2560, 2048)),  # huge page: height-bound
        ((9000, 4000), (4096, 1820)),  # huge page: width-bound
        ((800, 600), (800, 600)),  # small page: never upscaled
    ],
)
def test_frame_size_rules(size, expected):
    assert frame_size(*size) == expected


def test_frame_size_rejects_empty_page():
    with pytest.raises(ValueError):
        frame_size(0, 10)


# --------------------------------------------------------------------------- threshold


def test_gaussian_kernel_matches_cv2():
    ours = gaussian_kernel(31)
    theirs = cv2.getGaussianKernel(31, 0, ktype=cv2.CV_32F).ravel()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-7)


def test_threshold_torch_agrees_with_cv2():
    page = synthetic_page(2048, 700, n_lines=6)
    expected = adaptive_threshold(page)
    assert set(np.unique(expected)) <= {0, 255}
    got = adaptive_threshold_torch(torch.from_numpy(page))
    assert got.dtype == torch.uint8 and tuple(got.shape) == page.shape
    agreement = float((got.numpy() == expected).mean())
    print(f"\nthreshold torch vs cv2 agreement: {agreement:.6%} ({int((got.numpy() != expected).sum())} px differ)")
    assert agreement >= 0.999


def test_threshold_torch_batch_matches_single():
    pages = np.stack([synthetic_page(300, 200, 3, seed=s) for s in range(3)])
    batch = adaptive_threshold_torch(torch.from_numpy(pages)).numpy()
    for i in range(3):
        assert (batch[i] == adaptive_threshold_torch(torch.from_numpy(pages[i])).numpy()).all()
        assert (batch[i] == adaptive_threshold(pages[i])).mean() >= 0.999


# --------------------------------------------------------------------------- tiling


def test_tile_stitch_round_trip_with_white_padding():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (1000, 1300), dtype=np.uint8)  # no 255 inside: padding is detectable
    rows, cols = tile_count(1000, 1300)
    assert (rows, cols) == (2, 3)
    tiles = tile_frame(frame)
    assert tiles.shape == (6, 512, 512) and tiles.dtype == np.uint8
    assert (tiles[0] == frame[:512, :512]).all()
    assert (tiles[1] == frame[:512, 512:1024]).all()  # row-major
    assert (tiles[3][: 1000 - 512, :] == frame[512:, :512]).all()
    assert (tiles[3][1000 - 512 :, :] == 255).all()  # bottom padding white
    assert (tiles[2][:, 1300 - 1024 :] == 255).all()  # right padding white
    assert (tiles[2][:, : 1300 - 1024] == frame[:512, 1024:]).all()
    assert (stitch(tiles, rows, cols, 1000, 1300) == frame).all()
    into = np.full((1000, 1300), 7, np.uint8)
    assert stitch_into(tiles, rows, cols, into) is into and (into == frame).all()

    t = torch.from_numpy(frame)
    ttiles = tile_frame_torch(t)
    assert (ttiles.numpy() == tiles).all()
    assert (stitch_torch(ttiles, rows, cols, 1000, 1300).numpy() == frame).all()


def test_tile_float_frame_pads_with_one_and_exact_fit():
    frame = np.zeros((512, 1024), np.float32)
    assert tile_frame(frame).shape == (2, 512, 512)
    small = np.zeros((100, 50), np.float32)
    tiles = tile_frame(small)
    assert tiles.shape == (1, 512, 512)
    assert tiles[0, :100, :50].max() == 0 and tiles[0, 100:, :].min() == 1.0
    ttiles = tile_frame_torch(torch.from_numpy(small))
    assert ttiles[0, 100:, :].min().item() == 1.0


def test_stitch_rejects_wrong_grid():
    with pytest.raises(ValueError):
        stitch(np.zeros((5, 512, 512), np.float32), 2, 3, 1000, 1300)
    with pytest.raises(ValueError):  # a grid smaller than the frame it should fill
        stitch_into(np.zeros((6, 512, 512), np.uint8), 2, 3, np.zeros((1100, 1300), np.uint8))


# --------------------------------------------------------------------------- lines


@pytest.mark.parametrize("angle", [0.0, 4.0, -4.0, 2.0, -1.5])
def test_find_lines_count_order_specks_and_skew(angle):
    mask, _ = lines_mask(n=5, angle=angle)
    lines = find_lines(mask.astype(bool), original_size=(4096, 1024))
    assert isinstance(lines, PageLines)
    assert lines.count == 5  # the dots, the dash and the border streak are gone
    assert abs(lines.angle - angle) <= 0.5
    assert lines.boxes.shape == (5, 4) and lines.boxes.dtype == np.int32
    # Top to bottom: centres along the page's vertical increase.
    centres = np.array([centroid(c) for c in lines.contours])
    key = centres[:, 1] + centres[:, 0] * math.tan(math.radians(angle))
    assert (np.diff(key) > 0).all()
    for c in lines.contours:
        assert c.dtype == np.int32 and c.ndim == 2 and c.shape[1] == 2
        assert len(c) < 40  # simplified: rows stay compact


def test_find_lines_boxes_in_original_pixels():
    mask, singles = lines_mask(n=4, angle=0.0)
    lines = find_lines(mask, original_size=(4096, 1024))  # original is 2× the frame
    for box, one in zip(lines.boxes, singles):
        x, y, w, h = cv2.boundingRect(one)
        assert tuple(box) == (2 * x, 2 * y, 2 * w, 2 * h)
    for contour, one in zip(lines.contours, singles):
        x, y, w, h = cv2.boundingRect(one)
        assert contour[:, 0].min() >= 2 * x and contour[:, 0].max() < 2 * (x + w)
        assert contour[:, 1].min() >= 2 * y and contour[:, 1].max() < 2 * (y + h)
    # Frame contours stay in frame pixels.
    assert lines.frame_size == (2048, 512) and lines.original_size == (4096, 1024)
    assert max(c[:, 0].max() for c in lines.frame_contours) < 2048


def test_small_angle_reported_as_zero():
    mask, _ = lines_mask(n=5, angle=0.2, specks=False)
    assert find_lines(mask, (2048, 512)).angle == 0.0


def test_skew_clamped_to_five_degrees():
    mask, _ = lines_mask(frame_w=2048, frame_h=1024, n=4, angle=7.0, specks=False)
    assert find_lines(mask, (2048, 1024)).angle == pytest.approx(5.0)


def test_short_line_at_right_end_is_ordered_after_the_line_above():
    # At +4° a short line at the right end of the next row sits higher in the image
    # than the centre of the full line above it; it must still come second.
    w, h, angle = 2048, 512, 4.0
    mask = np.zeros((h, w), np.uint8)
    draw(mask, band(w, h, 224, w - 224, 200, 24, angle))
    draw(mask, band(w, h, 1500, 1900, 240, 24, angle))
    lines = find_lines(mask, (w, h))
    assert lines.count == 2
    assert lines.boxes[0, 2] > lines.boxes[1, 2]  # the long one first
    assert lines.boxes[1, 1] < lines.boxes[0, 1] + lines.boxes[0, 3] // 2  # and yet higher up


def test_find_lines_same_for_every_mask_dtype_and_leaves_the_mask_alone():
    """The inference process hands uint8 0/1 masks (found without a copy); bool, 0/255 and
    float masks give the same lines, and none is modified (post reuses the slot's mask)."""
    mask, _ = lines_mask(n=5, angle=2.0)
    as_01 = (mask > 0).astype(np.uint8)
    kept = as_01.copy()
    reference = find_lines(as_01, (4096, 1024))
    assert (as_01 == kept).all() and reference.count == 5
    for other in (as_01.astype(bool), as_01 * 255, as_01.astype(np.float32), np.asfortranarray(as_01)):
        got = find_lines(other, (4096, 1024))
        assert got.angle == reference.angle and (got.boxes == reference.boxes).all()
        assert all((a == b).all() for a, b in zip(got.contours, reference.contours))


def test_empty_mask():
    lines = find_lines(np.zeros((512, 2048), bool), (4096, 1024))
    assert lines.count == 0 and lines.boxes.shape == (0, 4) and lines.angle == 0.0


def test_plan_correction_rotates_from_three_degrees_only():
    for angle, rotated in ((4.0, True), (-4.0, True), (3.2, True), (2.0, False), (0.0, False)):
        mask, _ = lines_mask(n=5, angle=angle, specks=False)
        first = find_lines(mask, (4096, 1024))
        plan = plan_correction(mask, first)
        assert not plan.dewarped  # straight bands are not bent, whatever their skew
        if rotated:  # the correction turns the page back: the opposite of its skew
            assert plan.rotation_angle == pytest.approx(-first.angle) and plan.rotation_angle * angle < 0
        else:
            assert plan.identity


def _centroid_of(image: np.ndarray) -> np.ndarray:
    ys, xs = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    total = image.sum()
    return np.array([(image * xs).sum() / total, (image * ys).sum() / total])


@pytest.mark.parametrize("correction", [
    Correction(3.5),
    Correction(None, np.array([[300, 500, 320, 500], [330, 1500, 320, 1500], [300, 2500, 320, 2500],
                               [600, 1500, 620, 1500]], np.float32), 0.5),
    Correction(-4.2, np.array([[300, 500, 320, 500], [330, 1500, 320, 1500], [300, 2500, 320, 2500],
                               [600, 1500, 620, 1500]], np.float32), 0.5),
], ids=["rotated", "dewarped", "both"])
def test_a_corrected_frame_is_the_readers_corrected_page_scaled(correction):
    """The worker corrects frames, readers correct originals: a blob lands at the same place
    (to a tenth of a pixel) either way."""
    w, h, fw, fh = 3000, 900, 1707, 512
    corners = np.array([[0, 0, 0, 0], [0, w - 1, 0, w - 1], [h - 1, 0, h - 1, 0], [h - 1, w - 1, h - 1, w - 1]],
                       np.float32)
    if correction.dewarped:
        correction = Correction(correction.rotation_angle, np.vstack([correction.tps_points, corners]), 0.5)
    ys, xs = np.mgrid[0:h, 0:w]
    for cx, cy in ((700, 300), (2200, 650)):
        original = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 15.0 ** 2)).astype(np.float32)
        reader = corrected_page(original, correction.rotation_angle, correction.tps_points, correction.tps_alpha)
        frame = cv2.resize(original, (fw, fh), interpolation=cv2.INTER_AREA)
        ours = correct_frame(frame, correction, (w, h), fill=0)
        at = map_points(_centroid_of(ours)[None], frame_to_original_affine((fw, fh), (w, h)))[0]
        np.testing.assert_allclose(at, _centroid_of(reader), atol=0.1)


def test_a_skewed_page_is_rotated_and_its_contours_lie_on_the_corrected_page():
    w, h = 2048, 512
    mask, _ = lines_mask(w, h, n=5, angle=4.0, specks=False)
    first = find_lines(mask, (w * 2, h * 2))
    assert first.angle == pytest.approx(4.0, abs=0.5)
    plan = plan_correction(mask, first)
    assert plan.rotation_angle == pytest.approx(-first.angle)

    gray = np.where(mask > 0, 0, 255).astype(np.uint8)  # dark lines on white paper
    straight = correct_frame(gray, plan, (w * 2, h * 2))
    assert straight.shape == gray.shape and straight[0, 0] == 255  # white corners
    second = find_lines(straight < 128, (w * 2, h * 2), plan)
    assert second.count == 5 and second.nb_lines == 5
    assert abs(second.angle) < 0.3  # horizontal after rotation
    assert second.correction == plan
    # The reader rebuilds the corrected page from the original: every contour point is ink.
    original = cv2.resize(gray, (w * 2, h * 2), interpolation=cv2.INTER_NEAREST)
    page = corrected_page(original, plan.rotation_angle, None, None)
    near = cv2.erode(page, np.ones((7, 7), np.uint8)) < 128
    for contour, box in zip(second.contours, second.boxes):
        assert near[contour[:, 1], contour[:, 0]].all()
        assert box[3] <= 2.5 * 24 * 2  # straight: the box is about the band (24 frame px × 2)


def test_estimate_skew_on_contours():
    mask, _ = lines_mask(n=5, angle=-4.0, specks=False)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    assert estimate_skew(list(contours)) == pytest.approx(-4.0, abs=0.5)
    assert estimate_skew([c.reshape(-1, 2) for c in contours]) == pytest.approx(-4.0, abs=0.5)
    assert estimate_skew([]) == 0.0


# --------------------------------------------------------------------------- timing


def _best_of(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def test_report_per_page_costs(capsys):
    """Not an assertion: prints per-page costs on a 4096×1400 frame for the lead."""
    w, h = 4096, 1400
    page = synthetic_page(w, h, n_lines=12, seed=3)
    binary = adaptive_threshold(page)
    rows, cols = tile_count(h, w)
    tiles = tile_frame(binary)
    probs = (tiles.astype(np.float32) / 255)  # stand-in for model output tiles
    mask = np.zeros((h, w), np.uint8)
    for i in range(12):
        draw(mask, band(w, h, 100, w - 100, 100 + i * 100, 40, 1.0))
    t_page = torch.from_numpy(page)
    t_probs = torch.from_numpy(probs)
    costs = {
        "threshold cv2": _best_of(lambda: adaptive_threshold(page)),
        "threshold torch (cpu)": _best_of(lambda: adaptive_threshold_torch(t_page)),
        "tile_frame (uint8)": _best_of(lambda: tile_frame(binary)),
        "tile_frame_torch": _best_of(lambda: tile_frame_torch(torch.from_numpy(binary))),
        "stitch (float32)": _best_of(lambda: stitch(probs, rows, cols, h, w)),
        "stitch_torch (float32)": _best_of(lambda: stitch_torch(t_probs, rows, cols, h, w)),
        "mask > 0.85": _best_of(lambda: stitch(probs, rows, cols, h, w) > 0.85),
        "find_lines (12 lines)": _best_of(lambda: find_lines(mask, (2 * w, 2 * h))),
        "correct_frame (rotate)": _best_of(lambda: correct_frame(page, Correction(4.0), (2 * w, 2 * h))),
    }
    with capsys.disabled():
        print(f"\nper-page costs, {w}×{h} frame, {rows * cols} tiles (best of 3, ms):")
        for name, ms in costs.items():
            print(f"  {name:<24}{ms:8.1f}")
