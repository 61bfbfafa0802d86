"""The task lifecycle, top to bottom (DESIGN §5). Every SQS message goes through here.

    admit ─ 1. parse and validate the body ............ poison → DLQ at once, with the reason
          ─ 2. read the manifest → version ............ missing/invalid → terminal → DLQ
          ─ 3. ensure the volume row; success.json? ... yes → DB done, delete, next
          ─ 4. claim the task (one SQL statement) ..... not claimable → look again once the
                                                         holder's heartbeat could be stale
    (the controller streams the pages through the pipeline)
    extend ─ visibility, while the volume runs ......... never once the message is settled
    finish ─ 5. error ratio within max_error_ratio? ... no → retryable
           ─ 6. Parquet, then success.json, then DB done + metrics, then delete the message
    retry  ─ DB retryable_failed; the message becomes visible again after a back-off
    release ─ DB retryable_failed; visible again at once (shutdown, crash of the controller)
    let go ─ the claim was taken over (this worker went stale): touch neither row nor message

Errors are classified where they arise (``bec.errors``); this module only routes them.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import botocore.exceptions

from bec import artifacts, aws, jobkinds, metrics, tasks
from bec.archive import Manifest, read_manifest
from bec.db import Database
from bec.errors import BecError, PoisonMessage, RetryableError, TerminalError, Unavailable
from bec.ids import check_i_id, check_w_id

log = logging.getLogger("bec.lifecycle")

MAX_BODY = 4096
MAX_BACKOFF_S = 900


@dataclass(frozen=True)
class Services:
    """What the lifecycle talks to, and the facts of this worker."""

    db: Database
    s3: Any          # artifacts (destination bucket)
    source: Any      # the archive: S3, or a folder (bec.localarchive)
    sqs: Any
    job_name: str
    job_id: int
    worker_id: int
    worker_name: str
    source_bucket: str
    dest_bucket: str
    queue_url: str
    dlq_url: str
    config: dict[str, Any]
    model: dict[str, str]
    retry_delay: int = 30
    stale_after_s: float = tasks.STALE_AFTER_S
    # Held around every change of a message's visibility (see ``extend_visibility``).
    visibility_lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)


@dataclass(frozen=True)
class Received:
    """An SQS message as received."""

    message_id: str
    receipt: str
    body: str
    receive_count: int
    # Set once this worker has given the message its fate (deleted, or visible again now or
    # after a delay): from then on its visibility is never extended.
    settled: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    @classmethod
    def from_sqs(cls, raw: dict[str, Any]) -> "Received":
        count = int(raw.get("Attributes", {}).get("ApproximateReceiveCount", "1") or 1)
        return cls(raw["MessageId"], raw["ReceiptHandle"], raw.get("Body", ""), count)


class Verdict(Enum):
    ADMITTED = "admitted"
    ALREADY_DONE = "already_done"
    NOT_CLAIMABLE = "not_claimable"
    POISON = "poison"
    TERMINAL = "terminal"
    RETRY = "retry"


@dataclass
class Admission:
    verdict: Verdict
    message: Received
    reason: str = ""
    w_id: str = ""
    i_id: str = ""
    manifest: Manifest | None = None
    volume_id: int = 0
    task_id: int = 0
    attempt: int = 0
    claimed_at: float = 0.0
    inputs: Any = None           # what the job kind read for the volume's pages (ocr: ldv1's lines)
    database_down: bool = False  # the retry was caused by PostgreSQL being unreachable

    @property
    def label(self) -> str:
        return f"{self.w_id}/{self.i_id}" if self.w_id else "?"


# -- 1. parse --------------------------------------------------------------------------------
def parse_body(body: str) -> tuple[str, str]:
    if len(body) > MAX_BODY:
        raise PoisonMessage(f"message body of {len(body)} bytes is too large for a task")
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        raise PoisonMessage("message body is not JSON") from None
    except RecursionError:  # "[[[[…" within MAX_BODY: must not take the controller down
        raise PoisonMessage("message body is not JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise PoisonMessage(f"message body must be a JSON object, got {type(value).__name__}")
    missing = {"w_id", "i_id"} - set(value)
    if missing:
        raise PoisonMessage(f"message body lacks {', '.join(sorted(missing))}")
    extra = set(value) - {"w_id", "i_id"}
    if extra:
        names = ", ".join(k if k.isprintable() else repr(k) for k in sorted(extra))
        raise PoisonMessage(f"message body has unexpected keys: {names[:200]}")
    try:
        return check_w_id(value["w_id"]), check_i_id(value["i_id"])
    except BecError as exc:
        raise PoisonMessage(str(exc)) from None


# -- admit: steps 1–4 --------------------------------------------------------------------------
def admit(svc: Services, message: Received) -> Admission:
    adm = Admission(Verdict.RETRY, message)
    try:
        adm.w_id, adm.i_id = parse_body(message.body)                                    # 1
    except PoisonMessage as exc:
        adm.verdict, adm.reason = Verdict.POISON, str(exc)
        send_to_dlq(svc, message, adm.reason, "poison")
        return adm
    try:
        try:
            manifest = read_manifest(svc.source, svc.source_bucket, adm.w_id, adm.i_id)  # 2
        except TerminalError as exc:
            adm.volume_id = tasks.ensure_volume(svc.db, adm.w_id, adm.i_id, None, None)
            tasks.record_terminal(svc.db, svc.job_id, adm.volume_id, "", svc.worker_id, str(exc))
            adm.verdict, adm.reason = Verdict.TERMINAL, str(exc)
            send_to_dlq(svc, message, adm.reason, "terminal")
            return adm
        adm.manifest = manifest
        version = manifest.version
        adm.volume_id = tasks.ensure_volume(svc.db, adm.w_id, adm.i_id, version,       # 3
                                            len(manifest.entries))
        marker = read_success_marker(svc, adm.w_id, adm.i_id, version)
        if marker is not None:
            tasks.record_done_from_marker(svc.db, svc.job_id, adm.volume_id, version,
                                          svc.worker_id, marker)
            delete_message(svc, message)
            adm.verdict = Verdict.ALREADY_DONE
            return adm
        claim = tasks.claim(svc.db, svc.job_id, adm.volume_id, version, svc.worker_id,  # 4
                            len(manifest.entries), svc.stale_after_s)
        if claim is None:
            adm.verdict, adm.reason = Verdict.NOT_CLAIMABLE, "task is done or running elsewhere"
            set_visibility(svc, message, recheck_delay_s(svc))
            return adm
        adm.task_id, adm.attempt = claim.task_id, claim.attempt
        if claim.attempt == 1:  # a first claim: was the manifest missing before?
            tasks.forget_missing_manifest(svc.db, svc.job_id, adm.volume_id)
        kind = jobkinds.kind_of(svc.job_name)
        if kind is not None:  # a RetryableError (e.g. "run ldv1 first") retries it, recorded
            adm.inputs = kind.volume_inputs(svc, adm)
        adm.claimed_at = time.time()
        adm.verdict = Verdict.ADMITTED
        return adm
    except (RetryableError, Unavailable) as exc:
        adm.verdict, adm.reason = Verdict.RETRY, str(exc)
        adm.database_down = isinstance(exc, Unavailable)
        retry_later(svc, adm, adm.reason)
        return adm


def recheck_delay_s(svc: Services) -> int:
    """When to look again at a volume running elsewhere. The holder deletes the message when
    it finishes; if it died, its heartbeat is stale after ``stale_after_s`` and the next
    receive takes the volume over."""
    return int(svc.stale_after_s) + 2


def read_success_marker(svc: Services, w_id: str, i_id: str, version: str) -> dict[str, Any] | None:
    key = artifacts.success_key(svc.job_name, w_id, i_id, version)
    try:
        body = svc.s3.get_object(Bucket=svc.dest_bucket, Key=key)["Body"].read()
        metrics.S3_READ.inc(len(body))
    except botocore.exceptions.ClientError as exc:
        if aws.is_not_found(exc):
            return None
        raise aws.as_retryable("reading success.json", exc) from None
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        raise RetryableError(f"reading success.json: {exc}") from None
    try:
        marker = json.loads(body)
    except ValueError:
        marker = None
    if isinstance(marker, dict):
        return marker
    # S3 writes whole objects, so this was not a crash of ours: process the volume again and
    # write a true marker, rather than record "done" with counts nobody can read.
    log.warning("s3://%s/%s is unreadable (%d bytes): processing the volume again",
                svc.dest_bucket, key, len(body))
    return None


# -- finish: steps 5–6 -------------------------------------------------------------------------
def error_summary(pages: list[artifacts.PageOutcome]) -> str:
    kinds = Counter(p.error_type for p in pages if not p.ok)
    return ", ".join(f"{n}× {kind}" for kind, n in kinds.most_common(3))


def finish(svc: Services, adm: Admission, pages: list[artifacts.PageOutcome]) -> Verdict:
    """Write the artifacts and record success, or route the volume to a retry."""
    assert adm.manifest is not None
    kind = jobkinds.kind_of(svc.job_name)
    assert kind is not None, svc.job_name
    version = adm.manifest.version
    duration_ms = (time.time() - adm.claimed_at) * 1000
    errors = sum(not p.ok for p in pages)
    ratio = errors / len(pages) if pages else 1.0
    if ratio > float(svc.config.get("max_error_ratio", 0.1)):                           # 5
        reason = (f"{errors} of {len(pages)} pages failed ({ratio:.0%} > max_error_ratio "
                  f"{svc.config.get('max_error_ratio')}): {error_summary(pages)}")
        log.warning("volume %s not finished: %s", adm.label, reason)
        retry_later(svc, adm, reason, nb_errors=errors, duration_ms=duration_ms)
        return Verdict.RETRY
    marker = {
        "job": svc.job_name, "w_id": adm.w_id, "i_id": adm.i_id, "version": version,
        "manifest_etag": adm.manifest.etag.strip('"'), "total_images": len(pages),
        "nb_errors": errors, "errors_by_type": dict(Counter(p.error_type for p in pages if not p.ok)),
        "total_duration_ms": round(duration_ms, 3),
        "avg_duration_per_page_ms": round(duration_ms / len(pages), 3) if pages else 0.0,
        "stage_ms": {name: round(sum(p.timings[i] for p in pages), 3)
                     for i, name in enumerate(kind.stage_names)},
        "worker": {"id": svc.worker_id, "name": svc.worker_name},
        "task_id": adm.task_id, "attempt": adm.attempt,
        "job_config": svc.config, "model": svc.model,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **kind.summary(pages),
    }
    write_started = time.perf_counter()
    try:                                                                                 # 6
        table = kind.parquet_bytes(pages, {"bec.model.sha256": svc.model.get("sha256", "")})
        svc.s3.put_object(Bucket=svc.dest_bucket,
                          Key=artifacts.parquet_key(svc.job_name, adm.w_id, adm.i_id, version), Body=table)
        success = artifacts.success_bytes(marker)
        svc.s3.put_object(Bucket=svc.dest_bucket,
                          Key=artifacts.success_key(svc.job_name, adm.w_id, adm.i_id, version),
                          Body=success, ContentType="application/json")
        metrics.S3_WRITTEN.inc(len(table) + len(success))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, OSError) as exc:
        reason = f"writing artifacts: {aws.error_code(exc)}: {exc}"[:500]
        log.warning("volume %s not finished: %s", adm.label, reason)
        retry_later(svc, adm, reason, nb_errors=errors, duration_ms=duration_ms)
        return Verdict.RETRY
    try:
        ours = tasks.mark_done(svc.db, adm.task_id, svc.worker_id, adm.attempt, len(pages), errors, duration_ms)
    except Unavailable as exc:
        # success.json is written: the next delivery sees it and repairs the DB row.
        log.warning("volume %s not finished: recording done: %s (success.json is written: the "
                    "next delivery repairs the database)", adm.label, exc)
        retry_later(svc, adm, f"recording done: {exc}", record=False)
        return Verdict.RETRY
    if not ours:
        let_go(svc, adm, "wrote its artifacts")
        return Verdict.NOT_CLAIMABLE
    delete_message(svc, adm.message)
    metrics.STAGE_SECONDS.labels("write").observe(time.perf_counter() - write_started)
    return Verdict.ADMITTED


# -- failure routes ------------------------------------------------------------------------------
def backoff_s(svc: Services, receive_count: int) -> int:
    return int(min(MAX_BACKOFF_S, svc.retry_delay * 2 ** max(0, receive_count - 1)))


def retry_later(svc: Services, adm: Admission, reason: str, *, nb_errors: int | None = None,
                duration_ms: float | None = None, record: bool = True) -> None:
    """Retryable: DB ``retryable_failed`` and the message visible again after a back-off."""
    if record and not _record_failure(svc, adm, reason, "failed it", nb_errors=nb_errors,
                                      total_duration_ms=duration_ms):
        return
    set_visibility(svc, adm.message, backoff_s(svc, adm.message.receive_count))


def release(svc: Services, adm: Admission, reason: str) -> None:
    """Give the volume back now: DB ``retryable_failed``, message visible at once."""
    if _record_failure(svc, adm, reason, "released it"):
        set_visibility(svc, adm.message, 0)


def _record_failure(svc: Services, adm: Admission, reason: str, what: str, **counts: Any) -> bool:
    """Mark this worker's claim ``retryable_failed``; False when the claim is no longer ours
    (the volume was let go: the caller leaves the message alone too)."""
    if not adm.task_id:
        return True
    try:
        if not tasks.mark_failed(svc.db, adm.task_id, svc.worker_id, adm.attempt, terminal=False,
                                 reason=reason, **counts):
            let_go(svc, adm, what)
            return False
    except Unavailable as exc:
        log.warning("could not record the failure of %s (%s): %s", adm.label, what, exc)
    return True


def let_go(svc: Services, adm: Admission, what: str) -> None:
    """The claim was taken over while this worker held it (its heartbeat went stale). The new
    holder has the task row and the message (with its own receipt): touch neither, and stop
    extending this worker's now stale receipt."""
    with svc.visibility_lock:
        adm.message.settled.set()
    log.warning("volume %s was taken over by another worker before this one %s (this worker's "
                "heartbeat was stale): leaving it to that worker", adm.label, what)


