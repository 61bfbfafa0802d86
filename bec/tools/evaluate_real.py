"""Score a line model on real pages: true vs found line counts, page by page.

``python -m bec.tools.evaluate_real FOLDER COUNTS [--weights PATH] [--threads N]``

``COUNTS`` is a CSV file with a header and at least the columns ``file`` (a file name
in ``FOLDER``) and ``lines`` (the true number of text lines); other columns (``kind``,
``note``) are carried along. ``benchmarks/real-dev-counts.csv`` holds the counts of
``../shared/real-dev/`` (from its README's table): the images themselves are never
copied into the repository, they are read by path::

    python -m bec.tools.evaluate_real ../shared/real-dev benchmarks/real-dev-counts.csv

Every page goes through the production contract (:func:`~bec.tools.evaluate_ldv1.detect_lines`:
frame, threshold, tiles, model, stitch, p > 0.85, contours, second pass on skewed
pages) and lines are counted by :func:`~bec.tools.evaluate_ldv1.count_lines`, the one place
that says what "lines found" means. The command prints one row per page (true, found,
within tolerance, exact), then the share of pages within ±max(1, 10 %) of the truth
and the share exact. Bad input (a missing folder, a file listed but absent or
unreadable, a malformed count) is one line on stderr and exit 1.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from bec.errors import BadInput

__all__ = ["RealPage", "read_counts", "within_tolerance", "score_pages", "main"]


@dataclass
class RealPage:
    file: str
    expected: int
    found: int = -1
    kind: str = ""

    @property
    def exact(self) -> bool:
        return self.found == self.expected

    @property
    def within(self) -> bool:
        return within_tolerance(self.expected, self.found)


def within_tolerance(expected: int, found: int) -> bool:
    """``found`` within ±max(1, 10 %) of ``expected``: the issue's measure of a usable count."""
    return abs(found - expected) <= max(1.0, 0.1 * expected)


def read_counts(path: Path) -> list[RealPage]:
    """The pages of a counts CSV (``file``, ``lines``, optional ``kind``), in file order."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise BadInput(f"cannot read the counts file {str(path)!r}: {exc.strerror or exc}") from None
    rows = list(csv.DictReader(line for line in text.splitlines() if not line.startswith("#")))
    if not rows or not {"file", "lines"} <= set(rows[0]):
        raise BadInput(f"the counts file {str(path)!r} needs a header with the columns 'file' and 'lines'")
    pages = []
    for n, row in enumerate(rows, start=2):
        name, lines = (row.get("file") or "").strip(), (row.get("lines") or "").strip()
        if not name or not lines.isdigit():
            raise BadInput(f"{path.name} line {n}: expected a file name and a whole number of lines, "
                           f"got {name!r}, {lines!r}")
        pages.append(RealPage(name, int(lines), kind=(row.get("kind") or "").strip()))
    return pages


def _load_gray(path: Path):  # noqa: ANN202 - numpy array
    from bec.edges.imaging import read_gray_file

    try:
        return read_gray_file(path)
    except FileNotFoundError:
        raise BadInput(f"{path.name} is listed in the counts file but not in {str(path.parent)!r}") from None


def score_pages(model, folder: Path, pages: list[RealPage],  # noqa: ANN001 - torch module
                verbose: bool = True) -> list[RealPage]:
    """Fill in ``found`` for each page; print a row per page when ``verbose``."""
    from bec.tools.evaluate_ldv1 import count_lines, detect_lines

    if verbose:
        print(f"{'page':24s} {'kind':12s} {'true':>4s} {'found':>5s}  within  exact")
    for page in pages:
        gray = _load_gray(folder / page.file)
        page.found = count_lines(detect_lines(model, gray))
        if verbose:
            print(f"{page.file:24s} {page.kind[:12]:12s} {page.expected:4d} {page.found:5d}  "
                  f"{'yes' if page.within else 'no':6s}  {'yes' if page.exact else 'no'}", flush=True)
    return pages


def summary_lines(pages: list[RealPage]) -> list[str]:
    n = len(pages)
    within = sum(p.within for p in pages)
    exact = sum(p.exact for p in pages)
    mean_err = sum(abs(p.found - p.expected) / max(p.expected, 1) for p in pages) / max(n, 1)
    return [f"within ±max(1, 10%): {within}/{n} = {within / max(n, 1):.0%}",
            f"exact: {exact}/{n} = {exact / max(n, 1):.0%}",
            f"mean relative error: {mean_err:.0%}"]


def main(argv: list[str] | None = None) -> int:
    from bec.tools.evaluate_ldv1 import DEFAULT_WEIGHTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder holding the page images")
    parser.add_argument("counts", type=Path, help="CSV with columns file,lines[,kind,...]")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        if not args.folder.is_dir():
            raise BadInput(f"{str(args.folder)!r} is not a folder of page images")
        pages = read_counts(args.counts)
        import cv2
        import torch

        from bec.errors import ModelError
        from bec.ldv1.checkpoint import load_checkpoint

        torch.set_num_threads(args.threads)
        cv2.setNumThreads(1)
        try:
            model = load_checkpoint(args.weights).module
        except ModelError as exc:
            raise BadInput(str(exc)) from None
        print(f"weights {args.weights}; {len(pages)} pages from {args.folder}")
        score_pages(model, args.folder, pages)
    except BadInput as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    for line in summary_lines(pages):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
