"""Score OCR against transcripts: the character error rate, page-level beside line-level.

``python -m bec.ocr.quality [--real FOLDER] [--generated N] [--start SEED] [--kinds K,…]
[--weights PATH] [--modes page,ldv1] [--config JSON] [--json OUT]``

Each page is read two ways, by the very code the worker runs:

* ``page``: Tesseract's own layout analysis on the whole page (``lines_from`` null);
* ``ldv1``: BEC's lines (``lines_from: ldv1``): the line model (``--weights``, the shipped
  small model by default) through the production contract (frame, mask, contours, second pass
  on skewed or bent pages), the corrected page rebuilt, each line cut out and read alone.

CER (:mod:`bec.ocr.score`): edit distance over NFC-normalised text with whitespace removed,
divided by the transcript's length; a set's CER is its errors over its characters.

``--real FOLDER`` reads ``FOLDER/transcripts/``: ``NAME.txt`` (line-broken Unicode; a first
line that is a file name, as in the namsel files, is not page text) or ``NAME.json`` (line
number → list of syllables; text with no Tibetan letters is EWTS and converted with pyewts),
and the image ``FOLDER/NAME.*`` beside it. ``--generated N`` draws N pages from seeds
``--start``… (evaluation seeds, never trained on) of ``--kinds``, gray pages through a JPEG
round trip as an archive stores them. Bad input is one line on stderr and exit 1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bec.errors import BadInput

os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # one core per engine, as in the worker

IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
FILE_NAME_LINE = re.compile(r"\S+\.(tif|tiff|jpg|jpeg|png)", re.IGNORECASE)
TIBETAN = re.compile("[\u0f00-\u0fff]")
MODES = ("page", "ldv1")


@dataclass
class Sample:
    name: str
    kind: str
    gray: Any                                   # uint8 H×W
    transcript: str


@dataclass
class Scored:
    name: str
    kind: str
    chars: int
    errors: dict[str, int] = field(default_factory=dict)   # mode → edit distance
    seconds: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

    def cer(self, mode: str) -> float | None:
        return self.errors[mode] / self.chars if mode in self.errors and self.chars else None


# -- transcripts -----------------------------------------------------------------------------
def read_transcript(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise BadInput(f"cannot read the transcript {str(path)!r}: {exc.strerror or exc}") from None
    if path.suffix == ".json":
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise BadInput(f"{path.name} is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise BadInput(f"{path.name} must map line numbers to lines, got {type(value).__name__}")
        lines = [" ".join(v) if isinstance(v, list) else str(v)
                 for _, v in sorted(value.items(), key=lambda kv: _line_number(kv[0], path))]
    else:
        lines = text.splitlines()
        if lines and FILE_NAME_LINE.fullmatch(lines[0].strip()):
            lines = lines[1:]                       # namsel: the first line names the image
    joined = "\n".join(line.strip() for line in lines if line.strip())
    return joined if TIBETAN.search(joined) else from_ewts(lines)


def _line_number(key: str, path: Path) -> int:
    try:
        return int(key)
    except ValueError:
        raise BadInput(f"{path.name}: keys must be line numbers, got {key!r}") from None


def from_ewts(lines: list[str]) -> str:
    """Unicode Tibetan from EWTS lines. A shad written after a space ("na /") would come out
    with a tsheg before it (ན་།), which printed text never has (except after ང)."""
    import pyewts

    converter = pyewts.pyewts()
    out = []
    for line in lines:
        if line.strip():
            uni = converter.toUnicode(line.strip())
            out.append(re.sub("(?<!\u0f44)\u0f0b(?=\u0f0d)", "", uni))
    return "\n".join(out)


def real_samples(folder: Path) -> list[Sample]:
    from bec.edges.imaging import read_gray_file

    scripts = folder / "transcripts"
    if not scripts.is_dir():
        raise BadInput(f"{str(scripts)!r} is not a folder of transcripts")
    samples = []
    for path in sorted(p for p in scripts.iterdir() if p.suffix in (".txt", ".json")):
        images = [folder / (path.stem + s) for s in IMAGE_SUFFIXES if (folder / (path.stem + s)).is_file()]
        if not images:
            raise BadInput(f"no image for the transcript {path.name} in {str(folder)!r}")
        samples.append(Sample(path.stem, "real", read_gray_file(images[0]), read_transcript(path)))
    if not samples:
        raise BadInput(f"no transcript (.txt, .json) in {str(scripts)!r}")
    return samples


def generated_samples(count: int, start: int, kinds: list[str]) -> list[Sample]:
    import io

    import numpy as np
    from PIL import Image

    from bec.tools.synth import encode_jpeg, page_for_seed

    samples = []
    for n in range(count):
        seed = start + n
        page = page_for_seed(seed, kinds[n % len(kinds)])
        gray = page.image
        if page.style == "gray":                     # as the archive stores a scan or a photo
            data = encode_jpeg(gray, rgb=page.capture == "photo")
            gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
        samples.append(Sample(f"seed {seed}", f"{page.kind}/{page.capture}", gray, "\n".join(page.line_texts)))
    return samples


# -- reading -----------------------------------------------------------------------------------
class Readers:
    """The worker's ways of reading a page, in one process."""

    def __init__(self, weights: Path | None, cfg: Any) -> None:
        from bec.ocr.tesseract import Engine, find_language_data

        self.margin = cfg.line_margin
        self.engine = Engine(find_language_data(cfg.lang, cfg.tessdata), cfg.lang, cfg.psm, cfg.line_psm, cfg.dpi)
        self.model = None
        if weights is not None:
            import torch

            from bec.errors import ModelError
            from bec.ldv1.checkpoint import load_checkpoint

            torch.set_num_threads(1)
            try:
                self.model = load_checkpoint(weights).module
            except ModelError as exc:
                raise BadInput(str(exc)) from None

    def page(self, sample: Sample) -> str:
        return "\n".join(line.text for line in self.engine.read_page(sample.gray))

    def ldv1(self, sample: Sample) -> str:
        from bec.ldv1.correction import correct_frame
        from bec.tools.evaluate_ldv1 import detect_lines

        lines = detect_lines(self.model, sample.gray)
        page = correct_frame(sample.gray, lines.correction, (sample.gray.shape[1], sample.gray.shape[0]))
        return self._read_cut(page, lines.contours, lines.line_index)

    def _read_cut(self, page: Any, contours: list[Any], line_index: Any) -> str:
        from bec.ocr.cutting import cut_lines

        return "\n".join(self.engine.read_line(crop.image)[0] for crop in cut_lines(page, contours, line_index,
                                                                                      self.margin))


