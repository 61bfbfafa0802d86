"""The lifecycle's lost-work paths (issue 20), step by step against real PostgreSQL and moto:
a claim whose reply was lost, a failure that could not be recorded, a duplicate of a volume
running elsewhere, the last receive, S3 failing as a whole, SQS's 12-hour visibility limit.
Faults moto and PostgreSQL cannot produce on demand are injected by a wrapped database
(``dbfaults.FlakyDatabase``) and an HTTP proxy in front of moto (``faultproxy``)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import botocore.exceptions
import pytest

from bec.control import lifecycle, tasks
from bec.edges import aws
from bec.errors import RetryableError, StorageUnavailable
from bec.edges.volumefile import VolumeFile
from bec.control.lifecycle import Received, Services, Verdict
from conftest import DEST_BUCKET, REGION, SOURCE_BUCKET
from dbfaults import FlakyDatabase
from faultproxy import EXPIRED, PASS, RESET, S3FaultProxy
from workerkit import add_volumes, queue_counts, setup_job

CLAIM = "'running', 1, %(worker)s"             # a piece of the claim's SQL text
MARK_FAILED = "SET status = %s, done_at = now(), error_reason"
MARK_DONE = "SET status = 'done', done_at = now()"


@pytest.fixture
def world(stack):
    """A job, one 2-page volume in the archive, a worker row, and a flaky view of the database."""
    q = setup_job(stack)
    [(w, i)] = add_volumes(stack, 1, pages=2)
    job_id = stack.db.row("SELECT id FROM jobs")["id"]
    worker = tasks.register_worker(stack.db, "me", job_id, {})
    flaky = FlakyDatabase(stack.db_params)
    yield {"q": q, "w": w, "i": i, "job_id": job_id, "worker": worker, "db": flaky}
    flaky.close()


def services(stack, world, *, worker: int | None = None, s3=None, **kw) -> Services:
    s3 = s3 or stack.s3
    return Services(db=world["db"], s3=s3, source=s3, sqs=stack.sqs, job_name="ldv1", job_id=world["job_id"],
                    worker_id=worker or world["worker"], worker_name="me", source_bucket=SOURCE_BUCKET,
                    dest_bucket=DEST_BUCKET, queue_url=world["q"]["queue"], dlq_url=world["q"]["dlq"],
                    config={"max_error_ratio": 0.1}, model={}, retry_delay=0, **kw)


def receive(stack, url: str, visibility: int = 600, wait: int = 0) -> Received:
    got = stack.sqs.receive_message(QueueUrl=url, VisibilityTimeout=visibility, WaitTimeSeconds=wait,
                                    AttributeNames=["ApproximateReceiveCount"]).get("Messages", [])
    assert got, "no message"
    return Received.from_sqs(got[0])


def send_volume(stack, world) -> Received:
    stack.sqs.send_message(QueueUrl=world["q"]["queue"], MessageBody=json.dumps({"w_id": world["w"], "i_id": world["i"]}))
    return receive(stack, world["q"]["queue"])


def task_rows(stack) -> list[dict]:
    return stack.db.rows("SELECT id, status::text AS status, worker_id, attempt, error_reason FROM task_executions")


# -- 2. a live worker never loses its claim ---------------------------------------------------
def test_a_claim_whose_reply_was_lost_is_found_again_by_the_same_receive(stack, world):
    """PostgreSQL commits the claim, the reply is lost (failover, reset). Before: the admission
    gave up with no task id, released the message (here at once: retry delay 0), and left a
    row ``running`` under this live worker, which every other worker then found "running
    elsewhere" until the message reached the DLQ."""
    svc = services(stack, world)
    message = send_volume(stack, world)
    world["db"].lose(CLAIM, when="after")
    held = lifecycle.admit(svc, message)
    assert world["db"].lost == [CLAIM]
    assert held.verdict is Verdict.HELD and held.pending is None and held.unavailable == "database"
    [row] = task_rows(stack)                        # it did commit
    assert (row["status"], row["worker_id"], row["attempt"]) == ("running", world["worker"], 1)
    assert queue_counts(stack, world["q"]["queue"]) == (0, 1)  # the message is still ours

    again = lifecycle.admit(svc, message)            # the database answers: the same receive
    assert again.verdict is Verdict.ADMITTED
    assert (again.task_id, again.attempt) == (row["id"], 1)
    assert task_rows(stack) == [row]