def sqs_text(text: str) -> str:
    """Only the characters SQS accepts in a message or attribute (#x9 #xA #xD #x20–#xD7FF
    #xE000–#xFFFD #x10000–#x10FFFF); anything else becomes U+FFFD."""
    return "".join(c if (c in "\t\n\r" or " " <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd"
                         or c >= "\U00010000") else "\ufffd" for c in text)


def send_to_dlq(svc: Services, message: Received, reason: str, kind: str) -> None:
    """Straight to the DLQ with the reason (as a message attribute), then off the queue."""
    try:
        svc.sqs.send_message(QueueUrl=svc.dlq_url, MessageBody=message.body or "(empty)",
                             MessageAttributes={
                                 "bec_reason": {"DataType": "String", "StringValue": sqs_text(reason[:1000]) or "-"},
                                 "bec_worker": {"DataType": "String", "StringValue": sqs_text(svc.worker_name) or "-"},
                                 "bec_job": {"DataType": "String", "StringValue": svc.job_name},
                             })
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        log.warning("could not send message %s to the DLQ (%s); SQS's redrive will",
                    message.message_id, aws.error_code(exc))
        return
    metrics.SQS_DLQ.labels(kind).inc()
    delete_message(svc, message)


def delete_message(svc: Services, message: Received) -> None:
    with svc.visibility_lock:
        message.settled.set()
        try:
            svc.sqs.delete_message(QueueUrl=svc.queue_url, ReceiptHandle=message.receipt)
            metrics.SQS_DELETES.inc()
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            log.warning("could not delete message %s (%s); it will be seen again and skipped",
                        message.message_id, aws.error_code(exc))


