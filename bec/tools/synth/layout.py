"""Page layouts drawn flat: ink, illustrations and the line labels, before any capture.

A layout composes a page on a :class:`~.ink.Canvas` from the strokes of :mod:`.ink`.

What is and is not a line follows the issue's rules:

* a line's band runs from its first glyph to its last, head line to foot of the
  letters; gaps, shads and string holes inside it belong to it;
* a pecha's vertical margin title, its folio number, captions under its illustrations,
  marginal notes, frames, ruling and string-hole circles are ink but never lines;
* a book page's running header (with its page number) and a page number at the foot
  are lines, and so are footnotes; a table of contents has one line per entry and
  column.
"""
from __future__ import annotations

import cv2
import numpy as np

from bec.tools.synth.ink import (Canvas, TextStyle, block_edge, box, frame, illustration, new_canvas, pick_style,
                                 rule, shaped, vertical_text, write_digits, write_line)
from bec.tools.synth.text import SHAD, Writer, tibetan_number

__all__ = ["Canvas", "LAYOUTS", "draw_layout"]


def pecha(rng: np.random.Generator, h: int, w: int, variant: str) -> Canvas:
    """A pecha folio: "print" (modern uchen), "woodblock" or "manuscript" (dbu-med or
    uchen by hand)."""
    cv = new_canvas(h, w)
    script = "umed" if variant == "manuscript" and rng.random() < 0.6 else "uchen"
    n = int(rng.integers(4, 10))
    mx = w * rng.uniform(0.025, 0.08)
    my = h * rng.uniform(0.07, 0.18)
    framed = variant != "manuscript" or rng.random() < 0.7
    thick = max(1, int(round(h * rng.uniform(0.002, 0.006) * (2 if variant == "woodblock" else 1))))
    fx0, fy0, fx1, fy1 = mx, my, w - mx, h - my
    if framed:
        frame(cv, rng, fx0, fy0, fx1, fy1, thick, rng.random() < 0.5)
    block_h = fy1 - fy0
    if variant == "woodblock" or rng.random() < 0.2:
        # The printing block's edges: rough, smudged bands of ink along the frame.
        for y in (fy0, fy1):
            block_edge(cv, rng, fx0, fx1, y, block_h / n * rng.uniform(0.08, 0.3))
    pitch = block_h / (n + rng.uniform(0.0, 0.4))
    # Line pitch over body height: about 3 on most folios, down to 1.8 on crowded ones.
    body = pitch / (rng.uniform(1.8, 3.6) if script == "uchen" else rng.uniform(2.0, 3.8))
    style = pick_style(rng, script, body, irregular=variant == "manuscript")
    cv.aged = variant != "print" or rng.random() < 0.3
    if variant == "woodblock":
        cv.stroke = int(rng.integers(0, 3))
        cv.blots = True
    elif variant == "manuscript" and rng.random() < 0.3:
        cv.stroke = 1
    writer = Writer(rng)
    pad = body * rng.uniform(0.6, 1.5)
    tx0, tx1 = fx0 + pad, fx1 - pad
    # Side panels: margin title on the left, folio number on the right, behind rules.
    side_style = pick_style(rng, script, body * rng.uniform(0.6, 0.9))
    if framed and rng.random() < 0.65:
        pw = w * rng.uniform(0.035, 0.07)
        rule(cv, rng, (fx0 + pw, fy0), (fx0 + pw, fy1), thick)
        if rng.random() < 0.5:
            rule(cv, rng, (fx0 + pw + 3 * thick + 2, fy0), (fx0 + pw + 3 * thick + 2, fy1), thick)
        vertical_text(cv, rng, writer, side_style, fx0 + pw / 2, (fy0 + fy1) / 2, block_h * 0.8)
        tx0 = fx0 + pw + pad + 4 * thick
    elif rng.random() < 0.5:          # the title outside the frame, in the left margin
        vertical_text(cv, rng, writer, side_style, mx * 0.5, h / 2, block_h * 0.7)
    if framed and rng.random() < 0.55:
        pw = w * rng.uniform(0.03, 0.06)
        rule(cv, rng, (fx1 - pw, fy0), (fx1 - pw, fy1), thick)
        number = (tibetan_number(int(rng.integers(1, 600))) if rng.random() < 0.4
                  else writer.words_only(int(rng.integers(1, 4))))
        vertical_text(cv, rng, writer, side_style, fx1 - pw / 2, (fy0 + fy1) / 2, block_h * 0.6,
                       number)
        tx1 = fx1 - pw - pad - 4 * thick
    elif rng.random() < 0.4:          # a folio number in the right margin
        vertical_text(cv, rng, writer, side_style, w - mx * 0.5, h / 2, block_h * 0.4,
                       tibetan_number(int(rng.integers(1, 600))))
    # Illustrations at one or both ends of the text block, with captions below.
    if variant != "woodblock" and rng.random() < 0.2:
        iw = (tx1 - tx0) * rng.uniform(0.1, 0.18)
        sides = ["left", "right"] if rng.random() < 0.6 else [["left", "right"][int(rng.integers(2))]]
        cap_style = pick_style(rng, "umed", body * rng.uniform(0.45, 0.7))
        for side in sides:
            ix0 = tx0 if side == "left" else tx1 - iw
            illustration(cv, rng, ix0, fy0 + pad * 0.5, ix0 + iw, fy1 - pad * 0.5)
            if fy1 + 2.5 * cap_style.body < h and rng.random() < 0.7:
                write_line(cv, rng, writer, cap_style, [(ix0, ix0 + iw * 1.1)],
                           fy1 + cap_style.body * 0.8, label=0, justify=False, fill=rng.uniform(0.5, 1))
            if side == "left":
                tx0 = ix0 + iw + pad
            else:
                tx1 = ix0 - pad
    # String holes: circles the lines make room for.
    holes: list[tuple[float, float, float, float]] = []     # (cx, cy, r, extra clearance)
    if variant != "woodblock" and rng.random() < 0.5:
        r = pitch * rng.uniform(1.0, 1.8)
        k = 2 if rng.random() < 0.7 else 1
        for f in ((1 / 3, 2 / 3) if k == 2 else (0.5,)):
            cx = tx0 + (tx1 - tx0) * (f + rng.uniform(-0.05, 0.05))
            cy = (fy0 + fy1) / 2 + rng.uniform(-0.2, 0.2) * pitch
            holes.append((cx, cy, r, rng.uniform(0.0, 2.5)))
            if rng.random() < 0.7:
                cv2.circle(cv.ink, (int(cx), int(cy)), int(r), int(rng.uniform(90, 200)), max(1, thick // 2),
                           cv2.LINE_AA)
    ruled = variant == "manuscript" and rng.random() < 0.5
    short_last = rng.random() < 0.2
    top0 = fy0 + (block_h - n * pitch) / 2
    for i in range(n):
        band_top = top0 + i * pitch + (pitch - body) * rng.uniform(0.35, 0.5)
        segs = _around_holes(tx0, tx1, band_top, body, holes, pad)
        first = writer.opening() + " " if i == 0 and rng.random() < 0.2 else ""
        fill = rng.uniform(0.25, 0.9) if (short_last and i == n - 1) else 1.0
        got = write_line(cv, rng, writer, style, segs, band_top, label=cv.n_lines + 1,
                         justify=True, first=first, fill=fill)
        if got:
            cv.n_lines += 1
        if ruled and i < n - 1:
            y = top0 + (i + 1) * pitch + rng.uniform(-0.1, 0.1) * pitch
            rule(cv, rng, (tx0 - pad * 0.5, y), (tx1 + pad * 0.5, y), 1, int(rng.uniform(60, 150)))
    if ruled:
        box(cv, rng, tx0 - pad * 0.5, top0, tx1 + pad * 0.5, top0 + n * pitch, 1, int(rng.uniform(60, 150)))
    # Marginal notes: a few small syllables above the frame or in the left margin.
    for _ in range(int(rng.integers(0, 3))):
        note = pick_style(rng, "umed", body * rng.uniform(0.4, 0.6))
        if my > 3 * note.body:
            x = rng.uniform(mx, w - mx - 10 * note.body)
            write_line(cv, rng, writer, note, [(x, x + note.body * rng.uniform(3, 10))],
                       my * rng.uniform(0.2, 0.5), label=0, justify=False, fill=1.0,
                       chunks=[writer.words_only(int(rng.integers(1, 4)))])
    return cv


def _around_holes(x0: float, x1: float, top: float, body: float,
                  holes: list[tuple[float, float, float, float]], pad: float) -> list[tuple[float, float]]:
    """The x ranges of a line that stay clear of the string-hole circles."""
    segs = [(x0, x1)]
    for cx, cy, r, extra in holes:
        dy = max(abs(top - cy), abs(top + body - cy))
        near = min(abs(top - cy), abs(top + body - cy)) if not (top <= cy <= top + body) else 0.0
        if near >= r + body * 0.5:
            continue
        half = np.sqrt(max(r * r - min(dy, near) ** 2, 0.0)) + pad * 0.5 + body * extra
        out = []
        for a, b in segs:
            if cx - half > a + body:
                out.append((a, min(b, cx - half)))
            if cx + half < b - body:
                out.append((max(a, cx + half), b))
        segs = out
    return segs or [(x0, x1)]


# --------------------------------------------------------------------------- book

def book(rng: np.random.Generator, h: int, w: int) -> Canvas:
    """A modern book page: running header and page number, 13–23 body lines, paragraphs,
    indented verse, sometimes footnotes under a short rule."""
    cv = new_canvas(h, w)
    mx0, mx1 = w * rng.uniform(0.07, 0.14), w * rng.uniform(0.07, 0.14)
    my0, my1 = h * rng.uniform(0.05, 0.1), h * rng.uniform(0.05, 0.1)
    n = int(rng.integers(13, 24))
    text_h = h - my0 - my1
    pitch = text_h / (n + 3.5)
    body = pitch / rng.uniform(2.0, 4.2)
    style = pick_style(rng, "uchen", body)
    style.space = body * rng.uniform(0.3, 0.9)
    writer = Writer(rng)
    y = my0
    number = str(int(rng.integers(1, 900)))
    where = rng.choice(["header", "footer", "both", "none"], p=[0.45, 0.35, 0.1, 0.1])
    # Running header: the page number at the outer edge and a title, as one line.
    title_style = style.scaled(rng.uniform(0.8, 1.0))
    if rng.random() < 0.85:
        x_title = mx0 + (w - mx0 - mx1) * rng.uniform(0.1, 0.45)
        lo = hi = None
        if where in ("header", "both"):
            lo, hi = write_digits(cv, number, mx0, y, title_style.body, rng, label=cv.n_lines + 1)
        got = write_line(cv, rng, writer, title_style, [(max(x_title, (hi or 0) + body * 2), w - mx1)], y,
                         label=cv.n_lines + 1, justify=False,
                         chunks=[writer.words_only(int(rng.integers(3, 9)))])
        if got and lo is not None:
            _join_band(cv, cv.n_lines + 1, y, title_style)
        cv.n_lines += 1
        if rng.random() < 0.5:
            ry = y + title_style.body * rng.uniform(1.6, 2.2)
            rule(cv, rng, (mx0, ry), (w - mx1, ry), max(1, int(body * 0.08)))
        y += pitch * rng.uniform(1.5, 2.5)
    # Body: paragraphs and verse.
    footnotes = int(rng.integers(1, 4)) if rng.random() < 0.25 else 0
    foot_style = style.scaled(rng.uniform(0.7, 0.85))
    bottom = h - my1 - (pitch * 1.5 if where in ("footer", "both") else 0)
    bottom -= footnotes * foot_style.body * 2.2 + (pitch if footnotes else 0)
    para_start = True
    verse_left = 0
    while y + body < bottom:
        x0, x1 = mx0, w - mx1
        if verse_left == 0 and rng.random() < 0.05:
            verse_left = int(rng.integers(2, 6))
        if verse_left:
            ind = (x1 - x0) * rng.uniform(0.06, 0.15)
            writer.verse = True
            writer._foot = 0
            chunks = [writer.chunk() for _ in range(int(rng.integers(2, 5)))]
            writer.verse = False
            got = write_line(cv, rng, writer, style, [(x0 + ind, x1 - ind)], y, label=cv.n_lines + 1,
                             justify=False, chunks=chunks)
            verse_left -= 1
        else:
            ind = body * rng.uniform(1.0, 3.0) if para_start and rng.random() < 0.5 else 0.0
            end_para = rng.random() < 0.07
            got = write_line(cv, rng, writer, style, [(x0 + ind, x1)], y, label=cv.n_lines + 1,
                             justify=rng.random() < 0.7, fill=rng.uniform(0.2, 0.9) if end_para else 1.0)
            para_start = end_para
        if got:
            cv.n_lines += 1
        y += pitch
    if footnotes:
        y = max(y, bottom) + pitch * 0.3
        rule(cv, rng, (mx0, y), (mx0 + (w - mx0 - mx1) * rng.uniform(0.2, 0.4), y), max(1, int(body * 0.06)))
        y += pitch * 0.5
        for _ in range(footnotes):
            got = write_line(cv, rng, writer, foot_style, [(mx0, w - mx1)], y, label=cv.n_lines + 1,
                             justify=False, fill=rng.uniform(0.3, 1.0))
            if got:
                cv.n_lines += 1
            y += foot_style.body * 2.2
    if where in ("footer", "both"):
        y = h - my1 - body
        write_digits(cv, number, w / 2, y, body, rng, label=cv.n_lines + 1, align="center")
        cv.n_lines += 1
    return cv


def _join_band(cv: Canvas, label: int, top: float, style: TextStyle) -> None:
    """Make the header's page number and title one band (one line, gap included)."""
    ys, xs = np.nonzero(cv.labels == label)
    if len(xs):
        y0 = int(top)
        y1 = int(top + style.body)
        cv.labels[y0:y1 + 1, xs.min():xs.max() + 1] = label


# --------------------------------------------------------------------------- contents

def contents(rng: np.random.Generator, h: int, w: int) -> Canvas:
    """A two-column table of contents: title, then entries with dot leaders and page
    numbers; one line per entry per column."""
    cv = new_canvas(h, w)
    mx, my = w * rng.uniform(0.06, 0.12), h * rng.uniform(0.06, 0.1)
    rows = int(rng.integers(8, 20))
    pitch = (h - 2 * my) / (rows + 2.5)
    body = pitch / rng.uniform(2.0, 3.8)
    style = pick_style(rng, "uchen", body)
    writer = Writer(rng)
    y = my
    head = style.scaled(rng.uniform(1.1, 1.5))
    chunks = [writer.words_only(int(rng.integers(2, 4)))]
    run = shaped(head.font, head.ppem, chunks[0])
    x = (w - run.width) / 2
    if write_line(cv, rng, writer, head, [(x, x + run.width + 2)], y, label=cv.n_lines + 1,
                  justify=False, chunks=chunks):
        cv.n_lines += 1
    y += pitch * 2.2
    gutter = max(body * rng.uniform(3.0, 5.0), (w - 2 * mx) * 0.06)
    col_w = (w - 2 * mx - gutter) / 2
    digits = rng.random() < 0.6
    for r in range(rows):
        for c in range(2):
            x0 = mx + c * (col_w + gutter)
            indent = body * 2 if rng.random() < 0.2 else 0.0
            page = int(rng.integers(1, 500))
            num = tibetan_number(page) if digits else str(page)
            entry = [writer.words_only(int(rng.integers(2, 7))) + SHAD]
            got = write_line(cv, rng, writer, style, [(x0 + indent, x0 + col_w * 0.75)], y, label=cv.n_lines + 1,
                             justify=False, chunks=entry)
            if not got:
                continue
            label = cv.n_lines + 1
            if digits:
                nrun = shaped(style.font, style.ppem, num)
                nx = x0 + col_w - nrun.width
                write_line(cv, rng, writer, style, [(nx, x0 + col_w + 1)], y, label=label, justify=False,
                           chunks=[num])
                end = nx
            else:
                end, _ = write_digits(cv, num, x0 + col_w, y, body, rng, label=label, align="right")
            # Dot leaders between the entry and its page number, inside the band.
            step = body * rng.uniform(0.35, 0.6)
            dy = y + body * rng.uniform(0.6, 0.9)
            for dx in np.arange(got[1] + step, end - step * 0.5, step):
                cv2.circle(cv.ink, (int(dx), int(dy)), max(1, int(body * 0.07)), 255, -1, cv2.LINE_AA)
            cv.labels[int(y):int(y + body) + 1, int(got[0]):int(min(w, end + body))] = label
            cv.n_lines += 1
        y += pitch
    return _renumber(cv)


def _renumber(cv: Canvas) -> Canvas:
    """Labels 1..n in the order lines were drawn, without holes (an entry that did not fit)."""
    present = np.flatnonzero(np.bincount(cv.labels.ravel()))
    present = present[present > 0]
    lut = np.zeros(int(cv.labels.max()) + 1, np.int16)
    lut[present] = np.arange(1, len(present) + 1, dtype=np.int16)
    cv.labels = lut[cv.labels]
    cv.texts = {int(lut[k]): t for k, t in cv.texts.items() if k < len(lut) and lut[k]}
    cv.n_lines = len(present)
    return cv


LAYOUTS = ("pecha", "woodblock", "manuscript", "book", "toc")


def draw_layout(rng: np.random.Generator, kind: str, h: int, w: int) -> Canvas:
    """Draw a page of ``kind`` (one of ``LAYOUTS``) on a flat h×w canvas."""
    if kind == "pecha":
        cv = pecha(rng, h, w, "print")
    elif kind in ("woodblock", "manuscript"):
        cv = pecha(rng, h, w, kind)
    elif kind == "book":
        cv = book(rng, h, w)
    elif kind == "toc":
        cv = contents(rng, h, w)
    else:
        raise ValueError(f"kind must be one of {LAYOUTS}, got {kind!r}")
    return _renumber(cv)
