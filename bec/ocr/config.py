"""The ocr job config: every key with its default, validated at ``jobs create/update`` and at
worker start, so a typo (``"line_from"``) or a wrong type names the key instead of being
silently ignored."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from bec.errors import ConfigError

MODELS = ("tesseract",)
#: Page segmentation modes that read a page (Tesseract's numbering): 1 and 3 automatic layout
#: analysis (1 with orientation detection), 4 one column, 5 vertical block, 6 one block,
#: 7 one line, 8 one word, 11/12 sparse text, 13 raw line.
PAGE_PSMS = (1, 3, 4, 5, 6, 7, 8, 11, 12, 13)
#: Modes that read one cut-out line: 7 one text line, 8 one word, 13 raw line (no heuristics).
LINE_PSMS = (7, 8, 13)
LANG = re.compile(r"[A-Za-z0-9_]{1,40}(\+[A-Za-z0-9_]{1,40}){0,4}")


@dataclass(frozen=True)
class OcrConfig:
    model: str = "tesseract"
    lang: str = "bod"                    # Tesseract language(s): "bod", "bod+eng"
    lines_from: str | None = None        # a line-detection job (e.g. "ldv1"); None: page-level OCR
    # Page-level: Tesseract's layout analysis; 4 = one column of text of varying sizes (the
    # archive's pechas and books). Measured with python -m bec.ocr.quality, CER psm 3 → 4:
    # 20 generated pages 68.2 % → 52.9 %, real book pages 4.5 % → 3.1 % and 0.7 % → 0.7 %.
    psm: int = 4
    line_psm: int = 7                    # lines from ldv1: each cut-out line read as one line
    line_margin: float = 0.5             # margin round a line's polygon, × its height (vowel signs, stacks)
    min_confidence: float = 0.0          # lines below this (0–100) are left out of text and lines
    tessdata: str = ""                   # folder of <lang>.traineddata; "": TESSDATA_PREFIX, then Debian's
    dpi: int = 0                         # the resolution Tesseract is told; 0: it estimates it from the text
    # Share of pages with *transient* errors above which a volume is retried (bec.errors).
    max_transient_error_ratio: float = 0.1
    max_image_pixels: int = 120_000_000  # larger images are refused (decompression bombs)
    max_image_bytes: int = 128 * 1024 * 1024  # larger files are refused before they are read
    max_frame_pixels: int = 4096 * 4096  # larger pages are scaled down to fit a slot

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "OcrConfig":
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ConfigError(f"unknown ocr config key {key!r} (known: {', '.join(sorted(known))})")
        values = {key: _checked(key, value) for key, value in raw.items()}
        config = cls(**values)
        config._check_values()
        return config

    def _check_values(self) -> None:
        from bec.control.ids import check_job_name
        from bec.control.jobkinds import LDV1, kind_name

        if self.model not in MODELS:
            raise ConfigError(f"ocr config key 'model' must be one of {', '.join(MODELS)}, got {self.model!r}")
        if not LANG.fullmatch(self.lang):
            raise ConfigError(f"ocr config key 'lang' must name Tesseract languages like 'bod' or "
                              f"'bod+eng', got {self.lang!r}")
        if self.lines_from is not None:
            try:
                check_job_name(self.lines_from)
            except Exception as exc:
                raise ConfigError(f"ocr config key 'lines_from': {exc}") from None
            if kind_name(self.lines_from) != LDV1:
                raise ConfigError(f"ocr config key 'lines_from' must name a line-detection job "
                                  f"(ldv1 or ldv1-…), got {self.lines_from!r}")
        if self.psm not in PAGE_PSMS:
            raise ConfigError(f"ocr config key 'psm' must be one of {', '.join(map(str, PAGE_PSMS))}, got {self.psm}")
        if self.line_psm not in LINE_PSMS:
            raise ConfigError(f"ocr config key 'line_psm' must be one of {', '.join(map(str, LINE_PSMS))}, "
                              f"got {self.line_psm}")
        if not 0.0 <= self.min_confidence <= 100.0:
            raise ConfigError("ocr config key 'min_confidence' must be between 0 and 100")
        if not 0.0 <= self.line_margin <= 5.0:
            raise ConfigError("ocr config key 'line_margin' must be between 0 and 5 (line heights)")
        if not 0.0 <= self.max_transient_error_ratio <= 1.0:
            raise ConfigError("ocr config key 'max_transient_error_ratio' must be between 0 and 1")
        for key in ("max_image_pixels", "max_frame_pixels", "max_image_bytes"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"ocr config key {key!r} must be positive")
        if not 0 <= self.dpi <= 2400:
            raise ConfigError("ocr config key 'dpi' must be 0 (estimated) or a resolution up to 2400")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TYPES: dict[str, tuple[type, ...]] = {"model": (str,), "lang": (str,), "lines_from": (str, type(None)),
                                       "psm": (int,), "line_psm": (int,), "line_margin": (float,),
                                       "min_confidence": (float,), "tessdata": (str,), "dpi": (int,),
                                       "max_transient_error_ratio": (float,), "max_image_pixels": (int,),
                                       "max_image_bytes": (int,),
                                       "max_frame_pixels": (int,)}
_WORDS = {str: "a string", int: "an integer", float: "a number", type(None): "null"}


def _checked(key: str, value: Any) -> Any:
    expected = _TYPES[key]
    if isinstance(value, bool):
        ok = False
    elif float in expected and isinstance(value, int):
        ok, value = True, float(value)
    else:
        ok = isinstance(value, expected)
    if not ok:
        want = " or ".join(_WORDS[t] for t in expected)
        raise ConfigError(f"ocr config key {key!r} must be {want}, got {type(value).__name__} {value!r}")
    return value
