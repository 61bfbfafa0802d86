"""A retried volume keeps its finished pages: the partial artifact.

When a volume goes back for a retry because too many of its pages hit transient errors,
the file its attempt wrote (every row: finished pages, deterministic errors, and the
transient error rows) is kept at ``artifacts.partial_key``: under ``{job}/_partial/``, which
readers of ``{job}/`` skip, and never beside a success.json, so it is never taken for
output. The next claim (attempt 2 or later) reads it back: its finished pages' rows are
copied, and only the others are fetched and inferred again. Rows computed by another model,
another result-changing config or another Parquet schema are not reused. Once the volume is
done, the partial is deleted (``s3:DeleteObject``; without it the object stays, unread, for
an S3 lifecycle rule on ``{job}/_partial/`` to expire).

Nothing here may fail a volume: a partial that cannot be read, or kept, only means that the
next attempt redoes every page, and the logs and the retry reason say so.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import IO, Any

import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from bec.control import jobkinds
from bec.edges import artifacts, aws
from bec.observe import metrics
from bec.edges.volumefile import SPOOL_BYTES, Resume, Tally, config_digest

log = logging.getLogger("bec.partial")

#: Large files go up and down as parallel multipart transfers; four parts at a time bounds
#: the memory a transfer takes (4 × 8 MiB).
TRANSFER = TransferConfig(max_concurrency=4)
S3_TROUBLE = (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
              boto3.exceptions.S3UploadFailedError, OSError)


@dataclass
class Found:
    """A partial artifact exists for the claimed version (usable or not: either way it is
    deleted once the volume is done)."""

    key: str
    resume: Resume | None


def file_metadata(svc: Any) -> dict[str, str]:
    """What a volume's file records of how its rows were computed (checked on resume)."""
    return {"bec.model.sha256": svc.model.get("sha256", ""), "bec.model.name": svc.model.get("name", ""),
            "bec.config.sha256": config_digest(svc.config)}


def load(svc: Any, adm: Any) -> Found | None:
    """The partial artifact of an earlier attempt of this claim's version, if any."""
    if adm.attempt <= 1 or adm.manifest is None:
        return None  # written only when a claimed attempt is retried: a first claim has none
    key = artifacts.partial_key(svc.job_name, adm.w_id, adm.i_id, adm.manifest.version)
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    try:
        svc.s3.download_fileobj(svc.dest_bucket, key, spool, Config=TRANSFER)
    except S3_TROUBLE as exc:
        spool.close()
        if isinstance(exc, botocore.exceptions.ClientError) and aws.is_not_found(exc):
            return None
        log.warning("volume %s: could not look for partial results at s3://%s/%s (%s): every page is "
                    "processed again", adm.label, svc.dest_bucket, key, aws.error_code(exc))
        return None
    metrics.S3_READ.inc(spool.tell())
    spool.seek(0)
    try:
        kind = jobkinds.kind_of(svc.job_name)
        schema = kind.table_schema() if kind is not None else None
        resume = Resume(spool, [e.filename for e in adm.manifest.entries], file_metadata(svc),
                        **({"schema": schema} if schema is not None else {}))
    except ValueError as why:
        spool.close()
        log.warning("volume %s: its partial results s3://%s/%s are not used (%s): every page is "
                    "processed again", adm.label, svc.dest_bucket, key, why)
        return Found(key, None)
    log.info("volume %s resumes: %d of %d pages were finished by an earlier attempt; %d are redone",
             adm.label, resume.kept_count, len(resume.kept), len(resume.kept) - resume.kept_count)
    return Found(key, resume)


def store(svc: Any, adm: Any, file: IO[bytes], size: int, tally: Tally) -> str:
    """Keep a retried attempt's file for the next one; the retry reason's words on what
    happens to the finished pages."""
    finished = tally.pages - tally.transient_errors
    if finished <= 0:
        return "no page finished, so the next attempt redoes all of them"
    key = artifacts.partial_key(svc.job_name, adm.w_id, adm.i_id, adm.manifest.version)
    try:
        svc.s3.upload_fileobj(file, svc.dest_bucket, key, Config=TRANSFER)
    except S3_TROUBLE as exc:
        log.warning("volume %s: could not keep its partial results at s3://%s/%s (%s)", adm.label,
                    svc.dest_bucket, key, aws.error_code(exc))
        return (f"its {finished} finished pages could not be kept ({aws.error_code(exc)}), so the next "
                "attempt redoes all of them")
    metrics.S3_WRITTEN.inc(size)
    return (f"its {finished} finished pages are kept in s3://{svc.dest_bucket}/{key}: the next attempt "
            f"redoes only the {tally.transient_errors} others")


def drop(svc: Any, adm: Any, found: Found) -> None:
    """The volume is done: its partial results have served (best effort)."""
    try:
        svc.s3.delete_object(Bucket=svc.dest_bucket, Key=found.key)
    except S3_TROUBLE as exc:
        log.warning("volume %s is done, but its partial results s3://%s/%s could not be deleted (%s): "
                    "they are never read again (grant s3:DeleteObject on %s/_partial/*, or expire "
                    "them with a lifecycle rule)", adm.label, svc.dest_bucket, found.key,
                    aws.error_code(exc), svc.job_name)
