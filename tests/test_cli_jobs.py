"""`bec jobs …` against PostgreSQL and the moto server: the guide's outputs and real state."""
from __future__ import annotations

import json

import pytest

from clihelp import bec, fails, ok


def queue_attrs(stack, name: str) -> dict:
    url = stack.sqs.get_queue_url(QueueName=name)["QueueUrl"]
    return stack.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]


def test_create_makes_queues_with_redrive_and_job_row(stack):
    out = ok("jobs", "create", "--name", "ldv1")
    lines = out.strip().splitlines()
    assert lines[0] == "Creating SQS queues for job 'ldv1'..."
    assert lines[1].startswith("✓ Created queue: ") and lines[1].endswith("/bec_ldv1_tasks")
    assert lines[2].startswith("✓ Created DLQ: ") and lines[2].endswith("/bec_ldv1_dlq")
    assert lines[3] == "✓ Created job: id=1, name=ldv1"

    tasks = queue_attrs(stack, "bec_ldv1_tasks")
    dlq = queue_attrs(stack, "bec_ldv1_dlq")
    policy = json.loads(tasks["RedrivePolicy"])
    assert policy["deadLetterTargetArn"] == dlq["QueueArn"]
    assert int(policy["maxReceiveCount"]) == 3
    assert tasks["VisibilityTimeout"] == "300"
    assert tasks["MessageRetentionPeriod"] == str(14 * 24 * 3600)
    assert dlq["MessageRetentionPeriod"] == str(14 * 24 * 3600)

    row = stack.db.row("SELECT * FROM jobs WHERE name = 'ldv1'")
    assert row["id"] == 1 and row["config"] == {}
    assert row["queue_url"] == lines[1].split(": ", 1)[1]


def test_create_with_config_file_and_custom_receive_count(stack, tmp_path):
    cfg = tmp_path / "ldv1-config.json"
    cfg.write_text(json.dumps({"use_gpu": True, "precision": "fp16", "batch_size": 16,
                               "compile_model": False, "max_tiles_per_batch": 80}))
    ok("jobs", "create", "--name", "ldv1", "--config", str(cfg), "--max-receive-count", "5")
    assert json.loads(queue_attrs(stack, "bec_ldv1_tasks")["RedrivePolicy"])["maxReceiveCount"] in (5, "5")
    assert stack.db.row("SELECT config FROM jobs")["config"]["max_tiles_per_batch"] == 80


def test_create_reuses_existing_queues(stack):
    dlq = stack.sqs.create_queue(QueueName="bec_ocr_dlq")["QueueUrl"]
    out = ok("jobs", "create", "--name", "ocr", "--config-text", '{"model": "tesseract", "lang": "bod"}')
    assert f"✓ Reused DLQ: {dlq}" in out
    assert "✓ Created queue: " in out
    assert stack.db.row("SELECT config FROM jobs")["config"] == {"model": "tesseract", "lang": "bod"}


def test_create_with_existing_queue_urls(stack):
    q = stack.sqs.create_queue(QueueName="custom-queue")["QueueUrl"]
    d = stack.sqs.create_queue(QueueName="custom-dlq")["QueueUrl"]
    out = ok("jobs", "create", "--name", "ldv1", "--queue-url", q, "--dlq-url", d)
    assert "✓ Created job: id=1, name=ldv1" in out
    row = stack.db.row("SELECT queue_url, dlq_url FROM jobs")
    assert (row["queue_url"], row["dlq_url"]) == (q, d)
    names = [u.rsplit("/", 1)[1] for u in stack.sqs.list_queues().get("QueueUrls", [])]
    assert "bec_ldv1_tasks" not in names


