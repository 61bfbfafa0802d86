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

from bec.edges import artifacts
from bec.devstack.volumes import ensure_bucket
from clihelp import ok
from conftest import DEST_BUCKET

BEC = str(Path(sys.executable).with_name("bec"))


def seed(stack, queued: int = 3) -> None:
    """ldv1: 200 pages claimed 3 min ago and done 2 min ago, 198 pages 10 min ago, 400 pages
    2 hours ago; one volume running under a live worker, one (10,000 pages) under a worker
    killed 3 hours ago; queued volumes."""
    ok("jobs", "create", "--name", "ldv1")
    db = stack.db
    db.execute("INSERT INTO workers (worker_name, hostname, job_id) VALUES ('w-live', 'h1', 1)")
    db.execute("INSERT INTO workers (worker_name, hostname, job_id, last_heartbeat_at) "
               "VALUES ('w-killed', 'h2', 1, now() - interval '3 hours')")
    for n in range(5):
        db.execute("INSERT INTO volumes (bdrc_w_id, bdrc_i_id) VALUES ('W22084', %s)", (f"I088{n}",))
    for vol, images, ago in ((1, 200, "2 minutes"), (2, 198, "10 minutes"), (3, 400, "2 hours")):
        db.execute("INSERT INTO task_executions (job_id, volume_id, s3_etag, status, total_images, nb_errors, "
                   "total_duration_ms, started_at, done_at) VALUES (1, %s, 'abc123', 'done', %s, 0, 1000, "
                   "now() - %s::interval - interval '1 minute', now() - %s::interval)", (vol, images, ago, ago))
    db.execute("INSERT INTO task_executions (job_id, volume_id, s3_etag, status, worker_id, total_images) "
               "VALUES (1, 4, 'abc123', 'running', 1, 300), (1, 5, 'abc123', 'running', 2, 10000)")
    url = db.row("SELECT queue_url FROM jobs")["queue_url"]
    for n in range(queued):
        stack.sqs.send_message(QueueUrl=url, MessageBody=f'{{"n": {n}}}')


def table_of(out: str) -> dict[str, list[str]]:
    return {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.startswith("│")}


def test_watch_shows_the_table_throughput_and_eta(stack):
    seed(stack)
    out = ok("jobs", "stats", "ldv1", "--watch", "--interval", "0.1", "--iterations", "1")
    assert out.startswith("Job Statistics: ldv1 (id=1)")
    assert "Task Execution Status" in out and "Overall Totals:" in out
    table = table_of(out)
    assert table["done"][:2] == ["3", "798"] and table["running"][:2] == ["1", "300"]
    assert table["stalled"][:2] == ["1", "10000"]
    # The first figure: the pages of the volumes done in the last 5 minutes over the time
    # since the first of them was claimed (3 min), not over the whole window (0.67 pages/s).
    assert re.search(r"  Pages/s: 1\.1[01] \(1 volume done in the last 3m 0\ds of work\)", out), out
    assert "  Avg Pages per Volume: 266.0" in out                   # 798 / 3
    assert "  Workers: 1 live" in out
    assert "  Queue: 3 volumes (3 visible, 0 in flight)" in out
    # 3 volumes × 266 pages ÷ 1.11 pages/s ≈ 720 s
    assert re.search(r"  ETA: 1[12]m \d\ds \(3 × 266\.0 pages ÷ 1\.1[01] pages/s\)", out), out
    assert "Ctrl-C to exit" in out


def test_watch_measures_between_refreshes(stack):
    seed(stack)
    out = ok("jobs", "stats", "ldv1", "--watch", "--interval", "0.1", "--iterations", "3")
    last = out.split("Throughput:")[-1]
    # nothing was done between the refreshes: the first figure, barely lowered (0.1 s of 60 s)
    assert re.search(r"  Pages/s: 1\.1\d \(between refreshes, smoothed over ~60 s\)", last), last


