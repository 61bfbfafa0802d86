"""Which contours form one text line: ``line_index`` and ``nb_lines``.

The model's mask often splits a text line into several contours: at a shad and the space
after it, at a string hole, at an illustration inset. Readers want lines, so contours that
continue one another along the same row share an index; unrelated text standing at the same
height must not: the columns of a two-column page or table of contents, the captions of a
pecha's side panels.

How (on a straightened page: the caller rotates the boxes by the residual skew first):

* Two contours are *neighbours in a row* when their vertical extents overlap by at least
  half the smaller height and they barely overlap horizontally; each contour is linked to
  its nearest such neighbour on the right.
* A gap up to ``MIN_GUTTER_GAP`` band heights is always inside a line.
* A wider gap is inside a line unless it is a **gutter**. The test is the page's column
  coverage: how many contours cover each x. A string hole or an inset interrupts a few lines
  while the lines above and below run through it; a column gutter or the edge of a side
  panel interrupts (nearly) all of them. So a gap wider than ``JOIN_GAP`` bands is a gutter
  when the coverage across its middle is at most ``GUTTER_SHARE`` of the coverage that the
  text body typically has; and any gap is one when rows from the top of the text to its
  bottom are split there, at least as many as run across it (a narrow gutter that the model
  bridged on some rows). Shads and spaces do not line up from one line to the next.

On a folio (a page at least ``FOLIO_ASPECT`` times as wide as it is tall: a pecha) the text
is one block: a gap is a gutter only where it cuts off a side panel at an end of the block,
narrow and with a caption or two (:func:`_side_panel`). A string hole that every line flows
around (a short folio with large holes) leaves no line across it, yet those lines go on
beyond it.

Marks outside the text block are not lines (:func:`marginal_lines`): thin, short bands beyond
the block's right or left end (show-through, the edge of the next page), and on a folio above
or below it (marginal notes, captions under the illustrations); and, anywhere, very thin
short bands (show-through between the lines). A book page's running header, page number and
footnotes sit above and below its body on purpose and stay lines.

Lines are ordered top to bottom, lines at the same height left to right, and the contours
of a line left to right.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Gaps up to this many band heights are within a line unless the rows split there from
#: the top of the text to its bottom (a narrow column gutter); wider gaps also when almost
#: nothing crosses them. Shads and spaces do not line up from one line to the next.
JOIN_GAP = 1.5
#: Gaps up to this many band heights are always within a line.
MIN_GUTTER_GAP = 0.5
#: Vertical overlap (share of the smaller height) for two contours to sit in one row.
ROW_OVERLAP = 0.5
#: Horizontal overlap (share of the narrower width) above which two contours are stacked,
#: not consecutive.
MAX_X_OVERLAP = 0.3
#: A wide gap is a gutter when fewer than this share of the body's lines cross it.
GUTTER_SHARE = 0.25
#: Below this body coverage (lines typically stacked at one x) there are too few lines to
#: tell a gutter from a gap, and wide gaps stay inside their line.
MIN_BODY_LINES = 3
#: A gap that at least this many rows share, as many as cross it, from rows spread over this
#: share of the text's height, is a gutter too (see _is_gutter).
MIN_SPLIT_ROWS = 3
GUTTER_SPAN = 0.6
#: Lines whose centres differ by less than this many band heights are at the same height.
SAME_HEIGHT = 0.5
#: A page this many times as wide as it is tall is a folio: one text block.
FOLIO_ASPECT = 2.0
#: On a folio, a gap is a gutter only when it cuts off a side panel: the text beyond it, to
#: the block's end, spans less than ``SIDE_PANEL_SHARE`` of the block's width and stands on
#: fewer than ``PANEL_ROWS`` of the rows the block has (captions under an illustration).
SIDE_PANEL_SHARE = 0.3
PANEL_ROWS = 0.5
#: A line whose bands are all thinner than this share of the body's band, and together
#: shorter than ``MARK_SHARE`` of the block's width, is a mark when it stands outside the
#: text block (see :func:`marginal_lines`).
MARK_HEIGHT = 0.75
MARK_SHARE = 0.4
#: Thinner still, such a short line is a mark wherever it stands: show-through between the
#: lines, a tile edge's sliver. The smallest real text (footnotes) is thicker.
SPECK_HEIGHT = 0.5


class Gutter(NamedTuple):
    """A column gutter: its x, and the span of the rows split at it (straightened y)."""

    x: float
    top: float
    bottom: float

    def splits(self, left_end: float, right_start: float, y: float) -> bool:
        """Does this gutter run through a gap from ``left_end`` to ``right_start`` at ``y``?"""
        return left_end <= self.x <= right_start and self.top <= y <= self.bottom


class _Union:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _band(boxes: np.ndarray) -> float:
    """The body's band height: the boxes' heights, their median weighted by width."""
    x0, y0, x1, y1 = boxes.T
    return _weighted_median(np.maximum(y1 - y0, 1e-6), np.maximum(x1 - x0, 1e-6))


def _is_folio(page_size: tuple[float, float] | None) -> bool:
    return page_size is not None and page_size[0] >= FOLIO_ASPECT * page_size[1]


#: Each contour's right neighbour in its row and whether the gap between is a gutter.
Links = list[tuple[int, int, bool]]


def group_lines(boxes: np.ndarray, page_size: tuple[float, float] | None = None,
                gutters: list[Gutter] = (), links: Links | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Group contours into text lines.

    ``boxes`` is L×4 ``(x0, y0, x1, y1)`` per contour on the straightened page (any unit);
    ``page_size`` (w, h) in the same unit tells a folio from a book page (None: a book page);
    ``gutters`` (:func:`column_gutters`) are column gutters that no line crosses; ``links``
    are :func:`row_links` of these boxes and gutters when the caller has them already.
    Returns ``(order, line_index)``: the contour order (lines top to bottom, each left to
    right) and, for the contours in that order, their line index (0 = top line).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int16)
    x0, y0, x1, y1 = boxes.T
    width = np.maximum(x1 - x0, 1e-6)
    band = _band(boxes)
    union = _Union(n)
    for i, j, gutter in links if links is not None else row_links(boxes, page_size, gutters):
        if not gutter:
            union.join(i, j)

    roots = np.array([union.find(i) for i in range(n)])
    groups = {r: np.flatnonzero(roots == r) for r in np.unique(roots)}
    centre = (y0 + y1) / 2
    lines = []
    for members in groups.values():
        y = _weighted_median(centre[members], width[members])
        lines.append((y, float(x0[members].min()), members[np.argsort(x0[members], kind="stable")]))
    lines.sort(key=lambda line: line[0])
    # Lines at about the same height (columns, side panels) read left to right.
    rows: list[list[tuple]] = []
    for line in lines:
        if rows and line[0] - rows[-1][0][0] < SAME_HEIGHT * band:
            rows[-1].append(line)
        else:
            rows.append([line])
    ordered = [line for row in rows for line in sorted(row, key=lambda line: line[1])]
    order = np.concatenate([members for _, _, members in ordered]).astype(np.int64)
    index = np.concatenate([np.full(len(members), k, np.int16)
                            for k, (_, _, members) in enumerate(ordered)])
    return order, index


def row_links(boxes: np.ndarray, page_size: tuple[float, float] | None,
              gutters: list[Gutter] = ()) -> Links:
    """Each contour's nearest neighbour on its right in the same row, and whether the gap
    between them is a gutter (see the module's docstring; any gap over one of ``gutters``
    is): ``(left, right, gutter)``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    if n == 0:
        return []
    x0, y0, x1, y1 = boxes.T
    width = np.maximum(x1 - x0, 1e-6)
    height = np.maximum(y1 - y0, 1e-6)
    band = _band(boxes)
    coverage = _column_coverage(x0, x1)
    body = _body_coverage(coverage)

    pairs = [(i, j) for i in range(n)
             for j in [_right_neighbour(i, x0, y0, x1, y1, width, height)] if j is not None]
    gaps = [(float(x1[i]), float(x0[j]), float(y0[i] + y1[i]) / 2) for i, j in pairs
            if x0[j] - x1[i] > MIN_GUTTER_GAP * band]
    block = float(y1.max() - y0.min())
    folio = _is_folio(page_size)
    left_end, right_end = float(x0.min()), float(x1.max())
    links = []
    for i, j in pairs:
        gap = x0[j] - x1[i]
        wide = gap > JOIN_GAP * band
        if any(g.splits(x1[i], x0[j], (y0[i] + y1[i]) / 2) for g in gutters):
            gutter = True
        elif gap <= MIN_GUTTER_GAP * band:
            gutter = False
        elif folio and not _side_panel(x0, x1, (x1[i] + x0[j]) / 2, left_end, right_end, body):
            gutter = False          # inside a folio's block: a string hole, an inset, a space
        else:
            gutter = _is_gutter(coverage, x1[i], x0[j], body, gaps, block, wide)
        links.append((i, j, bool(gutter)))
    return links


