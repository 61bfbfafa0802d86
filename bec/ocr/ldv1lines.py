"""A line-detection job's output for one volume version, read once when an ocr volume is claimed.

The ocr job's ``lines_from`` names that job. Its ``success.json`` for the same version means
its Parquet is complete (DESIGN §3); without it the volume is retried later with a reason
that says to run that job first — never terminal (ldv1 may simply not have reached the
volume yet) and never guessed (page-level OCR is another job config, not a fallback).

Only the columns OCR needs are read, and the nested contours are kept as flat numpy arrays
with offsets (a pecha volume has tens of thousands of contours: one Python object per point
would cost seconds). Each page's share is pickled into its slot by the controller.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any

import botocore.exceptions
import numpy as np

from bec.edges import aws
from bec.observe import metrics
from bec.edges.artifacts import parquet_key, success_key
from bec.errors import RetryableError

COLUMNS = ["img_file_name", "source_etag", "ok", "error_type", "error_message", "rotation_angle",
           "tps_points", "tps_alpha", "contours", "line_index"]


class LinesMissing(RetryableError):
    """The line-detection job has not finished this volume version (yet)."""


@dataclass
class VolumeLines:
    """The line-detection rows of one volume version, page by page (manifest order)."""

    job: str
    names: list[str]
    etags: list[str | None]
    ok: list[bool]
    errors: list[str | None]
    rotation: list[float | None]
    tps_points: list[Any]                 # per page: None or a flat list of 4-float lists
    tps_alpha: list[float | None]
    contour_starts: np.ndarray            # per page: its first contour (pages + 1 offsets)
    point_starts: np.ndarray              # per contour: its first point (contours + 1 offsets)
    xs: np.ndarray
    ys: np.ndarray
    line_index: np.ndarray                # per contour

    def page(self, n: int) -> dict[str, Any]:
        """What page ``n``'s OCR needs: its correction, contours and line numbers."""
        first, last = int(self.contour_starts[n]), int(self.contour_starts[n + 1])
        contours = []
        for c in range(first, last):
            a, b = int(self.point_starts[c]), int(self.point_starts[c + 1])
            contours.append(np.stack([self.xs[a:b], self.ys[a:b]], axis=1).astype(np.int32))
        points = self.tps_points[n]
        return {"job": self.job, "filename": self.names[n], "source_etag": self.etags[n],
                "ok": self.ok[n], "error": self.errors[n], "rotation_angle": self.rotation[n],
                "tps_points": None if points is None else np.asarray(points, np.float32).reshape(-1, 4),
                "tps_alpha": self.tps_alpha[n], "contours": contours,
                "line_index": self.line_index[first:last].copy()}

    def page_bytes(self, n: int) -> bytes:
        return pickle.dumps(self.page(n), protocol=pickle.HIGHEST_PROTOCOL)


def _get(s3: Any, bucket: str, key: str) -> bytes | None:
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except botocore.exceptions.ClientError as exc:
        if aws.is_not_found(exc):
            return None
        raise aws.as_retryable(f"reading s3://{bucket}/{key}", exc) from None
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise RetryableError(f"reading s3://{bucket}/{key}: {exc}") from None
    metrics.S3_READ.inc(len(body))
    return body


def read_volume_lines(s3: Any, bucket: str, job: str, w_id: str, i_id: str, version: str,
                      filenames: list[str]) -> VolumeLines:
    """The rows of ``job``'s Parquet for this volume version, checked against the manifest."""
    import pyarrow.parquet as pq

    where = f"{job} output for {w_id}/{i_id} version {version}"
    marker = success_key(job, w_id, i_id, version)
    if _get(s3, bucket, marker) is None:
        raise LinesMissing(f"{where} is missing (no s3://{bucket}/{marker}): run {job} first; "
                           "this volume is retried later")
    key = parquet_key(job, w_id, i_id, version)
    body = _get(s3, bucket, key)
    if body is None:
        raise LinesMissing(f"{where} is incomplete (success.json without s3://{bucket}/{key}): "
                           f"run {job} again for it")
    try:
        table = pq.read_table(io.BytesIO(body), columns=COLUMNS)
    except Exception as exc:  # pyarrow's errors: unreadable or without the contract's columns
        raise RetryableError(f"{where} is unreadable (s3://{bucket}/{key}: {exc}"[:400] + ")") from None
    names = table.column("img_file_name").to_pylist()
    if names != filenames:
        raise RetryableError(f"{where} lists {len(names)} images, not the manifest's {len(filenames)} "
                             f"in its order: run {job} again for it")
    contours = table.column("contours").combine_chunks()
    lines = contours.flatten()                     # one list of points per contour
    points = lines.flatten()                       # struct<x, y>
    index = table.column("line_index").combine_chunks()
    return VolumeLines(
        job=job, names=names, etags=table.column("source_etag").to_pylist(),
        ok=table.column("ok").to_pylist(),
        errors=[f"{t}: {m}" if t else m for t, m in zip(table.column("error_type").to_pylist(),
                                                       table.column("error_message").to_pylist())],
        rotation=table.column("rotation_angle").to_pylist(),
        tps_points=table.column("tps_points").to_pylist(),
        tps_alpha=table.column("tps_alpha").to_pylist(),
        contour_starts=_offsets(contours), point_starts=_offsets(lines),
        xs=points.field("x").to_numpy(zero_copy_only=False), ys=points.field("y").to_numpy(zero_copy_only=False),
        line_index=index.flatten().to_numpy(zero_copy_only=False).astype(np.int16))


def _offsets(array: Any) -> np.ndarray:
    """A list array's offsets, relative to its first (a sliced array's do not start at 0)."""
    offsets = array.offsets.to_numpy()
    return (offsets - offsets[0]).astype(np.int64)
