"""The task lifecycle, top to bottom (DESIGN §5). Every SQS message goes through here.

    admit ─ 1. parse and validate the body ............ poison → DLQ at once, with the reason
          ─ 2. read the manifest → version ............ missing/invalid → terminal → DLQ
          ─ 3. ensure the volume row; success.json? ... yes → DB done, delete, next
          ─ 4. claim the task (one SQL statement, ..... running elsewhere → handed back, to be
               idempotent per receive)                   looked at once the holder could be stale
    (the controller streams the pages through the pipeline)
    extend ─ visibility, while the volume runs ......... never once the message is settled
    finish ─ 5. transient page errors within ......... no → retryable; the finished pages are
                max_transient_error_ratio?                kept (bec.control.partial) for the next attempt
           ─ 6. Parquet, then success.json, then DB done + metrics, then delete the message
                (deterministic page errors are rows of a done volume: never a retry)
    retry  ─ DB retryable_failed; the message becomes visible again after a back-off, or goes
             to the DLQ with the reason on its last receive; the finished pages are kept
    release ─ DB retryable_failed; handed back at once (drain, outage)
    let go ─ the claim was taken over (this worker went stale): touch neither row nor message
    hold   ─ PostgreSQL did not answer: the row could not be settled (a claim may even have
             committed with its reply lost), so the message is kept hidden and the step is
             done again once the database answers. A message is never released, nor its
             row left behind, on a guess.

A message handed back for a reason that is not its own (a volume running elsewhere, a drain,
an S3 outage) is *requeued*: a fresh copy, then the original deleted, so that it spends none
of the receives after which SQS moves it to the DLQ. The DLQ holds only real faults, and
every message BEC sends there carries its reason.

Errors are classified where they arise (``bec.errors``); this module only routes them.

It is longer than BEC's other modules (about 570 lines) on purpose: a reader follows one
message from receive to verdict, and every route it can take, without leaving this file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

import botocore.exceptions

import boto3.exceptions

from bec.control import jobkinds, partial, tasks
from bec.edges import artifacts, aws
from bec.observe import metrics
from bec.edges.archive import Manifest, read_manifest
from bec.control.db import Database
from bec.errors import (BecError, DatabaseUnavailable, PoisonMessage, RetryableError, StorageUnavailable,
                        TerminalError, Unavailable)
from bec.control.ids import check_i_id, check_w_id
from bec.edges.volumefile import VolumeFile

log = logging.getLogger("bec.lifecycle")

MAX_BODY = 4096
MAX_BACKOFF_S = 900
MAX_DELAY_S = 900          # SQS's longest DelaySeconds
MAX_VISIBILITY_S = 43200   # SQS's 12 hours: a message is never hidden longer after its receive
VISIBILITY_CAP_MARGIN_S = 60  # our clock starts after SQS's, at the end of the receive


@dataclass(frozen=True)
class Services:
    """What the lifecycle talks to, and the facts of this worker."""

    db: Database
    s3: Any          # artifacts (destination bucket)
    source: Any      # the archive: S3, or a folder (bec.edges.localarchive)
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
    max_receive_count: int = 0  # the tasks queue's redrive maxReceiveCount (0: no redrive)
    # Is S3 usable now? Each returns None, or what is wrong (``aws.probe`` on each bucket).
    storage_probes: tuple[Callable[[], str | None], ...] = ()
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
    received_at: float = field(default_factory=time.monotonic, compare=False)
    # Set once its visibility reached SQS's 12-hour limit (said once in the log).
    capped: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def visibility_left_s(self, now: float | None = None) -> float:
        """How much longer SQS lets this receive stay hidden (12 hours from the receive)."""
        age = (time.monotonic() if now is None else now) - self.received_at
        return MAX_VISIBILITY_S - VISIBILITY_CAP_MARGIN_S - age

    @classmethod
    def from_sqs(cls, raw: dict[str, Any]) -> "Received":
        count = int(raw.get("Attributes", {}).get("ApproximateReceiveCount", "1") or 1)
        return cls(raw["MessageId"], raw["ReceiptHandle"], raw.get("Body", ""), count)


class Verdict(Enum):
    ADMITTED = "admitted"
    ALREADY_DONE = "already_done"
    NOT_CLAIMABLE = "not_claimable"  # running elsewhere (requeued), or taken over (let go)
    POISON = "poison"
    TERMINAL = "terminal"
    RETRY = "retry"
    RELEASED = "released"  # requeued at once: a drain, an S3 outage
    HELD = "held"          # PostgreSQL did not answer: kept hidden, ``pending`` (or admission) again later


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
    partial: partial.Found | None = None  # an earlier attempt's finished pages (bec.control.partial)
    unavailable: str = ""  # "database" or "storage" when an outage decided the verdict
    # HELD after admission: None (admit the message again); after a claim: the settlement
    # to try again (mark done, failed or released), returning its verdict.
    pending: Callable[[], Verdict] | None = field(default=None, repr=False)
    inputs: Any = None           # what the job kind read for the volume's pages (ocr: ldv1's lines)

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
def claim_token(message: Received) -> str:
    """What makes a claim idempotent: one receive (receipt) of one message."""
    return hashlib.sha256(message.receipt.encode()).hexdigest()[:32]


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
            manifest = read_manifest(svc.source, svc.source_bucket, adm.w_id, adm.i_id,  # 2
                                     probes=svc.storage_probes)
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
                            len(manifest.entries), svc.stale_after_s, token=claim_token(message))
        if claim is None:
            return not_claimable(svc, adm)
        adm.task_id, adm.attempt = claim.task_id, claim.attempt
        if claim.attempt == 1:  # a first claim: was the manifest missing before?
            tasks.forget_missing_manifest(svc.db, svc.job_id, adm.volume_id)
        superseded = tasks.forget_superseded(svc.db, svc.job_id, adm.volume_id, version, svc.stale_after_s)
        if superseded:
            log.info("volume %s: %d task(s) of an older version left running by a worker that is gone "
                     "were dropped (version %s supersedes them)", adm.label, superseded, version)
        kind = jobkinds.kind_of(svc.job_name)
        if kind is not None:  # a RetryableError (e.g. "run ldv1 first") retries it, recorded
            adm.inputs = kind.volume_inputs(svc, adm)
        adm.claimed_at = time.time()
        adm.verdict = Verdict.ADMITTED
        return adm
    except DatabaseUnavailable as exc:
        # Any step may have been cut, the claim included, perhaps after PostgreSQL committed it:
        # keep the message, and admit it again (the same claim finds its own row) once the
        # database answers. Released now, it would leave a running row behind.
        adm.verdict, adm.reason, adm.unavailable = Verdict.HELD, str(exc), "database"
        return adm
    except StorageUnavailable as exc:
        # Not the volume's fault, and nothing is claimed yet: hand the message back unspent.
        adm.verdict, adm.reason, adm.unavailable = Verdict.RELEASED, str(exc), "storage"
        requeue(svc, message, svc.retry_delay, "S3 unavailable")
        return adm
    except (RetryableError, Unavailable) as exc:
        adm.reason = str(exc)
        adm.verdict = retry_later(svc, adm, adm.reason)
        return adm


def not_claimable(svc: Services, adm: Admission) -> Admission:
    """The claim was refused: the task is done, or running healthily on another worker."""
    assert adm.manifest is not None
    version = adm.manifest.version
    if tasks.task_status(svc.db, svc.job_id, adm.volume_id, version) == "done":
        if read_success_marker(svc, adm.w_id, adm.i_id, version) is not None:
            delete_message(svc, adm.message)  # finished meanwhile: a duplicate
            adm.verdict = Verdict.ALREADY_DONE
            return adm
        key = artifacts.success_key(svc.job_name, adm.w_id, adm.i_id, version)
        adm.verdict = Verdict.TERMINAL
        adm.reason = (f"task of version {version} is done in the database, but s3://{svc.dest_bucket}/{key} "
                      "is missing (artifacts deleted?)")
        send_to_dlq(svc, adm.message, adm.reason, "terminal")
        return adm
    # Running elsewhere: its holder's own message finishes the task. This one is handed back
    # unspent (before, each look spent a receive, and a healthy volume's duplicate reached
    # the DLQ); if the holder dies, a later look finds it stale and claims the task.
    adm.verdict, adm.reason = Verdict.NOT_CLAIMABLE, "task is running elsewhere"
    requeue(svc, adm.message, recheck_delay_s(svc), "running elsewhere")
    return adm


def recheck_delay_s(svc: Services) -> int:
    """When to look again at a volume running elsewhere. The holder deletes the message when
    it finishes; if it died, its heartbeat is stale after ``stale_after_s`` and the next
    receive takes the volume over."""
    return min(MAX_DELAY_S, int(svc.stale_after_s) + 2)


def read_success_marker(svc: Services, w_id: str, i_id: str, version: str) -> dict[str, Any] | None:
    key = artifacts.success_key(svc.job_name, w_id, i_id, version)
    try:
        body = svc.s3.get_object(Bucket=svc.dest_bucket, Key=key)["Body"].read()
        metrics.S3_READ.inc(len(body))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, OSError) as exc:
        if aws.is_not_found(exc):
            return None
        raise aws.storage_failure("reading success.json", exc, svc.storage_probes) from None
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
def finish(svc: Services, adm: Admission, out: VolumeFile) -> Verdict:
    """Write the artifacts and record success, or route the volume to a retry.

    Only transient page errors (``bec.errors.TRANSIENT_PAGE_ERRORS``) can send a volume back:
    a deterministic one is the same on every try, so it is recorded as an error row and the
    volume is done. A retried volume keeps its finished pages for the next attempt."""
    assert adm.manifest is not None
    kind = jobkinds.kind_of(svc.job_name)
    assert kind is not None, svc.job_name
    version = adm.manifest.version
    duration_ms = (time.time() - adm.claimed_at) * 1000
    tally = out.tally
    pages, errors = tally.pages, tally.nb_errors
    try:
        body, size = out.close()
    except Exception as exc:  # disk full under TMPDIR, or a row that could not be built
        reason = f"writing the volume's Parquet to a temporary file: {type(exc).__name__}: {exc}"[:500]
        log.warning("volume %s not finished: %s", adm.label, reason)
        return retry_later(svc, adm, reason, nb_errors=errors, duration_ms=duration_ms)
    transient = tally.transient_errors
    limit = float(svc.config.get("max_transient_error_ratio", 0.1))
    ratio = transient / pages if pages else 1.0
    if ratio > limit:                                                                    # 5
        kept = partial.store(svc, adm, body, size, tally)
        reason = (f"{transient} of {pages} pages hit transient errors ({ratio:.0%} > "
                  f"max_transient_error_ratio {limit:g}): {tally.summary(tally.transient_by_type)}; {kept}")
        log.warning("volume %s not finished: %s", adm.label, reason)
        return retry_later(svc, adm, reason, nb_errors=errors, duration_ms=duration_ms)
    by_class = {"deterministic": errors - transient, "transient": transient}
    marker = {
        "job": svc.job_name, "w_id": adm.w_id, "i_id": adm.i_id, "version": version,
        "manifest_etag": adm.manifest.etag.strip('"'), "total_images": pages,
        "nb_errors": errors, "errors_by_type": dict(tally.errors_by_type), "errors_by_class": by_class,
        # the first failed pages, one by one (every one is a row of the Parquet)
        "errors": tally.listed, "errors_listed": len(tally.listed),
        "resumed_pages": tally.resumed,
        "total_duration_ms": round(duration_ms, 3),
        "avg_duration_per_page_ms": round(duration_ms / pages, 3) if pages else 0.0,
        "stage_ms": {name: round(ms, 3) for name, ms in zip(kind.stage_names, tally.stage_ms)},
        "row_groups": out.row_groups,
        "worker": {"id": svc.worker_id, "name": svc.worker_name},
        "task_id": adm.task_id, "attempt": adm.attempt,
        "job_config": svc.config, "model": svc.model,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **kind.summary(body),
    }
    write_started = time.perf_counter()
    try:                                                                                 # 6
        svc.s3.upload_fileobj(body, svc.dest_bucket,
                              artifacts.parquet_key(svc.job_name, adm.w_id, adm.i_id, version),
                              Config=partial.TRANSFER)
        success = artifacts.success_bytes(marker)
        svc.s3.put_object(Bucket=svc.dest_bucket,
                          Key=artifacts.success_key(svc.job_name, adm.w_id, adm.i_id, version),
                          Body=success, ContentType="application/json")
        metrics.S3_WRITTEN.inc(size + len(success))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
            boto3.exceptions.S3UploadFailedError, OSError) as exc:
        failure = aws.storage_failure("writing artifacts", exc, svc.storage_probes)
        reason = str(failure)[:500]
        log.warning("volume %s not finished: %s", adm.label, reason)
        if isinstance(failure, StorageUnavailable):  # S3 as a whole: not the volume's fault
            adm.unavailable = "storage"
            return release(svc, adm, f"released: {reason}")
        return retry_later(svc, adm, reason, nb_errors=errors, duration_ms=duration_ms)
    metrics.STAGE_SECONDS.labels("write").observe(time.perf_counter() - write_started)
    return settle_done(svc, adm, pages, errors, duration_ms)


def settle_done(svc: Services, adm: Admission, total_images: int, nb_errors: int,
                duration_ms: float) -> Verdict:
    """success.json is written: record done, then delete the message. Held while PostgreSQL
    does not answer (this step is tried again then): releasing the message would leave the
    row ``running`` under this live worker, and every other worker finding it "running
    elsewhere" until the message reached the DLQ."""
    try:
        ours = tasks.mark_done(svc.db, adm.task_id, svc.worker_id, adm.attempt, total_images, nb_errors,
                               duration_ms)
    except Unavailable as exc:  # the caller says so (it holds the message)
        adm.unavailable, adm.reason = "database", f"recording done failed: {exc}"
        adm.pending = lambda: settle_done(svc, adm, total_images, nb_errors, duration_ms)
        return Verdict.HELD
    if not ours:
        let_go(svc, adm, "wrote its artifacts")
        return Verdict.NOT_CLAIMABLE
    delete_message(svc, adm.message)
    if adm.partial is not None:
        partial.drop(svc, adm, adm.partial)
    return Verdict.ADMITTED


