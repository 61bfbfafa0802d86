"""`bec queue …` against the moto server: message bodies, counts, redrive, purge."""
from __future__ import annotations

import json
import time

import pytest

from bec.control import queues
from clihelp import fails, ok


def drain(sqs, url: str) -> list[dict]:
    """Receive every message of a queue (and delete it), for assertions on bodies."""
    got = []
    while True:
        batch = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not batch:
            return got
        for msg in batch:
            got.append(json.loads(msg["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"])


@pytest.fixture
def job(stack):
    ok("jobs", "create", "--name", "ldv1")
    row = stack.db.row("SELECT queue_url, dlq_url FROM jobs")
    return row["queue_url"], row["dlq_url"]


def test_enqueue_file_format_dedupe_and_bodies(stack, job, tmp_path):
    vols = tmp_path / "volumes.txt"
    vols.write_text("# One volume per line: W_ID,I_ID or W_ID I_ID\n"
                    "W22084,I0886\nW22084 I0887\nW1KG13780,I1KG15541\n\n"
                    "# Comments start with #\n   W22084 ,  I0886  # again\n\tW22084\tI0888\n")
    out = ok("queue", "enqueue", "--job-name", "ldv1", "--file", str(vols))
    assert "✓ Enqueued 4 volumes to bec_ldv1_tasks (1 duplicate skipped)" in out
    bodies = drain(stack.sqs, job[0])
    assert sorted((b["w_id"], b["i_id"]) for b in bodies) == sorted(
        [("W22084", "I0886"), ("W22084", "I0887"), ("W1KG13780", "I1KG15541"), ("W22084", "I0888")])
    assert all(set(b) == {"w_id", "i_id"} for b in bodies)


def test_enqueue_a_file_saved_by_a_windows_editor(stack, job, tmp_path):
    vols = tmp_path / "volumes.txt"
    vols.write_bytes("W22084,I0886\r\nW22084 I0887\r\n".encode("utf-8-sig"))
    assert "✓ Enqueued 2 volumes" in ok("queue", "enqueue", "--job-name", "ldv1", "--file", str(vols))
    assert sorted(b["w_id"] + "/" + b["i_id"] for b in drain(stack.sqs, job[0])) == ["W22084/I0886", "W22084/I0887"]


def test_enqueue_single_and_multiple_volumes(stack, job):
    ok("queue", "enqueue", "--job-name", "ldv1", "--volume", "W22084,I0886")
    ok("queue", "enqueue", "--job-name", "ldv1", "--volume", "W22084,I0886", "--volume", "W22084,I0887")
    assert len(drain(stack.sqs, job[0])) == 3


def test_enqueue_many_in_batches(stack, job, tmp_path):
    vols = tmp_path / "many.txt"
    vols.write_text("".join(f"W{n},I{n:04d}\n" for n in range(1, 256)))
    out = ok("queue", "enqueue", "--job-name", "ldv1", "--file", str(vols))
    assert "✓ Enqueued 255 volumes" in out
    assert queues.depth(stack.sqs, job[0])["visible"] == 255


@pytest.mark.parametrize("content, message", [
    ("W22084,I0886\nW22084\n", "line 2: expected 'W_ID,I_ID'"),
    ("W22084,I0886\n\n# c\nX1,I0886\n", "line 4: invalid work id 'X1'"),
    ("W22084,I08/86\n", "line 1: invalid image-group id"),
    ("W22084,I0886,extra\n", "line 1: expected"),
    ("W../x,I0886\n", "line 1: invalid work id"),
    ("W1,I" + "1" * 40 + "\n", "at most 32 characters"),
    ("W1;DROP TABLE jobs,I1\n", "line 1"),
])
def test_enqueue_bad_line_sends_nothing(stack, job, tmp_path, content, message):
    vols = tmp_path / "bad.txt"
    vols.write_text(content)
    assert message in fails("queue", "enqueue", "--job-name", "ldv1", "--file", str(vols))
    assert queues.depth(stack.sqs, job[0])["visible"] == 0


def test_enqueue_rejections(stack, job, tmp_path):
    assert "cannot read volume file" in fails("queue", "enqueue", "--job-name", "ldv1", "--file", str(tmp_path / "none.txt"))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00W1")
    assert "cannot read volume file" in fails("queue", "enqueue", "--job-name", "ldv1", "--file", str(binary))
    assert "nothing to enqueue" in fails("queue", "enqueue", "--job-name", "ldv1")
    assert "--volume #1" in fails("queue", "enqueue", "--job-name", "ldv1", "--volume", "nonsense")
    assert "unknown job 'other'" in fails("queue", "enqueue", "--job-name", "other", "--volume", "W1,I1")
    assert "invalid job name" in fails("queue", "enqueue", "--job-name", "../x", "--volume", "W1,I1")
    assert queues.depth(stack.sqs, job[0])["visible"] == 0


def test_send_retries_failed_entries_of_a_batch():
    """A partially failed SendMessageBatch gets its failed entries sent again."""
    class FlakySqs:
        def __init__(self):
            self.calls = []

        def send_message_batch(self, QueueUrl, Entries):
            self.calls.append([e["MessageBody"] for e in Entries])
            if len(self.calls) == 1:  # first call: the last two entries fail (throttled)
                return {"Successful": [{"Id": e["Id"]} for e in Entries[:-2]],
                        "Failed": [{"Id": e["Id"], "Code": "ThrottlingException", "SenderFault": False}
                                   for e in Entries[-2:]]}
            return {"Successful": [{"Id": e["Id"]} for e in Entries]}

    sqs = FlakySqs()
    bodies = [f"b{i}" for i in range(10)]
    report = queues.send_bodies(sqs, "url", bodies, attempts=3)
    assert report.sent == 10 and not report.failed
    assert sqs.calls[1] == ["b8", "b9"]


def test_queue_stats_table(stack, job):
    ok("queue", "enqueue", "--job-name", "ldv1", "--volume", "W1,I1", "--volume", "W1,I2")
    stack.sqs.receive_message(QueueUrl=job[0], MaxNumberOfMessages=1, VisibilityTimeout=60)
    out = ok("queue", "stats", "--job-name", "ldv1")
    cells = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in out.splitlines() if line.startswith("│")}
    assert cells["Messages Available"] == "1"
    assert cells["Messages In Flight"] == "1"
    assert cells["Messages Delayed"] == "0"
    assert cells["DLQ Messages"] == "0"
    assert cells["Created"].startswith("20")


