"""The task's artifacts on S3 (DESIGN §3): the volume's Parquet, then ``success.json``.

``{job}/{W}/{I}/{version}/{W}-{I}-{version}.parquet`` has one row per manifest image in
manifest order, failed images included.

The archive's readers (its OCR jobs, its Spark/Athena tables) read these columns by name,
with these Arrow types; they are a contract and never change meaning:

``img_file_name`` string · ``source_etag`` string · ``rotation_angle`` float32 (null: not
rotated) · ``tps_points`` list<list<float32>> (``[in_y, in_x, out_y, out_x]`` per control
point; null: not dewarped) · ``tps_alpha`` float16 (null: not dewarped) · ``contours``
list<list<struct<x, y: int16>>> · ``nb_contours`` int32 · ``contours_bboxes``
list<struct<x, y, w, h: int16>> · ``ok`` bool · ``error_stage``, ``error_type``,
``error_message`` string.

Contours and boxes are on the *corrected page* (the original rotated by ``rotation_angle``,
then dewarped by the spline: :mod:`bec.ldv1.correction`) at the original image's scale.
BEC's own columns come after them: ``nb_lines`` and ``line_index`` (one per contour, 0 = the
top line), sizes, the measured skew and per-stage timings.

Columns are built from flat numpy arrays and offsets (no per-point Python objects), so a
500-page volume is written in milliseconds.
"""
from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import botocore.exceptions
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bec.edges import aws

POINT = pa.struct([("x", pa.int16()), ("y", pa.int16())])
BOX = pa.struct([("x", pa.int16()), ("y", pa.int16()), ("w", pa.int16()), ("h", pa.int16())])

#: Columns every row has, failed pages included, are declared non-null: readers (Spark,
#: Athena, pandas) may rely on the schema instead of checking.
REQUIRED = {"img_file_name", "ok", "nb_contours", "contours", "contours_bboxes", "nb_lines",
            "line_index", "fetch_ms", "decode_ms", "infer_ms", "post_ms"}

SCHEMA = pa.schema([pa.field(name, kind, nullable=name not in REQUIRED) for name, kind in [
    # The archive's contract, by name and type.
    ("img_file_name", pa.string()),
    ("source_etag", pa.string()),
    ("rotation_angle", pa.float32()),
    ("tps_points", pa.list_(pa.list_(pa.float32()))),
    ("tps_alpha", pa.float16()),
    ("contours", pa.list_(pa.list_(POINT))),
    ("nb_contours", pa.int32()),
    ("contours_bboxes", pa.list_(BOX)),
    ("ok", pa.bool_()),
    ("error_stage", pa.string()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
    # BEC's own.
    ("nb_lines", pa.int32()),
    ("line_index", pa.list_(pa.int16())),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("frame_width", pa.int32()),
    ("frame_height", pa.int32()),
    ("skew_angle", pa.float32()),
    ("fetch_ms", pa.float32()),
    ("decode_ms", pa.float32()),
    ("infer_ms", pa.float32()),
    ("post_ms", pa.float32()),
]])


@dataclass
class PageRecord:
    """What every job kind records of a manifest image: its name, ok or why not, its size.

    Each kind's outcome adds its own results; the controller makes a failed page a bare
    :class:`PageOutcome` whatever the kind, and a kind's table reads only these fields of it."""

    filename: str
    ok: bool
    etag: str | None = None
    error_stage: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    width: int | None = None
    height: int | None = None


def record_columns(pages: list[Any]) -> dict[str, list[Any]]:
    """The :class:`PageRecord` columns of a kind's table (same names in every kind's Parquet)."""
    return {"img_file_name": [p.filename for p in pages], "source_etag": [p.etag for p in pages],
            "ok": [bool(p.ok) for p in pages], "error_stage": [p.error_stage for p in pages],
            "error_type": [p.error_type for p in pages], "error_message": [p.error_message for p in pages],
            "width": [p.width for p in pages], "height": [p.height for p in pages]}


def table_of(columns: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """A table in ``schema``'s column order from columns given as Arrow arrays or lists."""
    arrays = [columns[f.name] if isinstance(columns[f.name], pa.Array) else pa.array(columns[f.name], type=f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass
class PageOutcome(PageRecord):
    """One manifest image's ldv1 result, ok or failed.

    ``rotation_angle``, ``tps_points`` and ``tps_alpha`` are the correction that defines the
    corrected page (None: not rotated / not dewarped); ``skew_angle`` is the skew the first
    pass measured (None on a failed page).
    """

    frame_width: int | None = None
    frame_height: int | None = None
    rotation_angle: float | None = None
    skew_angle: float | None = None
    contours: list[np.ndarray] = field(default_factory=list)
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int32))
    timings: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    line_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    tps_points: np.ndarray | None = None
    tps_alpha: float | None = None

    @property
    def nb_lines(self) -> int:
        return int(np.max(self.line_index)) + 1 if len(self.line_index) else 0

    @classmethod
    def failed(cls, filename: str, stage: str, kind: str, message: str, etag: str | None = None,
               timings: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)) -> "PageOutcome":
        return cls(filename, False, etag, stage, kind, message, timings=timings)

    @classmethod
    def from_result(cls, filename: str, result: dict[str, Any], *, etag: str | None,
                    size: tuple[int, int], frame: tuple[int, int],
                    timings: tuple[float, float, float, float]) -> "PageOutcome":
        """A finished page from the result post-processing wrote into its slot."""
        return cls(filename, True, etag, width=size[0], height=size[1], frame_width=frame[0],
                   frame_height=frame[1], rotation_angle=result["rotation_angle"],
                   skew_angle=float(result["skew"]), contours=result["contours"],
                   boxes=result["boxes"], timings=timings, line_index=result["line_index"],
                   tps_points=result["tps_points"], tps_alpha=result["tps_alpha"])


def output_prefix(job_name: str, w_id: str, i_id: str, version: str) -> str:
    return f"{job_name}/{w_id}/{i_id}/{version}/"


def parquet_key(job_name: str, w_id: str, i_id: str, version: str) -> str:
    return output_prefix(job_name, w_id, i_id, version) + f"{w_id}-{i_id}-{version}.parquet"


def success_key(job_name: str, w_id: str, i_id: str, version: str) -> str:
    return output_prefix(job_name, w_id, i_id, version) + "success.json"


def partial_key(job_name: str, w_id: str, i_id: str, version: str) -> str:
    """Where a retried volume keeps its finished pages (``bec.control.partial``): under ``_partial/``,
    which readers of ``{job}/`` skip (Spark, Athena and pyarrow datasets ignore ``_`` names),
    never beside a success.json."""
    return f"{job_name}/_partial/{w_id}/{i_id}/{version}/{w_id}-{i_id}-{version}.parquet"


def _int16(values: np.ndarray) -> pa.Array:
    return pa.array(np.clip(values, -32768, 32767).astype(np.int16), type=pa.int16())


def _offsets(lengths: list[int]) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))


