"""The worker when its infrastructure misbehaves: PostgreSQL restarts, the S3/SQS endpoint
disappears (and comes back empty), the database runs out of connections, S3 turns slow.

Each scenario runs a real `bec worker` and checks the one property that matters: the
worker does not crash, and no volume is lost or done twice.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from bec.control import queues
from bec.edges import artifacts
from bec.edges.archive import MANIFEST, volume_prefix
from bec.config import DbParams
from bec.control.db import Database
from bec.devstack import moto as motostack
from bec.devstack import postgres as pgstack
from bec.devstack.volumes import ensure_bucket
from bec.control.ids import queue_names
from faultproxy import TcpProxy
from conftest import DEST_BUCKET, SOURCE_BUCKET, Stack, stack_env
from workerkit import (JOB, add_repeated_volume, add_volumes, enqueue, long_volumes, read_parquet, setup_job,
                       start_worker, tasks)

pytestmark = pytest.mark.slow

PG_SETTINGS = {"max_connections": 12, "fsync": "off", "shared_buffers": "16MB"}


# -- stacks on private services --------------------------------------------------------------
@pytest.fixture(scope="module")
def private_pg() -> Iterator[pgstack.Server]:
    """A PostgreSQL of our own (we restart it, and starve it of connections).

    Not under pytest's tmp_path: as root the server runs as ``postgres``, which must reach
    its data folder, and every pytest session resets /tmp/pytest-of-root to 0700 when it
    starts — a restart would then fail whenever another session starts meanwhile.
    """
    top = Path(tempfile.mkdtemp(prefix="bec-private-pg-"))
    top.chmod(0o711)
    server = pgstack.start_private(top / "data", settings=PG_SETTINGS)
    yield server
    pgstack.stop_private(server, mode="immediate")
    shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def custom_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, params: DbParams,
                 moto: motostack.MotoServer) -> Iterator[Stack]:
    """Like conftest's ``stack``, on the database and moto server given."""
    env = stack_env(params, moto.url)
    for key in [k for k in os.environ if k.startswith(("BEC_", "AWS_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    with Database(params, max_size=2) as db:
        db.execute("TRUNCATE task_executions, volumes, workers, jobs RESTART IDENTITY CASCADE")
        yield Stack(db, params, moto, env, tmp_path)


@pytest.fixture
def pg_stack(private_pg, moto_server, monkeypatch, tmp_path) -> Iterator[Stack]:
    """A fresh database on the private PostgreSQL, the session's moto server."""
    name = f"bec_infra_{uuid.uuid4().hex[:8]}"
    pgstack.create_database(private_pg, name)
    params = DbParams(private_pg.host, private_pg.port, private_pg.user, None, name)
    with Database(params, max_size=1) as db:
        db.apply_schema()
    moto_server.reset()
    with custom_stack(monkeypatch, tmp_path, params, moto_server) as stack:
        yield stack
    if private_pg.answers():
        pgstack.drop_database(private_pg, name)


def assert_all_done_once(stack: Stack, vols: list[tuple[str, str]], pages: int) -> list[dict]:
    rows = tasks(stack)
    by_volume = collections.Counter((r["w_id"], r["i_id"]) for r in rows)
    assert set(by_volume) == set(vols) and set(by_volume.values()) == {1}, rows
    for row in rows:
        assert row["status"] == "done", row
        assert row["total_images"] == pages and row["nb_errors"] == 0, row
        parquet = read_parquet(stack, row["w_id"], row["i_id"], row["s3_etag"])
        assert len(parquet) == pages and all(p["ok"] for p in parquet)
    return rows


def dlq_depth(stack: Stack, url: str) -> int:
    attrs = stack.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


# -- 1. PostgreSQL restarts mid-run -----------------------------------------------------------
def test_postgres_restart_mid_run_loses_nothing(pg_stack, private_pg):
    stack = pg_stack
    q = setup_job(stack)
    vols = long_volumes(stack, 4, pages=40)
    enqueue(stack, q["queue"], vols)
    run = start_worker(stack, "--max-volumes-in-flight", "1", "--shutdown-after-empty", "4")
    run.wait_for("Processing message", timeout=60)
    pgstack.stop_private(private_pg, mode="fast")      # every connection is cut
    try:
        time.sleep(4)
        assert run.process.poll() is None, run.output
    finally:
        pgstack.start_private(private_pg.data_dir, private_pg.port, settings=PG_SETTINGS)
    assert run.wait(180) == 0, run.output
    assert " died " not in run.output and "Traceback" not in run.output, run.output
    stack.db.pool.check()  # our own idle connection died with the server too
    assert "PostgreSQL at" in run.output or "error connecting" in run.output  # it was felt
    rows = assert_all_done_once(stack, vols, 40)
    assert max(r["attempt"] for r in rows) <= 3  # at most one claim lost per failed receive
    assert dlq_depth(stack, q["dlq"]) == 0            # no volume burnt its receives
    assert stack.sqs.get_queue_attributes(QueueUrl=q["queue"], AttributeNames=["ApproximateNumberOfMessages"])[
        "Attributes"]["ApproximateNumberOfMessages"] == "0"


# -- 2. the S3/SQS endpoint goes away for 20 s and comes back empty ---------------------------
OUTAGE_S = 20  # longer than the worker's visibility timeout (10 s): an extension fails meanwhile


def test_moto_outage_does_not_crash_or_lose_acknowledged_work(db_params, monkeypatch, tmp_path):
    """What is asserted, precisely (moto forgets everything when it stops):

    * before the outage: every volume whose message the worker had acknowledged (its
      "Successfully processed" line) or whose task the DB records as done had its Parquet
      and success.json in the old moto (read log and DB, then list the bucket: the worker
      writes artifacts before it marks done, deletes, and logs);
    * the outage (20 s) starts while a 200-page volume is in flight: the worker and all its
      children stay up;
    * after a fresh moto comes back on the same port (the test recreates buckets, queues
      and source images — identical bytes, so identical versions — and re-enqueues every
      volume the DB does not record as done, as an operator would): every volume ends with
      exactly one task row, done, and those not done before the outage have their
      artifacts in the new moto (the in-flight one included).
    """
    port = motostack.free_port()
    moto = motostack.start(port=port, log_path=tmp_path / "moto-1.log")
    big = ("W1", "I1")

    manifests: dict[str, bytes] = {}

    def upload(stack: Stack) -> None:
        """The source volumes; the second time, the very same manifest bytes (a gzip header
        holds a time stamp: a new upload would be a new ETag, so a new version)."""
        add_volumes(stack, 4, pages=8)
        add_repeated_volume(stack, *big, 200)
        for w, i in [("W22084", f"I{n:04d}") for n in range(4)] + [big]:
            key = volume_prefix(w, i) + MANIFEST
            if key in manifests:
                stack.s3.put_object(Bucket=SOURCE_BUCKET, Key=key, Body=manifests[key])
            else:
                manifests[key] = stack.s3.get_object(Bucket=SOURCE_BUCKET, Key=key)["Body"].read()

    try:
        with custom_stack(monkeypatch, tmp_path, db_params, moto) as stack:
            q = setup_job(stack)
            upload(stack)
            vols = [("W22084", f"I{n:04d}") for n in range(4)]
            enqueue(stack, q["queue"], vols[:2])
            run = start_worker(stack, "--shutdown-after-empty", "0", "--max-volumes-in-flight", "1",
                               "--visibility-timeout", "10", "--grace", "5")
            try:
                deadline = time.monotonic() + 90
                while run.output.count("Successfully processed") < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
                enqueue(stack, q["queue"], [big] + vols[2:])
                vols.append(big)
                run.wait_for(f"for volume {big[0]}/{big[1]} ", timeout=60)
                # -- snapshot, then cut the endpoint at once ---------------------------------
                acknowledged = set(re.findall(r"Successfully processed message: (\S+)", run.output))
                labels = dict(re.findall(r"Processing message: (\S+) for volume (\S+) ", run.output))
                done_before = {(r["w_id"], r["i_id"], r["s3_etag"]) for r in tasks(stack) if r["status"] == "done"}
                keys = {o["Key"] for o in stack.s3.list_objects_v2(Bucket=DEST_BUCKET).get("Contents", [])}
                moto.stop()
                assert len(acknowledged) >= 2
                versions = {(w, i): v for w, i, v in done_before}
                for mid in acknowledged:
                    w, i = labels[mid].split("/")
                    versions.setdefault((w, i), stack.db.row(
                        "SELECT last_s3_etag FROM volumes WHERE bdrc_w_id=%s AND bdrc_i_id=%s", (w, i))["last_s3_etag"])
                for (w, i), v in versions.items():
                    assert artifacts.parquet_key(JOB, w, i, v) in keys, (w, i)
                    assert artifacts.success_key(JOB, w, i, v) in keys, (w, i)

                # -- the outage ----------------------------------------------------------------
                kids = run.wait_children(["controller", "fetch-0", "infer-0", "post-0"])
                time.sleep(OUTAGE_S)
                assert run.process.poll() is None, run.output
                assert all(k.is_running() for k in kids.values()) and " died " not in run.output, run.output

                # -- a fresh, empty moto on the same port ------------------------------------
                moto = motostack.start(port=port, log_path=tmp_path / "moto-2.log")
                stack.moto = moto
                pair = queues.ensure_queues(stack.sqs, *queue_names(JOB))
                assert (pair.queue_url, pair.dlq_url) == (q["queue"], q["dlq"])
                ensure_bucket(stack.s3, DEST_BUCKET)
                ensure_bucket(stack.s3, SOURCE_BUCKET)
                upload(stack)
                done_at_restart = {(r["w_id"], r["i_id"]) for r in tasks(stack) if r["status"] == "done"}
                todo = [v for v in vols if v not in done_at_restart]
                assert big in todo
                enqueue(stack, q["queue"], todo)

                deadline = time.monotonic() + 150
                while time.monotonic() < deadline:
                    rows = tasks(stack)
                    if len(rows) == len(vols) and all(r["status"] == "done" for r in rows):
                        break
                    assert run.process.poll() is None, run.output
                    time.sleep(0.5)
            finally:
                run.signal(signal.SIGTERM)
                code = run.wait(60)
            assert code == 0, run.output
            assert " died " not in run.output and "Traceback" not in run.output, run.output
            rows = tasks(stack)
            by_volume = collections.Counter((r["w_id"], r["i_id"]) for r in rows)
            assert set(by_volume) == set(vols) and set(by_volume.values()) == {1}, rows
            assert all(r["status"] == "done" for r in rows), rows
            for w, i in todo:
                row = next(r for r in rows if (r["w_id"], r["i_id"]) == (w, i))
                pages = 200 if (w, i) == big else 8
                assert row["total_images"] == pages
                assert len(read_parquet(stack, w, i, row["s3_etag"])) == pages
                stack.s3.head_object(Bucket=DEST_BUCKET, Key=artifacts.success_key(JOB, w, i, row["s3_etag"]))
    finally:
        moto.stop()


# -- 3. the database runs out of connections ---------------------------------------------------
def hog_all(server: pgstack.Server, dbname: str) -> list[psycopg.Connection]:
    """Open connections until PostgreSQL refuses ("too many clients")."""
    hogs = []
    while True:
        try:
            hogs.append(psycopg.connect(server.conninfo(dbname), autocommit=True, application_name="hog"))
        except psycopg.OperationalError as exc:
            assert "too many clients" in str(exc), exc
            return hogs
        assert len(hogs) < 100


def cut_bec_connections_and_take_their_slots(server: pgstack.Server, dbname: str,
                                             hog: psycopg.Connection) -> list[psycopg.Connection]:
    """Terminate BEC's connections and hold the slots they free, until none of BEC's is left.

    The worker's pool reconnects at once: between one termination and the next ``hog_all`` it
    can win a freed slot (the stop-11 CI run lost this race and processed every volume), so
    cut again until a pass finds nothing of BEC's to cut. The database is then full of hogs.
    """
    taken: list[psycopg.Connection] = []
    quiet = 0
    for _ in range(50):
        cut = hog.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name IN ('bec-controller', 'bec-cli') AND datname = %s",
                          (dbname,)).fetchall()
        taken += hog_all(server, dbname)
        quiet = 0 if cut else quiet + 1
        if quiet == 2:  # two passes apart: a connection still starting up shows in the second
            return taken
        time.sleep(0.2)
    raise AssertionError("BEC kept reconnecting faster than its slots could be taken")


def test_connection_exhaustion_is_a_clear_error_then_waited_out(pg_stack, private_pg):
    stack = pg_stack
    dbname = stack.db_params.database
    q = setup_job(stack)
    vols = add_volumes(stack, 3, pages=10)

    # at start-up: one clear line, exit 1 (a service manager restarts it), nothing registered
    hogs = hog_all(private_pg, dbname)
    try:
        started = time.monotonic()
        run = start_worker(stack)
        code = run.wait(60)
    finally:
        for h in hogs:
            h.close()
    assert code == 1 and time.monotonic() - started < 30, run.output
    errors = [line for line in run.lines if line.startswith("Error:")]
    assert len(errors) == 1 and "too many clients" in errors[0], run.output
    assert f"cannot connect to PostgreSQL at postgres@127.0.0.1:{private_pg.port}/{dbname}" in errors[0]
    assert "Traceback" not in run.output
    assert stack.db.row("SELECT count(*) AS n FROM workers")["n"] == 0

    # mid-run: its connections are cut and every slot taken, then work arrives → it waits, resumes.
    # The volumes are enqueued only once the database is full: a null-model volume takes 0.2 s,
    # so work enqueued earlier could be finished before the hog holds every slot.
    run = start_worker(stack, "--max-volumes-in-flight", "1", "--shutdown-after-empty", "7")
    run.wait_for("processes ready", timeout=60)
    hogs = hog_all(private_pg, dbname)
    try:
        hogs += cut_bec_connections_and_take_their_slots(private_pg, dbname, hogs[0])
        enqueue(stack, q["queue"], vols)
        time.sleep(8)
        assert run.process.poll() is None, run.output
        assert "Successfully processed" not in run.output, run.output  # nothing finished without the DB
    finally:
        for h in hogs:
            h.close()
    assert run.wait(180) == 0, run.output
    assert " died " not in run.output and "Traceback" not in run.output, run.output
    assert "too many clients" in run.output, run.output  # the pool said why it waited
    stack.db.pool.check()
    assert_all_done_once(stack, vols, 10)
    assert dlq_depth(stack, q["dlq"]) == 0


# -- 4. slow S3 --------------------------------------------------------------------------------
class SlowProxy(TcpProxy):
    """A TCP proxy in front of moto that can hold every HTTP request for ``delay`` seconds."""

    METHODS = (b"GET ", b"PUT ", b"POST", b"HEAD", b"DELE")

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.delay = 0.0
        self.requests = self.delayed = 0
        super().__init__(host, int(port))

    def passes(self, data: bytes, from_client: bool, state: dict[str, bool]) -> bool:
        if from_client and data[:4] in self.METHODS:
            delay = self.delay
            with self.lock:
                self.requests += 1
                self.delayed += delay > 0
            if delay:
                time.sleep(delay)
        return True


def test_slow_s3_is_waited_out(stack):
    q = setup_job(stack)
    vols = add_volumes(stack, 3, pages=6)
    enqueue(stack, q["queue"], vols)
    proxy = SlowProxy(stack.moto.url)
    try:
        run = start_worker(stack, "--shutdown-after-empty", "3", "--visibility-timeout", "10",
                           env={"AWS_ENDPOINT_URL": proxy.url})
        run.wait_for("Processing message", timeout=60)
        proxy.delay = 1.5                 # every S3/SQS request now waits 1.5 s
        time.sleep(10)
        assert run.process.poll() is None, run.output
        proxy.delay = 0.0
        assert run.wait(180) == 0, run.output
    finally:
        proxy.close()
    assert proxy.delayed >= 5, (proxy.requests, proxy.delayed)
    assert " died " not in run.output and "Traceback" not in run.output, run.output
    rows = assert_all_done_once(stack, vols, 6)
    assert all(r["attempt"] == 1 for r in rows)  # waited, not retried
    assert run.output.count("Successfully processed") == 3
    assert dlq_depth(stack, q["dlq"]) == 0
