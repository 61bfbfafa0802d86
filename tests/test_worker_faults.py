"""The worker under faults: killed children, killed supervisor, signals, competing workers."""
from __future__ import annotations

import collections
import signal
import time

import psutil
import pytest

from workerkit import (no_shm_leak,  # noqa: F401 - fixture
                       add_repeated_folder_volume, add_repeated_volume, add_volumes, enqueue, long_volumes, queue_counts, read_parquet, run_worker, setup_job,
                       start_worker, tasks)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_shm_leak")]


def assert_all_done_once(stack, vols, pages):
    rows = tasks(stack)
    by_volume = collections.Counter((r["w_id"], r["i_id"]) for r in rows)
    assert set(by_volume) == set(vols) and set(by_volume.values()) == {1}, rows
    for row in rows:
        assert row["status"] == "done", row
        assert row["total_images"] == pages and row["nb_errors"] == 0
        parquet = read_parquet(stack, row["w_id"], row["i_id"], row["s3_etag"])
        assert len(parquet) == pages and all(p["ok"] for p in parquet)
    return rows


def signal_twice(run, after: str) -> float:
    """SIGTERM, then SIGINT once ``after`` is logged: the seconds the worker takes to exit 0."""
    run.signal(signal.SIGTERM)
    run.wait_for(after, timeout=10)
    run.signal(signal.SIGINT)
    started = time.monotonic()
    assert run.wait(60) == 0, run.output
    return time.monotonic() - started


@pytest.mark.parametrize("role", ["fetch-0", "infer-0", "post-0", "controller"])
def test_kill_9_of_a_child_mid_volume(stack, role):
    q = setup_job(stack)
    vols = add_volumes(stack, 3, pages=16)
    enqueue(stack, q["queue"], vols)
    run = start_worker(stack)
    kids = run.wait_children(["controller", "fetch-0", "infer-0", "post-0"])
    run.wait_for("Processing message", timeout=60)
    victim = kids[role]
    victim.kill()
    died_at = time.monotonic()
    run.wait_for(f"{role} (pid {victim.pid}) died", timeout=10)
    assert time.monotonic() - died_at < 5.0
    assert run.wait(180) == 0, run.output
    rows = assert_all_done_once(stack, vols, 16)
    if role == "controller":
        assert max(r["attempt"] for r in rows) <= 2  # in-flight volumes were released and re-claimed
    else:
        assert all(r["attempt"] == 1 for r in rows)  # pages redone inside the same claim
    assert not [k for k in kids.values() if k.is_running()]  # no process outlives the worker
    assert queue_counts(stack, q["queue"]) == (0, 0)


def test_kill_9_of_the_supervisor_leaves_no_orphans_and_work_is_taken_over(stack, tmp_path):
    q = setup_job(stack)
    vols = add_volumes(stack, 3, pages=12)
    enqueue(stack, q["queue"], vols)
    tmp = {"TMPDIR": str(tmp_path)}  # where the workers' metrics folders go
    run = start_worker(stack, "--visibility-timeout", "4", env=tmp)
    kids = run.wait_children(["controller", "fetch-0", "infer-0", "post-0"])
    run.wait_for("Processing message", timeout=60)
    run.process.kill()
    run.process.wait(10)
    gone, alive = psutil.wait_procs(list(kids.values()), timeout=5)
    assert not alive, f"orphans: {alive}"
    left = list(tmp_path.glob(f"bec-metrics-{run.process.pid}-*"))
    assert len(left) == 1 and any(left[0].glob("*.db"))  # nobody could clean it up ...
    # a second worker takes the volumes over once the first one's heartbeat is stale
    second = run_worker(stack, "--stale-after", "6", "--shutdown-after-empty", "12", env=tmp)
    rows = assert_all_done_once(stack, vols, 12)
    assert {r["worker_id"] for r in rows} <= {1, 2}
    assert "Processing message" in second.output
    assert not list(tmp_path.glob("bec-metrics-*"))  # ... until the next start (and its own at its end)