def _nullable(values: list[Any], kind: pa.DataType, dtype: type) -> pa.Array:
    missing = np.array([v is None for v in values], dtype=bool)
    data = np.array([0 if v is None else v for v in values], dtype=dtype)
    return pa.array(data, type=kind, mask=missing)


def _tps_column(pages: list[PageOutcome]) -> pa.Array:
    """list<list<float32>>: per row its control points as 4-float lists, null when none."""
    rows = [np.asarray(p.tps_points, np.float32).reshape(-1, 4) if p.tps_points is not None
            else np.zeros((0, 4), np.float32) for p in pages]
    flat = np.concatenate(rows).reshape(-1) if rows else np.zeros(0, np.float32)
    points = pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, 4, dtype=np.int32)),
                                      pa.array(flat, type=pa.float32()))
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)]).astype(np.int32)
    missing = pa.array([p.tps_points is None for p in pages], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), points, mask=missing)


def build_table(pages: list[PageOutcome]) -> pa.Table:
    all_contours = [c for p in pages for c in p.contours]
    points = np.concatenate(all_contours) if all_contours else np.zeros((0, 2), np.int32)
    point_arr = pa.StructArray.from_arrays([_int16(points[:, 0]), _int16(points[:, 1])], fields=list(POINT))
    lines = pa.ListArray.from_arrays(_offsets([len(c) for c in all_contours]), point_arr)
    contours = pa.ListArray.from_arrays(_offsets([len(p.contours) for p in pages]), lines)
    boxes_np = np.concatenate([p.boxes.reshape(-1, 4) for p in pages]) if pages else np.zeros((0, 4))
    box_arr = pa.StructArray.from_arrays([_int16(boxes_np[:, i]) for i in range(4)], fields=list(BOX))
    boxes = pa.ListArray.from_arrays(_offsets([len(p.boxes.reshape(-1, 4)) for p in pages]), box_arr)
    index_np = (np.concatenate([np.asarray(p.line_index, np.int16).reshape(-1) for p in pages])
                if pages else np.zeros(0, np.int16))
    line_index = pa.ListArray.from_arrays(_offsets([len(np.asarray(p.line_index).reshape(-1)) for p in pages]),
                                          pa.array(index_np.astype(np.int16), type=pa.int16()))
    timings = np.array([p.timings for p in pages], dtype=np.float32).reshape(-1, 4)
    columns: dict[str, Any] = {
        **record_columns(pages),
        "rotation_angle": _nullable([p.rotation_angle for p in pages], pa.float32(), np.float32),
        "tps_points": _tps_column(pages),
        "tps_alpha": _nullable([p.tps_alpha if p.tps_points is not None else None for p in pages],
                               pa.float16(), np.float16),
        "contours": contours,
        "nb_contours": [len(p.contours) for p in pages],
        "contours_bboxes": boxes,
        "nb_lines": [p.nb_lines for p in pages],
        "line_index": line_index,
        "frame_width": [p.frame_width for p in pages],
        "frame_height": [p.frame_height for p in pages],
        "skew_angle": [p.skew_angle for p in pages],
        "fetch_ms": timings[:, 0], "decode_ms": timings[:, 1],
        "infer_ms": timings[:, 2], "post_ms": timings[:, 3],
    }
    return table_of(columns, SCHEMA)


def parquet_bytes(pages: list[PageOutcome], metadata: dict[str, str] | None = None) -> bytes:
    table = build_table(pages)
    if metadata:
        table = table.replace_schema_metadata({k: v for k, v in metadata.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def success_bytes(marker: dict[str, Any]) -> bytes:
    return json.dumps(marker, indent=2, sort_keys=True, default=str).encode()


def read_success_markers(s3: Any, bucket: str, job: str,
                 rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any] | None, str]]:
    """Each task row's success.json, read in parallel for ``bec jobs errors``: (row, marker or
    None, why it could not be read). A marker that cannot be read is said, never fatal."""
    def fetch(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
        key = success_key(job, row["w_id"], row["i_id"], row["version"])
        try:
            marker = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            return row, None, f"{key}: {aws.error_code(exc)}"
        except (ValueError, OSError) as exc:
            return row, None, f"{key}: {type(exc).__name__}"
        by_type = marker.get("errors_by_type") if isinstance(marker, dict) else None
        return (row, marker, "") if isinstance(by_type, dict) else (row, None, f"{key}: no errors_by_type")

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(fetch, rows))
