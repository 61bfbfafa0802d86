"""The task's artifacts on S3 (DESIGN §3): the volume's Parquet, then ``success.json``.

``{job}/{W}/{I}/{version}/{W}-{I}-{version}.parquet`` has one row per manifest image in
manifest order, failed images included. Contours and boxes are in original-image pixels
(int16). Columns are built from flat numpy arrays and offsets — no per-point Python
objects — so a 500-page volume is written in milliseconds.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

POINT = pa.struct([("x", pa.int16()), ("y", pa.int16())])
BOX = pa.struct([("x", pa.int16()), ("y", pa.int16()), ("w", pa.int16()), ("h", pa.int16())])

#: Columns every row has, failed pages included, are declared non-null: readers (Spark,
#: Athena, pandas) may rely on the schema instead of checking.
REQUIRED = {"img_file_name", "ok", "rotation_angle", "skew_angle", "nb_contours", "contours", "bboxes",
            "fetch_ms", "decode_ms", "infer_ms", "post_ms"}

SCHEMA = pa.schema([pa.field(name, kind, nullable=name not in REQUIRED) for name, kind in [
    ("img_file_name", pa.string()),
    ("img_s3_etag", pa.string()),
    ("ok", pa.bool_()),
    ("error_stage", pa.string()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("frame_width", pa.int32()),
    ("frame_height", pa.int32()),
    ("rotation_angle", pa.float32()),
    ("skew_angle", pa.float32()),
    ("nb_contours", pa.int32()),
    ("contours", pa.list_(pa.list_(POINT))),
    ("bboxes", pa.list_(BOX)),
    ("fetch_ms", pa.float32()),
    ("decode_ms", pa.float32()),
    ("infer_ms", pa.float32()),
    ("post_ms", pa.float32()),
]])


@dataclass
class PageOutcome:
    """One manifest image's result, ok or failed."""

    filename: str
    ok: bool
    etag: str | None = None
    error_stage: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    width: int | None = None
    height: int | None = None
    frame_width: int | None = None
    frame_height: int | None = None
    rotation_angle: float = 0.0
    skew_angle: float = 0.0
    contours: list[np.ndarray] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    timings: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @classmethod
    def failed(cls, filename: str, stage: str, kind: str, message: str, etag: str | None = None,
               timings: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)) -> "PageOutcome":
        return cls(filename, False, etag, stage, kind, message, timings=timings)


def output_prefix(job_name: str, w_id: str, i_id: str, version: str) -> str:
    return f"{job_name}/{w_id}/{i_id}/{version}/"


def parquet_key(job_name: str, w_id: str, i_id: str, version: str) -> str:
    return output_prefix(job_name, w_id, i_id, version) + f"{w_id}-{i_id}-{version}.parquet"


def success_key(job_name: str, w_id: str, i_id: str, version: str) -> str:
    return output_prefix(job_name, w_id, i_id, version) + "success.json"


def partial_key(job_name: str, w_id: str, i_id: str, version: str) -> str:
    """Where a retried volume keeps its finished pages (``bec.partial``): under ``_partial/``,
    which readers of ``{job}/`` skip (Spark, Athena and pyarrow datasets ignore ``_`` names),
    never beside a success.json."""
    return f"{job_name}/_partial/{w_id}/{i_id}/{version}/{w_id}-{i_id}-{version}.parquet"


def _int16(values: np.ndarray) -> pa.Array:
    return pa.array(np.clip(values, -32768, 32767).astype(np.int16), type=pa.int16())


def _offsets(lengths: list[int]) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))


def build_table(pages: list[PageOutcome]) -> pa.Table:
    all_contours = [c for p in pages for c in p.contours]
    points = np.concatenate(all_contours) if all_contours else np.zeros((0, 2), np.int32)
    point_arr = pa.StructArray.from_arrays([_int16(points[:, 0]), _int16(points[:, 1])], fields=list(POINT))
    lines = pa.ListArray.from_arrays(_offsets([len(c) for c in all_contours]), point_arr)
    contours = pa.ListArray.from_arrays(_offsets([len(p.contours) for p in pages]), lines)
    boxes_np = np.concatenate([p.boxes.reshape(-1, 4) for p in pages]) if pages else np.zeros((0, 4))
    box_arr = pa.StructArray.from_arrays([_int16(boxes_np[:, i]) for i in range(4)], fields=list(BOX))
    boxes = pa.ListArray.from_arrays(_offsets([len(p.boxes.reshape(-1, 4)) for p in pages]), box_arr)
    timings = np.array([p.timings for p in pages], dtype=np.float32).reshape(-1, 4)
    columns: dict[str, Any] = {
        "img_file_name": [p.filename for p in pages],
        "img_s3_etag": [p.etag for p in pages],
        "ok": [p.ok for p in pages],
        "error_stage": [p.error_stage for p in pages],
        "error_type": [p.error_type for p in pages],
        "error_message": [p.error_message for p in pages],
        "width": [p.width for p in pages],
        "height": [p.height for p in pages],
        "frame_width": [p.frame_width for p in pages],
        "frame_height": [p.frame_height for p in pages],
        "rotation_angle": [p.rotation_angle for p in pages],
        "skew_angle": [p.skew_angle for p in pages],
        "nb_contours": [len(p.contours) for p in pages],
        "contours": contours,
        "bboxes": boxes,
        "fetch_ms": timings[:, 0], "decode_ms": timings[:, 1],
        "infer_ms": timings[:, 2], "post_ms": timings[:, 3],
    }
    arrays = [columns[f.name] if isinstance(columns[f.name], pa.Array)
              else pa.array(columns[f.name], type=f.type) for f in SCHEMA]
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def parquet_bytes(pages: list[PageOutcome], metadata: dict[str, str] | None = None) -> bytes:
    table = build_table(pages)
    if metadata:
        table = table.replace_schema_metadata({k: v for k, v in metadata.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def success_bytes(marker: dict[str, Any]) -> bytes:
    return json.dumps(marker, indent=2, sort_keys=True, default=str).encode()