# -- failure routes ------------------------------------------------------------------------------
def backoff_s(svc: Services, receive_count: int) -> int:
    return int(min(MAX_BACKOFF_S, svc.retry_delay * 2 ** max(0, receive_count - 1)))


def retry_later(svc: Services, adm: Admission, reason: str, *, nb_errors: int | None = None,
                duration_ms: float | None = None) -> Verdict:
    """Retryable: DB ``retryable_failed`` and the message visible again after a back-off; on
    its last receive (the redrive's ``maxReceiveCount``), to the DLQ with the reason, rather
    than moved there by SQS with none."""
    recorded = _record_failure(svc, adm, reason, "failed it", nb_errors=nb_errors, total_duration_ms=duration_ms)
    if recorded is Verdict.HELD:
        adm.pending = lambda: retry_later(svc, adm, reason, nb_errors=nb_errors, duration_ms=duration_ms)
    if recorded is not None:
        return recorded
    count, limit = adm.message.receive_count, svc.max_receive_count
    if limit and count >= limit:
        send_to_dlq(svc, adm.message, f"failed on receive {count} of {limit}: {reason}", "retries")
    else:
        set_visibility(svc, adm.message, backoff_s(svc, count))
    return Verdict.RETRY


def release(svc: Services, adm: Admission, reason: str, delay_s: int = 0) -> Verdict:
    """Give the volume back (a drain, an S3 outage, a volume rewritten while it ran): DB
    ``retryable_failed``, and the message requeued unspent, visible after ``delay_s``: the
    volume did nothing wrong."""
    recorded = _record_failure(svc, adm, reason, "released it")
    if recorded is Verdict.HELD:
        adm.pending = lambda: release(svc, adm, reason, delay_s)
    if recorded is not None:
        return recorded
    adm.reason = reason
    requeue(svc, adm.message, delay_s, reason)
    return Verdict.RELEASED


