"""Only the holder of a claim settles its task (real PostgreSQL, moto S3/SQS).

A worker whose heartbeat went stale while it worked (a network partition, a stalled host)
may see its volume taken over by another worker. Whatever the stale worker then says about
the task (done, failed, released) must not end the new holder's claim: before, its
``mark_failed`` turned the new holder's running row into ``retryable_failed``, and a third
worker could claim the volume while the second still processed it.
"""
from __future__ import annotations

import pytest

from bec.control import lifecycle, tasks
from bec.edges import artifacts
from bec.edges.archive import Manifest, ManifestEntry
from bec.devstack.volumes import ensure_bucket
from bec.control.lifecycle import Admission, Received, Services, Verdict
from bec.edges.volumefile import VolumeFile
from clihelp import ok
from conftest import DEST_BUCKET

VERSION = "abc123"


@pytest.fixture
def taken_over(stack):
    """A task claimed by worker A, whose heartbeat then went stale, and taken over by B."""
    ok("jobs", "create", "--name", "ldv1")
    job_id = stack.db.row("SELECT id FROM jobs")["id"]
    volume_id = tasks.ensure_volume(stack.db, "W1", "I1", VERSION, 2)
    a = tasks.register_worker(stack.db, "a", job_id, {})
    b = tasks.register_worker(stack.db, "b", job_id, {})
    claim_a = tasks.claim(stack.db, job_id, volume_id, VERSION, a, 2)
    stack.db.execute("UPDATE workers SET last_heartbeat_at = now() - interval '5 minutes' "
                     "WHERE worker_id = %s", (a,))
    claim_b = tasks.claim(stack.db, job_id, volume_id, VERSION, b, 2)
    assert claim_a is not None and claim_b is not None
    assert claim_b.task_id == claim_a.task_id and claim_b.attempt == claim_a.attempt + 1
    return job_id, volume_id, (a, claim_a), (b, claim_b)


def task_row(stack):
    return stack.db.row("SELECT status, worker_id, attempt, error_reason FROM task_executions")


def test_a_stale_worker_cannot_settle_a_task_taken_over(stack, taken_over):
    job_id, volume_id, (a, claim_a), (b, claim_b) = taken_over
    assert not tasks.mark_failed(stack.db, claim_a.task_id, a, claim_a.attempt, terminal=False, reason="late")
    assert not tasks.mark_done(stack.db, claim_a.task_id, a, claim_a.attempt, 2, 0, 10.0)
    assert not tasks.mark_failed(stack.db, claim_a.task_id, a, None, terminal=False, reason="supervisor")
    assert task_row(stack) == {"status": "running", "worker_id": b, "attempt": 2, "error_reason": None}
    # so a third worker still finds it running healthily elsewhere
    c = tasks.register_worker(stack.db, "c", job_id, {})
    assert tasks.claim(stack.db, job_id, volume_id, VERSION, c, 2) is None
    # and the holder settles it
    assert tasks.mark_done(stack.db, claim_b.task_id, b, claim_b.attempt, 2, 0, 10.0)
    assert task_row(stack)["status"] == "done"


def test_a_claim_of_an_earlier_attempt_by_the_same_worker_cannot_settle_the_new_one(stack, taken_over):
    """A restarted controller re-claims its own running task (attempt + 1): a late verdict of
    the old attempt is not the new claim's."""
    job_id, volume_id, _a, (b, claim_b) = taken_over
    again = tasks.claim(stack.db, job_id, volume_id, VERSION, b, 2)
    assert again is not None and again.attempt == claim_b.attempt + 1
    assert not tasks.mark_failed(stack.db, claim_b.task_id, b, claim_b.attempt, terminal=False, reason="old")
    assert tasks.mark_failed(stack.db, again.task_id, b, again.attempt, terminal=False, reason="new")
    assert task_row(stack)["error_reason"] == "new"


def test_the_stale_worker_lets_the_volume_go_untouched(stack, taken_over):
    """Through the lifecycle: the stale worker finishes (artifacts written) or fails its copy;
    it neither marks the row nor deletes or re-shows the message, which the holder owns now."""
    job_id, _volume_id, (a, claim_a), (b, _claim_b) = taken_over
    ensure_bucket(stack.s3, DEST_BUCKET)
    sqs = stack.sqs
    url = sqs.get_queue_url(QueueName="bec_ldv1_tasks")["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody='{"w_id": "W1", "i_id": "I1"}')
    raw = sqs.receive_message(QueueUrl=url, VisibilityTimeout=600, AttributeNames=["All"])["Messages"][0]
    svc = Services(db=stack.db, s3=stack.s3, source=stack.s3, sqs=sqs, job_name="ldv1", job_id=job_id,
                   worker_id=a, worker_name="a", source_bucket="src", dest_bucket=DEST_BUCKET,
                   queue_url=url, dlq_url=url, config={"max_transient_error_ratio": 1.0}, model={})
    manifest = Manifest("W1", "I1", "W1/I1/", '"abc123ffff"', (ManifestEntry("p1.jpg", None, None),
                                                                ManifestEntry("p2.jpg", None, None)))
    pages = VolumeFile(len(manifest.entries), {})
    for n, e in enumerate(manifest.entries):
        pages.add(n, artifacts.PageOutcome.failed(e.filename, "fetch", "missing_object", "gone"))

    def admitted() -> Admission:
        return Admission(Verdict.ADMITTED, Received.from_sqs(raw), w_id="W1", i_id="I1", manifest=manifest,
                         task_id=claim_a.task_id, attempt=claim_a.attempt, claimed_at=1.0)

    finished = admitted()
    assert lifecycle.finish(svc, finished, pages) is Verdict.NOT_CLAIMABLE
    assert finished.message.settled.is_set()  # no more extensions of a stale receipt
    failed = admitted()
    lifecycle.retry_later(svc, failed, "too many errors")
    lifecycle.release(svc, admitted(), "shutting down")
    assert task_row(stack) == {"status": "running", "worker_id": b, "attempt": 2, "error_reason": None}
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert (attrs["ApproximateNumberOfMessages"], attrs["ApproximateNumberOfMessagesNotVisible"]) == ("0", "1")
