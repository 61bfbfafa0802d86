"""A message's fate, once given, is never undone by a visibility extension (pure unit tests:
the SQS client is a recorder, so the order of the calls can be read back exactly)."""
from __future__ import annotations

import threading
import time
from typing import Any

from bec.control import lifecycle
from bec.control.lifecycle import Admission, Received, Services, Verdict


class RecordingSqs:
    """Records each visibility call when it *completes*, as SQS would apply it; the batch
    call can be made slow to open the window a concurrent verdict would race into."""

    def __init__(self, batch_seconds: float = 0.0) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.batch_seconds = batch_seconds
        self.batch_started = threading.Event()

    def change_message_visibility_batch(self, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        self.batch_started.set()
        time.sleep(self.batch_seconds)
        self.calls += [("extend", e["ReceiptHandle"], e["VisibilityTimeout"]) for e in Entries]
        return {"Successful": [{"Id": e["Id"]} for e in Entries]}

    def change_message_visibility(self, QueueUrl: str, ReceiptHandle: str, VisibilityTimeout: int) -> None:
        self.calls.append(("set", ReceiptHandle, VisibilityTimeout))

    def delete_message(self, QueueUrl: str, ReceiptHandle: str) -> None:
        self.calls.append(("delete", ReceiptHandle, 0))

    def send_message(self, QueueUrl: str, MessageBody: str, DelaySeconds: int = 0) -> None:
        self.calls.append(("send", MessageBody, DelaySeconds))


def services(sqs: RecordingSqs) -> Services:
    return Services(db=None, s3=None, source=None, sqs=sqs, job_name="ldv1", job_id=1,  # type: ignore[arg-type]
                    worker_id=1, worker_name="w", source_bucket="src", dest_bucket="dst",
                    queue_url="q", dlq_url="dlq", config={}, model={}, retry_delay=30)


def admission(receipt: str) -> Admission:
    message = Received(f"id-{receipt}", receipt, "{}", 1)
    return Admission(Verdict.ADMITTED, message, w_id="W1", i_id="I1")  # no task id: no DB row


def test_a_settled_message_is_never_extended():
    sqs = RecordingSqs()
    svc = services(sqs)
    retried, released, done, running = (admission(r) for r in ("retried", "released", "done", "running"))
    lifecycle.retry_later(svc, retried, "too many errors")
    lifecycle.release(svc, released, "shutting down")
    lifecycle.delete_message(svc, done.message)

    extended = lifecycle.extend_visibility(svc, [a.message for a in (retried, released, done, running)], 600)

    assert [(m.receipt, seconds) for m, seconds in extended] == [("running", 600)]
    # a release is a requeue: a fresh copy, then the original deleted
    assert sqs.calls == [("set", "retried", 30), ("send", "{}", 0), ("delete", "released", 0),
                         ("delete", "done", 0), ("extend", "running", 600)]


def test_a_retry_given_while_an_extension_is_in_flight_lands_after_it():
    """Before: the extension (600 s) could land after the retry's 30 s back-off and hide the
    message for the whole visibility timeout."""
    sqs = RecordingSqs(batch_seconds=0.3)
    svc = services(sqs)
    vol = admission("vol")
    extender = threading.Thread(target=lifecycle.extend_visibility, args=(svc, [vol.message], 600))
    extender.start()
    assert sqs.batch_started.wait(5)
    lifecycle.retry_later(svc, vol, "finishing failed")  # the finishing thread, meanwhile
    extender.join()

    assert sqs.calls == [("extend", "vol", 600), ("set", "vol", 30)]
    assert lifecycle.extend_visibility(svc, [vol.message], 600) == []
    assert sqs.calls[-1] == ("set", "vol", 30)
