"""The ocr job's Parquet: one row per manifest image, in manifest order, failed images included.

Same layout and success-marker rules as ldv1 (``{job}/{W}/{I}/{version}/{W}-{I}-{version}.parquet``,
then ``success.json``: :mod:`bec.edges.artifacts`). Columns, a contract for the archive's readers:

``img_file_name`` string · ``source_etag`` string · ``ok`` bool · ``error_stage``,
``error_type``, ``error_message`` string · ``text`` string (the lines joined by ``\\n``; null on a
failed page) · ``nb_lines`` int32 · ``lines`` list<struct<text string, confidence float32,
line_index int16, x, y, w, h int16>> · ``mean_confidence`` float32 (the lines' confidence
weighted by their characters; null when no line was read) · ``line_source`` string (``"ldv1"``:
lines cut from a line-detection job's output, ``"page"``: Tesseract's own layout analysis;
null on a failed page) · ``width``, ``height`` int32 (the original's size) · ``fetch_ms``,
``decode_ms``, ``ocr_ms``, ``cut_ms`` float32.

A line's box is on the *corrected page* when its lines came from ldv1 (the page its contours
are on), on the original image otherwise; its ``line_index`` is ldv1's (0 = the top line), or
the line's rank on the page.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bec.edges.artifacts import PageRecord, record_columns, table_of

LINE = pa.struct([("text", pa.string()), ("confidence", pa.float32()), ("line_index", pa.int16()),
                  ("x", pa.int16()), ("y", pa.int16()), ("w", pa.int16()), ("h", pa.int16())])
REQUIRED = {"img_file_name", "ok", "nb_lines", "lines", "fetch_ms", "decode_ms", "ocr_ms", "cut_ms"}
SCHEMA = pa.schema([pa.field(name, kind, nullable=name not in REQUIRED) for name, kind in [
    ("img_file_name", pa.string()),
    ("source_etag", pa.string()),
    ("ok", pa.bool_()),
    ("error_stage", pa.string()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
    ("text", pa.string()),
    ("nb_lines", pa.int32()),
    ("lines", pa.list_(LINE)),
    ("mean_confidence", pa.float32()),
    ("line_source", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("fetch_ms", pa.float32()),
    ("decode_ms", pa.float32()),
    ("ocr_ms", pa.float32()),
    ("cut_ms", pa.float32()),
]])

#: One line as the OCR process writes it into its slot: (text, confidence, line_index, x, y, w, h).
LineTuple = tuple[str, float, int, int, int, int, int]


@dataclass
class OcrOutcome(PageRecord):
    """A page read by the OCR process. Failed pages are ``bec.edges.artifacts.PageOutcome``s (the
    controller's, kind-agnostic); the table reads only their :class:`PageRecord` fields."""

    text_lines: list[LineTuple] = field(default_factory=list)
    line_source: str | None = None
    timings: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def text(self) -> str:
        return "\n".join(line[0] for line in self.text_lines)

    @property
    def mean_confidence(self) -> float | None:
        from bec.ocr.tesseract import mean_confidence

        return mean_confidence([(t[0], t[1]) for t in self.text_lines]) if self.text_lines else None

    @classmethod
    def from_result(cls, filename: str, result: dict[str, Any], *, etag: str | None,
                    size: tuple[int, int], timings: tuple[float, float, float, float]) -> "OcrOutcome":
        return cls(filename, True, etag, width=size[0], height=size[1],
                   text_lines=[tuple(line) for line in result["lines"]],  # type: ignore[misc]
                   line_source=result["line_source"], timings=timings)


def _int16(values: list[int]) -> pa.Array:
    return pa.array(np.clip(np.asarray(values, np.int64), -32768, 32767).astype(np.int16), type=pa.int16())


def build_table(pages: list[Any]) -> pa.Table:
    lines = [getattr(p, "text_lines", None) or [] for p in pages]
    flat = [line for page_lines in lines for line in page_lines]
    columns = list(zip(*flat)) if flat else [[] for _ in range(7)]
    structs = pa.StructArray.from_arrays(
        [pa.array(columns[0], pa.string()), pa.array(np.asarray(columns[1], np.float32), pa.float32()),
         *(_int16(list(c)) for c in columns[2:])], fields=list(LINE))
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in lines], dtype=np.int64)]).astype(np.int32)
    timings = np.array([p.timings for p in pages], dtype=np.float32).reshape(-1, 4)
    data: dict[str, Any] = record_columns(pages)
    ok = data["ok"]
    data.update({
        "text": [p.text if good else None for p, good in zip(pages, ok)],
        "nb_lines": [len(x) for x in lines],
        "lines": pa.ListArray.from_arrays(pa.array(offsets), structs),
        "mean_confidence": [p.mean_confidence if good else None for p, good in zip(pages, ok)],
        "line_source": [getattr(p, "line_source", None) if good else None for p, good in zip(pages, ok)],
        "fetch_ms": timings[:, 0], "decode_ms": timings[:, 1], "ocr_ms": timings[:, 2], "cut_ms": timings[:, 3],
    })
    return table_of(data, SCHEMA)


def parquet_bytes(pages: list[Any], metadata: dict[str, str] | None = None) -> bytes:
    table = build_table(pages)
    if metadata:
        table = table.replace_schema_metadata(dict(metadata))
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
