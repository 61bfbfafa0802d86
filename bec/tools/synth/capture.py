"""Capture: how a flat page becomes an archive image (photograph, scan or bilevel scan).

Geometry first, then light and paper. The flat page's ink, illustrations and labels are
warped together by one map, built from the page's *known* distortions:

* ``bend``: a smooth vertical displacement of the page's content, ``bend · f(x)`` px
  with ``max |f| = 1`` (a folio that does not lie flat, a book page curving into its
  gutter);
* ``skew``: a rotation about the page centre, degrees, positive counter-clockwise (the
  lines rise to the right), the sign ``cv2.getRotationMatrix2D`` uses;
* ``perspective``: each output corner moved by up to this share of the page size
  (a camera not quite square to the page);

and the page lands inside a border (a photograph's dark table, a scanner's lid), which
is why the output is a little larger than the flat page. Labels are warped with
nearest-neighbour sampling, so they stay exact line indices.

Then: paper tone and texture, uneven light, show-through of the back side, stains and
specks, blur and sensor noise; a bilevel scan is thresholded like a fax and speckled.
"""
from __future__ import annotations

import cv2
import numpy as np

from bec.tools.synth.layout import Canvas

__all__ = ["CAPTURES", "capture", "bend_profile"]

CAPTURES = ("photo", "scan", "bilevel")


def bend_profile(rng: np.random.Generator, width: int) -> np.ndarray:
    """A smooth displacement profile over x, normalised to max |f| = 1 (float32)."""
    u = np.linspace(0.0, 1.0, width, dtype=np.float32)
    kind = rng.random()
    if kind < 0.4:                                   # one arc: the page bows
        f = np.sin(np.pi * u)
    elif kind < 0.7:                                 # curls at one end (a gutter)
        f = u ** rng.uniform(2.0, 4.0)
        if rng.random() < 0.5:
            f = f[::-1].copy()
    else:                                            # a gentle wave
        f = np.sin(2 * np.pi * u * rng.uniform(0.6, 1.4) + rng.uniform(0, 2 * np.pi))
    f = f - (f.max() + f.min()) / 2 if kind >= 0.7 else f
    peak = float(np.abs(f).max()) or 1.0
    return (f / peak).astype(np.float32)


