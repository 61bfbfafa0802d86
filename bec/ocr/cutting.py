"""Lines cut out of the corrected page, one image per text line, for single-line OCR.

ldv1's contours lie on the *corrected page* (the original rotated, then dewarped: issue 9),
so the page is rebuilt as the archive's readers rebuild it
(:func:`bec.ldv1.correction.corrected_page`), computed the fast way the worker's second pass
does (:func:`bec.ldv1.correction.correct_frame`; a test holds the two the same). Contours sharing a ``line_index`` are one text
line (split at a shad, a space, a string hole). Each line's image is its contours' box with a
margin, and every pixel farther than the margin from its polygons is painted paper white:
a neighbour line's descenders or a margin title then cannot leak into the line read.

Why a margin of a share of the line's height: ldv1's mask covers the letters' body band (head
line to foot), and Tibetan vowel signs rise above it and subscribed stacks hang below it by
up to about half a body height.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

PAPER = 255
#: White border round each line image, in line heights (at least 8 px): Tesseract's line
#: recogniser wants a quiet zone; glyphs touching the image's edge lose vowel signs and
#: stacks (a 600-dpi book page read line by line: 14–26 % CER without it, 3.5 % with it).
QUIET_ZONE = 0.25


@dataclass
class LineImage:
    line_index: int
    image: np.ndarray                     # uint8, the line alone on paper
    box: tuple[int, int, int, int]        # x, y, w, h of its contours on the corrected page


def cut_lines(page: np.ndarray, contours: list[np.ndarray], line_index: np.ndarray,
              margin: float) -> list[LineImage]:
    """One image per text line of ``page`` (the corrected page), top line first.

    ``contours`` are K×2 (x, y) polygons in ``page``'s pixels; ``margin`` is in line heights
    (a line's height: the median of its contours' heights, so one tall shad or a merged
    ornament does not balloon it).
    """
    h, w = page.shape[:2]
    groups: dict[int, list[np.ndarray]] = {}
    for contour, index in zip(contours, np.asarray(line_index).reshape(-1).tolist()):
        points = np.asarray(contour, np.int32).reshape(-1, 2)
        if len(points):
            groups.setdefault(int(index), []).append(points)
    lines = []
    for index in sorted(groups):
        polygons = groups[index]
        boxes = np.array([cv2.boundingRect(p) for p in polygons])
        x0, y0 = boxes[:, 0].min(), boxes[:, 1].min()
        x1, y1 = (boxes[:, 0] + boxes[:, 2]).max(), (boxes[:, 1] + boxes[:, 3]).max()
        height = float(np.median(boxes[:, 3]))
        pad_y = max(2, int(round(margin * height)))
        pad_x = max(2, int(round(0.5 * margin * height)))
        cx0, cy0 = max(0, x0 - pad_x), max(0, y0 - pad_y)
        cx1, cy1 = min(w, x1 + pad_x), min(h, y1 + pad_y)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        mask = np.zeros((cy1 - cy0, cx1 - cx0), np.uint8)
        cv2.fillPoly(mask, [p - (cx0, cy0) for p in polygons], 255)
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * pad_x + 1, 2 * pad_y + 1))
        mask = cv2.dilate(mask, kernel)
        image = page[cy0:cy1, cx0:cx1].copy()
        image[mask == 0] = PAPER
        quiet = max(8, int(round(QUIET_ZONE * height)))
        image = cv2.copyMakeBorder(image, quiet, quiet, quiet, quiet, cv2.BORDER_CONSTANT, value=PAPER)
        lines.append(LineImage(index, image, (int(x0), int(y0), int(x1 - x0), int(y1 - y0))))
    return lines
