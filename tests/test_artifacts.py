"""The ldv1 Parquet contract: the archive's readers read these columns by name and type."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bec.edges.artifacts import PageOutcome, parquet_bytes

POINT = pa.struct([("x", pa.int16()), ("y", pa.int16())])
BOX = pa.struct([("x", pa.int16()), ("y", pa.int16()), ("w", pa.int16()), ("h", pa.int16())])

#: The archive's existing format (issue 16): never renamed, never retyped.
CONTRACT = {
    "img_file_name": pa.string(),
    "source_etag": pa.string(),
    "rotation_angle": pa.float32(),
    "tps_points": pa.list_(pa.list_(pa.float32())),
    "tps_alpha": pa.float16(),
    "contours": pa.list_(pa.list_(POINT)),
    "nb_contours": pa.int32(),
    "contours_bboxes": pa.list_(BOX),
    "ok": pa.bool_(),
    "error_stage": pa.string(),
    "error_type": pa.string(),
    "error_message": pa.string(),
}
#: BEC's own lines columns.
LINES = {"nb_lines": pa.int32(), "line_index": pa.list_(pa.int16())}


def pages() -> list[PageOutcome]:
    square = np.array([[10, 20], [110, 20], [110, 50], [10, 50]], np.int32)
    dewarped = PageOutcome(
        "I00010001.jpg", True, "etag-1", width=3000, height=900, frame_width=4096, frame_height=512,
        rotation_angle=-3.25, skew_angle=3.25, contours=[square, square + [200, 0], square + [0, 60]],
        boxes=np.array([[10, 20, 101, 31], [210, 20, 101, 31], [10, 80, 101, 31]], np.int32),
        line_index=np.array([0, 0, 1], np.int16),
        tps_points=np.array([[0, 0, 0, 0], [35.5, 10, 30, 10], [899, 2999, 899, 2999]], np.float32),
        tps_alpha=0.5)
    straight = PageOutcome("I00010002.tif", True, "etag-2", width=2000, height=700, skew_angle=0.4,
                           contours=[square], boxes=np.array([[10, 20, 101, 31]], np.int32),
                           line_index=np.array([0], np.int16))
    failed = PageOutcome.failed("I00010003.jpg", "fetch", "missing_object", "not on S3")
    return [dewarped, straight, failed]


def read(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def test_the_contract_columns_keep_their_names_and_arrow_types():
    table = read(parquet_bytes(pages()))
    for name, kind in {**CONTRACT, **LINES}.items():
        assert table.schema.field(name).type == kind, name
    # Columns every row has (failed pages too) say so; the correction's are nullable.
    for name in ("img_file_name", "ok", "contours", "nb_contours", "contours_bboxes", "nb_lines", "line_index"):
        assert not table.schema.field(name).nullable, name
    for name in ("source_etag", "rotation_angle", "tps_points", "tps_alpha"):
        assert table.schema.field(name).nullable, name


def test_rows_carry_the_correction_or_null():
    rows = read(parquet_bytes(pages())).to_pylist()
    dewarped, straight, failed = rows
    assert dewarped["rotation_angle"] == -3.25 and dewarped["tps_alpha"] == 0.5
    assert dewarped["tps_points"] == [[0, 0, 0, 0], [35.5, 10, 30, 10], [899, 2999, 899, 2999]]
    assert dewarped["nb_contours"] == 3 and len(dewarped["contours_bboxes"]) == 3
    assert dewarped["contours_bboxes"][2] == {"x": 10, "y": 80, "w": 101, "h": 31}
    assert dewarped["contours"][1][0] == {"x": 210, "y": 20}
    assert dewarped["nb_lines"] == 2 and dewarped["line_index"] == [0, 0, 1]
    assert dewarped["source_etag"] == "etag-1"
    # Not rotated, not dewarped: null, not 0 (a reader must not rotate by 0.0 or fit nothing).
    assert straight["rotation_angle"] is None and straight["tps_points"] is None
    assert straight["tps_alpha"] is None and straight["skew_angle"] == np.float32(0.4)
    assert straight["nb_lines"] == 1 and straight["line_index"] == [0]
    assert failed["ok"] is False and failed["error_type"] == "missing_object"
    assert failed["contours"] == [] and failed["contours_bboxes"] == [] and failed["line_index"] == []
    assert failed["nb_contours"] == 0 and failed["nb_lines"] == 0
    assert failed["rotation_angle"] is None and failed["tps_points"] is None and failed["skew_angle"] is None
