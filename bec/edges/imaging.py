"""Image decoding for the fetch processes: bytes → grayscale array at (about) frame size.

JPEG goes through libjpeg-turbo (PyTurboJPEG) straight to grayscale (the luma plane, no
colour conversion) and, when the frame is smaller than the image, with DCT-domain scaled
decoding (1/2, 1/4, 1/8…), which skips most of the decoding work. CMYK JPEG, TIFF (Group 4
bilevel, LZW/ZIP, 16-bit) and anything else go through Pillow. Every failure is a
``PageError`` with a stable kind, decided here.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
from PIL import Image

from bec.errors import PageError

try:
    from turbojpeg import TJCS_CMYK, TJCS_YCCK, TJFLAG_STOPONWARNING, TJPF_GRAY, TurboJPEG

    class _StrictTurboJPEG(TurboJPEG):
        """libjpeg-turbo reports a truncated stream as a *warning*, which PyTurboJPEG turns
        into ``warnings.warn`` (process-global, not per thread). With STOPONWARNING the
        decode stops there; this makes that an exception in the calling thread."""

        def _TurboJPEG__report_error(self, handle: object) -> None:
            raise OSError(self._TurboJPEG__get_error_string(handle))

    _TURBO: TurboJPEG | None = _StrictTurboJPEG()
except Exception:  # library or libturbojpeg missing: Pillow decodes JPEG too
    _TURBO = None
    TJCS_CMYK = TJCS_YCCK = TJPF_GRAY = TJFLAG_STOPONWARNING = -1

# Our own pixel limit (the job's max_image_pixels) is checked from the header before
# decoding; Pillow's process-wide check would only get in its way.
Image.MAX_IMAGE_PIXELS = None

JPEG_MAGIC = b"\xff\xd8\xff"
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_SCALES = sorted({Fraction(n, d) for n, d in (_TURBO.scaling_factors if _TURBO else [])
                  if Fraction(n, d) <= 1})


@dataclass
class Decoded:
    gray: np.ndarray           # uint8 H×W, possibly already scaled down
    width: int                 # the original image's size
    height: int
    codec: str                 # "turbojpeg" | "pillow"


def sniff(data: bytes) -> str:
    if data[:3] == JPEG_MAGIC:
        return "jpeg"
    if data[:4] in TIFF_MAGICS:
        return "tiff"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "other"


#: The output's contours and boxes are int16 in original-image pixels (DESIGN §3): a longer
#: side could not be written without clipping its coordinates, so such a page is refused.
MAX_SIDE = 32767


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise PageError("decode", "corrupt_image", f"image claims a size of {width}×{height}")
    if width * height > max_pixels:
        raise PageError("decode", "too_large",
                        f"image of {width}×{height} = {width * height:,} pixels exceeds the "
                        f"limit of {max_pixels:,}")
    if max(width, height) > MAX_SIDE:
        raise PageError("decode", "too_large",
                        f"image of {width}×{height}: a side over {MAX_SIDE:,} pixels does not fit the "
                        "output's int16 coordinates")


def _scale_for(width: int, height: int, want_w: int, want_h: int) -> Fraction | None:
    """The smallest DCT scale whose output still covers the wanted frame."""
    best = None
    for s in _SCALES:
        sw, sh = -(-width * s.numerator // s.denominator), -(-height * s.numerator // s.denominator)
        if sw >= want_w and sh >= want_h:
            best = s
            break
    return best if best is not None and best < 1 else None


def decode(data: bytes, max_pixels: int,
           frame_for: Callable[[int, int], tuple[int, int]] | None = None) -> Decoded:
    """Decode to grayscale; ``frame_for(w, h)`` lets JPEG decode at a reduced scale."""
    if not data:
        raise PageError("decode", "empty_file", "the image file is empty (0 bytes)")
    kind = sniff(data)
    if kind == "jpeg" and _TURBO is not None:
        decoded = _decode_turbo(data, max_pixels, frame_for)
        if decoded is not None:
            return decoded
    return _decode_pillow(data, max_pixels, kind)


def _decode_turbo(data: bytes, max_pixels: int,
                  frame_for: Callable[[int, int], tuple[int, int]] | None) -> Decoded | None:
    assert _TURBO is not None
    try:
        width, height, _subsample, colorspace = _TURBO.decode_header(data)
    except OSError as exc:
        raise PageError("decode", "corrupt_image", f"JPEG header unreadable: {exc}") from None
    _check_pixels(width, height, max_pixels)
    if colorspace in (TJCS_CMYK, TJCS_YCCK):
        return None  # libjpeg-turbo cannot give gray from CMYK; Pillow converts it
    scale = None
    if frame_for is not None:
        fw, fh = frame_for(width, height)
        scale = _scale_for(width, height, fw, fh)
    try:
        # STOPONWARNING: a truncated or damaged stream is an error, not a half-grey page
        gray = _TURBO.decode(data, pixel_format=TJPF_GRAY, flags=TJFLAG_STOPONWARNING,
                             scaling_factor=(scale.numerator, scale.denominator) if scale else None)
    except (OSError, UserWarning, ValueError) as exc:
        raise PageError("decode", "corrupt_image", f"JPEG data is corrupt: {exc}") from None
    if gray.ndim == 3:
        gray = gray[:, :, 0]
    return Decoded(np.ascontiguousarray(gray), width, height, "turbojpeg")


def _decode_pillow(data: bytes, max_pixels: int, kind: str) -> Decoded:
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        _check_pixels(width, height, max_pixels)
        image.load()
    except PageError:
        raise
    except Image.UnidentifiedImageError:
        if kind != "other":  # its signature says JPEG/TIFF/PNG, but Pillow cannot parse it
            raise PageError("decode", "corrupt_image",
                            f"{kind.upper()} data is corrupt: its header or directory is unreadable "
                            f"(truncated or damaged file of {len(data):,} bytes)") from None
        raise PageError("decode", "unsupported_format",
                        f"not a recognised image format (starts with {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PageError("decode", "corrupt_image", f"{kind.upper()} data is corrupt: {exc}") from None
    try:
        gray = _to_gray(image)
    except (OSError, ValueError) as exc:
        raise PageError("decode", "unsupported_format", f"cannot convert {image.mode} image: {exc}") from None
    return Decoded(gray, width, height, "pillow")


#: Pixels converted at a time where a mode needs arithmetic wider than a byte (16-bit, 32-bit,
#: float, alpha): the copies and temporaries are one strip's, never the page's. Whole-page
#: int64 arrays (and Pillow's whole-page ``tobytes``, built from chunks and joined: twice the
#: page) cost a 16-bit TIFF about 22 bytes per pixel at its peak; the pixel limit lets a page
#: have 120 Mpx.
STRIP_PIXELS = 1 << 20


def _strips(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, pixels) of bands of rows, each band copied out of Pillow on its own."""
    width, height = image.size
    step = max(1, STRIP_PIXELS // max(1, width))
    for top in range(0, height, step):
        yield top, np.asarray(image.crop((0, top, width, min(height, top + step))))


def _by_strips(image: Image.Image, convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``convert`` applied to each band of rows of ``image``, into one uint8 page."""
    width, height = image.size
    out = np.empty((height, width), np.uint8)
    for top, strip in _strips(image):
        out[top:top + strip.shape[0]] = convert(strip)
    return out


def _to_gray(image: Image.Image) -> np.ndarray:
    """A uint8 page from any mode, with at most a strip's worth of memory besides Pillow's
    image and the result. Measured peak RSS of a decode, bytes a pixel of a 12 Mpx page,
    Pillow's image included: 16-bit TIFF 21.8 → 4.3, 32-bit TIFF 25.8 → 7.1, float TIFF
    16.7 → 6.6, RGBA PNG 16.1 → 10.0, 8-bit TIFF 3.2 → 2.6, Group 4 3.8 → 2.6."""
    mode = image.mode
    if mode == "L":
        return _by_strips(image, lambda s: s)
    if mode == "1":
        return _by_strips(image, lambda s: s.astype(np.uint8) * np.uint8(255))
    if mode == "F":
        lo = min((float(np.nanmin(s)) for _, s in _strips(image)), default=0.0)
        hi = max((float(np.nanmax(s)) for _, s in _strips(image)), default=0.0)
        scale = 255.0 / max(hi - lo, 1e-9)
        return _by_strips(image, lambda s: ((s - lo) * scale).astype(np.uint8))
    if mode.startswith("I;16"):
        return _by_strips(image, lambda s: (s.astype(np.uint32) * 255 // 65535).astype(np.uint8))
    if mode == "I":
        # 32-bit pages: negative values are black, and int64 so that ×255 cannot wrap
        top = max(int(image.getextrema()[1]), 1)
        return _by_strips(image, lambda s: (np.clip(s, 0, None).astype(np.int64) * 255 // top).astype(np.uint8))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # over white: gray = 255 − (255 − g)·a/255, from the gray and alpha planes (2 bytes a
        # pixel), not from RGBA composites (three 4-byte pages)
        return _by_strips(image.convert("LA"), lambda s: (
            255 - ((255 - s[..., 0].astype(np.uint16)) * s[..., 1] + 127) // 255).astype(np.uint8))
    return _by_strips(image.convert("L"), lambda s: s)


def resize_into(gray: np.ndarray, out: np.ndarray) -> None:
    """Resample to ``out``'s shape (area averaging when shrinking) writing into ``out``."""
    h, w = out.shape
    if gray.shape == (h, w):
        np.copyto(out, gray)
        return
    shrinking = gray.shape[0] >= h and gray.shape[1] >= w
    cv2.resize(gray, (w, h), dst=out, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def read_gray_file(path: Path) -> np.ndarray:
    """A whole page from disk as 8-bit gray, at full size: for the tools that score real pages
    (not the worker's path, which decodes to the frame). An unreadable image is ``BadInput``;
    a missing file raises ``FileNotFoundError`` for the caller to word."""
    from PIL import UnidentifiedImageError

    from bec.errors import BadInput

    Image.MAX_IMAGE_PIXELS = 200_000_000          # 600-dpi book scans are large, not bombs
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"))
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError) as exc:
        raise BadInput(f"{path.name} cannot be read as an image: {exc}") from None
