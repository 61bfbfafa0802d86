"""Tesseract through tesserocr: the engine, its language data, and its identity.

tesserocr's wheel bundles libtesseract, so a page costs a C call, not a process. The language
data is Debian's (``tesseract-ocr-bod``: ``/usr/share/tesseract-ocr/5/tessdata/bod.traineddata``).
Each OCR process holds one engine and runs single-threaded: a libtesseract built with OpenMP
(Debian's is) starts a thread team per call unless ``OMP_THREAD_LIMIT=1``, and one process per
core with teams of their own fight over the cores instead of using them. The libtesseract 5.5.4
in tesserocr 2.13's wheel links no OpenMP runtime (checked: no libgomp), so there one engine is
one thread anyway; the variable is set for builds that have it.

What a worker refuses to start without is decided here (:func:`find_language_data`,
:func:`require_tesserocr`), in one line naming what to install.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bec.errors import BadInput

#: Where Debian and other distributions put the language data, newest first.
TESSDATA_DIRS = ("/usr/share/tesseract-ocr/5/tessdata", "/usr/share/tesseract-ocr/4.00/tessdata",
                 "/usr/share/tessdata", "/usr/local/share/tessdata")
#: Debian's package for a language's data (``bod`` → ``tesseract-ocr-bod``).
DEBIAN_PACKAGE = "tesseract-ocr-{lang}"


def require_tesserocr() -> None:
    import importlib.util

    try:
        found = importlib.util.find_spec("tesserocr") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BadInput("bec worker needs tesserocr for ocr jobs, and it is not installed: "
                       "pip install -e '.[ocr]' (its wheel bundles libtesseract)")


def find_language_data(lang: str, tessdata: str = "") -> Path:
    """The folder holding ``<l>.traineddata`` for every language of ``lang`` ("bod+eng"):
    ``tessdata`` when given, else ``TESSDATA_PREFIX``, else the distributions' folders."""
    languages = lang.split("+")
    candidates = [tessdata] if tessdata else [os.environ.get("TESSDATA_PREFIX", ""), *TESSDATA_DIRS]
    for folder in filter(None, candidates):
        if all((Path(folder) / f"{name}.traineddata").is_file() for name in languages):
            return Path(folder)
    where = tessdata or ", ".join(filter(None, candidates))
    packages = " ".join(DEBIAN_PACKAGE.format(lang=name) for name in languages)
    hint = (f"apt-get install {packages}" if not tessdata
            else f"put {' '.join(n + '.traineddata' for n in languages)} there or fix the job config's tessdata")
    raise BadInput(f"Tesseract's language data for {lang!r} is missing ({' and '.join(n + '.traineddata' for n in languages)} "
                   f"not found in {where}): {hint}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def engine_identity(folder: Path, lang: str) -> dict[str, str]:
    """What ``success.json`` records as the model: the Tesseract version, and each
    traineddata file's name with its sha256 (``name``/``sha256``: the first language's)."""
    import tesserocr

    version = tesserocr.tesseract_version().splitlines()[0].strip()   # "tesseract 5.5.4"
    files = [folder / f"{name}.traineddata" for name in lang.split("+")]
    sums = [_sha256(f) for f in files]
    identity = {"name": files[0].name, "sha256": sums[0], "engine": version, "lang": lang,
                "tessdata": str(folder)}
    if len(files) > 1:
        identity["traineddata"] = ", ".join(f"{f.name} {s}" for f, s in zip(files, sums))
    return identity


@dataclass
class Line:
    """One recognised text line: its text, Tesseract's confidence (0–100) and box (x, y, w, h)."""

    text: str
    confidence: float
    box: tuple[int, int, int, int]


class Engine:
    """One Tesseract instance: whole pages (its layout analysis) or single cut-out lines."""

    def __init__(self, folder: Path, lang: str, psm: int, line_psm: int, dpi: int) -> None:
        from tesserocr import PyTessBaseAPI

        self.psm, self.line_psm = int(psm), int(line_psm)  # tesserocr's PSM values are plain ints
        try:
            self.api = PyTessBaseAPI(path=str(folder) + os.sep, lang=lang, psm=self.psm)
        except RuntimeError as exc:  # unreadable or incompatible traineddata
            raise BadInput(f"Tesseract cannot load {lang!r} from {folder}: {exc}") from None
        # Raw pixels carry no resolution: Tesseract estimates one from the text's size, which
        # measured better than any fixed value on the archive's mix of 300- and 600-dpi scans
        # (a 600-dpi book page told 300: 0.7 % → 9.2 % CER). An operator may fix one (dpi).
        if dpi:
            self.api.SetVariable("user_defined_dpi", str(int(dpi)))
        # Its per-page notes ("Estimating resolution as 612") would fill the worker's log.
        self.api.SetVariable("debug_file", os.devnull)

    def _set(self, gray: np.ndarray) -> None:
        image = np.ascontiguousarray(gray, dtype=np.uint8)
        h, w = image.shape
        self.api.SetImageBytes(image.tobytes(), w, h, 1, w)

    def _lines(self) -> list[Line]:
        from tesserocr import RIL, iterate_level

        self.api.Recognize()
        found: list[Line] = []
        iterator = self.api.GetIterator()
        if iterator is None:
            return found
        for item in iterate_level(iterator, RIL.TEXTLINE):
            try:
                text = (item.GetUTF8Text(RIL.TEXTLINE) or "").strip()
            except RuntimeError:  # tesserocr's "No text returned": an empty line
                continue
            box = item.BoundingBox(RIL.TEXTLINE)
            if not text or box is None:
                continue
            x0, y0, x1, y1 = box
            found.append(Line(text, float(item.Confidence(RIL.TEXTLINE)), (x0, y0, x1 - x0, y1 - y0)))
        return found

    def read_page(self, gray: np.ndarray) -> list[Line]:
        """The page's lines, top to bottom as Tesseract's layout analysis orders them."""
        self.api.SetPageSegMode(self.psm)
        self._set(gray)
        return self._lines()

    def read_line(self, gray: np.ndarray) -> tuple[str, float]:
        """One cut-out line: its text (pieces Tesseract found joined by a space) and the
        character-weighted mean confidence."""
        self.api.SetPageSegMode(self.line_psm)
        self._set(gray)
        lines = self._lines()
        text = " ".join(line.text for line in lines)
        return text, mean_confidence([(line.text, line.confidence) for line in lines])

    def close(self) -> None:
        self.api.End()


def mean_confidence(lines: list[tuple[str, float]] | list[Any]) -> float:
    """Confidence of several lines as one: their mean weighted by characters (a two-letter
    page number must not weigh as much as a full line). 0 when there is no text."""
    chars = sum(len(text) for text, _ in lines)
    if not chars:
        return 0.0
    return sum(len(text) * conf for text, conf in lines) / chars