def _record_failure(svc: Services, adm: Admission, reason: str, what: str, **counts: Any) -> Verdict | None:
    """Mark this worker's claim ``retryable_failed``: None when done (or nothing was claimed);
    NOT_CLAIMABLE when the claim is no longer ours (the volume was let go: the caller leaves
    the message alone too); HELD when PostgreSQL did not answer (the caller keeps the
    message: released now, it would leave the row ``running`` under this live worker)."""
    if not adm.task_id:
        return None
    try:
        if not tasks.mark_failed(svc.db, adm.task_id, svc.worker_id, adm.attempt, terminal=False,
                                 reason=reason, **counts):
            let_go(svc, adm, what)
            return Verdict.NOT_CLAIMABLE
    except Unavailable as exc:  # the caller says so (it holds the message)
        adm.unavailable, adm.reason = "database", f"could not record that this worker {what}: {exc}"
        return Verdict.HELD
    return None


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
                                              VisibilityTimeout=max(0, min(MAX_VISIBILITY_S, seconds)))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            log.warning("could not change visibility of message %s (%s)", message.message_id,
                        aws.error_code(exc))


def requeue(svc: Services, message: Received, delay_s: int, why: str) -> None:
    """Hand the message back without spending one of its receives: a fresh copy (visible after
    ``delay_s``), then the original deleted. SQS counts receives per message and moves it to
    the DLQ after ``maxReceiveCount``; a message handed back for a reason that is not its own
    (its volume running elsewhere, a drain, an S3 outage) must not get closer to the DLQ.

    The copy is sent before the original is deleted: at worst a duplicate, which the next
    admission absorbs (already done, or running elsewhere), never a loss. Where SQS refuses
    the copy, the original is made visible again instead (a receive spent, nothing lost)."""
    with svc.visibility_lock:
        message.settled.set()
    delay = max(0, min(MAX_DELAY_S, int(delay_s)))
    try:
        svc.sqs.send_message(QueueUrl=svc.queue_url, MessageBody=message.body, DelaySeconds=delay)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        log.warning("could not requeue message %s (%s: %s): visible again in %d s instead",
                    message.message_id, why, aws.error_code(exc), delay)
        set_visibility(svc, message, delay)
        return
    metrics.SQS_REQUEUES.inc()
    delete_message(svc, message)