def column_gutters(boxes: np.ndarray, page_size: tuple[float, float],
                   links: Links | None = None) -> list[Gutter]:
    """The column gutters of a page with columns (never a folio's): at the middle of the
    clear strip that the rows split there leave in common, from the first of those rows to
    the last (a running header above the columns crosses no gutter).

    The model bridges a narrow gutter on a row now and then (a table of contents' dot
    leader runs into the next column's entry); :func:`bec.ldv1.postprocess.find_lines`
    cuts such bridges there. A gutter needs ``MIN_SPLIT_ROWS`` rows split at it and a strip
    clear on all of them. ``links``: :func:`row_links` of these boxes, if the caller has them.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0 or _is_folio(page_size):
        return []
    x0, y0, x1, y1 = boxes.T
    links = links if links is not None else row_links(boxes, page_size)
    strips = sorted((float(x1[i]), float(x0[j]), float(y0[i] + y1[i]) / 2)
                    for i, j, gutter in links if gutter)
    found: list[Gutter] = []
    while strips:
        lo, hi, _ = strips[0]
        group = [gap for gap in strips if gap[0] < hi and gap[1] > lo]   # gaps over the first
        strips = [gap for gap in strips if gap not in group]
        lo, hi = max(gap[0] for gap in group), min(gap[1] for gap in group)
        if len(group) >= MIN_SPLIT_ROWS and hi > lo:
            rows = [gap[2] for gap in group]
            found.append(Gutter((lo + hi) / 2, min(rows), max(rows)))
    return found


def _right_neighbour(i: int, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray,
                     width: np.ndarray, height: np.ndarray) -> int | None:
    """The nearest contour continuing contour ``i``'s row on its right, if any."""
    overlap_y = np.minimum(y1, y1[i]) - np.maximum(y0, y0[i])
    same_row = overlap_y >= ROW_OVERLAP * np.minimum(height, height[i])
    overlap_x = np.minimum(x1, x1[i]) - np.maximum(x0, x0[i])
    after = (x0 + width / 2 > x1[i]) & (overlap_x <= MAX_X_OVERLAP * np.minimum(width, width[i]))
    candidates = np.flatnonzero(same_row & after)
    candidates = candidates[candidates != i]
    if len(candidates) == 0:
        return None
    gaps = x0[candidates] - x1[i]
    return int(candidates[np.argmin(gaps)])


