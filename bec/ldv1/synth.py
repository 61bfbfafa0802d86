"""Seeded generator of pecha-like pages, with the line mask a model must predict.

BEC ships a small line model of its own (see ``smallnet`` / ``train``) so that the demo
and the tests show real line detection without the production weights. Neither real
scans nor their labels can be shipped, so pages are drawn here: wide paper-toned pages
with a few long horizontal lines of glyph-like marks, skew, stains, pecha frames and
marginal marks, either as gray scans or as fax-like bilevel scans.

The label is a *band* per text line: from the first to the last glyph, and from the
head line of the glyphs to the bottom of their main body. Vowel marks above and stacked
letters below stay outside the band, so bands of neighbouring lines are always separated
by at least one glyph height of background; that keeps the predicted mask of one line a
single connected component that never touches the next one. Frame lines, side-panel
page marks, blotches and stains are drawn in ink but are never labelled.

Geometry is chosen in *frame* units (the page as the model sees it: wide pages scaled
to a height of 512) so that glyph sizes always stay in the range the model is trained
on, whatever the page's pixel size. Skew is applied to the drawing coordinates (not by
warping the raster), which keeps generation well under 100 ms for a 2600×800 page.

Seeds: training uses seeds below ``EVAL_SEED_START``; evaluation and tests use seeds
from it upwards, so the model is always scored on pages it has never seen.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

__all__ = ["SynthPage", "generate_page", "page_for_seed", "encode_jpeg", "encode_tiff_g4",
           "STYLES", "EVAL_SEED_START"]

STYLES = ("gray", "bilevel")
EVAL_SEED_START = 1_000_000      # training seeds are < this, evaluation seeds ≥ this

_TILE = 512                      # frame height of a wide page
_WIDE_RATIO = 2.5
_MIN_PITCH_F = 30.0              # line pitch bounds, in frame pixels
_MAX_PITCH_F = 150.0
_MAX_GLYPH_F = 60.0              # glyph body height cap, in frame pixels
_SHIFT = 3                       # sub-pixel bits for cv2 drawing
_N_STROKE_KINDS = 9


@dataclass
class SynthPage:
    """One generated page.

    ``angle`` is the skew in degrees with OpenCV's convention (``getRotationMatrix2D``:
    positive turns the content counter-clockwise as displayed).
    """

    image: np.ndarray        # uint8 H×W gray (0/255 only for "bilevel")
    n_lines: int
    line_mask: np.ndarray    # bool H×W, one band per text line
    angle: float
    style: str = "gray"


def page_for_seed(seed: int, style: str | None = None) -> SynthPage:
    """The page of a seed; style alternates with the seed when not given (even: gray)."""
    if style is None:
        style = STYLES[seed % 2]
    return generate_page(np.random.default_rng(seed), style=style)


def generate_page(rng: np.random.Generator, style: str = "gray",
                  width: int | None = None, height: int | None = None, *,
                  wide_share: float = 0.85) -> SynthPage:
    """Draw one page; everything random comes from ``rng`` (same state, same page).

    Without a size, a page is a wide pecha with probability ``wide_share`` and an
    ordinary book page otherwise (training asks for more of the latter: they are the
    harder case, with tile seams in both directions).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    w, h = _page_size(rng, width, height, wide_share)
    wide = w > _WIDE_RATIO * h
    scale = _TILE / h if wide else min(1.0, 4096 / w, 2048 / h)   # original → frame
    ink = np.zeros((h, w), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    n_lines, angle = _draw_content(rng, ink, mask, scale, wide)
    image = _render(rng, ink, style)
    return SynthPage(image=image, n_lines=n_lines, line_mask=mask.astype(bool),
                     angle=angle, style=style)


# --------------------------------------------------------------------------- geometry

def _page_size(rng: np.random.Generator, width: int | None, height: int | None,
               wide_share: float) -> tuple[int, int]:
    if width is not None and height is not None:
        return int(width), int(height)
    if rng.random() < wide_share:                              # pecha: wide
        h = int(rng.integers(500, 801)) if height is None else int(height)
        lo = max(1800, int(_WIDE_RATIO * h) + 1)
        w = int(rng.integers(lo, max(lo, 2600) + 1)) if width is None else int(width)
        return w, h
    if rng.random() < 0.7:                                     # portrait book page
        h = int(rng.integers(1000, 1501)) if height is None else int(height)
        w = int(h * rng.uniform(0.65, 0.8)) if width is None else int(width)
    else:                                                      # landscape, not a pecha
        w = int(rng.integers(1400, 2001)) if width is None else int(width)
        h = int(w / rng.uniform(1.3, 2.2)) if height is None else int(height)
    return w, h


def _sample_angle(rng: np.random.Generator) -> float:
    r = rng.random()
    if r < 0.45:
        return float(rng.uniform(-1.0, 1.0))
    if r < 0.8:
        return float(rng.uniform(-3.0, 3.0))
    return float(rng.uniform(-5.0, 5.0))


def _draw_content(rng: np.random.Generator, ink: np.ndarray, mask: np.ndarray,
                  scale: float, wide: bool) -> tuple[int, float]:
    """Lay out the text block, draw ink and bands; returns (line count, angle)."""
    h, w = ink.shape
    n = int(rng.integers(3, 10))
    angle = _sample_angle(rng)
    margin_x = w * rng.uniform(0.04, 0.09)
    margin_y = h * rng.uniform(0.06, 0.12)
    block_w = w - 2 * margin_x
    min_pitch, max_pitch = _MIN_PITCH_F / scale, _MAX_PITCH_F / scale
    # Vertical room left once the rotated block's corners must stay on the page.
    spare = h - 2 * margin_y - n * min_pitch
    max_sin = max(0.0, spare / block_w)
    sin_a = abs(np.sin(np.radians(angle)))
    if sin_a > max_sin:
        angle = float(np.sign(angle) * np.degrees(np.arcsin(max_sin)))
        sin_a = max_sin
    room = h - 2 * margin_y - block_w * sin_a
    pitch = float(np.clip(room / n * rng.uniform(0.8, 1.0), min_pitch, max_pitch))
    glyph_h = min(pitch * rng.uniform(0.33, 0.45), _MAX_GLYPH_F / scale)
    block_h = pitch * n
    top0 = (h - block_h) / 2 + rng.uniform(-0.3, 0.3) * max(0.0, room - block_h) / 2
    # Side margins wider than any gap inside a line (≤ 1.3 glyph heights): where a line
    # starts is then never in doubt, and a tile seam in a gap is never mistaken for it.
    # (A narrower block needs less vertical room once rotated, so the fit above holds.)
    margin_x = max(margin_x, 3.0 * glyph_h)
    block_w = w - 2 * margin_x

    rot = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0).astype(np.float32)
    strokes: list[tuple[np.ndarray, int]] = []        # (polylines N×P×2, thickness)

    # Side panel (page marks of a pecha) and frame, in unrotated coordinates.
    x_text0, x_text1 = margin_x, w - margin_x
    has_frame = rng.random() < 0.8
    # The frame must stay on the page once rotated: bound its padding by the margins.
    top_room = top0 - (block_w / 2) * sin_a
    pad = max(0.0, min(pitch * rng.uniform(0.35, 0.7), 0.7 * margin_x, 0.7 * top_room))
    frame_t = max(1, round(rng.uniform(1.0, 3.5) / max(scale, 0.5)))
    # A side panel of page marks only comes with its ruled frame: without the rule, marks
    # that close to the text could as well be the start of its lines.
    panel = wide and has_frame and rng.random() < 0.6
    if panel:
        panel_w = block_w * rng.uniform(0.05, 0.08)
        x_text0 += panel_w
        strokes.append((_wavy(rng, [(x_text0 - pad / 2, top0 - pad),
                                    (x_text0 - pad / 2, top0 + block_h + pad)]), frame_t))
        marks = _marginal_column(rng, margin_x + panel_w / 2 - pad / 2, top0, block_h,
                                 glyph_h)
        strokes += marks
    if has_frame:
        strokes += _frame(rng, margin_x - pad, top0 - pad, w - margin_x + pad,
                          top0 + block_h + pad, frame_t)
    for _ in range(int(rng.integers(0, 3))):     # marks in the outer margin, off any line
        strokes += _margin_note(rng, w, margin_x, top0, block_h, glyph_h,
                                x_text0 - (pad if has_frame else 0.0))

    bands = []
    short_last = rng.random() < 0.35
    for i in range(n):
        top = top0 + i * pitch + pitch * 0.3 + rng.uniform(-0.06, 0.06) * pitch
        gh = glyph_h * rng.uniform(0.92, 1.08)
        x0 = x_text0 + rng.uniform(0.0, 0.02) * block_w
        x1 = x_text1 - rng.uniform(0.0, 0.02) * block_w
        if i == n - 1 and short_last:      # still ≥ 10 glyph heights: never a "note"
            x1 = x0 + max((x1 - x0) * rng.uniform(0.25, 0.9), min(x1 - x0, 10 * gh))
        line_strokes, xs, xe = _text_line(rng, x0, x1, top, gh)
        strokes += line_strokes
        bands.append([(xs, top), (xe, top), (xe, top + gh), (xs, top + gh)])

    for pts, thickness in strokes:
        _polylines(ink, _rotate(pts, rot), thickness)
    _blotches(rng, ink)
    band_pts = _rotate(np.asarray(bands, np.float32), rot)
    cv2.fillPoly(mask, _fixed(band_pts), 1, cv2.LINE_8, _SHIFT)
    return n, angle