def test_sigterm_drains_and_exits_0(stack):
    q = setup_job(stack)
    vols = add_volumes(stack, 4, pages=10)
    enqueue(stack, q["queue"], vols)
    run = start_worker(stack, "--max-volumes-in-flight", "1", "--grace", "60", "--shutdown-after-empty", "0")
    run.wait_for("Processing message", timeout=60)
    run.signal(signal.SIGTERM)
    assert run.wait(90) == 0, run.output
    assert "Draining" in run.output and "Worker completed successfully (drained)" in run.output
    first = tasks(stack)
    assert first and all(r["status"] == "done" for r in first)  # in flight → finished, not dropped
    worker = stack.db.row("SELECT stopped_at FROM workers WHERE worker_id = 1")
    assert worker["stopped_at"] is not None
    run_worker(stack)
    assert_all_done_once(stack, vols, 10)


def test_sigterm_with_no_grace_releases_in_flight_volumes(stack):
    q = setup_job(stack)
    vols = long_volumes(stack, 2, pages=120)
    enqueue(stack, q["queue"], vols)
    run = start_worker(stack, "--grace", "0", "--shutdown-after-empty", "0")
    run.wait_for("Processing message", timeout=60)
    run.signal(signal.SIGTERM)
    assert run.wait(60) == 0, run.output
    assert "Released volume" in run.output
    released = [r for r in tasks(stack) if r["status"] == "retryable_failed"]
    assert released and all("released" in r["error_reason"] for r in released)
    visible, in_flight = queue_counts(stack, q["queue"])
    assert visible >= len(released) and in_flight == 0  # visible again at once
    run_worker(stack)
    rows = assert_all_done_once(stack, vols, 120)
    assert any(r["attempt"] == 2 for r in rows)


def test_second_signal_releases_at_once(stack):
    q = setup_job(stack)
    vols = long_volumes(stack, 2, pages=120)
    enqueue(stack, q["queue"], vols)
    run = start_worker(stack, "--grace", "300", "--shutdown-after-empty", "0")
    run.wait_for("Processing message", timeout=60)
    assert signal_twice(run, after="Draining") < 30
    assert "Second signal" in run.output


def test_a_drain_hands_back_what_the_receive_in_flight_brings(stack):
    """SQS cannot cancel a long poll: a message arriving while a drained worker's last poll is
    still open would be hidden for the visibility timeout, with nobody to process it. The
    worker waits for that poll and makes what it brings visible again; a second signal does
    not wait."""
    q = setup_job(stack)
    vols = add_volumes(stack, 1, pages=1)
    run = start_worker(stack, "--poll-wait", "5", "--shutdown-after-empty", "0")
    run.wait_for("processes ready", timeout=60)
    time.sleep(0.5)  # a 5 s poll is open
    run.signal(signal.SIGTERM)
    run.wait_for("Waiting up to 7 s for the last SQS receive", timeout=10)
    enqueue(stack, q["queue"], vols)  # taken by that poll
    assert run.wait(30) == 0, run.output
    assert queue_counts(stack, q["queue"]) == (1, 0) and tasks(stack) == []
    # handed back as a fresh copy: a drain is not the message's fault, and spends none of its receives
    assert stack.sqs.receive_message(QueueUrl=q["queue"], AttributeNames=["ApproximateReceiveCount"],
                                     WaitTimeSeconds=1)["Messages"][0]["Attributes"]["ApproximateReceiveCount"] == "1"

    run = start_worker(stack, "--poll-wait", "20", "--shutdown-after-empty", "0")  # the queue is empty
    run.wait_for("processes ready", timeout=60)
    assert signal_twice(run, after="Waiting up to 22 s") < 5