def score(samples: list[Sample], readers: Readers, modes: list[str], verbose: bool = True) -> list[Scored]:
    from bec.ocr.score import errors

    results = []
    if verbose:
        print(f"{'page':22s} {'kind':20s} {'chars':>6s}  " + "  ".join(f"{m + ' CER':>9s}" for m in modes))
    for sample in samples:
        scored = Scored(sample.name, sample.kind, 0)
        for mode in modes:
            if mode == "ldv1" and readers.model is None:
                continue
            started = time.perf_counter()
            text = getattr(readers, mode)(sample)
            scored.seconds[mode] = round(time.perf_counter() - started, 3)
            scored.errors[mode], scored.chars = errors(text, sample.transcript)
            scored.texts[mode] = text
        results.append(scored)
        if verbose:
            cells = [f"{scored.cer(m):9.1%}" if scored.cer(m) is not None else f"{'-':>9s}" for m in modes]
            print(f"{sample.name[:22]:22s} {sample.kind[:20]:20s} {scored.chars:6d}  " + "  ".join(cells), flush=True)
    return results


def summary(results: list[Scored], modes: list[str]) -> dict[str, float]:
    out = {}
    for mode in modes:
        have = [r for r in results if mode in r.errors]
        chars = sum(r.chars for r in have)
        if chars:
            out[mode] = sum(r.errors[mode] for r in have) / chars
    return out


def main(argv: list[str] | None = None) -> int:
    from bec.tools.evaluate_ldv1 import DEFAULT_WEIGHTS
    from bec.tools.synth import EVAL_SEED_START, KINDS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, help="a folder with transcripts/ and the page images")
    parser.add_argument("--generated", type=int, default=0, help="generated pages to score")
    parser.add_argument("--start", type=int, default=EVAL_SEED_START, help="first seed of generated pages")
    parser.add_argument("--kinds", default=",".join(KINDS), help="kinds of generated page, in turn")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="ldv1 line model for 'ldv1'")
    parser.add_argument("--modes", default=",".join(MODES), help="page, ldv1")
    parser.add_argument("--config", default="{}", help="ocr job config to score (JSON): psm, line_psm, "
                        "line_margin, lang, dpi…")
    parser.add_argument("--json", type=Path, help="write every page's scores and texts here")
    args = parser.parse_args(argv)
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or set(modes) - set(MODES):
            raise BadInput(f"--modes takes {', '.join(MODES)}, got {args.modes!r}")
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        if set(kinds) - set(KINDS):
            raise BadInput(f"--kinds takes {', '.join(KINDS)}, got {args.kinds!r}")
        if not args.real and args.generated <= 0:
            raise BadInput("give --real FOLDER and/or --generated N")
        from bec.errors import BecError
        from bec.control.jobs import parse_config_text
        from bec.ocr.config import OcrConfig

        try:
            cfg = OcrConfig.from_mapping(parse_config_text(args.config, "--config"))
            readers = Readers(args.weights if "ldv1" in modes else None, cfg)
        except BecError as exc:
            raise BadInput(str(exc)) from None
        samples = real_samples(args.real) if args.real else []
        samples += generated_samples(args.generated, args.start, kinds) if args.generated > 0 else []
    except BadInput as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    results = score(samples, readers, modes)
    sets = {"all": results}
    if args.real and args.generated:
        sets = {"real": [r for r in results if r.kind == "real"],
                "generated": [r for r in results if r.kind != "real"], "all": results}
    for name, subset in sets.items():
        cers = summary(subset, modes)
        print(f"{name}: " + ", ".join(f"{m} CER {cers[m]:.1%}" for m in modes if m in cers)
              + f" ({sum(r.chars for r in subset)} characters, {len(subset)} pages)")
    if args.json:
        args.json.write_text(json.dumps({"pages": [asdict(r) for r in results],
                                         "summary": {k: summary(v, modes) for k, v in sets.items()}},
                                        ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