def _rotate(pts: np.ndarray, rot: np.ndarray) -> np.ndarray:
    return pts @ rot[:, :2].T + rot[:, 2]


def _fixed(pts: np.ndarray) -> np.ndarray:
    return np.round(pts * (1 << _SHIFT)).astype(np.int32)


def _polylines(img: np.ndarray, pts: np.ndarray, thickness: int) -> None:
    if len(pts):
        cv2.polylines(img, _fixed(pts), False, 255, int(thickness), cv2.LINE_AA, _SHIFT)


# --------------------------------------------------------------------------- glyphs

def _text_line(rng: np.random.Generator, x0: float, x1: float, top: float,
               gh: float) -> tuple[list[tuple[np.ndarray, int]], float, float]:
    """Syllables of 1–4 glyph-like marks separated by tsheg dots, shad bars and gaps."""
    n_max = int((x1 - x0) / (0.45 * gh)) + 4
    widths = gh * rng.uniform(0.45, 0.85, n_max)
    end_syl = rng.random(n_max) < 0.4
    gaps = np.where(end_syl, gh * rng.uniform(0.3, 0.45, n_max),
                    gh * rng.uniform(0.04, 0.12, n_max))
    shad = end_syl & (rng.random(n_max) < 0.06)
    gaps = np.where(shad, gh * rng.uniform(0.8, 1.3, n_max), gaps)
    space = rng.random(n_max) < 0.015
    gaps = np.where(space, gh * rng.uniform(0.6, 1.3, n_max), gaps)
    starts = x0 + np.concatenate(([0.0], np.cumsum(widths + gaps)[:-1]))
    k = max(1, int(np.count_nonzero(starts + widths <= x1)))       # glyphs that fit
    gw, end_syl, shad, gaps = widths[:k], end_syl[:k], shad[:k], gaps[:k]
    # No bare space next to either end of a line: a syllable or two beyond one would
    # look just like a margin note (which is not a line) and make the label arbitrary.
    near_end = np.zeros(k, bool)
    near_end[:2] = True
    near_end[max(0, k - 4):] = True
    gaps = np.where(space[:k] & ~shad & near_end, gh * 0.35, gaps)
    gx = x0 + np.concatenate(([0.0], np.cumsum(gw + gaps)[:-1]))
    end_syl[-1] = shad[-1] = False
    thick = max(1, round(gh * rng.uniform(0.08, 0.13)))
    out: list[tuple[np.ndarray, int]] = []
    main = _glyph_strokes(rng, gx, gw, top, gh)
    heavy = rng.random(len(main)) < 0.3            # irregular stroke widths
    out.append((main[~heavy], thick))
    out.append((main[heavy], thick + 1))
    # tsheg: a dot at head height after a syllable (a zero-length line is a round dot)
    tx = gx[end_syl & ~shad] + gw[end_syl & ~shad] + gh * 0.15
    ty = np.full_like(tx, top + gh * 0.08)
    dots = np.stack([np.stack([tx, ty], -1)] * 2, 1)
    out.append((dots, max(2, round(gh * rng.uniform(0.16, 0.24)))))
    # shad: a vertical bar in the middle of its gap
    sx = gx[shad] + gw[shad] + gaps[shad] * 0.5
    bars = np.stack([np.stack([sx, np.full_like(sx, top - 0.05 * gh)], -1),
                     np.stack([sx + gh * 0.05, np.full_like(sx, top + 1.15 * gh)], -1)], 1)
    out.append((bars, thick))
    return out, float(gx[0]), float(gx[-1] + gw[-1])


