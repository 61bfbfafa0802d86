"""An archive bucket read from a local folder (``--s3-source-bucket file:///path``).

For a mounted copy of the archive, and for benchmarks that must leave S3's cost out.
Implements the one call the worker makes on the source bucket, ``get_object``, with
boto3's shapes (``Body``, ``ETag`` as S3 computes it for a one-part upload, ``ContentLength``;
a missing key raises the same ``ClientError`` code ``NoSuchKey``), so nothing else needs to know.
"""
from __future__ import annotations

import hashlib
import io
from datetime import datetime
from pathlib import Path
from typing import Any

import botocore.exceptions

SCHEME = "file://"


def is_local(bucket: str) -> bool:
    return bucket.startswith(SCHEME)


def local_root(bucket: str) -> Path:
    """The folder a ``file://`` source names."""
    return Path(bucket[len(SCHEME):]).resolve()


class DirectoryS3:
    """``max_bytes``: a larger file is not read; its answer has its ``ContentLength`` and an
    empty body, for the caller to refuse (as it refuses S3's before reading the body)."""

    def __init__(self, url: str, max_bytes: int | None = None) -> None:
        self.root = local_root(url)
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise self._missing(key)  # keys never leave the folder
        return path

    @staticmethod
    def _missing(key: str) -> botocore.exceptions.ClientError:
        return botocore.exceptions.ClientError(
            {"Error": {"Code": "NoSuchKey", "Message": f"{key} not found"},
             "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject")

    def get_object(self, Bucket: str, Key: str,  # noqa: N803 - boto3's names
                   IfUnmodifiedSince: datetime | None = None) -> dict[str, Any]:  # noqa: N803
        if not self.root.is_dir():  # an unmounted archive: the whole source is gone, not a key
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "NoSuchBucket", "Message": f"{self.root} is not a folder"},
                 "ResponseMetadata": {"HTTPStatusCode": 404}}, "GetObject")
        path = self._path(Key)
        try:
            stat = path.stat()
            size = stat.st_size
            if self.max_bytes is not None and size > self.max_bytes:
                return {"Body": io.BytesIO(b""), "ETag": '""', "ContentLength": size}
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise self._missing(Key) from None
        if IfUnmodifiedSince is not None and stat.st_mtime > IfUnmodifiedSince.timestamp():
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "PreconditionFailed", "Message": "At least one of the pre-conditions "
                           "you specified did not hold"}, "ResponseMetadata": {"HTTPStatusCode": 412}},
                "GetObject")
        return {"Body": io.BytesIO(data), "ETag": etag_of(data), "ContentLength": len(data)}


def etag_of(data: bytes) -> str:
    """What S3 gives an object uploaded in one part: the MD5 of its content, quoted.

    A volume's version is the first six hex digits of its manifest's ETag. Made of the
    file's mtime (in ns, hex) and size, those digits were the mtime's high bits, which change
    every ~18 minutes: a manifest rewritten within them kept its version and was skipped as
    done. A content hash changes with the content, and only with it (a copy of the archive
    keeps its versions)."""
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


def probe_client(bucket: str, region: str) -> Any:
    """The client ``aws.probe`` asks whether the archive can serve objects now: the folder
    itself, or a single-try S3 client."""
    if is_local(bucket):
        return DirectoryS3(bucket)
    from bec.edges import aws

    return aws.single_try_client("s3", region)


def source_client(bucket: str, region: str, max_bytes: int | None = None, **kwargs: Any) -> Any:
    """The client to read the archive with: a folder for ``file://``, else S3."""
    if is_local(bucket):
        return DirectoryS3(bucket, max_bytes)
    from bec.edges import aws

    return aws.client("s3", region, **kwargs)
