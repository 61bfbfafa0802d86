"""Contours grouped into text lines (``line_index``, ``nb_lines``), on drawn line masks.

Each mask is what the model gives for a page layout: bands broken where real lines break
(shads, spaces, string holes, an illustration inset), side panels with their own short
lines, two columns. The grouping must join what continues a line and nothing else.
"""
from __future__ import annotations

import numpy as np
import pytest

from bec.ldv1.linegroups import group_lines
from bec.ldv1.postprocess import find_lines

BAND = 24   # band height in frame pixels
PITCH = 60  # line pitch


def draw_segments(mask: np.ndarray, segments: list[tuple[int, int, int]], slope: float = 0.0,
                  band: int = BAND) -> None:
    """Bands (x0, x1, centre y) ``band`` high; ``slope`` tilts them (dy per dx, image y down)."""
    for x0, x1, yc in segments:
        for x in range(x0, x1):
            y = int(round(yc - slope * x))
            mask[y - band // 2:y + band // 2, x] = 1


def truth_of(lines, expected: dict[tuple[int, int], int]) -> None:
    """Each contour (found by its left end and centre row) has the expected line index."""
    frame_w = lines.frame_size[0]
    for contour, index in zip(lines.frame_contours, lines.line_index):
        x0 = int(contour[:, 0].min())
        yc = int(round((contour[:, 1].min() + contour[:, 1].max()) / 2))
        key = min(expected, key=lambda k: abs(k[0] - x0) / frame_w + abs(k[1] - yc) / 100)
        assert index == expected[key], f"contour at x={x0}, y={yc}: line {index}, expected {expected[key]}"


@pytest.mark.parametrize("slope", [0.0, 0.03])
def test_a_line_split_at_shads_string_holes_and_an_inset_is_one_line(slope):
    w, h = 4096, 512
    mask = np.zeros((h, w), np.uint8)
    expected = {}
    for k in range(6):
        yc = 80 + k * PITCH + int(slope * 2000)
        shift = 37 * k                                                      # shads: gaps of ~1.25 band
        cuts = [(200, 900 + shift), (930 + shift, 1500 - shift)]
        rest = [(1530 - shift, 3900)]
        if k in (2, 3):                                                     # string hole: a wide gap
            rest = [(1530 - shift, 2400), (2600, 3900)]
        if 1 <= k <= 3:                                                     # an illustration inset
            rest = [(a, min(b, 3300)) for a, b in rest if a < 3300] + [(3600, 3900)]
        cuts += rest
        draw_segments(mask, [(a, b, yc) for a, b in cuts], slope)
        for a, b in cuts:
            expected[(a, int(round(yc - slope * (a + b) / 2)))] = k
    lines = find_lines(mask, (w * 2, h * 2))
    assert lines.nb_lines == 6
    truth_of(lines, expected)
    # Order: line by line, each left to right.
    assert list(lines.line_index) == sorted(lines.line_index)
    for k in range(6):
        xs = [c[:, 0].min() for c, i in zip(lines.contours, lines.line_index) if i == k]
        assert xs == sorted(xs)


def test_side_panels_keep_their_own_lines():
    """A pecha with an illustration panel at each end, captions under them: the captions are
    lines of their own, never joined to the main text beside them."""
    w, h = 4096, 512
    mask = np.zeros((h, w), np.uint8)
    main = [(700, 3400, 80 + k * PITCH) for k in range(7)]
    left_captions = [(120, 560, 80 + 5 * PITCH + 6), (120, 480, 80 + 6 * PITCH + 4)]
    right_captions = [(3560, 3980, 80 + 6 * PITCH - 5)]
    draw_segments(mask, main + left_captions + right_captions)
    lines = find_lines(mask, (w, h))
    assert lines.count == 10 and lines.nb_lines == 10
    # Every contour is a line of its own; at the same height, left to right.
    starts = [int(c[:, 0].min()) for c in lines.frame_contours]
    assert sorted(lines.line_index) == list(range(10))
    assert starts[-5:] == [120, 700, 120, 700, 3560]
    last_row = [x for x, i in zip(starts, lines.line_index) if i == lines.nb_lines - 1]
    assert last_row == [3560]


def test_a_folio_whose_every_line_flows_around_two_string_holes_has_whole_lines():
    """A short pecha folio with two large string holes: no line runs across either hole, so
    the column coverage there is zero, as in a column gutter. On a folio the block is one
    text: the three pieces of each line are one line."""
    w, h = 2400, 512
    mask = np.zeros((h, w), np.uint8)
    expected = {}
    for k in range(4):
        y = 120 + k * PITCH
        chord = 40 if k in (0, 3) else 90                      # the circle is wider mid-page
        pieces = [(300, 900 - chord), (900 + chord, 1500 - chord), (1500 + chord, 2100)]
        draw_segments(mask, [(a, b, y) for a, b in pieces])
        expected.update({(a, y): k for a, _ in pieces})
    lines = find_lines(mask, (w * 2, h * 2))
    assert lines.count == 12 and lines.nb_lines == 4
    truth_of(lines, expected)


def test_marks_outside_the_text_block_are_not_lines():
    """A folio: a marginal note above the block and a caption under it, both thin and short;
    and a book page: thin show-through beyond its right margin and, thinner, between its
    lines. None is a text line. The book's page number under its body is full height and
    stays a line."""
    w, h = 2400, 512
    mask = np.zeros((h, w), np.uint8)
    body = [(300, 2100, 130 + k * PITCH) for k in range(5)]
    draw_segments(mask, body)
    draw_segments(mask, [(1500, 1640, 60), (1700, 1760, 60)], band=10)   # a note in two pieces
    draw_segments(mask, [(320, 520, 455)], band=12)                       # a caption
    lines = find_lines(mask, (w, h))
    assert lines.nb_lines == 5 and lines.count == 5
    assert sorted(int(c[:, 0].min()) for c in lines.frame_contours) == [300] * 5

    w, h = 1400, 2000
    mask = np.zeros((h, w), np.uint8)
    rows = [160 + k * PITCH for k in range(20)]
    draw_segments(mask, [(100, 1200, y) for y in rows] + [(640, 700, 1480)])  # body, page number
    draw_segments(mask, [(1280, 1390, y + 4) for y in rows[2::5]], band=10)   # show-through
    draw_segments(mask, [(300, 420, y + PITCH // 2) for y in rows[1::6]], band=8)  # and between
    lines = find_lines(mask, (w, h))
    assert lines.nb_lines == 21 and lines.count == 21
    assert int(lines.frame_contours[-1][:, 0].min()) == 640


def test_two_columns_are_not_joined_but_a_running_header_is_one_line():
    """A book page in two columns under a running header with the page number at its end: 1
    header line + 12 rows × 2 columns; column text never joins across the gutter."""
    w, h = 1400, 2000
    mask = np.zeros((h, w), np.uint8)
    header = [(100, 160, 60), (400, 1000, 60), (1240, 1300, 60)]          # number, title, number
    left = [(100, 640, 160 + k * PITCH) for k in range(12)]
    right = [(700, 1300, 160 + k * PITCH) for k in range(12)]               # gutter: 60 px = 2.5 bands
    draw_segments(mask, header + left + right)
    lines = find_lines(mask, (w, h))
    assert lines.nb_lines == 25
    expected = {(a, y): 0 for a, _, y in header}
    for k in range(12):
        expected[(100, 160 + k * PITCH)] = 1 + 2 * k       # same height: left column first
        expected[(700, 160 + k * PITCH)] = 2 + 2 * k
    truth_of(lines, expected)


def test_a_table_of_contents_in_two_columns_keeps_its_columns_apart():
    """Entry … dot leader … page number: the model bridges the leader, so an entry is one band
    ending at its column's edge; the gutter between the columns is narrow (a band and a
    half) and the model bridges it on two rows. Those two bands are cut at the gutter: every
    entry is a line of its own."""
    w, h = 1400, 1000
    mask = np.zeros((h, w), np.uint8)
    segments = []
    for k in range(12):
        y = 100 + k * PITCH
        if k in (4, 9):                                          # bridged across the gutter
            segments += [(100 + 9 * k, 1260, y)]
        else:
            segments += [(100 + 9 * k, 650, y), (686, 1260 - 5 * k, y)]  # gutter 650–686
    draw_segments(mask, segments)
    lines = find_lines(mask, (w, h))
    assert lines.nb_lines == lines.count == 12 * 2
    assert sorted(lines.line_index) == list(range(24))  # no two contours joined
    for k in (4, 9):  # the bridged rows: the left entry ends at the gutter, the right starts there
        row = [c for c in lines.frame_contours if abs(c[:, 1].mean() - (100 + k * PITCH)) < PITCH / 3]
        spans = sorted((int(c[:, 0].min()), int(c[:, 0].max())) for c in row)
        assert len(spans) == 2 and 650 <= spans[0][1] < spans[1][0] <= 686 and spans[1][1] >= 1250


def test_group_lines_on_boxes_alone():
    order, index = group_lines(np.zeros((0, 4)))
    assert len(order) == 0 and len(index) == 0
    # Two stacked contours are two lines even when they touch horizontally.
    boxes = np.array([[0, 0, 100, 20], [0, 40, 100, 60], [110, 2, 200, 22]], float)
    order, index = group_lines(boxes)
    assert list(order) == [0, 2, 1] and list(index) == [0, 0, 1]