def _side_panel(x0: np.ndarray, x1: np.ndarray, middle: float, left_end: float,
                right_end: float, body: float) -> bool:
    """On a folio, does a gap at ``middle`` cut off a side panel at an end of the block?
    A side panel is narrow and holds a caption or two; the short first words of a justified
    line stand on every row."""
    width = right_end - left_end
    if middle - left_end < SIDE_PANEL_SHARE * width:
        beyond = np.count_nonzero(x1 <= middle)
    elif right_end - middle < SIDE_PANEL_SHARE * width:
        beyond = np.count_nonzero(x0 >= middle)
    else:
        return False
    return beyond < PANEL_ROWS * body


def _column_coverage(x0: np.ndarray, x1: np.ndarray) -> np.ndarray:
    """How many contours cover each x (one bin per unit, from 0 to the rightmost end)."""
    size = int(np.ceil(x1.max())) + 2
    delta = np.zeros(size + 1, np.int64)
    np.add.at(delta, np.clip(np.floor(x0).astype(np.int64), 0, size), 1)
    np.add.at(delta, np.clip(np.ceil(x1).astype(np.int64), 0, size), -1)
    return np.cumsum(delta)[:size]


def _body_coverage(coverage: np.ndarray) -> float:
    """The coverage of the text body: a high quantile of the covered columns (ragged line
    ends and gaps only lower it)."""
    covered = coverage[coverage > 0]
    return float(np.percentile(covered, 75)) if len(covered) else 0.0