def test_two_workers_on_one_queue_process_each_volume_once(stack):
    q = setup_job(stack)
    vols = add_volumes(stack, 6, pages=4)
    enqueue(stack, q["queue"], vols + vols[:3])  # with some duplicates for good measure
    # A duplicate of a volume running elsewhere is looked at again stale_after + 2 s later, and
    # a worker waits for it before counting empty polls: a short stale_after keeps this short.
    first = start_worker(stack, "--shutdown-after-empty", "3", "--stale-after", "10")
    second = start_worker(stack, "--shutdown-after-empty", "3", "--stale-after", "10")
    assert first.wait(180) == 0 and second.wait(180) == 0
    assert_all_done_once(stack, vols, 4)
    processed = first.output.count("Successfully processed") + second.output.count("Successfully processed")
    assert processed == 6
    assert all(r["attempt"] == 1 for r in tasks(stack))


def test_visibility_is_extended_for_long_volumes(stack, tmp_path):
    """A volume taking several visibility timeouts is never handed to the other live worker."""
    q = setup_job(stack)
    vols = [("W1", "I1")]
    # 1,000 pages: ~9 s here at ~110 null-model pages/s, over two 2 s visibility timeouts even
    # on a host twice as fast (240 pages took 3.7 s once the CPU pipeline got faster). The pages
    # come from a folder: this test is about SQS, and uploading them to moto took 16 s.
    archive = tmp_path / "archive"
    add_repeated_folder_volume(archive, "W1", "I1", 1000)
    enqueue(stack, q["queue"], vols)
    source = ("--s3-source-bucket", f"file://{archive}")
    first = start_worker(stack, *source, "--visibility-timeout", "2", "--shutdown-after-empty", "4")
    first.wait_for("Processing message", timeout=60)
    second = start_worker(stack, *source, "--visibility-timeout", "2", "--shutdown-after-empty", "4")
    assert first.wait(180) == 0 and second.wait(180) == 0
    rows = assert_all_done_once(stack, vols, 1000)
    assert rows[0]["attempt"] == 1 and rows[0]["total_duration_ms"] > 2 * 2000
    assert "Processing message" not in second.output


def test_a_child_that_keeps_dying_stops_the_worker_with_an_error(stack):
    q = setup_job(stack)
    vols = add_volumes(stack, 1, pages=2)
    enqueue(stack, q["queue"], vols)
    run = start_worker(stack, "--shutdown-after-empty", "0")
    kills = 0
    deadline = time.monotonic() + 90
    while run.process.poll() is None and time.monotonic() < deadline:
        victim = run.children().get("post-0")
        if victim is not None:
            try:
                victim.kill()
                kills += 1
            except psutil.Error:
                pass
            time.sleep(0.3)
        time.sleep(0.05)
    assert run.wait(30) == 1, run.output
    assert "post-0 crashed 6 times" in run.output and kills >= 6
    worker = stack.db.row("SELECT stopped_at FROM workers")
    assert worker["stopped_at"] is not None
    # whatever it held went back to SQS
    visible, in_flight = queue_counts(stack, q["queue"])
    assert tasks(stack) == [] or all(r["status"] in ("done", "retryable_failed") for r in tasks(stack))


def test_heartbeat_advances_while_working(stack):
    q = setup_job(stack)
    add_repeated_volume(stack, "W1", "I1", 200)
    enqueue(stack, q["queue"], [("W1", "I1")])
    run = start_worker(stack, "--shutdown-after-empty", "0")
    run.wait_for("Processing message", timeout=60)
    time.sleep(6)
    row = stack.db.row("SELECT extract(epoch FROM last_heartbeat_at - started_at) AS beat, stopped_at FROM workers")
    assert row["stopped_at"] is None and row["beat"] >= 4
    run.signal(signal.SIGTERM)
    assert run.wait(60) == 0


