"""The DLQ holds only real faults (issue 20): permissions, outages and lost replies that used to
send healthy work there. Real `bec worker` processes, real PostgreSQL and moto; what moto
cannot do (403 on a missing key, expired credentials, a reset connection, a lost reply) is
injected by the proxies of ``faultproxy``."""
from __future__ import annotations

import os
import time

import pytest

from bec.edges.archive import volume_prefix
from bec.edges.artifacts import success_key
from bec.devstack.volumes import put_manifest
from conftest import DEST_BUCKET, SOURCE_BUCKET
from dbfaults import read_only_database
from faultproxy import DENY_MISSING, EXPIRED, PASS, RESET, PgReplyCutter, S3FaultProxy
from workerkit import (no_shm_leak,  # noqa: F401 - fixture
                       JOB, add_repeated_volume, add_volumes, enqueue, manifest, queue_counts, read_parquet, setup_job,
                       start_worker, tasks)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_shm_leak")]


@pytest.fixture
def s3_proxy(stack):
    proxy = S3FaultProxy(stack.moto.url)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("deny_head_bucket", [True, False], ids=["head-bucket-denied", "get-only-denied"])
def test_without_list_bucket_the_worker_refuses_to_start(stack, s3_proxy, deny_head_bucket):
    """Without s3:ListBucket, S3 answers a GET of a missing key with 403 AccessDenied (moto does
    not; the proxy does). Every first-time volume then failed its success.json check and went
    to the DLQ after 3 receives. The worker now proves at start that a missing key reads 404,
    and refuses, in one line, before it registers or receives."""
    q = setup_job(stack)
    enqueue(stack, q["queue"], add_volumes(stack, 1, pages=2))
    s3_proxy.mode, s3_proxy.deny_head_bucket = DENY_MISSING, deny_head_bucket
    run = start_worker(stack, env={"AWS_ENDPOINT_URL_S3": s3_proxy.url})
    assert run.wait(60) == 1, run.output
    errors = [line for line in run.lines if line.startswith("Error:")]
    assert len(errors) == 1 and "s3:ListBucket" in errors[0], run.output
    assert "archive.tbrc.org" in errors[0] and "Traceback" not in run.output
    assert "Starting BEC Worker" not in run.output
    assert queue_counts(stack, q["queue"]) == (1, 0) and queue_counts(stack, q["dlq"]) == (0, 0)
    assert tasks(stack) == [] and stack.db.row("SELECT count(*) AS n FROM workers")["n"] == 0


# -- 6. a page that crashes its decoder becomes an error row ------------------------------------
CRASHING_PLUGIN = '''
"""Test only: a Pillow plugin whose decoder dereferences NULL, as a bug in libtiff would."""
import ctypes

from PIL import Image, ImageFile


class CrashingImage(ImageFile.ImageFile):
    format = "BECCRASH"

    def _open(self):
        ctypes.string_at(0)  # a segmentation fault, in this very thread


Image.register_open("BECCRASH", CrashingImage, lambda prefix: prefix[:8] == b"BECCRASH")
'''


def test_a_page_that_crashes_its_decoder_becomes_an_error_row(stack, tmp_path):
    """Before: a page whose holder died was requeued with no limit; the fetch process crashed
    on it until the supervisor gave up on the role (5 crashes in 300 s) and stopped the worker,
    releasing every volume in flight, and so on, on every worker that took the volume. Now
    its second crash makes it an error row (decode/crashed_decoder) and the worker goes on."""
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "sitecustomize.py").write_text(CRASHING_PLUGIN)
    q = setup_job(stack, {"max_error_ratio": 0.5})
    [(w, i)] = add_volumes(stack, 1, pages=6)
    bad = manifest(stack, w, i)[3]["filename"]
    stack.s3.put_object(Bucket=SOURCE_BUCKET, Key=volume_prefix(w, i) + bad, Body=b"BECCRASH" + b"\0" * 64)
    enqueue(stack, q["queue"], [(w, i)])
    path = os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])
    run = start_worker(stack, env={"PYTHONPATH": path})
    assert run.wait(120) == 0, run.output
    assert run.output.count("fetch-0 (pid") == 2 and "crashed 6 times" not in run.output, run.output
    [row] = tasks(stack)
    assert (row["status"], row["attempt"], row["nb_errors"]) == ("done", 1, 1), row
    pages = read_parquet(stack, w, i, row["s3_etag"])
    assert [p["ok"] for p in pages] == [True, True, True, False, True, True]
    assert (pages[3]["img_file_name"], pages[3]["error_stage"], pages[3]["error_type"]) == (bad, "decode", "crashed_decoder"), run.output
    assert queue_counts(stack, q["dlq"]) == (0, 0)