def _maps(rng: np.random.Generator, flat: tuple[int, int], out: tuple[int, int], skew: float,
          bend: float, perspective: float) -> tuple[np.ndarray, np.ndarray]:
    """For every output pixel, the flat-page position it shows (cv2.remap maps).

    Built on a coarse grid (every 4th pixel) and resized: the warp is smooth, and this
    keeps a 4-Mpx page's map at a few milliseconds.
    """
    fh, fw = flat
    oh, ow = out
    step = 4
    gh, gw = oh // step + 2, ow // step + 2
    ys, xs = np.mgrid[0:gh, 0:gw].astype(np.float64) * step
    pts = np.stack([xs.ravel(), ys.ravel()], 1)
    # Undo the perspective: output corners were moved by up to ``perspective``·size.
    src = np.float32([[0, 0], [ow, 0], [ow, oh], [0, oh]])
    dst = src + rng.uniform(-1, 1, (4, 2)).astype(np.float32) * perspective * np.float32([ow, oh])
    hom = cv2.getPerspectiveTransform(dst, src)             # output → straight output
    p = np.concatenate([pts, np.ones((len(pts), 1))], 1) @ hom.T
    pts = p[:, :2] / p[:, 2:3]
    # Undo the placement and the rotation (about the flat page's centre).
    c_out = np.array([ow / 2.0, oh / 2.0])
    c_flat = np.array([fw / 2.0, fh / 2.0])
    a = np.radians(skew)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])   # forward, y down
    pts = (pts - c_out) @ rot + c_flat                       # inverse = transpose
    # Undo the bend: a pure vertical shift that depends on x only.
    profile = bend_profile(rng, fw)
    xi = np.clip(pts[:, 0], 0, fw - 1).astype(np.int64)
    pts[:, 1] -= bend * profile[xi]
    mx = pts[:, 0].reshape(gh, gw).astype(np.float32)
    my = pts[:, 1].reshape(gh, gw).astype(np.float32)
    size = ((gw - 1) * step + 1, (gh - 1) * step + 1)
    mx = cv2.resize(mx, size, interpolation=cv2.INTER_LINEAR)[:oh, :ow]
    my = cv2.resize(my, size, interpolation=cv2.INTER_LINEAR)[:oh, :ow]
    return np.ascontiguousarray(mx), np.ascontiguousarray(my)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise, about [-1, 1], at ``shape`` (an upsampled coarse grid)."""
    gh = max(2, shape[0] * cells // max(shape))
    gw = max(2, shape[1] * cells // max(shape))
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC) * 0.5


def _ink_texture(rng: np.random.Generator, cv: Canvas) -> np.ndarray:
    """Stroke weight and inking: woodblocks are bold and blotted, hands vary."""
    ink = cv.ink
    if cv.stroke > 0:
        k = 2 * cv.stroke + 1
        ink = cv2.dilate(ink, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    if cv.blots:
        h, w = ink.shape
        ink = ink.copy()
        for _ in range(int(rng.integers(3, 25))):
            c = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            ax = (int(rng.uniform(1, h * 0.012)) + 1, int(rng.uniform(1, h * 0.012)) + 1)
            cv2.ellipse(ink, c, ax, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
        # uneven inking of the block: some strokes print weaker
        weak = _smooth_noise(rng, (h // 8 + 1, w // 8 + 1), 40)
        weak = cv2.resize(weak, (w, h), interpolation=cv2.INTER_LINEAR)
        ink = (ink * np.clip(0.85 + 0.5 * weak, 0.45, 1.0)).astype(np.uint8)
    return ink


def capture(rng: np.random.Generator, cv: Canvas, mode: str, skew: float, bend: float,
            perspective: float | None = None,
            out_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Photograph or scan a flat page: (uint8 gray image, int16 labels), same size.

    Without ``out_size`` the image is the rotated, bent page with its border round it
    (the whole page is always in the picture); with it, the page is centred in an
    image of that (h, w), which the caller sized to hold it.
    """
    if mode not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {mode!r}")
    fh, fw = cv.shape
    photo = mode == "photo"
    if perspective is None:
        perspective = rng.uniform(0.0, 0.01) if photo else 0.0
    # Border: photographs show the table round the page; scans a little lid or nothing.
    if photo:
        bx, by = rng.uniform(0.01, 0.05), rng.uniform(0.02, 0.1)
    elif rng.random() < 0.3:
        bx, by = rng.uniform(0.0, 0.015), rng.uniform(0.0, 0.03)
    else:
        bx = by = 0.0
    if out_size is None:
        c, s = abs(np.cos(np.radians(skew))), abs(np.sin(np.radians(skew)))
        ow = int(fw * c + fh * s + 2 * bx * fw) + 2
        oh = int(fh * c + fw * s + 2 * by * fh + 2 * abs(bend)) + 2
    else:
        oh, ow = out_size
    mx, my = _maps(rng, (fh, fw), (oh, ow), skew, bend, perspective)
    ink = _ink_texture(rng, cv)
    ink = cv2.remap(ink, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    labels = cv2.remap(cv.labels, mx, my, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    page = cv2.remap(_page_mask(rng, fh, fw, cv.aged), mx, my, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=0).astype(np.float32) * (1 / 255.0)
    art = None
    if cv.art is not None:
        art = cv2.remap(cv.art, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                        borderValue=0).astype(np.float32) * (1 / 255.0)
    img = _light(rng, ink, page, art, photo, mode, cv.aged)
    if mode == "bilevel":
        img = _binarise(rng, img)
    return img, labels


def _page_mask(rng: np.random.Generator, h: int, w: int, aged: bool) -> np.ndarray:
    """The paper's outline (uint8 255 inside): a rectangle, or a worn, torn edge."""
    if not aged:
        return np.full((h, w), 255, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    k = 40
    t = np.linspace(0.0, 1.0, k, endpoint=False)
    depth = min(h, w) * rng.uniform(0.005, 0.03)

    def edge() -> np.ndarray:                     # inward bite along one side, smooth + ragged
        smooth = np.abs(np.interp(t, np.linspace(0, 1, 6), rng.standard_normal(6)))
        return depth * (0.6 * smooth + 0.4 * rng.random(k))

    top = np.stack([t * w, edge()], 1)
    right = np.stack([w - 1 - edge(), t * h], 1)
    bottom = np.stack([(1 - t) * w, h - 1 - edge()], 1)
    left = np.stack([edge(), (1 - t) * h], 1)
    poly = np.concatenate([top, right, bottom, left]).astype(np.int32)
    cv2.fillPoly(mask, [poly], 255, cv2.LINE_AA)
    return mask


def _creases(rng: np.random.Generator, img: np.ndarray, page: np.ndarray) -> None:
    """Folds and cracks of an old folio: thin, darker (sometimes lighter) wandering curves."""
    h, w = img.shape
    layer = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(1, 8))):
        n = 12
        start = np.array([rng.uniform(0, w), rng.uniform(0, h)])
        heading = rng.uniform(0, 2 * np.pi)
        step = max(h, w) * rng.uniform(0.01, 0.05)
        turns = np.cumsum(rng.normal(0.0, 0.3, n)) + heading
        pts = start + np.cumsum(np.stack([np.cos(turns), np.sin(turns)], 1) * step, 0)
        cv2.polylines(layer, [pts.astype(np.int32)], False, float(rng.uniform(-0.25, 0.4)),
                      int(rng.integers(1, 3)), cv2.LINE_AA)
    img *= 1.0 - layer * page


def _light(rng: np.random.Generator, ink: np.ndarray, page: np.ndarray, art: np.ndarray | None,
           photo: bool, mode: str, aged: bool = False) -> np.ndarray:
    """Paper, ink and light composited (float work at 1/8 scale where it is smooth)."""
    h, w = ink.shape
    lh, lw = h // 8 + 1, w // 8 + 1
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)
    tone = rng.uniform(150.0, 235.0) if photo else rng.uniform(185.0, 250.0)
    grad_k = 0.35 if photo else 0.1
    field = (1.0 + rng.uniform(-grad_k, grad_k) * (xx / lw - 0.5)
             + rng.uniform(-grad_k, grad_k) * (yy / lh - 0.5))
    field -= rng.uniform(0.0, 0.35 if photo else 0.1) * ((xx / lw - 0.5) ** 2 + (yy / lh - 0.5) ** 2) * 2
    field += rng.uniform(0.01, 0.06) * _smooth_noise(rng, (lh, lw), 14)
    stains = np.zeros((lh, lw), np.float32)
    for _ in range(int(rng.integers(0, 6))):
        centre = (int(rng.uniform(0, lw)), int(rng.uniform(0, lh)))
        axes = (int(rng.uniform(2, 30)), int(rng.uniform(2, 20)))
        cv2.ellipse(stains, centre, axes, float(rng.uniform(0, 180)), 0, 360,
                    float(rng.uniform(0.03, 0.2)), -1 if rng.random() < 0.7 else 2)
    if stains.any():
        stains = cv2.GaussianBlur(stains, (0, 0), rng.uniform(1.0, 3.0))
    paper = cv2.resize(tone * field * (1.0 - stains), (w, h), interpolation=cv2.INTER_LINEAR)
    # Paper fibre: fine noise that a thresholder turns into specks.
    fibre = rng.uniform(2.0, 10.0 if photo else 6.0)
    grain = cv2.resize(rng.standard_normal((h // 2 + 1, w // 2 + 1)).astype(np.float32), (w, h),
                       interpolation=cv2.INTER_LINEAR)
    paper += fibre * grain
    strength = rng.uniform(0.55, 0.92)
    fade = _smooth_noise(rng, (lh, lw), 8)
    fade = cv2.resize(strength * (1.0 - rng.uniform(0.0, 0.35) * np.abs(fade)), (w, h),
                      interpolation=cv2.INTER_LINEAR)
    cover = ink.astype(np.float32) * (1.0 / 255.0)
    if rng.random() < (0.5 if mode != "bilevel" else 0.25):          # show-through
        back = cv2.flip(ink, 1)
        shift = np.float32([[1, 0, rng.uniform(-0.03, 0.03) * w], [0, 1, rng.uniform(-0.05, 0.05) * h]])
        back = cv2.warpAffine(back, shift, (w, h))
        back = cv2.GaussianBlur(back, (0, 0), rng.uniform(1.0, 3.0)).astype(np.float32) * (1 / 255.0)
        paper *= 1.0 - rng.uniform(0.05, 0.22) * back
    img = paper * (1.0 - fade * cover)
    if art is not None:
        img *= 1.0 - 0.8 * art
    if aged and rng.random() < 0.7:
        _creases(rng, img, page)
    if photo or rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.3 if photo else 0.8))
    # What lies outside the page: a dark table for photographs, white or grey for scans.
    if photo:
        bg = rng.uniform(10.0, 110.0) + 25.0 * _smooth_noise(rng, (h, w), 6)
    else:
        bg = np.float32(rng.uniform(200.0, 255.0) if rng.random() < 0.7 else rng.uniform(20.0, 90.0))
    img = img * page + bg * (1.0 - page)
    specks = int(rng.poisson(h * w * rng.uniform(0.0, 2e-5)))
    if specks:
        ys, xs = rng.integers(0, h, specks), rng.integers(0, w, specks)
        rad = rng.integers(1, 3, specks)
        for y, x, r in zip(ys.tolist(), xs.tolist(), rad.tolist()):
            cv2.circle(img, (x, y), r, float(rng.uniform(0, 90)), -1)
    sigma = rng.uniform(1.5, 6.0)
    img += rng.standard_normal((h, w), dtype=np.float32) * sigma
    return np.clip(img, 0, 255).astype(np.uint8)


def _binarise(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """A bilevel scanner's fixed cut, then fax noise (specks and drop-outs)."""
    paper_level = float(np.percentile(img[::8, ::8], 75))
    cut = paper_level * rng.uniform(0.55, 0.8)
    out = np.where(img < cut, 0, 255).astype(np.uint8)
    h, w = out.shape
    for value, rate in ((0, rng.uniform(2e-5, 3e-4)), (255, rng.uniform(1e-5, 1e-4))):
        k = int(rng.poisson(h * w * rate))
        ys, xs = rng.integers(0, h - 1, k), rng.integers(0, w - 1, k)
        out[ys, xs] = value
        big = rng.random(k) < 0.3
        out[ys[big] + 1, xs[big]] = value
        out[ys[big], xs[big] + 1] = value
    return out
