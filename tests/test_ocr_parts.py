"""The ocr kind's parts, each against real data: the corrected page it rebuilds, the lines it cuts,
the ldv1 rows it reads from (moto S3), the Parquet it writes, transcripts and the CER."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("uharfbuzz")

from bec.edges import artifacts  # noqa: E402
from bec.ldv1.correction import Correction, correct_frame, corrected_page  # noqa: E402
from bec.tools.synth import page_for_seed  # noqa: E402
from bec.ocr.cutting import PAPER, QUIET_ZONE, cut_lines  # noqa: E402


def _bands(labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    contours, index = [], []
    for k in range(1, int(labels.max()) + 1):
        found, _ = cv2.findContours((labels == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contours += [c.reshape(-1, 2) for c in found]
        index += [k - 1] * len(found)
    return contours, np.array(index, np.int16)


def test_the_corrected_page_the_ocr_process_builds_is_the_readers():
    """The OCR process rebuilds ldv1's corrected page with the second pass's fast remap, not the
    reader's per-pixel spline (150× slower): on a rotated and dewarped page both agree to
    interpolation noise."""
    image = page_for_seed(1_000_002, "pecha", "scan").image[:, :900]
    h, w = image.shape
    points = [[y + 4 * np.sin(x / 200), x, y, x] for y in np.linspace(60, h - 60, 5) for x in np.linspace(0, w - 1, 6)]
    points += [[0, 0, 0, 0], [0, w - 1, 0, w - 1], [h - 1, 0, h - 1, 0], [h - 1, w - 1, h - 1, w - 1]]
    tps = np.array(points, np.float32)
    reader = corrected_page(image, 1.5, tps, 0.5)
    ours = correct_frame(image, Correction(1.5, tps, 0.5), (w, h))
    diff = np.abs(reader.astype(int) - ours)[20:-20, 20:-20]
    assert diff.mean() < 3 and (diff > 64).mean() < 0.001, (diff.mean(), (diff > 64).mean())


def test_lines_are_cut_top_down_each_alone_on_paper():
    """One image per line index, in order; ink farther than the margin from a line's own
    polygons (its neighbours) is painted paper; the box is the polygons' own."""
    page = page_for_seed(1_000_003, "book", "scan")
    contours, index = _bands(page.line_labels)
    lines = cut_lines(page.image, contours, index, margin=0.3)
    assert [line.line_index for line in lines] == list(range(page.n_lines))
    for line in lines:
        x, y, w, h = line.box
        ys, xs = np.nonzero(page.line_labels == line.line_index + 1)
        assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        quiet = max(8, round(QUIET_ZONE * h))  # the white border Tesseract wants
        assert line.image.shape[0] < 2.2 * h + 2 * quiet  # the margin, not the neighbours
        assert (line.image < 128).any()
    assert cut_lines(page.image, [], np.zeros(0, np.int16), 0.3) == []
    # A line in two pieces (split at a string hole, say) with foreign ink (gray 50: a margin
    # note) in the gap: cut out, the line keeps its own ink (0) and the gap is paper.
    sheet = np.full((60, 200), 200, np.uint8)
    sheet[20:40, 10:91] = 0
    sheet[20:40, 110:191] = 0
    sheet[20:40, 96:105] = 50
    left = np.array([[10, 20], [90, 20], [90, 39], [10, 39]])
    right = np.array([[110, 20], [190, 20], [190, 39], [110, 39]])
    line, = cut_lines(sheet, [left, right], np.array([0, 0]), margin=0.3)
    assert (line.image[:8] == PAPER).all() and (line.image[:, -8:] == PAPER).all()  # the quiet zone
    assert line.box == (10, 20, 181, 20)
    assert (line.image == 0).sum() == (sheet == 0).sum()
    assert not (line.image == 50).any() and (line.image == PAPER).any()


def _ldv1_outcome(name: str, n_lines: int, rotation: float | None, tps: np.ndarray | None) -> artifacts.PageOutcome:
    contours = [np.array([[10 * k, 20 * k], [10 * k + 50, 20 * k], [10 * k + 50, 20 * k + 9]], np.int32)
                for k in range(n_lines)]
    return artifacts.PageOutcome(name, True, f"etag-{name}", width=400, height=300, rotation_angle=rotation,
                                 contours=contours, boxes=np.array([cv2.boundingRect(c) for c in contours]),
                                 line_index=np.arange(n_lines, dtype=np.int16) // 2, tps_points=tps,
                                 tps_alpha=0.5 if tps is not None else None)