def test_smoothed_rate_follows_the_pages_done_between_refreshes():
    from bec.present.throughput import SmoothedRate

    rate = SmoothedRate(time_constant_s=60)
    assert rate.update(1000.0, 5000, first_estimate=0.4) == 0.4 and not rate.measured
    # 8 pages/s for a minute, one refresh every 5 s, a 40-page volume done every 5 s
    for k in range(1, 13):
        rate.update(1000.0 + 5 * k, 5000 + 40 * k)
    assert rate.measured and 5.0 < rate.rate < 8.0      # 63 % of the way after one time constant
    for k in range(13, 49):
        rate.update(1000.0 + 5 * k, 5000 + 40 * k)
    assert 7.8 < rate.rate <= 8.0
    # a volume-grained burst moves it a little, not to 200 pages in 5 s = 40 pages/s
    rate.update(1000.0 + 5 * 49, 5000 + 40 * 48 + 200)
    assert rate.rate < 11
    # the workers stopped: it decays towards 0; a deleted task (fewer pages) is no negative rate
    for k in range(50, 200):
        rate.update(1000.0 + 5 * k, 5000 + 40 * 48)
    assert rate.rate < 0.01
    rate.update(1000.0 + 5 * 200, 0)
    assert rate.rate >= 0


def test_watch_without_recent_work_or_queue(stack):
    seed(stack, queued=0)
    out = ok("jobs", "stats", "ldv1", "--watch", "--interval", "0.1", "--iterations", "1")
    assert "  ETA: done (queue empty)" in out
    stack.db.execute("UPDATE task_executions SET done_at = now() - interval '1 day'")
    stack.sqs.send_message(QueueUrl=stack.db.row("SELECT queue_url FROM jobs")["queue_url"], MessageBody="{}")
    out = ok("jobs", "stats", "ldv1", "--watch", "--iterations", "1")
    assert "  Pages/s: — (no volume done in the last 5 minutes)" in out, out
    assert "  Queue: 1 volume (1 visible, 0 in flight)" in out     # not "1 volumes"
    assert "  ETA: - (no pages done lately)" in out


def test_watch_says_when_no_live_worker_serves_the_job(stack):
    """The workers stopped (or were killed): no ETA, and the view says why. It used to show
    an ETA from the last five minutes' rate with nobody working."""
    seed(stack)
    stack.db.execute("UPDATE workers SET stopped_at = now() WHERE worker_name = 'w-live'")
    out = ok("jobs", "stats", "ldv1", "--watch", "--iterations", "1")
    assert "  Workers: none live (no worker of this job heartbeated in the last 60 s)" in out
    assert "  ETA: - (no live worker serves this job)" in out
    table = table_of(out)
    assert table["running"][0] == "0" and table["stalled"][:2] == ["2", "10300"]


def test_stats_do_not_count_a_dead_workers_tasks_as_running(stack, monkeypatch):
    """3 hours after a kill -9 its tasks said "running 2 / 10000 images", and Total Images
    counted them: they are stalled (nobody's work until taken over), not in Total Images."""
    seed(stack)
    out = ok("jobs", "stats", "ldv1")
    table = table_of(out)
    assert table["running"][:2] == ["1", "300"] and table["stalled"][:2] == ["1", "10000"]
    assert list(table) == ["running", "stalled", "done", "retryable_failed", "terminal_failed"]
    assert "  Total Tasks: 5" in out and "  Total Images: 1098" in out    # 798 done + 300 running
    # the threshold is the workers' own --stale-after (BEC_STALE_AFTER), or the option
    out = ok("jobs", "stats", "ldv1", "--stale-after", str(4 * 3600))
    assert table_of(out)["running"][:2] == ["2", "10300"] and "stalled" not in table_of(out)
    monkeypatch.setenv("BEC_STALE_AFTER", str(4 * 3600))
    assert "stalled" not in table_of(ok("jobs", "stats", "ldv1"))


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
    assert "Task Execution Status" in out and "Pages/s: " in out


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