def test_purge_needs_confirmation(stack, job):
    ok("queue", "enqueue", "--job-name", "ldv1", "--volume", "W1,I1")
    fails("queue", "purge", "--job-name", "ldv1", input="n\n")
    assert queues.depth(stack.sqs, job[0])["visible"] == 1
    assert "✓ Purged queue" in ok("queue", "purge", "--job-name", "ldv1", "--yes")
    assert queues.depth(stack.sqs, job[0])["visible"] == 0


def fill_dlq(stack, url: str, n: int) -> None:
    queues.send_bodies(stack.sqs, url, queues.bodies_for_volumes([(f"W{i}", "I1") for i in range(n)]))


def test_redrive_by_urls_with_max(stack, job):
    queue_url, dlq_url = job
    fill_dlq(stack, dlq_url, 25)
    out = ok("queue", "redrive", "--source-queue-url", dlq_url, "--dest-queue-url", queue_url,
             "--max-messages", "12")
    assert "✓ Moved 12 messages from bec_ldv1_dlq to bec_ldv1_tasks" in out
    moved = drain(stack.sqs, queue_url)
    assert len(moved) == 12
    left = drain(stack.sqs, dlq_url)
    # nothing lost, nothing duplicated
    assert sorted(b["w_id"] for b in moved + left) == sorted(f"W{i}" for i in range(25))


def test_redrive_whole_dlq_by_job_name(stack, job):
    queue_url, dlq_url = job
    fill_dlq(stack, dlq_url, 23)
    out = ok("queue", "redrive", "--job-name", "ldv1")
    # moto has no StartMessageMoveTask: the fallback moves everything
    assert "✓ Moved 23 messages" in out
    assert len(drain(stack.sqs, queue_url)) == 23
    assert queues.depth(stack.sqs, dlq_url)["visible"] == 0