def test_ldv1_rows_are_read_page_by_page_or_the_volume_waits(stack):
    """Each page's contours, line numbers and correction come back as ldv1 wrote them; a
    missing success.json, or rows that are not the manifest's, retry the volume (with why)."""
    from bec.devstack.volumes import ensure_bucket
    from bec.errors import RetryableError
    from bec.ocr.ldv1lines import LinesMissing, read_volume_lines
    from conftest import DEST_BUCKET

    s3 = stack.s3
    ensure_bucket(s3, DEST_BUCKET)
    with pytest.raises(LinesMissing, match=r"ldv1 output for W1/I1 version abc123 is missing .*run ldv1 first"):
        read_volume_lines(s3, DEST_BUCKET, "ldv1", "W1", "I1", "abc123", ["a.jpg"])
    tps = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)
    pages = [_ldv1_outcome("a.jpg", 3, None, None),
             artifacts.PageOutcome.failed("b.jpg", "decode", "corrupt_image", "truncated"),
             _ldv1_outcome("c.jpg", 5, -2.5, tps)]
    s3.put_object(Bucket=DEST_BUCKET, Key=artifacts.parquet_key("ldv1", "W1", "I1", "abc123"),
                  Body=artifacts.parquet_bytes(pages))
    s3.put_object(Bucket=DEST_BUCKET, Key=artifacts.success_key("ldv1", "W1", "I1", "abc123"), Body=b"{}")
    got = read_volume_lines(s3, DEST_BUCKET, "ldv1", "W1", "I1", "abc123", ["a.jpg", "b.jpg", "c.jpg"])
    for n, page in enumerate(pages):
        row = got.page(n)
        assert row["filename"] == page.filename and row["ok"] == page.ok
        assert len(row["contours"]) == len(page.contours)
        for mine, theirs in zip(row["contours"], page.contours):
            assert np.array_equal(mine, theirs)
        assert np.array_equal(row["line_index"], page.line_index)
    assert got.page(0)["rotation_angle"] is None and got.page(0)["tps_points"] is None
    assert got.page(1)["error"] == "corrupt_image: truncated"
    assert got.page(2)["rotation_angle"] == -2.5 and np.array_equal(got.page(2)["tps_points"], tps)
    assert got.page(2)["source_etag"] == "etag-c.jpg"
    with pytest.raises(RetryableError, match="lists 3 images, not the manifest's 2"):
        read_volume_lines(s3, DEST_BUCKET, "ldv1", "W1", "I1", "abc123", ["a.jpg", "c.jpg"])


def test_the_ocr_parquet_schema_with_ok_and_failed_pages():
    from bec.ocr.artifacts import SCHEMA, OcrOutcome, parquet_bytes

    good = OcrOutcome("a.jpg", True, "e1", width=100, height=50, line_source="ldv1", timings=(1, 2, 3, 4),
                      text_lines=[("ཀ་ཁ།", 90.0, 0, 1, 2, 30, 8), ("ག", 30.0, 2, 1, 20, 10, 8)])
    empty = OcrOutcome("b.jpg", True, "e2", width=100, height=50, line_source="page")
    failed = artifacts.PageOutcome.failed("c.jpg", "fetch", "missing_object", "gone")
    table = pq.read_table(io.BytesIO(parquet_bytes([good, empty, failed])))
    assert table.schema.remove_metadata() == SCHEMA
    a, b, c = table.to_pylist()
    assert a["text"] == "ཀ་ཁ།\nག" and a["nb_lines"] == 2 and a["line_source"] == "ldv1"
    assert a["lines"][1] == {"text": "ག", "confidence": 30.0, "line_index": 2, "x": 1, "y": 20, "w": 10, "h": 8}
    assert a["mean_confidence"] == pytest.approx((4 * 90 + 1 * 30) / 5)  # weighted by characters
    assert (a["fetch_ms"], a["decode_ms"], a["ocr_ms"], a["cut_ms"]) == (1, 2, 3, 4)
    assert b["ok"] and b["text"] == "" and b["nb_lines"] == 0 and b["mean_confidence"] is None
    assert not c["ok"] and c["text"] is None and c["lines"] == [] and c["line_source"] is None
    assert (c["error_stage"], c["error_type"], c["error_message"]) == ("fetch", "missing_object", "gone")


def test_transcripts_and_the_character_error_rate(tmp_path):
    from bec.ocr.quality import BadInput, read_transcript, real_samples
    from bec.ocr.score import cer

    assert cer("ཀ་ཁ།\nག", "ཀ་ ཁ། ག") == 0.0                     # whitespace and line breaks ignored
    assert cer("\u0f40\u0f74\u0f72", "\u0f40\u0f72\u0f74") == 0.0  # NFC orders the vowel signs
    assert cer("ཀ་ཁ", "ཀ་ཁ།") == pytest.approx(1 / 4)
    namsel = tmp_path / "21-x.txt"
    namsel.write_text("\ufeffsample_book1/out_003_1L.tif\nཀ་ཁ།\n\nག་ང།\n", encoding="utf-8")
    assert read_transcript(namsel) == "ཀ་ཁ།\nག་ང།"
    mura = tmp_path / "15-x.json"
    mura.write_text(json.dumps({"2": ["ga", "nga /"], "1": ["ka", "kha", "/"]}))
    assert read_transcript(mura) == "ཀ་ཁ།\nག་ང་།"                 # EWTS; ང keeps its tsheg
    with pytest.raises(BadInput, match="transcripts"):
        real_samples(tmp_path)


def test_generated_pages_carry_each_lines_text():
    """OCR ground truth: one text per labelled line, in line order, made of the Tibetan the page
    was drawn with (book headers and tables of contents carry their page numbers too)."""
    from bec.control.jobkinds import kind_name

    for kind in ("pecha", "book", "toc"):
        page = page_for_seed(1_000_100, kind, "scan")
        assert len(page.line_texts) == page.n_lines
        assert all(text.strip() for text in page.line_texts), page.line_texts
        tibetan = sum(1 for text in page.line_texts for ch in text if "\u0f00" <= ch <= "\u0fff")
        assert tibetan > 0.6 * sum(len("".join(t.split())) for t in page.line_texts)
        assert page_for_seed(1_000_100, kind, "scan").line_texts == page.line_texts
    assert (kind_name("ocr"), kind_name("ocr-lines"), kind_name("ldv1_fast"), kind_name("other")) == \
        ("ocr", "ocr", "ldv1", None)
