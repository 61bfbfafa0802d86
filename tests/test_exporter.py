"""`bec exporter`: per-job queue depth and task counts that match a seeded database and queues."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import botocore.config
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bec.config import DbParams
from bec.devstack.moto import free_port
from bec.observe.exporter import JobExporter
from clihelp import ok
from conftest import REGION

BEC = str(Path(sys.executable).with_name("bec"))


def seed(stack) -> dict[str, dict[str, str]]:
    """Two jobs; ldv1 with tasks in every status, 3 queued + 1 in flight + 2 in its DLQ."""
    ok("jobs", "create", "--name", "ldv1")
    ok("jobs", "create", "--name", "ocr")
    urls = {r["name"]: r for r in stack.db.rows("SELECT name, queue_url, dlq_url FROM jobs")}
    db = stack.db
    for n in range(8):
        db.execute("INSERT INTO volumes (bdrc_w_id, bdrc_i_id) VALUES ('W22084', %s)", (f"I088{n}",))
    db.execute("INSERT INTO workers (worker_name, hostname, job_id) VALUES ('w-live', 'h1', 1)")
    db.execute("INSERT INTO workers (worker_name, hostname, job_id, last_heartbeat_at) "
               "VALUES ('w-killed', 'h2', 1, now() - interval '3 hours')")
    rows = [  # volume, status, images, errors, worker
        (1, "done", 200, 2, None), (2, "done", 198, 0, None), (3, "done", 50, 5, None),
        (4, "retryable_failed", 150, 15, None), (5, "terminal_failed", 0, 0, None), (6, "running", 120, None, 1),
        (8, "running", 10000, None, 2),  # under a worker killed 3 hours ago: stalled
    ]
    for vol, status, images, errors, worker in rows:
        db.execute("INSERT INTO task_executions (job_id, volume_id, s3_etag, status, total_images, nb_errors, "
                   "worker_id) VALUES (1, %s, 'abc123', %s, %s, %s, %s)", (vol, status, images, errors, worker))
    db.execute("INSERT INTO task_executions (job_id, volume_id, s3_etag, status, total_images, nb_errors) "
               "VALUES (2, 7, 'abc123', 'done', 10, 1)")
    sqs = stack.sqs
    for n in range(4):
        sqs.send_message(QueueUrl=urls["ldv1"]["queue_url"], MessageBody=f'{{"n": {n}}}')
    got = sqs.receive_message(QueueUrl=urls["ldv1"]["queue_url"], MaxNumberOfMessages=1, VisibilityTimeout=300)
    assert len(got["Messages"]) == 1
    for n in range(2):
        sqs.send_message(QueueUrl=urls["ldv1"]["dlq_url"], MessageBody=f'{{"dead": {n}}}')
    return urls


def samples_of(families) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in families:
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def key(name: str, **labels: str) -> tuple[str, tuple]:
    return (name, tuple(sorted(labels.items())))


def sqs_factory():
    return boto3.client("sqs", region_name=REGION)


def expected_ldv1() -> dict[tuple[str, tuple], float]:
    return {
        key("bec_job_tasks", job="ldv1", status="done"): 3,
        key("bec_job_tasks", job="ldv1", status="running"): 1,
        key("bec_job_tasks", job="ldv1", status="stalled"): 1,
        key("bec_job_tasks", job="ldv1", status="retryable_failed"): 1,
        key("bec_job_tasks", job="ldv1", status="terminal_failed"): 1,
        key("bec_job_images_done", job="ldv1"): 448,
        key("bec_job_page_errors", job="ldv1"): 7,
        key("bec_job_queue_messages", job="ldv1", queue="tasks", state="visible"): 3,
        key("bec_job_queue_messages", job="ldv1", queue="tasks", state="in_flight"): 1,
        key("bec_job_queue_messages", job="ldv1", queue="dlq", state="visible"): 2,
        key("bec_job_queue_messages", job="ldv1", queue="dlq", state="in_flight"): 0,
        key("bec_job_tasks", job="ocr", status="done"): 1,
        key("bec_job_tasks", job="ocr", status="running"): 0,
        key("bec_job_tasks", job="ocr", status="stalled"): 0,
        key("bec_job_images_done", job="ocr"): 10,
        key("bec_job_page_errors", job="ocr"): 1,
        key("bec_job_queue_messages", job="ocr", queue="tasks", state="visible"): 0,
        key("bec_exporter_up"): 1,
    }


def test_values_match_database_and_queues_and_are_cached(stack):
    seed(stack)
    exporter = JobExporter(stack.db_params, sqs_factory, interval=3600)
    try:
        got = samples_of(exporter.collect())
        for k, v in expected_ldv1().items():
            assert got.get(k) == v, (k, got.get(k))
        assert len([k for k in got if k[0] == "bec_job_tasks"]) == 10  # 2 jobs × 5 statuses
        assert got[key("bec_exporter_last_success_timestamp_seconds")] == pytest.approx(time.time(), abs=60)
        # within the interval a scrape costs nothing: the values are the cached ones
        stack.db.execute("UPDATE task_executions SET status = 'done' WHERE status = 'running' AND worker_id = 1")
        assert samples_of(exporter.collect())[key("bec_job_tasks", job="ldv1", status="running")] == 1
        exporter.interval = 0
        again = samples_of(exporter.collect())
        assert again[key("bec_job_tasks", job="ldv1", status="running")] == 0
        assert again[key("bec_job_tasks", job="ldv1", status="done")] == 4
        assert again[key("bec_job_images_done", job="ldv1")] == 568
        # the stale threshold is the workers' (--stale-after): at 4 hours the killed one is alive
        exporter.stale_after_s = 4 * 3600
        again = samples_of(exporter.collect())
        assert again[key("bec_job_tasks", job="ldv1", status="running")] == 1
        assert again[key("bec_job_tasks", job="ldv1", status="stalled")] == 0
    finally:
        exporter.close()


def test_unreachable_database_or_sqs_is_up_0_not_a_crash(stack, caplog):
    seed(stack)
    dead = DbParams("127.0.0.1", free_port(), "postgres", None, "nope")
    exporter = JobExporter(dead, sqs_factory, interval=0, connect_timeout=1)
    got = samples_of(exporter.collect())
    assert got[key("bec_exporter_up")] == 0
    assert not any(k[0].startswith("bec_job_") for k in got)
    assert "cannot read task counts from PostgreSQL" in caplog.text
    # the database comes back (same object, next refresh): values again
    exporter.db_params = stack.db_params
    assert samples_of(exporter.collect())[key("bec_exporter_up")] == 1
    exporter.close()

    def dead_sqs():
        return boto3.client("sqs", region_name=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}",
                            config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=1))

    exporter = JobExporter(stack.db_params, dead_sqs, interval=0)
    try:
        got = samples_of(exporter.collect())
    finally:
        exporter.close()
    assert got[key("bec_exporter_up")] == 0
    assert got[key("bec_job_tasks", job="ldv1", status="done")] == 3  # the database part still counts
    assert not any(k[0] == "bec_job_queue_messages" for k in got)
    assert "cannot read SQS queue" in caplog.text


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15).read().decode()


def listening_addresses(pid: int, port: int) -> set[str]:
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_exporter_command_serves_the_values_and_passes_promtool(stack):
    seed(stack)
    port = free_port()
    proc = subprocess.Popen([BEC, "exporter", "--port", str(port), "--interval", "1"],  # default --addr
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **stack.env}, cwd=stack.workdir)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                text = scrape(port)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.1)
        got = samples_of(text_string_to_metric_families(text))
        for k, v in expected_ldv1().items():
            assert got.get(k) == v, (k, got.get(k))
        # by default it listens on this host only (it listened on every address)
        assert listening_addresses(proc.pid, port) == {"127.0.0.1"}
        # no DB or SQS round trip per scrape; after the interval a new refresh is seen
        stack.sqs.send_message(QueueUrl=stack.db.row("SELECT dlq_url FROM jobs WHERE name = 'ldv1'")["dlq_url"],
                               MessageBody="x")
        time.sleep(1.2)
        got = samples_of(text_string_to_metric_families(scrape(port)))
        assert got[key("bec_job_queue_messages", job="ldv1", queue="dlq", state="visible")] == 3
        promtool = shutil.which("promtool")
        if promtool:
            check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
            assert (check.returncode, check.stdout + check.stderr) == (0, "")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert f"Exporter: http://127.0.0.1:{port}/metrics" in out
    assert "Exporter stopped" in out


def test_exporter_needs_its_settings(stack, monkeypatch):
    from clihelp import fails

    monkeypatch.delenv("BEC_SQL_HOST")
    assert "BEC_SQL_HOST" in fails("exporter", "--port", "0")