def extend_visibility(svc: Services, messages: list[Received], seconds: int) -> list[tuple[Received, int]]:
    """Keep up to 10 messages hidden for ``seconds`` more, while their volumes run; returns
    those SQS extended, with the seconds each got.

    Under the same lock as every verdict, and never for a settled message: an extension that
    landed after a release or a retry's back-off would hide the message again for a whole
    visibility timeout, with nobody working on it.

    SQS hides a message at most 12 hours after its receive and refuses an extension past
    that: each is cut to what is left, and a message that reached the limit is said once.
    It then becomes visible to other workers, which hand it back unspent while this worker
    holds the volume (``not_claimable``). Every refused extension is logged: a message whose
    extension fails is shown to another worker at the end of its visibility timeout.
    """
    with svc.visibility_lock:
        now = time.monotonic()
        live: list[tuple[Received, int]] = []
        for m in messages:
            if m.settled.is_set():
                continue
            grant = int(min(seconds, m.visibility_left_s(now)))
            if grant <= 0:
                if not m.capped.is_set():
                    m.capped.set()
                    log.warning("message %s reached SQS's 12-hour visibility limit: other workers may "
                                "receive it now, and hand it back while this worker holds its volume",
                                m.message_id)
                continue
            live.append((m, grant))
        if not live:
            return []
        try:
            answer = svc.sqs.change_message_visibility_batch(
                QueueUrl=svc.queue_url,
                Entries=[{"Id": str(n), "ReceiptHandle": m.receipt, "VisibilityTimeout": grant}
                         for n, (m, grant) in enumerate(live)])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            log.warning("visibility extension of %d message(s) failed (%s): each is visible again at "
                        "the end of its current timeout unless a later extension succeeds",
                        len(live), aws.error_code(exc))
            return []
    for failed in answer.get("Failed", []):
        try:
            message = live[int(failed.get("Id", -1))][0].message_id
        except (ValueError, IndexError):
            message = "?"
        log.warning("visibility extension of message %s refused (%s: %s)", message,
                    failed.get("Code", "?"), str(failed.get("Message", ""))[:200])
    done = {e["Id"] for e in answer.get("Successful", [])}
    metrics.SQS_EXTENSIONS.inc(len(done))
    return [(m, grant) for n, (m, grant) in enumerate(live) if str(n) in done]
