"""Known skew and known bend for generated pages: the ground truth dewarping is tested on.

A generated page comes with its line labels (0 = paper, k = the band of text line k). These
functions move the page *and* its labels by the same known geometry, so a test (or the
demo's volumes) knows exactly where every line is on the skewed or bent image, and what
a correct straightening must give back.

* :func:`skew_page` turns the page by ``angle`` degrees (``cv2.getRotationMatrix2D``'s
  convention: positive turns the content counter-clockwise, lines rise to the right).
* :func:`bend_page` bows every line by ``amplitude`` pixels: the content at ``x`` moves
  down by ``amplitude·sin(π·x/w)`` (a page photographed with its middle sagging), or up for
  a negative amplitude.

Tools, not runtime: nothing a worker imports uses this module.
"""
from __future__ import annotations

import cv2
import numpy as np


def labels_from_mask(mask: np.ndarray) -> np.ndarray:
    """int16 labels of a line mask's bands, numbered top to bottom by their centres."""
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    order = np.argsort(centroids[1:, 1]) + 1
    relabel = np.zeros(count, np.int16)
    relabel[order] = np.arange(1, count, dtype=np.int16)
    return relabel[labels]


def _warp(image: np.ndarray, labels: np.ndarray, map_x: np.ndarray, map_y: np.ndarray,
          fill: int) -> tuple[np.ndarray, np.ndarray]:
    moved = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    moved_labels = cv2.remap(labels, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                             borderValue=0)
    return moved, moved_labels


def bend_page(image: np.ndarray, labels: np.ndarray, amplitude: float,
              fill: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """The page and its labels with every line bowed by ``amplitude`` pixels at the middle."""
    h, w = image.shape[:2]
    xs = np.arange(w, dtype=np.float32)
    shift = (amplitude * np.sin(np.pi * xs / max(w - 1, 1))).astype(np.float32)
    map_x = np.broadcast_to(xs, (h, w)).copy()
    map_y = (np.arange(h, dtype=np.float32)[:, None] - shift[None, :]).astype(np.float32)
    return _warp(image, labels.astype(np.int16), map_x, map_y, fill)


def skew_page(image: np.ndarray, labels: np.ndarray, angle: float,
              fill: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """The page and its labels turned by ``angle`` degrees about the centre, same size."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), float(angle), 1.0)
    turned = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=fill)
    turned_labels = cv2.warpAffine(labels.astype(np.int16), matrix, (w, h), flags=cv2.INTER_NEAREST,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return turned, turned_labels


GEOMETRIES = ("straight", "bent", "skewed")


def band_height(labels: np.ndarray) -> float:
    """Median vertical thickness of the page's line bands (pixels)."""
    columns = np.concatenate([(labels == k).sum(axis=0) for k in range(1, int(labels.max()) + 1)]
                             or [np.zeros(1)])
    columns = columns[columns > 0]
    return float(np.median(columns)) if len(columns) else 0.0


def apply_geometry(image: np.ndarray, labels: np.ndarray, geometry: str,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """The page as ``geometry`` says: as generated, bent (bowed up or down by twice its band
    height) or skewed (a further 4–5°, either way); returns (image, labels, the parameter:
    bend amplitude in pixels or extra skew in degrees, 0 when straight)."""
    if geometry == "straight":
        return image, labels, 0.0
    if geometry == "bent":
        amplitude = float(rng.choice([-1.0, 1.0])) * 2.0 * band_height(labels)
        return (*bend_page(image, labels, amplitude), amplitude)
    if geometry == "skewed":
        angle = float(rng.choice([-1.0, 1.0]) * rng.uniform(4.0, 5.0))
        return (*skew_page(image, labels, angle), angle)
    raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")


def geometry_args(geometry: str, rng: np.random.Generator) -> dict[str, float]:
    """The generator's arguments for a page of ``geometry``: as drawn (straight), bent by
    30–45 pixels up or down, or skewed by 4–5° either way."""
    if geometry == "straight":
        return {}
    sign = float(rng.choice([-1.0, 1.0]))
    if geometry == "bent":
        return {"bend": sign * float(rng.uniform(30.0, 45.0))}
    if geometry == "skewed":
        return {"skew": sign * float(rng.uniform(4.0, 5.0))}
    raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
