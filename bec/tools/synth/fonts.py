"""Tibetan fonts: HarfBuzz shaping, FreeType glyph bitmaps, and each font's body metrics.

Pillow (pillow-simd, built without raqm) cannot shape Tibetan: stacks come out as
strings of unjoined letters. HarfBuzz (``uharfbuzz``) shapes a run into positioned
glyphs and FreeType (``freetype-py``) rasterises each glyph once per size; a line is
then a few thousand bitmap blits from a cache, which keeps a page well under a second.

Fonts differ a lot at the same nominal size (a Monlam cursive's letters are half the
height of Tibetan Machine's), so sizes are asked for by **body height**: the height of
the square letters (པ མ ས བ) from their head line to their foot, measured once per
font. The same measurement places a line's label band: head line to foot of the
letters, with vowel signs above it and stacked letters below it left outside, which
is what keeps the bands of close lines apart.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FontSpec", "FONTS", "Font", "Run", "load_font", "missing_fonts", "MissingFonts",
           "fonts_of"]

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))


@dataclass(frozen=True)
class FontSpec:
    file: str       # file name, looked up under FONT_DIRS
    package: str    # the Debian package that installs it
    script: str     # "uchen" (print, headed letters) or "umed" (headless manuscript hands)
    weight: float   # how often it is drawn among fonts of its script


FONTS: tuple[FontSpec, ...] = (
    FontSpec("TibetanMachineUni.ttf", "fonts-tibetan-machine", "uchen", 3.0),
    FontSpec("DDC_Uchen.ttf", "fonts-ddc-uchen", "uchen", 3.0),
    *(FontSpec(f"Monlam Uni OuChan{n}.ttf", "fonts-monlam", "uchen", 1.0) for n in range(1, 6)),
    FontSpec("Monlam Uni Sans Serif.ttf", "fonts-monlam", "uchen", 0.5),
    FontSpec("TibetanSambhotaYigchung.ttf", "fonts-sambhota-yigchung", "umed", 3.0),
    FontSpec("fonts-sambhota-tsugring.otf", "fonts-sambhota-tsugring", "umed", 2.0),
    *(FontSpec(f"Monlam Uni Dutsa{n}.ttf", "fonts-monlam", "umed", 1.5) for n in (1, 2)),
    FontSpec("Monlam Uni PayTsik.ttf", "fonts-monlam", "umed", 1.0),
)
#: Left out: Monlam's Chouk, ChoukMatik, Tikrang and TikTong. Their long swashes cross
#: two or three lines; the archive's hands are far plainer, and a model taught that a
#: line may be crossed by strokes from its neighbours learns to merge lines.


class MissingFonts(RuntimeError):
    """Tibetan fonts or the shaping libraries are not installed; the message says what to
    install."""


@functools.lru_cache(maxsize=None)
def _find(file: str) -> Path | None:
    for root in FONT_DIRS:
        if root.is_dir():
            hit = next(iter(root.rglob(file)), None)
            if hit is not None:
                return hit
    return None


def missing_fonts() -> str | None:
    """None when every font and library is there; otherwise one line saying what to install."""
    problems = []
    try:
        import freetype  # noqa: F401
        import uharfbuzz  # noqa: F401
    except ImportError:
        problems.append("pip install uharfbuzz freetype-py (or: pip install -e '.[synth]')")
    packages = sorted({f.package for f in FONTS if _find(f.file) is None})
    if packages:
        problems.append("apt-get install " + " ".join(packages))
    from bec.tools.synth.text import DICTIONARY
    if not DICTIONARY.exists():
        problems.append("apt-get install hunspell-bo")
    if not problems:
        return None
    return "the page generator needs Tibetan fonts and text: " + "; ".join(problems)


def fonts_of(script: str) -> tuple[list[FontSpec], np.ndarray]:
    """The fonts of a script and their drawing probabilities."""
    specs = [f for f in FONTS if f.script == script]
    p = np.array([f.weight for f in specs], np.float64)
    return specs, p / p.sum()


@dataclass
class Run:
    """A shaped piece of text at one size: glyph ids and pen positions in pixels."""

    gids: np.ndarray      # int
    x: np.ndarray         # float, pen x of each glyph (offset included)
    y: np.ndarray         # float, upward offset of each glyph from the baseline
    width: float          # advance of the whole run


class Font:
    """One font file: shaping, cached glyph bitmaps, and its body metrics (per em)."""

    def __init__(self, spec: FontSpec, path: Path) -> None:
        import freetype
        import uharfbuzz as hb

        self.spec = spec
        self._hb = hb
        self._blob = hb.Blob.from_file_path(str(path))
        self._face = hb.Face(self._blob)
        self._font = hb.Font(self._face)
        self.upem = self._face.upem
        self._ft = freetype.Face(str(path))
        self._ft_flags = freetype.FT_LOAD_RENDER | freetype.FT_LOAD_TARGET_NORMAL
        self._size = 0
        self._glyphs: dict[tuple[int, int], tuple[np.ndarray, int, int]] = {}
        # Body of the script, in em units (y up): from the head line to the foot of the
        # square letters པ མ ས བ (the stems of ཀ ད ན reach lower; vowel signs and stacked
        # letters stay outside). Medians, so one odd glyph does not move it.
        square = [self._extents(c) for c in "\u0f54\u0f58\u0f66\u0f56"]
        self.body_top = float(np.median([t for t, _ in square]))
        self.body_bottom = float(np.median([b for _, b in square]))
        self.body = self.body_top - self.body_bottom
        self.space = self.shape(" ", self.upem).width / self.upem

    def _extents(self, text: str) -> tuple[float, float]:
        self._font.scale = (self.upem, self.upem)
        buf = self._shape_buffer(text)
        top, bottom = -1e9, 1e9
        for info, pos in zip(buf.glyph_infos, buf.glyph_positions):
            ext = self._font.get_glyph_extents(info.codepoint)
            if ext is None or ext.height == 0:
                continue
            t = ext.y_bearing + pos.y_offset
            top, bottom = max(top, t), min(bottom, t + ext.height)
        return float(top), float(bottom)

    def _shape_buffer(self, text: str):  # noqa: ANN202 - a uharfbuzz Buffer
        buf = self._hb.Buffer()
        buf.add_str(text)
        buf.guess_segment_properties()
        self._hb.shape(self._font, buf, {})
        return buf

    def ppem_for_body(self, body_px: float) -> int:
        """The pixel size (ppem) at which the body is ``body_px`` tall."""
        return max(4, int(round(body_px * self.upem / max(self.body, 1.0))))

    def shape(self, text: str, ppem: int) -> Run:
        """Shape ``text`` at ``ppem`` pixels per em (positions in pixels)."""
        self._font.scale = (ppem * 64, ppem * 64)
        buf = self._shape_buffer(text)
        infos, positions = buf.glyph_infos, buf.glyph_positions
        n = len(infos)
        gids = np.fromiter((i.codepoint for i in infos), np.int64, n)
        adv = np.fromiter((p.x_advance for p in positions), np.float64, n) / 64.0
        xoff = np.fromiter((p.x_offset for p in positions), np.float64, n) / 64.0
        yoff = np.fromiter((p.y_offset for p in positions), np.float64, n) / 64.0
        pen = np.concatenate(([0.0], np.cumsum(adv)[:-1])) if n else adv
        return Run(gids, pen + xoff, yoff, float(adv.sum()))

    def glyph(self, gid: int, ppem: int) -> tuple[np.ndarray, int, int]:
        """(coverage bitmap uint8 h×w, left bearing, top bearing) of a glyph, cached."""
        key = (gid, ppem)
        hit = self._glyphs.get(key)
        if hit is not None:
            return hit
        if self._size != ppem:
            self._ft.set_pixel_sizes(0, ppem)
            self._size = ppem
        self._ft.load_glyph(gid, self._ft_flags)
        slot = self._ft.glyph
        bm = slot.bitmap
        rows, width, pitch = bm.rows, bm.width, bm.pitch
        if rows and width and pitch > 0:
            # Read FreeType's buffer in place (``bm.buffer`` builds a Python list).
            ptr = ctypes.cast(bm._FT_Bitmap.buffer, ctypes.POINTER(ctypes.c_ubyte))
            arr = np.ctypeslib.as_array(ptr, shape=(rows, pitch))[:, :width].copy()
        else:
            arr = np.zeros((0, 0), np.uint8)
        if len(self._glyphs) > 60_000:          # a long training run meets many sizes
            self._glyphs.clear()
        hit = (arr, int(slot.bitmap_left), int(slot.bitmap_top))
        self._glyphs[key] = hit
        return hit


@functools.lru_cache(maxsize=None)
def load_font(file: str) -> Font:
    """The font of a file name in ``FONTS`` (loaded once per process)."""
    spec = next(f for f in FONTS if f.file == file)
    path = _find(file)
    if path is None:
        raise MissingFonts(missing_fonts() or f"font {file} not found")
    return Font(spec, path)
