"""`bec jobs stats --watch` and `bec jobs errors`: seeded tasks, queues and success.json markers."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bec import artifacts
from bec.devstack.volumes import ensure_bucket
from clihelp import ok
from conftest import DEST_BUCKET

BEC = str(Path(sys.executable).with_name("bec"))


def seed(stack, queued: int = 3) -> None:
    """ldv1: 200 pages done 2 min ago, 198 pages 10 min ago, 400 pages 2 hours ago; queued volumes."""
    ok("jobs", "create", "--name", "ldv1")
    db = stack.db
    for n in range(4):
        db.execute("INSERT INTO volumes (bdrc_w_id, bdrc_i_id) VALUES ('W22084', %s)", (f"I088{n}",))
    for vol, images, ago in ((1, 200, "2 minutes"), (2, 198, "10 minutes"), (3, 400, "2 hours")):
        db.execute("INSERT INTO task_executions (job_id, volume_id, s3_etag, status, total_images, nb_errors, "
                   "total_duration_ms, done_at) VALUES (1, %s, 'abc123', 'done', %s, 0, 1000, now() - %s::interval)",
                   (vol, images, ago))
    db.execute("INSERT INTO task_executions (job_id, volume_id, s3_etag, status) VALUES (1, 4, 'abc123', 'running')")
    url = db.row("SELECT queue_url FROM jobs")["queue_url"]
    for n in range(queued):
        stack.sqs.send_message(QueueUrl=url, MessageBody=f'{{"n": {n}}}')


def test_watch_shows_the_table_throughput_and_eta(stack):
    seed(stack)
    out = ok("jobs", "stats", "ldv1", "--watch", "--interval", "0.1", "--iterations", "2")
    assert out.startswith("Job Statistics: ldv1 (id=1)")
    assert "Task Execution Status" in out and "Overall Totals:" in out
    table = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
             for line in out.splitlines() if line.startswith("│")}
    assert table["done"][:2] == ["3", "798"] and table["running"][0] == "1"
    assert "  Pages/s (last 5 min): 0.67 (1 volumes)" in out        # 200 pages / 300 s
    assert "  Pages/s (last 15 min): 0.44 (2 volumes)" in out       # 398 pages / 900 s
    assert "  Avg Pages per Volume: 266.0" in out                   # 798 / 3
    assert "  Queue: 3 volumes (3 visible, 0 in flight)" in out
    # 3 volumes × 266 pages ÷ 0.667 pages/s = 1197 s
    assert re.search(r"  ETA: 19m 5[67]s \(3 × 266\.0 pages ÷ 0\.67 pages/s\)", out), out
    assert "Ctrl-C to exit" in out


def test_watch_without_recent_work_or_queue(stack):
    seed(stack, queued=0)
    out = ok("jobs", "stats", "ldv1", "--watch", "--interval", "0.1", "--iterations", "1")
    assert "  ETA: done (queue empty)" in out
    stack.db.execute("UPDATE task_executions SET done_at = now() - interval '1 day'")
    stack.sqs.send_message(QueueUrl=stack.db.row("SELECT queue_url FROM jobs")["queue_url"], MessageBody="{}")
    out = ok("jobs", "stats", "ldv1", "--watch", "--iterations", "1")
    assert "  Pages/s (last 5 min): 0.00 (0 volumes)" in out
    assert "  ETA: - (no volume done in the last 15 minutes)" in out


def test_plain_stats_unchanged_by_watch_options(stack):
    seed(stack)
    out = ok("jobs", "stats", "ldv1")
    assert "Throughput:" not in out and "ETA" not in out
    assert out.rstrip().endswith("Avg Duration per Page: 3.76 ms")   # 3 × 1000 ms / 798 pages


def test_watch_exits_cleanly_on_ctrl_c(stack):
    seed(stack)
    proc = subprocess.Popen([BEC, "jobs", "stats", "ldv1", "--watch", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **stack.env}, cwd=stack.workdir)
    try:
        deadline = time.monotonic() + 30
        # watching once the CLI holds its database connection
        while not stack.db.row("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'bec-cli' "
                               "AND datname = current_database()")["n"]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(0.8)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Aborted" not in err
    assert "Task Execution Status" in out and "Pages/s (last 5 min)" in out


def put_marker(stack, w: str, i: str, version: str, errors_by_type: dict[str, int]) -> None:
    marker = {"job": "ldv1", "w_id": w, "i_id": i, "version": version,
              "nb_errors": sum(errors_by_type.values()), "errors_by_type": errors_by_type}
    stack.s3.put_object(Bucket=DEST_BUCKET, Key=artifacts.success_key("ldv1", w, i, version),
                        Body=artifacts.success_bytes(marker))


def seed_failures(stack) -> None:
    ok("jobs", "create", "--name", "ldv1")
    db = stack.db
    for n in range(8):
        db.execute("INSERT INTO volumes (bdrc_w_id, bdrc_i_id) VALUES ('W22084', %s)", (f"I088{n}",))
    failed = [  # volume, status, attempt, reason, minutes ago
        (1, "retryable_failed", 2, "3 of 8 pages failed (38% > max_error_ratio 0.1): 3× missing_object", 30),
        (2, "retryable_failed", 1, "5 of 9 pages failed (56% > max_error_ratio 0.1): 5× missing_object", 20),
        (3, "terminal_failed", 1, "manifest missing: Works/60/W22084/images/W22084-0883/dimensions.json", 10),
        (4, "retryable_failed", 3, "reading manifest: [Errno 111] Connection refused", 5),
    ]
    for vol, status, attempt, reason, ago in failed:
        db.execute("INSERT INTO task_executions (job_id, volume_id, s3_etag, status, attempt, error_reason, done_at) "
                   "VALUES (1, %s, 'abc123', %s, %s, %s, now() - %s * interval '1 minute')",
                   (vol, status, attempt, reason, ago))
    done = [(5, 2, 40), (6, 3, 3), (7, 0, 2), (8, 1, 1)]  # volume, nb_errors, minutes ago
    for vol, errors, ago in done:
        db.execute("INSERT INTO task_executions (job_id, volume_id, s3_etag, status, total_images, nb_errors, done_at) "
                   "VALUES (1, %s, 'def456', 'done', 10, %s, now() - %s * interval '1 minute')", (vol, errors, ago))
    ensure_bucket(stack.s3, DEST_BUCKET)
    put_marker(stack, "W22084", "I0884", "def456", {"missing_object": 2})
    put_marker(stack, "W22084", "I0885", "def456", {"corrupt_image": 1, "missing_object": 2})
    # I0887 (1 error) has no marker: counted as unreadable, not a failure of the command


def test_errors_lists_failures_reasons_and_page_error_types(stack):
    seed_failures(stack)
    out = ok("jobs", "errors", "ldv1")
    lines = out.splitlines()
    assert lines[0] == "Recent Failed Tasks: ldv1 (id=1)"
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.split("Most common failure")[0].splitlines()
            if line.startswith("│") and line.split("│")[1].strip().isdigit()]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("4", "W22084/I0883", "retryable_failed", "3"),
        ("3", "W22084/I0882", "terminal_failed", "1"),
        ("2", "W22084/I0881", "retryable_failed", "1"),
        ("1", "W22084/I0880", "retryable_failed", "2"),
    ]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[0][4])
    assert "[Errno 111] Connection refused" in out  # shown as text, not taken for markup

    reasons = out.split("Most common failure reasons (numbers aside):")[1].split("Most common page errors:")[0]
    counts = {line.split("│")[2].strip(): line.split("│")[1].strip()
              for line in reasons.splitlines() if line.startswith("│") and line.split("│")[1].strip().isdigit()}
    # the two "N of N pages failed" share a group, shown with the latest text
    assert counts["5 of 9 pages failed (56% > max_error_ratio 0.1): 5× missing_object"] == "2"
    assert list(counts.values()) == ["2", "1", "1"]

    pages = out.split("Most common page errors:")[1]
    types = [[c.strip() for c in line.split("│")[1:-1]] for line in pages.splitlines()
             if line.startswith("│") and "_" in line]
    assert types == [["missing_object", "deterministic", "4", "2"], ["corrupt_image", "deterministic", "1", "1"]]
    assert "from the success.json of the 3 most recent done volumes with page errors" in pages
    assert "(1 could not be read, e.g. ldv1/W22084/I0887/def456/success.json: " in pages


def test_errors_limit_and_empty_job(stack):
    seed_failures(stack)
    out = ok("jobs", "errors", "ldv1", "--limit", "1")
    assert "W22084/I0883" in out and "W22084/I0882" not in out.split("Most common failure")[0]
    ok("jobs", "create", "--name", "other")
    out = ok("jobs", "errors", "other")
    assert "Most common failure reasons (numbers aside):\n  none" in out
    assert "none (no done task has page errors)" in out


def test_errors_without_dest_bucket_still_shows_the_database_part(stack, monkeypatch):
    seed_failures(stack)
    monkeypatch.delenv("BEC_DEST_S3_BUCKET")
    out = ok("jobs", "errors", "ldv1")
    assert "manifest missing" in out
    assert "set BEC_DEST_S3_BUCKET or pass --s3-dest-bucket" in out
    assert "missing_object" in ok("jobs", "errors", "ldv1", "--s3-dest-bucket", DEST_BUCKET).split(
        "Most common page errors:")[1]


def test_errors_of_one_volume_list_its_failed_pages_by_type(stack):
    """`--volume` narrows every part to one volume and lists its done version's failed pages,
    grouped by type, with their class (only transient ones could have sent it back)."""
    seed_failures(stack)
    errors = [{"index": 4, "file": "I08850005.jpg", "stage": "fetch", "type": "missing_object",
               "message": "s3://archive.tbrc.org/…/I08850005.jpg does not exist"},
              {"index": 1, "file": "I08850002.jpg", "stage": "decode", "type": "corrupt_image",
               "message": "JPEG data is corrupt: premature end of data segment"},
              {"index": 9, "file": "I08850010.jpg", "stage": "fetch", "type": "s3_error",
               "message": "GET s3://archive.tbrc.org/…/I08850010.jpg: InternalError (HTTP 500)"}]
    marker = {"job": "ldv1", "w_id": "W22084", "i_id": "I0885", "version": "def456", "nb_errors": 4,
              "errors_by_type": {"corrupt_image": 1, "missing_object": 2, "s3_error": 1}, "errors": errors}
    stack.s3.put_object(Bucket=DEST_BUCKET, Key=artifacts.success_key("ldv1", "W22084", "I0885", "def456"),
                        Body=artifacts.success_bytes(marker))
    stack.db.execute("UPDATE task_executions SET nb_errors = 4 WHERE volume_id = 6")
    out = ok("jobs", "errors", "ldv1", "--volume", "W22084/I0885")
    assert out.splitlines()[0] == "Recent Failed Tasks: ldv1 (id=1), volume W22084/I0885"
    assert "I0880" not in out and "I0884" not in out  # other volumes' failures and markers left out
    pages = out.split("Most common page errors:")[1]
    types = [[c.strip() for c in line.split("│")[1:-1]] for line in pages.split("Page errors of")[0].splitlines()
             if line.startswith("│") and "_" in line]
    assert types == [["missing_object", "deterministic", "2", "1"], ["corrupt_image", "deterministic", "1", "1"],
                     ["s3_error", "transient", "1", "1"]]
    listing = pages.split("Page errors of W22084/I0885 version def456 (done at attempt 1): 4 of 10 pages")[1]
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in listing.splitlines()
            if line.startswith("│") and line.split("│")[1].strip()]
    assert [r[:4] for r in rows if r[0] != "Error Type"][:3] == [
        ["corrupt_image", "deterministic", "decode", "#1 I08850002.jpg"],
        ["missing_object", "deterministic", "fetch", "#4 I08850005.jpg"],
        ["s3_error", "transient", "fetch", "#9 I08850010.jpg"]]
    assert ("(the first 3 are listed; every failed page is a row with ok = false in "
            f"s3://{DEST_BUCKET}/ldv1/W22084/I0885/def456/W22084-I0885-def456.parquet)") in out.replace("\n", "")
    # a volume with failed attempts only
    out = ok("jobs", "errors", "ldv1", "--volume", "W22084,I0880")
    assert "3 of 8 pages failed" in out and "none (no done task has page errors)" in out


def test_errors_volume_filter_is_validated_before_any_service():
    from clihelp import fails

    assert "invalid work id" in fails("jobs", "errors", "ldv1", "--volume", "W1';DROP/I1")
    assert "expected W_ID/I_ID" in fails("jobs", "errors", "ldv1", "--volume", "W22084")


def test_stats_count_volumes_done_with_page_errors(stack):
    seed_failures(stack)
    out = ok("jobs", "stats", "ldv1")
    assert "  Volumes Done with Page Errors: 3 (6 error rows; see `bec jobs errors`)" in out