def _glyph_strokes(rng: np.random.Generator, gx: np.ndarray, gw: np.ndarray, top: float,
                   gh: float) -> np.ndarray:
    """Three-point strokes for every glyph, returned as M×3×2 page coordinates.

    Each glyph gets a head bar, vertical stems, hooks and cross strokes, plus now and
    then a vowel mark above or a stacked letter below. Coordinates are drawn in glyph
    units (u across the glyph's width, v down from its head line, 1 = body bottom) so
    that the whole line is one vectorised batch.
    """
    g = len(gx)
    s = np.empty((g, _N_STROKE_KINDS, 3, 2), np.float32)
    use = np.empty((g, _N_STROKE_KINDS), bool)

    def uni(lo: float, hi: float, *shape: int) -> np.ndarray:
        return rng.uniform(lo, hi, (g, *shape)).astype(np.float32)

    # head bar
    s[:, 0, :, 0] = [0.0, 0.5, 1.0]
    s[:, 0, :, 1] = uni(-0.03, 0.05, 3)
    use[:, 0] = rng.random(g) < 0.85
    # main stem on the right
    u = uni(0.6, 1.0)
    s[:, 1, :, 0] = u[:, None] + uni(-0.15, 0.05, 3) * [0, 1, 1]
    s[:, 1, :, 1] = np.stack([uni(0, 0.1), uni(0.4, 0.6), uni(0.75, 1.0)], -1)
    use[:, 1] = rng.random(g) < 0.8
    # left stem / diagonal
    s[:, 2, :, 0] = np.stack([uni(0.0, 0.4), uni(0.0, 0.5), uni(0.0, 0.6)], -1)
    s[:, 2, :, 1] = np.stack([uni(0.0, 0.3), uni(0.3, 0.6), uni(0.6, 1.0)], -1)
    use[:, 2] = rng.random(g) < 0.6
    # hook / bowl
    s[:, 3, :, 0] = uni(0.0, 1.0, 3)
    s[:, 3, :, 1] = np.stack([uni(0.25, 0.55), uni(0.5, 1.0), uni(0.55, 1.0)], -1)
    use[:, 3] = rng.random(g) < 0.6
    # lower cross bar
    v = uni(0.4, 0.95)
    s[:, 4, :, 0] = [0.1, 0.5, 0.9]
    s[:, 4, :, 1] = v[:, None] + uni(-0.08, 0.08, 3)
    use[:, 4] = rng.random(g) < 0.35
    # stacked letter below the body
    u = uni(0.2, 0.8)
    s[:, 5, :, 0] = u[:, None] + uni(-0.25, 0.25, 3) * [0, 1, 1]
    s[:, 5, :, 1] = np.stack([uni(0.9, 1.0), uni(1.15, 1.35), uni(1.35, 1.7)], -1)
    use[:, 5] = rng.random(g) < 0.18
    s[:, 6, :, 0] = u[:, None] + np.float32([-0.3, 0.0, 0.3]) + uni(-0.1, 0.1, 3)
    s[:, 6, :, 1] = uni(1.2, 1.45)[:, None] + uni(-0.06, 0.06, 3)
    use[:, 6] = use[:, 5] & (rng.random(g) < 0.6)
    # vowel mark above the head line
    u = uni(0.1, 0.6)
    s[:, 7, :, 0] = u[:, None] + np.stack(
        [np.zeros(g, np.float32), uni(0.1, 0.3), uni(0.3, 0.7)], -1)
    s[:, 7, :, 1] = np.stack([uni(-0.05, 0.0), uni(-0.4, -0.25), uni(-0.5, -0.3)], -1)
    use[:, 7] = rng.random(g) < 0.12
    # vowel mark below (hook)
    u = uni(0.2, 0.7)
    s[:, 8, :, 0] = u[:, None] + np.float32([0.0, 0.2, 0.4])
    s[:, 8, :, 1] = np.stack([uni(0.95, 1.05), uni(1.2, 1.35), uni(1.1, 1.2)], -1)
    use[:, 8] = (rng.random(g) < 0.08) & ~use[:, 5]
    # a glyph always has at least a stem
    use[:, 1] |= ~use[:, 1:5].any(1)
    s += rng.normal(0.0, 0.035, s.shape).astype(np.float32)
    s[..., 0] = gx[:, None, None] + s[..., 0] * gw[:, None, None]
    s[..., 1] = top + s[..., 1] * gh
    return s[use]


