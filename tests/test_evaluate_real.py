"""``python -m bec.tools.evaluate_real``: true vs found line counts on a folder of pages.

Real pages cannot live in the repository (nor in CI), so the command is run here on
generated pages saved the way the archive stores them; the real-dev score is in the
README. Each row must be what the production contract finds for that page, and the
summary shares must follow from the rows.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("uharfbuzz")

from bec.ldv1 import SHIPPED_WEIGHTS  # noqa: E402
from bec.tools.evaluate_real import read_counts, within_tolerance  # noqa: E402
from bec.tools.synth import EVAL_SEED_START, encode_jpeg, encode_tiff_g4, generate_page  # noqa: E402

WEIGHTS = SHIPPED_WEIGHTS
REAL_DEV_COUNTS = Path(__file__).resolve().parents[1] / "benchmarks" / "real-dev-counts.csv"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bec.tools.evaluate_real", *args, "--threads", "2"],
                          capture_output=True, text=True, timeout=600)


def test_tolerance_is_max_of_one_line_and_ten_percent() -> None:
    assert within_tolerance(5, 6) and within_tolerance(5, 4) and not within_tolerance(5, 7)
    assert within_tolerance(20, 22) and not within_tolerance(20, 23)
    assert within_tolerance(9, 9) and not within_tolerance(9, 11)


def test_real_dev_counts_file_matches_the_readme_table() -> None:
    pages = {p.file: p.expected for p in read_counts(REAL_DEV_COUNTS)}
    assert pages == {"01-yoloseg.tif": 5, "06-yoloseg.jpg": 9, "07-yoloseg.jpg": 6, "09-namgyal.jpg": 9,
                     "11-annxfer.jpg": 4, "15-mura.jpg": 8, "21-namsel.tif": 20, "25-namsel.tif": 16}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, int]]]:
    """Three unseen generated pages as JPEG / G4 TIFF, with their true counts."""
    root = tmp_path_factory.mktemp("pages")
    truth = []
    for n, (kind, capture) in enumerate([("pecha", "scan"), ("manuscript", "bilevel"), ("book", "photo")]):
        page = generate_page(np.random.default_rng(3 * EVAL_SEED_START + n), kind, capture)
        name = f"p{n}.{'tif' if capture == 'bilevel' else 'jpg'}"
        data = encode_tiff_g4(page.image) if capture == "bilevel" else encode_jpeg(page.image, rgb=n == 2)
        (root / name).write_bytes(data)
        truth.append((name, page.n_lines))
    return root, truth


def test_prints_each_page_and_the_shares(folder: tuple[Path, list[tuple[str, int]]], tmp_path: Path) -> None:
    from PIL import Image

    from bec.ldv1.checkpoint import load_checkpoint
    from bec.tools.evaluate_ldv1 import count_lines, detect_lines

    root, truth = folder
    # The last page's count is wrong on purpose (by 5): it can be neither exact nor within.
    counts = [(name, lines + (5 if i == 2 else 0)) for i, (name, lines) in enumerate(truth)]
    csv_path = tmp_path / "counts.csv"
    csv_path.write_text("# a comment line\nfile,lines,kind\n" + "".join(f"{n},{c},gen\n" for n, c in counts))
    result = _run(str(root), str(csv_path), "--weights", str(WEIGHTS))
    assert result.returncode == 0, result.stderr
    rows = {m[0]: (int(m[1]), int(m[2]), m[3], m[4])
            for m in re.findall(r"^(p\d\.\w+)\s+gen\s+(\d+)\s+(\d+)\s+(yes|no)\s+(yes|no)$", result.stdout, re.M)}
    assert set(rows) == {n for n, _ in counts}, result.stdout
    model = load_checkpoint(WEIGHTS).module
    within = exact = 0
    for name, expected in counts:
        gray = np.asarray(Image.open(root / name).convert("L"))
        found = count_lines(detect_lines(model, gray))
        ok_within, ok_exact = within_tolerance(expected, found), expected == found
        assert rows[name] == (expected, found, "yes" if ok_within else "no", "yes" if ok_exact else "no")
        within += ok_within
        exact += ok_exact
    assert rows["p2.jpg"][3] == "no"
    assert f"within ±max(1, 10%): {within}/3" in result.stdout
    assert f"exact: {exact}/3" in result.stdout


@pytest.mark.parametrize("problem", ["no folder", "listed but absent", "bad count", "no header", "not an image"])
def test_bad_input_is_one_line_and_exit_1(problem: str, folder: tuple[Path, list[tuple[str, int]]],
                                          tmp_path: Path) -> None:
    root, truth = folder
    name = truth[0][0]
    csv_path = tmp_path / "counts.csv"
    csv_path.write_text(f"file,lines\n{name},5\n")
    args = [str(root), str(csv_path)]
    expect = ""
    if problem == "no folder":
        args[0], expect = str(tmp_path / "nope"), "is not a folder"
    elif problem == "listed but absent":
        csv_path.write_text("file,lines\nmissing.jpg,5\n")
        expect = "missing.jpg is listed in the counts file but not in"
    elif problem == "bad count":
        csv_path.write_text(f"file,lines\n{name},five\n")
        expect = "line 2: expected a file name and a whole number of lines"
    elif problem == "no header":
        csv_path.write_text(f"{name},5\n")
        expect = "needs a header with the columns 'file' and 'lines'"
    else:
        (tmp_path / "junk.jpg").write_bytes(b"not an image")
        args[0] = str(tmp_path)
        csv_path.write_text("file,lines\njunk.jpg,5\n")
        expect = "junk.jpg cannot be read as an image"
    result = _run(*args, "--weights", str(WEIGHTS))
    assert result.returncode == 1
    assert expect in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
