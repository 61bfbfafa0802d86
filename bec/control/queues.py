"""SQS operations behind the job and queue commands.

Queue creation is idempotent (an existing queue is reused and its redrive policy set);
sends go in batches of 10 with the failed entries of a batch sent again; redrive moves
messages with SQS's own message-move task where the endpoint has it, and falls back to
receive → send → delete otherwise (at-least-once, like SQS itself; each message at most
once per run, however fast workers send it back).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import botocore.exceptions

from bec.edges import aws

RETENTION_SECONDS = 14 * 24 * 3600
DEFAULT_VISIBILITY = 300
DEFAULT_MAX_RECEIVE_COUNT = 3
BATCH = 10


@dataclass
class QueuePair:
    queue_url: str
    dlq_url: str
    created_queue: bool
    created_dlq: bool


def _find_queue(sqs: Any, name: str) -> str | None:
    try:
        return sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except botocore.exceptions.ClientError as exc:
        if aws.error_code(exc) in {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}:
            return None
        raise


def queue_arn(sqs: Any, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


def ensure_queues(sqs: Any, queue_name: str, dlq_name: str, *,
                  max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT,
                  visibility_timeout: int = DEFAULT_VISIBILITY) -> QueuePair:
    """Create or reuse the tasks queue and its DLQ, wired by a redrive policy."""
    dlq_url = _find_queue(sqs, dlq_name)
    created_dlq = dlq_url is None
    if dlq_url is None:
        dlq_url = sqs.create_queue(QueueName=dlq_name, Attributes={
            "MessageRetentionPeriod": str(RETENTION_SECONDS)})["QueueUrl"]
    redrive = json.dumps({"deadLetterTargetArn": queue_arn(sqs, dlq_url),
                          "maxReceiveCount": str(max_receive_count)})
    queue_url = _find_queue(sqs, queue_name)
    created_queue = queue_url is None
    if queue_url is None:
        queue_url = sqs.create_queue(QueueName=queue_name, Attributes={
            "MessageRetentionPeriod": str(RETENTION_SECONDS),
            "VisibilityTimeout": str(visibility_timeout),
            "RedrivePolicy": redrive,
        })["QueueUrl"]
    else:
        sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"RedrivePolicy": redrive})
    return QueuePair(queue_url, dlq_url, created_queue, created_dlq)


def max_receive_count(sqs: Any, url: str) -> int:
    """The receives after which SQS moves a message of this queue to its DLQ (0: no redrive)."""
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"])["Attributes"]
    try:
        return int(json.loads(attrs.get("RedrivePolicy", "{}")).get("maxReceiveCount", 0))
    except (ValueError, TypeError, AttributeError):
        return 0


def queue_name_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# -- sending --------------------------------------------------------------------------------
@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (body, reason)


def send_bodies(sqs: Any, queue_url: str, bodies: Sequence[str], *,
                attempts: int = 5, on_progress: Callable[[int], None] | None = None) -> SendReport:
    """Send in batches of 10; entries SQS reports as failed are sent again with back-off.

    botocore retries whole failed calls; a *partially* failed batch is a successful call,
    so resending its failed entries is ours to do.
    """
    report = SendReport()
    for start in range(0, len(bodies), BATCH):
        pending = {str(i): body for i, body in enumerate(bodies[start:start + BATCH])}
        reasons: dict[str, str] = {}
        for attempt in range(attempts):
            if not pending:
                break
            if attempt:
                time.sleep(min(5.0, 0.2 * 2 ** attempt))
            answer = sqs.send_message_batch(QueueUrl=queue_url, Entries=[
                {"Id": key, "MessageBody": body} for key, body in pending.items()])
            for ok in answer.get("Successful", []):
                pending.pop(ok["Id"], None)
                report.sent += 1
            for bad in answer.get("Failed", []):
                reasons[bad["Id"]] = f"{bad.get('Code', '')}: {bad.get('Message', '')}"
                if bad.get("SenderFault"):
                    # the entry itself is wrong; sending it again cannot help
                    report.failed.append((pending.pop(bad["Id"]), reasons[bad["Id"]]))
        report.failed.extend((body, reasons.get(key, "not sent")) for key, body in pending.items())
        if on_progress:
            on_progress(min(BATCH, len(bodies) - start))
    return report


# -- inspecting -----------------------------------------------------------------------------
def queue_attributes(sqs: Any, url: str) -> dict[str, str]:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]


def depth(sqs: Any, url: str) -> dict[str, int]:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed"])["Attributes"]
    return {"visible": int(attrs.get("ApproximateNumberOfMessages", 0)),
            "in_flight": int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
            "delayed": int(attrs.get("ApproximateNumberOfMessagesDelayed", 0))}


# -- redrive --------------------------------------------------------------------------------
@dataclass
class MoveReport:
    moved: int = 0
    method: str = "receive/send/delete"
    task_handle: str | None = None
    left: int = 0  # received but not moved: back in the source already, or a copy of a moved one
    budget: int = 0  # the most this run would move: the source's depth at the start


def start_move_task(sqs_single_try: Any, source_arn: str, dest_arn: str) -> str | None:
    """SQS's server-side message move; None where the endpoint does not implement it."""
    try:
        return sqs_single_try.start_message_move_task(SourceArn=source_arn,
                                                      DestinationArn=dest_arn)["TaskHandle"]
    except botocore.exceptions.ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = aws.error_code(exc)
        if status >= 500 or code in {"UnsupportedOperation", "InvalidAction", "NotImplemented",
                                     "InternalFailure", "InvalidParameterValue"}:
            return None
        raise