@pytest.mark.parametrize("args, message", [
    (["--name", "bad name"], "invalid job name"),
    (["--name", "x/y"], "invalid job name"),
    (["--name", "a" * 71], "too long"),
    (["--name", "ldv1", "--config-text", "{not json"], "not valid JSON"),
    (["--name", "ldv1", "--config-text", "[1, 2]"], "must be a JSON object"),
    (["--name", "ldv1", "--config", "/nonexistent/cfg.json"], "cannot read config file"),
    (["--name", "ldv1", "--config-text", '{"batchsize": 3}'], "unknown ldv1 config key 'batchsize'"),
    (["--name", "ldv1", "--config-text", '{"batch_size": "3"}'], "'batch_size' must be an integer"),
    (["--name", "ldv1", "--config-text", '{"batches_in_flight": 3}'], "'batches_in_flight' must be 0 (auto), 1 or 2"),
    (["--name", "ldv1", "--queue-url", "http://x/q"], "go together"),
])
def test_create_rejects_bad_input_and_creates_nothing(stack, args, message):
    err = fails("jobs", "create", *args)
    assert message in err
    assert stack.sqs.list_queues().get("QueueUrls", []) == []
    assert stack.db.row("SELECT count(*) AS n FROM jobs")["n"] == 0


def test_duplicate_job_name_rejected(stack):
    ok("jobs", "create", "--name", "ldv1")
    assert "already exists" in fails("jobs", "create", "--name", "ldv1")
    assert stack.db.row("SELECT count(*) AS n FROM jobs")["n"] == 1


def test_list_show_update(stack):
    ok("jobs", "create", "--name", "ldv1", "--config-text", '{"use_gpu": true, "batch_size": 16}')
    listing = ok("jobs", "list")
    assert "┃ ID ┃ Name ┃ Queue" in listing
    assert "│ 1  │ ldv1 │ bec_ldv1_tasks │" in listing
    assert '{"use_gp...' in listing

    shown = ok("jobs", "show", "ldv1").splitlines()
    assert shown[0] == "Job 1" and shown[1] == "Name: ldv1"
    assert shown[2].startswith("Queue URL: ") and shown[2].endswith("bec_ldv1_tasks")
    assert shown[3].startswith("DLQ URL: ") and shown[3].endswith("bec_ldv1_dlq")
    assert shown[4] == "Configuration:"
    assert json.loads("\n".join(shown[5:])) == {"use_gpu": True, "batch_size": 16}

    ok("jobs", "update", "ldv1", "--config-text", '{"precision": "bf16"}')
    assert stack.db.row("SELECT config FROM jobs")["config"] == {"precision": "bf16"}
    assert "'precision' must be one of" in fails("jobs", "update", "ldv1", "--config-text", '{"precision": "fp8"}')
    assert stack.db.row("SELECT config FROM jobs")["config"] == {"precision": "bf16"}
    assert "unknown job 'nope'" in fails("jobs", "show", "nope")
    assert "unknown job" in fails("jobs", "update", "nope", "--config-text", "{}")


def test_delete_asks_and_keeps_queues_unless_told(stack):
    ok("jobs", "create", "--name", "ldv1")
    result = bec("jobs", "delete", "ldv1", input="n\n")
    assert result.exit_code != 0
    assert stack.db.row("SELECT count(*) AS n FROM jobs")["n"] == 1

    ok("jobs", "delete", "ldv1", "--yes")
    assert stack.db.row("SELECT count(*) AS n FROM jobs")["n"] == 0
    assert len(stack.sqs.list_queues()["QueueUrls"]) == 2

    ok("jobs", "create", "--name", "ldv1")
    ok("jobs", "delete", "ldv1", "--yes", "--delete-queues")
    assert stack.sqs.list_queues().get("QueueUrls", []) == []


def seed_tasks(stack) -> None:
    """Task rows as workers would leave them: 2 running, 2 done, 1 retryable, 1 terminal."""
    db = stack.db
    db.execute("INSERT INTO workers (worker_name, hostname) VALUES ('i-abc123', 'h1'), ('i-def456', 'h2')")
    for n in range(6):
        db.execute("INSERT INTO volumes (bdrc_w_id, bdrc_i_id) VALUES (%s, %s)", (f"W22084", f"I088{n}"))
    db.execute("INSERT INTO volumes (bdrc_w_id, bdrc_i_id) VALUES ('W1KG13780', 'I1KG15541')")
    rows = [  # volume, status, images, errors, duration ms, worker
        (1, "done", 200, 2, 15200.0, 1),
        (2, "done", 198, 0, 14800.0, 1),
        (3, "retryable_failed", 150, 15, 10500.0, 1),
        (4, "terminal_failed", 0, 0, None, 2),
        (5, "running", 200, None, None, 2),
        (7, "running", 200, None, None, 2),
    ]
    for vol, status, images, errors, ms, worker in rows:
        db.execute(
            "INSERT INTO task_executions (job_id, volume_id, s3_etag, status, worker_id, total_images, "
            "nb_errors, total_duration_ms) VALUES (1, %s, 'abc123', %s, %s, %s, %s, %s)",
            (vol, status, worker, images, errors, ms))