# -- 2. a claim whose reply is lost -----------------------------------------------------------
def test_a_claim_whose_reply_is_lost_is_found_again(stack):
    """PostgreSQL commits the claim and the connection breaks before the reply arrives (the
    proxy cuts it). Before: the admission gave up with no task id and released the message,
    leaving the row running under this live worker (another worker found it "running
    elsewhere" until the message reached the DLQ; this one claimed it again, attempt 2). Now
    the message is held and admitted again once the database answers: the same claim finds
    its own row."""
    q = setup_job(stack)
    vols = add_volumes(stack, 1, pages=3)
    enqueue(stack, q["queue"], vols)
    proxy = PgReplyCutter(stack.db_params.host, stack.db_params.port)
    try:
        proxy.cut_reply_to("'running', 1, $")  # the claim's INSERT … VALUES (…, 'running', 1, $4, …)
        run = start_worker(stack, "--shutdown-after-empty", "3", env={"BEC_SQL_PORT": str(proxy.port)})
        assert run.wait(120) == 0, run.output
    finally:
        proxy.close()
    assert proxy.cuts == 1, run.output
    assert "kept until the database answers" in run.output and "Traceback" not in run.output, run.output
    [row] = tasks(stack)
    assert (row["status"], row["attempt"]) == ("done", 1), row
    assert queue_counts(stack, q["queue"]) == (0, 0) and queue_counts(stack, q["dlq"]) == (0, 0)


# -- 3. an S3 outage, or expired credentials ----------------------------------------------------
@pytest.mark.parametrize("mode", [EXPIRED, RESET])
def test_an_s3_outage_pauses_the_worker_and_sends_nothing_to_the_dlq(stack, s3_proxy, mode):
    """S3 answers every request with ExpiredToken, or resets every connection, for a while.
    Before: pages failed as s3_error, volumes were retried and admissions failed, each
    spending a receive: within seconds the queue was in the DLQ. Now the worker gives its
    volumes back unspent, receives nothing, probes, and resumes when S3 answers."""
    q = setup_job(stack)
    add_repeated_volume(stack, "W1", "I1", 150)
    vols = [("W1", "I1")] + add_volumes(stack, 2, pages=3)
    enqueue(stack, q["queue"], vols)
    run = start_worker(stack, "--shutdown-after-empty", "3", "--max-volumes-in-flight", "2",
                       env={"AWS_ENDPOINT_URL_S3": s3_proxy.url})
    run.wait_for("Processing message: ", timeout=60)
    s3_proxy.mode = mode
    run.wait_for("S3 is unavailable", timeout=90)
    time.sleep(8)  # the outage goes on: probes fail, nothing is received
    assert queue_counts(stack, q["dlq"]) == (0, 0)
    assert "Successfully processed" not in run.output.split("S3 is unavailable")[1]
    s3_proxy.mode = PASS
    assert run.wait(180) == 0, run.output
    assert "S3 answers again: receiving resumes" in run.output and "Traceback" not in run.output
    rows = tasks(stack)
    assert sorted((r["w_id"], r["i_id"]) for r in rows) == sorted(vols), rows
    assert all(r["status"] == "done" and r["nb_errors"] == 0 for r in rows), rows
    assert queue_counts(stack, q["queue"]) == (0, 0) and queue_counts(stack, q["dlq"]) == (0, 0)


def version_of(stack, w: str, i: str) -> str:
    return stack.db.row("SELECT last_s3_etag FROM volumes WHERE bdrc_w_id = %s AND bdrc_i_id = %s", (w, i))["last_s3_etag"]


def wait_for_object(stack, bucket: str, key: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while stack.s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) == 0:
        assert time.monotonic() < deadline, f"no s3://{bucket}/{key} within {timeout} s"
        time.sleep(0.2)


# -- 4. a database that turned read-only ----------------------------------------------------------
def test_a_read_only_database_is_waited_out_by_the_heartbeat_and_a_finishing_volume(stack):
    """What a worker connected to a demoted writer sees: ReadOnlySqlTransaction on every write.
    Before: it killed the heartbeat thread for good (the worker looked dead while it worked,
    and another could take its volume over), and wedged a finishing volume (success.json
    written, row running, message extended for ever)."""
    q = setup_job(stack)
    add_repeated_volume(stack, "W1", "I1", 150)
    enqueue(stack, q["queue"], [("W1", "I1")])
    run = start_worker(stack, "--shutdown-after-empty", "3")
    run.wait_for("Processing message: ", timeout=60)
    with read_only_database(stack.db_params) as admin:
        wait_for_object(stack, DEST_BUCKET, success_key(JOB, "W1", "I1", version_of(stack, "W1", "I1")))
        time.sleep(6)  # a heartbeat and the "done" write fail meanwhile
        assert admin.execute("SELECT status::text FROM task_executions").fetchone()[0] == "running"
        assert queue_counts(stack, q["queue"]) == (0, 1)       # the message is still held
        reset_at = admin.execute("SELECT now()").fetchone()[0]
    assert run.wait(120) == 0, run.output
    assert "Traceback" not in run.output and "Exception in thread" not in run.output, run.output
    [row] = tasks(stack)
    assert (row["status"], row["attempt"]) == ("done", 1), row
    assert queue_counts(stack, q["queue"]) == (0, 0) and queue_counts(stack, q["dlq"]) == (0, 0)
    beat = stack.db.row("SELECT last_heartbeat_at, stopped_at FROM workers")
    assert beat["last_heartbeat_at"] >= reset_at  # the heartbeat lived through it