def _is_gutter(coverage: np.ndarray, left_end: float, right_start: float, body: float,
               gaps: list[tuple[float, float, float]], block_height: float, wide: bool) -> bool:
    if body < MIN_BODY_LINES:
        return False
    gap = right_start - left_end
    a = int(np.floor(left_end + 0.25 * gap))
    b = int(np.ceil(right_start - 0.25 * gap))
    if b <= a:
        return False
    crossing = float(coverage[max(a, 0):max(b, a + 1)].min())
    if wide and crossing <= GUTTER_SHARE * body:
        return True
    # Lines split at the same place from the top of the text to its bottom: a column gutter
    # that the model bridged on some rows (its bridges cross it) still splits at least as many
    # rows as cross it, all the way down. A string hole or an inset splits a few neighbouring
    # rows only.
    middle = (left_end + right_start) / 2
    rows = [y for lo, hi, y in gaps if lo < middle < hi]
    return (len(rows) >= MIN_SPLIT_ROWS and len(rows) >= crossing
            and max(rows) - min(rows) >= GUTTER_SPAN * block_height)


def marginal_lines(boxes: np.ndarray, line_index: np.ndarray,
                   page_size: tuple[float, float]) -> np.ndarray:
    """Which lines are marks outside the text block, not text lines: a bool per line index.

    ``boxes`` (x0, y0, x1, y1) and ``line_index`` are per contour, as :func:`group_lines`
    gives them. A mark is a line whose contours are all thin (under ``MARK_HEIGHT`` bands)
    and short (together under ``MARK_SHARE`` of the block's width), standing wholly beyond
    the block's typical line ends (right or left), or on a folio wholly above or below the
    block; or, anywhere, one whose contours are all under ``SPECK_HEIGHT`` bands. The block
    is what the full-height bands cover. Ink there is show-through, the next page's edge, a
    marginal note or a caption: the model marks it faintly and thinly.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n_lines = int(line_index.max()) + 1 if len(line_index) else 0
    marks = np.zeros(n_lines, bool)
    if n_lines < 2:
        return marks
    x0, y0, x1, y1 = boxes.T
    height = np.maximum(y1 - y0, 1e-6)
    band = _band(boxes)
    full = height >= MARK_HEIGHT * band
    if not full.any():
        return marks
    block_left, block_right = np.percentile(x0[full], 25), np.percentile(x1[full], 75)
    block_top, block_bottom = y0[full].min(), y1[full].max()
    folio = _is_folio(page_size)
    for k in range(n_lines):
        sel = line_index == k
        if full[sel].any() or (x1[sel] - x0[sel]).sum() > MARK_SHARE * (block_right - block_left):
            continue
        beside = x0[sel].min() >= block_right or x1[sel].max() <= block_left
        outside = y1[sel].max() <= block_top or y0[sel].min() >= block_bottom
        speck = bool((height[sel] < SPECK_HEIGHT * band).all())
        marks[k] = beside or (folio and outside) or speck
    return marks