def set_visibility(svc: Services, message: Received, seconds: int) -> None:
    """The message's fate for this worker: visible again in ``seconds`` (0: now)."""
    with svc.visibility_lock:
        message.settled.set()
        try:
            svc.sqs.change_message_visibility(QueueUrl=svc.queue_url, ReceiptHandle=message.receipt,
                                              VisibilityTimeout=max(0, min(43200, seconds)))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            log.warning("could not change visibility of message %s (%s)", message.message_id,
                        aws.error_code(exc))


def extend_visibility(svc: Services, messages: list[Received], seconds: int) -> list[Received]:
    """Keep up to 10 messages hidden for ``seconds`` more, while their volumes run; returns
    those SQS extended.

    Under the same lock as every verdict, and never for a settled message: an extension that
    landed after a release or a retry's back-off would hide the message again for a whole
    visibility timeout, with nobody working on it.
    """
    with svc.visibility_lock:
        live = [m for m in messages if not m.settled.is_set()]
        if not live:
            return []
        try:
            answer = svc.sqs.change_message_visibility_batch(
                QueueUrl=svc.queue_url,
                Entries=[{"Id": str(n), "ReceiptHandle": m.receipt, "VisibilityTimeout": seconds}
                         for n, m in enumerate(live)])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            log.warning("visibility extension failed (%s)", aws.error_code(exc))
            return []
    done = {e["Id"] for e in answer.get("Successful", [])}
    metrics.SQS_EXTENSIONS.inc(len(done))
    return [m for n, m in enumerate(live) if str(n) in done]