def test_redrive_argument_errors(stack, job):
    assert "give --job-name" in fails("queue", "redrive")
    assert "either --job-name" in fails("queue", "redrive", "--job-name", "ldv1", "--source-queue-url", "x")
    assert "NonExistentQueue" in fails("queue", "redrive", "--source-queue-url", job[0] + "nope",
                                       "--dest-queue-url", job[0])
    # a queue onto itself: before, the fallback move never ran out of messages
    fill_dlq(stack, job[1], 2)
    assert "same queue (bec_ldv1_dlq): nothing to move" in fails(
        "queue", "redrive", "--source-queue-url", job[1], "--dest-queue-url", job[1])
    assert queues.depth(stack.sqs, job[1])["visible"] == 2


def test_a_missing_queue_is_named(stack, job):
    """A job has two queues: an SQS error says which one is gone."""
    stack.sqs.delete_queue(QueueUrl=job[1])
    err = fails("queue", "stats", "--job-name", "ldv1")
    assert "SQS queue bec_ldv1_dlq: " in err and "NonExistentQueue" in err
    err = fails("queue", "redrive", "--job-name", "ldv1")
    assert "SQS queue bec_ldv1_dlq: " in err
    stack.sqs.delete_queue(QueueUrl=job[0])
    assert "SQS queue bec_ldv1_tasks: " in fails("queue", "enqueue", "--job-name", "ldv1", "--volume", "W1,I1")
    assert "SQS queue bec_ldv1_tasks: " in fails("queue", "purge", "--job-name", "ldv1", "--yes")


def test_redrive_leaves_copies_of_a_moved_message(stack, job):
    """A run moves each message once: a second copy of a body it moved (what a worker's own
    DLQ send of a bounced message looks like) stays in the source, visible at once."""
    queue_url, dlq_url = job
    fill_dlq(stack, dlq_url, 3)
    queues.send_bodies(stack.sqs, dlq_url, queues.bodies_for_volumes([("W0", "I1")]))
    out = ok("queue", "redrive", "--job-name", "ldv1")
    assert "✓ Moved 3 messages" in out
    assert "1 message came back to bec_ldv1_dlq during the move" in out
    assert sorted(b["w_id"] for b in drain(stack.sqs, queue_url)) == ["W0", "W1", "W2"]
    assert [b["w_id"] for b in drain(stack.sqs, dlq_url)] == ["W0"]  # visible now, not in 60 s


@pytest.mark.slow
def test_redrive_moves_a_message_once_while_a_worker_sends_it_back(stack):
    """The issue's run: a volume without a manifest in the DLQ, a worker running, and a
    redrive with a generous --max-messages. The worker sends the message back to the DLQ
    within a second of the move; the move used to take it again until --max-messages (an
    operator saw "Moved 18 messages" and attempt 18)."""
    from workerkit import enqueue, queue_counts, setup_job, start_worker

    q = setup_job(stack)
    enqueue(stack, q["queue"], [("W404", "I404")])
    worker = start_worker(stack, "--shutdown-after-empty", "0")
    try:
        deadline = time.monotonic() + 90
        while queue_counts(stack, q["dlq"])[0] < 1:  # the worker has sent it to the DLQ once
            assert time.monotonic() < deadline and worker.process.poll() is None, worker.output
            time.sleep(0.2)
        out = ok("queue", "redrive", "--source-queue-url", q["dlq"], "--dest-queue-url", q["queue"],
                 "--max-messages", "20")
        assert "✓ Moved 1 message from bec_ldv1_dlq to bec_ldv1_tasks" in out
        while queue_counts(stack, q["dlq"])[0] < 1:  # ... and a second time, after the move
            assert time.monotonic() < deadline, worker.output
            time.sleep(0.2)
    finally:
        worker.signal()
        worker.wait(60)
    row = stack.db.row("SELECT attempt, status::text AS status FROM task_executions")
    assert (row["status"], row["attempt"]) == ("terminal_failed", 2)
    assert queue_counts(stack, q["dlq"]) == (1, 0) and queue_counts(stack, q["queue"]) == (0, 0)