def test_a_dead_controllers_messages_wait_for_its_rows_to_be_released(stack):
    """The controller dies while the database is read-only: its running rows cannot be
    released. Before: the supervisor freed its messages all the same; the restarted controller
    took them again and again (its admissions failing), and they reached the DLQ while the row
    said running. Now the messages wait (hidden) until the rows are released, and the new
    controller starts only then."""
    q = setup_job(stack)
    add_repeated_volume(stack, "W1", "I1", 400)
    enqueue(stack, q["queue"], [("W1", "I1")])
    run = start_worker(stack, "--shutdown-after-empty", "3")
    kids = run.wait_children(["controller"])
    run.wait_for("Processing message: ", timeout=60)
    with read_only_database(stack.db_params):
        kids["controller"].kill()
        run.wait_for("controller (pid", timeout=10)
        time.sleep(8)  # its release is tried, and fails, every 5 s
        assert queue_counts(stack, q["queue"]) == (0, 1) and queue_counts(stack, q["dlq"]) == (0, 0)
        assert "are not released until it can" in run.output
    assert run.wait(180) == 0, run.output
    [row] = tasks(stack)
    assert (row["status"], row["attempt"]) == ("done", 2), row
    assert queue_counts(stack, q["queue"]) == (0, 0) and queue_counts(stack, q["dlq"]) == (0, 0)


# -- 10. a volume rewritten while it runs ----------------------------------------------------------
def test_a_volume_rewritten_while_it_runs_is_not_mixed_but_processed_at_its_new_version(stack):
    """The archive rewrites a volume (new images, then a new manifest) while a worker processes
    it. Before: page GETs were not pinned to the manifest read, so the result of the old
    version mixed in new images, and was recorded done; the new version waited for a message
    that never came. Now a page modified after the manifest was read is refused, the volume is
    given back unspent, and processed again at its new version."""
    q = setup_job(stack)
    add_repeated_volume(stack, "W1", "I1", 400)
    entries = manifest(stack, "W1", "I1")
    enqueue(stack, q["queue"], [("W1", "I1")])
    run = start_worker(stack, "--shutdown-after-empty", "10", "--stale-after", "3")
    run.wait_for("Processing message: ", timeout=60)
    time.sleep(1.5)  # S3 keeps modification times in whole seconds
    prefix = volume_prefix("W1", "I1")
    last = entries[-1]["filename"]
    new_image = stack.s3.get_object(Bucket=SOURCE_BUCKET, Key=prefix + entries[0]["filename"])["Body"].read() + b"\0"
    stack.s3.put_object(Bucket=SOURCE_BUCKET, Key=prefix + last, Body=new_image)
    new_version = put_manifest(stack.s3, SOURCE_BUCKET, "W1", "I1", entries[:-1] + [{**entries[-1], "width": 1}])
    assert run.wait(180) == 0, run.output
    assert "the volume changed while it ran" in run.output, run.output
    rows = {r["s3_etag"]: r for r in tasks(stack)}
    assert new_version in rows and rows[new_version]["status"] == "done", (rows, run.output)
    old = [r for v, r in rows.items() if v != new_version]
    assert [r["status"] for r in old] == ["retryable_failed"] and "changed while it ran" in old[0]["error_reason"]
    listed = {o["Key"] for o in stack.s3.list_objects_v2(Bucket=DEST_BUCKET).get("Contents", [])}
    assert all(f"/{new_version}/" in key for key in listed), listed  # nothing written for the old version
    pages = read_parquet(stack, "W1", "I1", new_version)
    head = stack.s3.head_object(Bucket=SOURCE_BUCKET, Key=prefix + last)
    assert pages[-1]["source_etag"] == head["ETag"].strip('"')
    assert queue_counts(stack, q["queue"]) == (0, 0) and queue_counts(stack, q["dlq"]) == (0, 0)