def _wavy(rng: np.random.Generator, ends: list[tuple[float, float]],
          n: int = 24) -> np.ndarray:
    """A hand-ruled straight line: a polyline with a little wobble (1×n×2)."""
    (xa, ya), (xb, yb) = ends
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    pts = (1 - t) * np.float32([xa, ya]) + t * np.float32([xb, yb])
    pts += rng.normal(0.0, 0.6, pts.shape).astype(np.float32)
    return pts[None]


def _frame(rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float,
           thickness: int) -> list[tuple[np.ndarray, int]]:
    """Pecha frame: a single or double ruled rectangle (sometimes top and bottom only)."""
    sides = [((x0, y0), (x1, y0)), ((x0, y1), (x1, y1))]
    if rng.random() < 0.85:
        sides += [((x0, y0), (x0, y1)), ((x1, y0), (x1, y1))]
    out = [(_wavy(rng, list(e)), thickness) for e in sides]
    if rng.random() < 0.4:
        d = rng.uniform(4.0, 10.0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

        def out_by_d(p: tuple[float, float]) -> tuple[float, float]:
            return p[0] + d * np.sign(p[0] - cx), p[1] + d * np.sign(p[1] - cy)

        outer = [(out_by_d(a), out_by_d(b)) for a, b in sides]
        out += [(_wavy(rng, list(e)), thickness + 1) for e in outer]
    return out


def _marginal_column(rng: np.random.Generator, xc: float, top0: float, block_h: float,
                     gh: float) -> list[tuple[np.ndarray, int]]:
    """Page marks of a side panel: 1–4 glyphs stacked vertically, never a line."""
    k = int(rng.integers(1, 5))
    gw = gh * 0.7
    tops = top0 + block_h / 2 + (np.arange(k) - k / 2) * gh * 1.5
    pieces = [_glyph_strokes(rng, np.float32([xc - gw / 2]), np.float32([gw]), float(t), gh)
              for t in tops]
    return [(np.concatenate(pieces), max(1, round(gh * 0.1)))]


def _margin_note(rng: np.random.Generator, w: int, margin_x: float, top0: float,
                 block_h: float, gh: float, left_limit: float) -> list[tuple[np.ndarray, int]]:
    """1–3 small glyphs in the outer margin (a reader's mark), well short of a line.

    A note is only placed where at least three glyph heights of paper separate it from
    the text (or it sits beyond the frame): closer than that, whether it belongs to the
    line would be a matter of taste, and the label must not be. It also keeps two
    or three glyph heights from the top and left page edges, which are tile edges:
    there, a few glyphs look just like the part of a line that a tile seam cut off.
    """
    k = int(rng.integers(1, 4))
    gh2 = gh * rng.uniform(0.6, 0.9)
    width = k * gh2 * 0.8
    left_room = left_limit - 3 * gh - width
    top_room = top0 - 3.5 * gh - gh2
    if top_room > 2 * gh and (left_room < 3 * gh or rng.random() < 0.5):  # top margin
        y = rng.uniform(2 * gh, top_room)
        x = rng.uniform(margin_x, w - margin_x - width)
    elif left_room >= 3 * gh:                                          # left margin
        y = rng.uniform(top0, top0 + block_h - gh2)
        x = rng.uniform(3 * gh, left_room)
    else:
        return []
    gx = x + np.arange(k, dtype=np.float32) * gh2 * 0.8
    return [(_glyph_strokes(rng, gx, np.full(k, gh2 * 0.65, np.float32), float(y), gh2),
             max(1, round(gh2 * 0.1)))]


def _blotches(rng: np.random.Generator, ink: np.ndarray) -> None:
    """Ink spots: small irregular filled blobs anywhere on the page."""
    h, w = ink.shape
    k = int(rng.integers(0, 4))
    if k == 0:
        return
    c = np.stack([rng.uniform(0, w, k), rng.uniform(0, h, k)], -1)[:, None, :]
    ang = np.sort(rng.uniform(0, 2 * np.pi, (k, 7)), 1)
    r = rng.uniform(2.0, 9.0, (k, 1)) * rng.uniform(0.6, 1.4, (k, 7))
    poly = c + np.stack([np.cos(ang) * r, np.sin(ang) * r], -1)
    cv2.fillPoly(ink, list(_fixed(poly.astype(np.float32))), 255, cv2.LINE_AA, _SHIFT)


# --------------------------------------------------------------------------- render

def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1] at ``shape`` (upsampled coarse grid)."""
    gh = max(2, shape[0] * cells // max(shape))
    gw = max(2, shape[1] * cells // max(shape))
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC) * 0.5


def _paper(rng: np.random.Generator, h: int, w: int, max_stain: float) -> np.ndarray:
    """Paper tone with gradient, mottling and stains, built at 1/8 scale and upsampled.

    ``max_stain`` bounds how much a stain darkens the paper: a fax scanner's fixed cut
    turns a deep stain into a field of black noise that hides the text itself, which
    no line detector could be asked to see through.
    """
    lh, lw = h // 8 + 1, w // 8 + 1
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    tone = rng.uniform(165.0, 240.0)
    grad = (rng.uniform(-0.12, 0.12) * (xx / lw - 0.5) + rng.uniform(-0.12, 0.12) * (yy / lh - 0.5))
    vignette = rng.uniform(0.0, 0.15) * (((xx / lw - 0.5) ** 2 + (yy / lh - 0.5) ** 2) * 2)
    field = 1.0 + grad - vignette + rng.uniform(0.01, 0.05) * _smooth_noise(rng, (lh, lw), 12)
    stains = np.zeros((lh, lw), np.float32)
    for _ in range(int(rng.integers(0, 5))):
        centre = (int(rng.uniform(0, lw)), int(rng.uniform(0, lh)))
        axes = (int(rng.uniform(3, 40)), int(rng.uniform(3, 25)))
        level = float(rng.uniform(0.05, max_stain))
        fill = -1 if rng.random() < 0.7 else max(1, axes[1] // 4)      # blot or tide ring
        cv2.ellipse(stains, centre, axes, float(rng.uniform(0, 180)), 0, 360, level, fill)
    if stains.any():
        stains = cv2.GaussianBlur(stains, (0, 0), rng.uniform(1.0, 4.0))
    field = tone * field * (1.0 - stains)
    return cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR)


def _render(rng: np.random.Generator, ink: np.ndarray, style: str) -> np.ndarray:
    """Composite ink on paper; bilevel pages are then binarised like a fax scan."""
    h, w = ink.shape
    paper = _paper(rng, h, w, 0.3 if style == "gray" else 0.12)
    strength = rng.uniform(0.6, 0.92)
    fading = rng.uniform(0.0, 0.3) * np.abs(_smooth_noise(rng, (h // 8 + 1, w // 8 + 1), 8))
    fade = strength * (1.0 - fading)
    fade = cv2.resize(fade, (w, h), interpolation=cv2.INTER_LINEAR)
    if style == "gray" and rng.random() < 0.5:
        ink = cv2.GaussianBlur(ink, (0, 0), rng.uniform(0.5, 1.1))
    img = paper * (1.0 - fade * (ink.astype(np.float32) * (1.0 / 255.0)))
    sigma = int(rng.integers(2, 9)) if style == "gray" else int(rng.integers(10, 30))
    noise = rng.integers(0, 2 * sigma + 1, (h, w), dtype=np.uint8).astype(np.float32) - sigma
    img += noise
    if style == "gray":
        return np.clip(img, 0, 255).astype(np.uint8)
    paper_level = float(np.median(paper[:: 16, :: 16]))
    cut = paper_level * (1.0 - strength * rng.uniform(0.35, 0.6))
    out = np.where(img < cut, 0, 255).astype(np.uint8)
    _speckle(rng, out)
    return out


def _speckle(rng: np.random.Generator, img: np.ndarray) -> None:
    """Fax noise: isolated black specks and white drop-outs, 1–2 px."""
    h, w = img.shape
    for value, rate in ((0, rng.uniform(2e-5, 3e-4)), (255, rng.uniform(1e-5, 1e-4))):
        k = int(rng.poisson(h * w * rate))
        ys, xs = rng.integers(0, h - 1, k), rng.integers(0, w - 1, k)
        img[ys, xs] = value
        big = rng.random(k) < 0.3
        img[ys[big] + 1, xs[big]] = value
        img[ys[big], xs[big] + 1] = value


# --------------------------------------------------------------------------- encoders

_PAPER_TINTS = ((1.0, 0.96, 0.86), (1.0, 0.93, 0.80), (0.97, 0.95, 0.90), (1.0, 0.98, 0.93))


def encode_jpeg(image: np.ndarray, rgb: bool, quality: int = 85) -> bytes:
    """JPEG bytes of a gray page; with ``rgb`` the page is tinted like old paper."""
    if rgb:
        tint = np.float32(_PAPER_TINTS[int(image[:: 97, :: 89].sum()) % len(_PAPER_TINTS)])
        data = np.clip(image[..., None].astype(np.float32) * tint, 0, 255).astype(np.uint8)
        pil = Image.fromarray(data, "RGB")
    else:
        pil = Image.fromarray(image, "L")
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def encode_tiff_g4(image: np.ndarray) -> bytes:
    """CCITT Group 4 TIFF bytes (1 bit/pixel) of a page; pixels ≥ 128 become white."""
    pil = Image.fromarray(np.where(image >= 128, 255, 0).astype(np.uint8), "L").convert("1")
    buf = io.BytesIO()
    pil.save(buf, format="TIFF", compression="group4")
    return buf.getvalue()