def test_a_failure_that_could_not_be_recorded_keeps_its_message(stack, world):
    """A PostgreSQL blip while recording a failure: before, the failure was swallowed and the
    message released all the same, leaving the row ``running``."""
    svc = services(stack, world)
    adm = lifecycle.admit(svc, send_volume(stack, world))
    assert adm.verdict is Verdict.ADMITTED
    world["db"].lose(MARK_FAILED)
    assert lifecycle.retry_later(svc, adm, "3 of 3 pages failed") is Verdict.HELD
    assert task_rows(stack)[0]["status"] == "running"
    assert queue_counts(stack, world["q"]["queue"]) == (0, 1)

    assert adm.pending is not None and adm.pending() is Verdict.RETRY   # the database answers
    assert [(r["status"], r["error_reason"]) for r in task_rows(stack)] == [("retryable_failed", "3 of 3 pages failed")]
    assert queue_counts(stack, world["q"]["queue"]) == (1, 0)


def test_a_done_that_could_not_be_recorded_keeps_its_message(stack, world):
    svc = services(stack, world)
    adm = lifecycle.admit(svc, send_volume(stack, world))
    world["db"].lose(MARK_DONE)
    out = VolumeFile(len(adm.manifest.entries), {})
    for n, entry in enumerate(adm.manifest.entries):
        out.add(n, lifecycle.artifacts.PageOutcome(entry.filename, True))
    assert lifecycle.finish(svc, adm, out) is Verdict.HELD
    assert task_rows(stack)[0]["status"] == "running" and queue_counts(stack, world["q"]["queue"]) == (0, 1)
    assert adm.pending() is Verdict.ADMITTED
    assert task_rows(stack)[0]["status"] == "done" and queue_counts(stack, world["q"]["queue"]) == (0, 0)


# -- 5. a duplicate of a volume running elsewhere does not count toward the DLQ ------------------
def test_a_duplicate_of_a_volume_running_elsewhere_spends_no_receive(stack, world):
    """Before: each look at it spent a receive (every stale_after + 2 s), and the duplicate of
    a healthy long volume reached the DLQ without a reason. It is handed back as a fresh copy."""
    holder = services(stack, world)
    assert lifecycle.admit(holder, send_volume(stack, world)).verdict is Verdict.ADMITTED
    other_id = tasks.register_worker(stack.db, "other", world["job_id"], {})
    other = services(stack, world, worker=other_id, stale_after_s=60)
    for look in range(3):
        duplicate = send_volume(stack, world) if look == 0 else receive(stack, world["q"]["queue"], wait=5)
        assert duplicate.receive_count == 1, look   # never closer to the DLQ
        tasks.heartbeat(stack.db, world["worker"])
        adm = lifecycle.admit(replace(other, stale_after_s=1.0), duplicate)
        assert adm.verdict is Verdict.NOT_CLAIMABLE
    [row] = task_rows(stack)
    assert (row["status"], row["worker_id"]) == ("running", world["worker"])


def test_a_retryable_failure_on_the_last_receive_goes_to_the_dlq_with_its_reason(stack, world):
    """Before: the message was made visible again and SQS's redrive moved it on its next
    receive, with no reason; now BEC sends it, with the reason, on the last receive."""
    svc = services(stack, world, max_receive_count=2)
    first = send_volume(stack, world)
    adm = lifecycle.admit(svc, first)
    assert lifecycle.retry_later(svc, adm, "2 of 2 pages failed: 2× corrupt_image") is Verdict.RETRY
    second = receive(stack, world["q"]["queue"], wait=2)
    assert second.receive_count == 2
    adm = lifecycle.admit(svc, second)
    assert lifecycle.retry_later(svc, adm, "2 of 2 pages failed: 2× corrupt_image") is Verdict.RETRY
    assert queue_counts(stack, world["q"]["queue"]) == (0, 0)
    dead = stack.sqs.receive_message(QueueUrl=world["q"]["dlq"], MessageAttributeNames=["All"])["Messages"]
    reason = dead[0]["MessageAttributes"]["bec_reason"]["StringValue"]
    assert reason == "failed on receive 2 of 2: 2 of 2 pages failed: 2× corrupt_image"


def test_a_task_done_without_its_artifacts_goes_to_the_dlq_with_its_reason(stack, world):
    svc = services(stack, world)
    adm = lifecycle.admit(svc, send_volume(stack, world))
    tasks.mark_done(stack.db, adm.task_id, world["worker"], adm.attempt, 2, 0, 1.0)  # no success.json
    dup = lifecycle.admit(svc, send_volume(stack, world))
    assert dup.verdict is Verdict.TERMINAL and "is missing" in dup.reason
    dead = stack.sqs.receive_message(QueueUrl=world["q"]["dlq"], MessageAttributeNames=["All"])["Messages"]
    assert "success.json is missing" in dead[0]["MessageAttributes"]["bec_reason"]["StringValue"]