def test_a_volume_held_by_a_worker_that_goes_silent_is_taken_over_by_a_running_worker(stack):
    """The message of a volume running elsewhere is looked at again once the holder could be stale."""
    from bec.control import tasks as task_sql
    from bec.edges.archive import read_manifest
    from workerkit import SOURCE_BUCKET

    q = setup_job(stack)
    [(w, i)] = vols = add_volumes(stack, 1, pages=3)
    job_id = stack.db.row("SELECT id FROM jobs")["id"]
    manifest = read_manifest(stack.s3, SOURCE_BUCKET, w, i)
    volume_id = task_sql.ensure_volume(stack.db, w, i, manifest.version, len(manifest.entries))
    holder = task_sql.register_worker(stack.db, "holder", job_id, {})
    assert task_sql.claim(stack.db, job_id, volume_id, manifest.version, holder, 3) is not None
    enqueue(stack, q["queue"], vols)
    # The holder beats until the worker has seen its claim (a worker slow to start would find
    # it stale at the first receive), then goes silent: stale 5 s later. The worker only goes
    # on polling for 12 s with nothing visible.
    run = start_worker(stack, "--stale-after", "5", "--shutdown-after-empty", "12")
    deadline = time.monotonic() + 60
    while "running elsewhere" not in run.output:
        assert time.monotonic() < deadline and run.process.poll() is None, run.output
        task_sql.heartbeat(stack.db, holder)
        time.sleep(0.5)
    assert run.wait(120) == 0, run.output
    rows = assert_all_done_once(stack, vols, 3)
    assert rows[0]["attempt"] == 2 and rows[0]["worker_id"] != holder
    assert queue_counts(stack, q["queue"]) == (0, 0)


def test_a_signal_while_the_controller_restarts_still_drains(stack):
    """SIGTERM while the controller is being restarted (its mailbox not bound yet): the drain
    is told again until it is heard. Before, it was sent once and lost, and the worker went on
    taking volumes until the hard deadline (grace + 30 s), then cut them off."""
    q = setup_job(stack)
    run = start_worker(stack, "--grace", "30", "--shutdown-after-empty", "0")
    run.wait_for("processes ready", timeout=60)
    run.wait_children(["controller"])["controller"].kill()
    run.wait_for("controller (pid", timeout=10)  # died; restarted after a back-off
    run.signal(signal.SIGTERM)
    started = time.monotonic()
    assert run.wait(45) == 0, run.output
    assert time.monotonic() - started < 25, run.output
    assert "did not finish within the grace period" not in run.output
    assert "Worker completed successfully (drained)" in run.output, run.output
    assert queue_counts(stack, q["queue"]) == (0, 0)


def test_shutdown_after_empty_waits_for_a_message_in_back_off(stack):
    """A retried volume's message is hidden for its back-off; the polls meanwhile are empty.
    A worker run with --shutdown-after-empty counted them and exited, and the message came
    back to a queue nobody polled. Now it waits for it (every page GET answers S3's 500 on the
    first attempt, through a proxy; botocore's retries are spent; the volume is retried)."""
    from faultproxy import FaultProxy

    q = setup_job(stack)
    vols = add_volumes(stack, 1, pages=2)
    enqueue(stack, q["queue"], vols)
    failing = [True]
    proxy = FaultProxy(stack.moto.url, lambda method, path: failing[0] and method == "GET"
                       and "/images/" in path and not path.endswith("dimensions.json"))
    try:
        run = start_worker(stack, "--retry-delay", "5", env={"AWS_ENDPOINT_URL_S3": proxy.url})
        deadline = time.monotonic() + 150
        while not stack.db.row("SELECT 1 AS x FROM task_executions WHERE status = 'retryable_failed'"):
            assert time.monotonic() < deadline and run.process.poll() is None, run.output
            time.sleep(0.1)
        failing[0] = False
        assert run.wait(120) == 0, run.output
    finally:
        proxy.close()
    assert proxy.failed >= 2
    assert "waiting for it before counting empty polls" in run.output
    rows = assert_all_done_once(stack, vols, 2)
    assert rows[0]["attempt"] == 2
    assert queue_counts(stack, q["queue"]) == (0, 0)