def test_stats_and_tasks_tables(stack):
    ok("jobs", "create", "--name", "ldv1")
    seed_tasks(stack)
    out = ok("jobs", "stats", "ldv1")
    assert out.startswith("Job Statistics: ldv1 (id=1)")
    assert "Task Execution Status" in out
    table = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in out.splitlines() if line.startswith("│")}
    assert table["running"] == ["2", "400", "0", "0"]
    assert table["done"] == ["2", "398", "2", "15000.00"]
    assert table["retryable_failed"] == ["1", "150", "15", "10500.00"]
    assert table["terminal_failed"] == ["1", "0", "0", "0"]
    assert "  Total Tasks: 6" in out
    assert "  Total Images: 948" in out
    assert "  Total Errors: 17" in out
    assert "  Avg Duration per Task: 13500.00 ms" in out
    # per page: (15200+14800+10500) / (200+198+150)
    assert f"  Avg Duration per Page: {40500 / 548:.2f} ms" in out

    tasks = ok("jobs", "tasks", "ldv1")
    assert tasks.startswith("Recent Task Executions: ldv1 (id=1)")
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in tasks.splitlines() if line.startswith("│")]
    assert [r[0] for r in rows] == ["6", "5", "4", "3", "2", "1"]
    assert rows[0] == ["6", "W1KG13780/I1KG...", "running", "-", "-", "-", "i-def456"]
    assert rows[4] == ["2", "W22084/I0881", "done", "198", "0", "14.8", "i-abc123"]

    limited = ok("jobs", "tasks", "ldv1", "--limit", "2", "--status", "done")
    rows = [line for line in limited.splitlines() if line.startswith("│")]
    assert len(rows) == 2 and all("done" in r for r in rows)
    assert "Invalid value for '--status'" in fails("jobs", "tasks", "ldv1", "--status", "weird")


def test_two_jobs_on_one_queue_are_warned_and_its_queues_kept(stack):
    """A second job given the first one's queues is warned; deleting either with
    --delete-queues is refused while the other uses them (it used to delete them)."""
    ok("jobs", "create", "--name", "ldv1")
    row = stack.db.row("SELECT queue_url, dlq_url FROM jobs")
    result = bec("jobs", "create", "--name", "ldv1-b", "--queue-url", row["queue_url"], "--dlq-url", row["dlq_url"])
    assert result.exit_code == 0, result.output
    assert "Warning: job 'ldv1' uses bec_ldv1_tasks too" in result.stderr
    assert "job 'ldv1' uses bec_ldv1_dlq too" in result.stderr
    err = fails("jobs", "delete", "ldv1", "--yes", "--delete-queues")
    assert "job 'ldv1-b' uses bec_ldv1_tasks too: not deleting queues another job needs" in err
    assert len(stack.sqs.list_queues()["QueueUrls"]) == 2
    assert stack.db.row("SELECT count(*) AS n FROM jobs")["n"] == 2   # nothing deleted
    ok("jobs", "delete", "ldv1-b", "--yes")                           # the job alone: fine
    ok("jobs", "delete", "ldv1", "--yes", "--delete-queues")           # the last user: fine
    assert stack.sqs.list_queues().get("QueueUrls", []) == []


def test_tasks_with_no_rows_says_so(stack):
    ok("jobs", "create", "--name", "ldv1")
    out = ok("jobs", "tasks", "ldv1")
    assert "No task executions yet." in out and "┃" not in out
    seed_tasks(stack)
    out = ok("jobs", "tasks", "ldv1", "--status", "terminal_failed")
    assert "No task executions" not in out
    stack.db.execute("DELETE FROM task_executions WHERE status = 'terminal_failed'")
    out = ok("jobs", "tasks", "ldv1", "--status", "terminal_failed")
    assert "No task executions with status terminal_failed." in out and "┃" not in out