def move_messages(sqs: Any, source_url: str, dest_url: str, *, max_messages: int | None = None,
                  on_progress: Callable[[int], None] | None = None,
                  empty_polls_to_stop: int = 2) -> MoveReport:
    """Receive → send → delete, in batches of 10, each message at most once.

    A message is deleted from the source only after the destination accepted it, so an
    interruption can at worst duplicate the messages of one batch (which the idempotent
    worker absorbs), never lose one.

    While workers run, a moved message can fail again and land back in the source before the
    move ends (a volume without a manifest comes back within a second). Receiving until the
    source is empty would move it again and again (an operator saw 18 moves of one message),
    so a run moves at most what the source held when it started, and never a message it has
    seen already: by MessageId (the ids it received, and those SQS gave the copies it sent,
    which a redrive policy keeps) or by body (a worker's own DLQ send is a new message with
    the same body). Those it meets again are left where they are, visible at the end.
    """
    report = MoveReport()
    report.budget = depth(sqs, source_url)["visible"]
    if max_messages is not None:
        report.budget = min(report.budget, max_messages)
    seen_ids: set[str] = set()
    moved_bodies: set[str] = set()
    held: list[str] = []  # receipts of the messages left in the source, hidden until the end
    empty = 0
    try:
        while report.moved < report.budget:
            want = min(BATCH, report.budget - report.moved)
            got = sqs.receive_message(QueueUrl=source_url, MaxNumberOfMessages=want,
                                      WaitTimeSeconds=1, VisibilityTimeout=60,
                                      MessageAttributeNames=["All"]).get("Messages", [])
            fresh, bodies = [], set()
            for msg in got:
                body = msg.get("Body", "")
                if msg["MessageId"] in seen_ids or body in moved_bodies or body in bodies:
                    held.append(msg["ReceiptHandle"])
                else:
                    fresh.append(msg)
                    bodies.add(body)
                seen_ids.add(msg["MessageId"])
            if not fresh:
                empty += 1
                if empty >= empty_polls_to_stop:
                    break
                continue
            empty = 0
            entries = []
            for i, msg in enumerate(fresh):
                entry: dict[str, Any] = {"Id": str(i), "MessageBody": msg["Body"]}
                if msg.get("MessageAttributes"):
                    entry["MessageAttributes"] = msg["MessageAttributes"]
                entries.append(entry)
            answer = sqs.send_message_batch(QueueUrl=dest_url, Entries=entries)
            sent = {ok["Id"]: ok.get("MessageId", "") for ok in answer.get("Successful", [])}
            seen_ids.update(sent.values())
            to_delete = [{"Id": str(i), "ReceiptHandle": fresh[i]["ReceiptHandle"]}
                         for i in range(len(fresh)) if str(i) in sent]
            moved_bodies.update(fresh[i]["Body"] for i in range(len(fresh)) if str(i) in sent)
            if to_delete:
                sqs.delete_message_batch(QueueUrl=source_url, Entries=to_delete)
            report.moved += len(to_delete)
            if on_progress:
                on_progress(len(to_delete))
            if len(to_delete) < len(fresh):
                # the destination refused some; they stay in the source (visible again later)
                break
    finally:
        report.left = len(held)
        _make_visible(sqs, source_url, held)
    return report


def _make_visible(sqs: Any, url: str, receipts: list[str]) -> None:
    """Give back what a move received and left: visible now, not after its 60 s."""
    for start in range(0, len(receipts), BATCH):
        try:
            sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
                {"Id": str(n), "ReceiptHandle": r, "VisibilityTimeout": 0}
                for n, r in enumerate(receipts[start:start + BATCH])])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
            pass  # they become visible by themselves within 60 s


def bodies_for_volumes(volumes: Iterable[tuple[str, str]]) -> list[str]:
    return [json.dumps({"w_id": w, "i_id": i}) for w, i in volumes]