# -- 3. S3 failing as a whole spends no receive -----------------------------------------------
@pytest.mark.parametrize("mode", [EXPIRED, RESET])
def test_s3_failing_as_a_whole_hands_the_message_back_unspent(stack, world, mode, monkeypatch):
    """Expired credentials, or S3 refusing connections. Before: the admission was a retry,
    which spent the message's receive (and with a refused connection took 23–29 s of
    botocore retries each): an outage of a few minutes sent the queue to the DLQ."""
    proxy = S3FaultProxy(stack.moto.url)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        s3, probe = aws.client("s3", REGION, max_attempts=2), aws.single_try_client("s3", REGION)
        svc = services(stack, world, s3=s3, storage_probes=(lambda: aws.probe(probe, SOURCE_BUCKET),
                                                            lambda: aws.probe(probe, DEST_BUCKET)))
        message = send_volume(stack, world)
        proxy.mode = mode
        adm = lifecycle.admit(svc, message)
        assert adm.verdict is Verdict.RELEASED and adm.unavailable == "storage", adm
        assert "S3 is unavailable" in adm.reason
        assert task_rows(stack) == []                  # nothing claimed
        again = receive(stack, world["q"]["queue"], wait=2)
        assert again.receive_count == 1                # a fresh copy: no receive spent
        proxy.mode = PASS
        assert lifecycle.admit(svc, again).verdict is Verdict.ADMITTED
    finally:
        proxy.close()


def test_one_object_denied_is_the_objects_trouble_not_an_outage():
    """The probe decides: AccessDenied on one object while a missing key still reads 404 is a
    retry, as before; the same error while the probe fails too is an outage."""
    denied = botocore.exceptions.ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                                             "GetObject")
    retry = aws.storage_failure("reading manifest", denied, (lambda: None,))
    assert type(retry) is RetryableError and "AccessDenied" in str(retry)
    outage = aws.storage_failure("reading manifest", denied, (lambda: None, lambda: "s3://b: ExpiredToken: …"))
    assert isinstance(outage, StorageUnavailable) and "ExpiredToken" in str(outage)


# -- 13. visibility extensions: failures said, SQS's 12-hour limit respected -------------------
def test_a_refused_visibility_extension_is_logged(stack, world, caplog):
    svc = services(stack, world)
    message = send_volume(stack, world)
    stack.sqs.delete_message(QueueUrl=world["q"]["queue"], ReceiptHandle=message.receipt)  # gone meanwhile
    with caplog.at_level(logging.WARNING, logger="bec.control.lifecycle"):
        assert lifecycle.extend_visibility(svc, [message], 300) == []
    assert f"visibility extension of message {message.message_id} refused (ReceiptHandleIsInvalid" in caplog.text


def test_extensions_stop_at_sqs_12_hour_limit(stack, world, caplog):
    """SQS refuses to hide a message longer than 12 hours after its receive: an extension past
    it failed (silently). It is cut to what is left, and a message at the limit is said once."""
    svc = services(stack, world)
    message = send_volume(stack, world)
    near = replace(message, received_at=time.monotonic() - (lifecycle.MAX_VISIBILITY_S - 200))
    [(extended, seconds)] = lifecycle.extend_visibility(svc, [near], 300)
    assert extended is near and 0 < seconds <= 200 - lifecycle.VISIBILITY_CAP_MARGIN_S
    past = replace(message, received_at=time.monotonic() - lifecycle.MAX_VISIBILITY_S)
    with caplog.at_level(logging.WARNING, logger="bec.control.lifecycle"):
        assert lifecycle.extend_visibility(svc, [past], 300) == []
        assert lifecycle.extend_visibility(svc, [past], 300) == []
    assert caplog.text.count("reached SQS's 12-hour visibility limit") == 1


# -- 10. a version whose worker died while the manifest changed ---------------------------------
def test_claiming_a_new_version_drops_an_old_one_left_running_by_a_dead_worker(stack, world):
    """Before: the old version stayed ``running`` for ever (no message names it any more), and
    counted as running in every statistic. One held by a live worker is left to it."""
    db, job = stack.db, world["job_id"]
    volume = tasks.ensure_volume(db, "W1", "I1", "aaaaaa", 2)
    dead = tasks.register_worker(db, "dead", job, {})
    live = tasks.register_worker(db, "live", job, {})
    assert tasks.claim(db, job, volume, "aaaaaa", dead, 2) is not None
    assert tasks.claim(db, job, volume, "bbbbbb", live, 2) is not None
    db.execute("UPDATE workers SET last_heartbeat_at = now() - interval '5 minutes' WHERE worker_id = %s", (dead,))
    assert tasks.claim(db, job, volume, "cccccc", world["worker"], 2) is not None
    assert tasks.forget_superseded(db, job, volume, "cccccc") == 1
    assert sorted((r["s3_etag"], r["status"]) for r in db.rows(
        "SELECT s3_etag, status::text AS status FROM task_executions")) == [("bbbbbb", "running"), ("cccccc", "running")]
