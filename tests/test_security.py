"""Security: untrusted names never reach SQL, SQS or an S3 key; secrets never reach an
output; the metrics endpoint serves metrics and nothing else.

Nothing is spied on: where a name must be rejected "before it reaches" a service, the test
either takes the service away (the command must still answer with the validation error)
or looks at the service afterwards (no row, queue, bucket or object was created).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import psutil
import pytest

from bec.edges import artifacts
from bec.devstack.moto import free_port
from clihelp import bec, fails, ok
from conftest import DEST_BUCKET, SOURCE_BUCKET

BAD_JOB_NAMES = ["../x", "x'; DROP TABLE jobs;--", 'a"b', "ジョブ", "x" * 71, "ldv1\n", "a b", "$(id)",
                 "a/b", "%2e%2e", ""]

# every command that takes a job name, with the name in place of {}
JOB_COMMANDS = [
    ("jobs", "create", "--name", "{}"),
    ("jobs", "update", "{}", "--config-text", "{{}}"),
    ("queue", "enqueue", "--job-name", "{}", "--volume", "W1,I1"),
    ("jobs", "show", "{}"),
    ("jobs", "delete", "{}", "--yes"),
    ("jobs", "stats", "{}"),
    ("jobs", "tasks", "{}"),
    ("jobs", "errors", "{}"),
    ("queue", "stats", "--job-name", "{}"),
    ("queue", "purge", "--job-name", "{}", "--yes"),
    ("queue", "redrive", "--job-name", "{}"),
]
def command(template: tuple[str, ...], name: str) -> list[str]:
    return [part.format(name) for part in template]


def assert_nothing_created(stack) -> None:
    for table in ("jobs", "workers", "volumes", "task_executions"):
        assert stack.db.row(f"SELECT count(*) AS n FROM {table}")["n"] == 0, table
    assert stack.sqs.list_queues().get("QueueUrls", []) == []
    assert stack.s3.list_buckets()["Buckets"] == []


@pytest.mark.parametrize("template", [pytest.param(t, id=" ".join(t[:2])) for t in JOB_COMMANDS])
def test_bad_job_name_is_refused_before_any_service_is_contacted(stack, monkeypatch, template):
    """No database host and a dead endpoint: only validation can answer."""
    monkeypatch.delenv("BEC_SQL_HOST")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for name in ("../x", "x'; DROP TABLE jobs;--"):
        err = fails(*command(template, name))
        assert "invalid job name" in err, (template, err)
        assert "BEC_SQL_HOST" not in err and "cannot reach" not in err


def test_bad_job_names_create_nothing_anywhere(stack):
    """Against the live stack: every command, every bad name → a validation error, and
    afterwards no row, no queue, no bucket, no object exists."""
    for template in JOB_COMMANDS:
        for name in BAD_JOB_NAMES:
            err = fails(*command(template, name))
            refusals = ("invalid job name", "is too long", "give --job-name")  # "" = not given
            assert any(r in err for r in refusals), (template, name, err)
            assert "Traceback" not in err
    assert_nothing_created(stack)


def test_bad_job_name_stops_the_worker_before_it_registers(stack):
    from workerkit import BEC

    env = {k: v for k, v in {**os.environ, **stack.env}.items() if k != "BEC_SQL_HOST"}
    done = subprocess.run([BEC, "worker", "--job-name", "../x'; --", "--model-path", "null", "--metrics-port", "0"],
                          capture_output=True, text=True, env=env, cwd=stack.workdir, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "invalid job name" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert_nothing_created(stack)


@pytest.mark.parametrize("volume, message", [
    ("W1,I1'--", "invalid image-group id"),
    ("W1,../I1", "invalid image-group id"),
    ("W一,I1", "invalid work id"),
    ('W1,I"1', "invalid image-group id"),
    ("W1;I1", "expected 'W_ID,I_ID'"),
    ("W" + "1" * 32 + ",I1", "at most 32 characters"),
    ("W1,I1,I2", "expected 'W_ID,I_ID'"),
    ("W1,I1\x00", "invalid image-group id"),
])
def test_bad_volume_ids_never_reach_the_queue(stack, volume, message):
    ok("jobs", "create", "--name", "ldv1")
    err = fails("queue", "enqueue", "--job-name", "ldv1", "--volume", "W2,I2", "--volume", volume)
    assert message in err and "--volume #2" in err, err
    url = stack.db.row("SELECT queue_url FROM jobs")["queue_url"]
    attrs = stack.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"  # not even the good one


# -- secrets ---------------------------------------------------------------------------------
SECRET_PW = "pw-SECRET-5f3a9c"
SECRET_AWS = "aws-SECRET-0b7e41"


def assert_no_secret(text: str | bytes, where: str) -> None:
    blob = text.encode() if isinstance(text, str) else text
    for secret in (SECRET_PW, SECRET_AWS):
        assert secret.encode() not in blob, f"{secret} found in {where}"


def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP exchange (no client-side path normalisation)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


SAMPLE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? \S+( \S+)?$")


def assert_only_metrics(body: bytes) -> None:
    text = body.decode()
    assert "root:" not in text and "/bin/" not in text
    for line in text.splitlines():
        assert not line or line.startswith("# ") or SAMPLE.match(line), line


@pytest.mark.slow
def test_no_secret_in_outputs_and_metrics_serve_only_metrics(stack, monkeypatch):
    from bec.devstack.volumes import put_manifest
    from workerkit import add_volumes, manifest, read_parquet, send, setup_job, start_worker

    secrets = {"BEC_SQL_PASSWORD": SECRET_PW, "AWS_SECRET_ACCESS_KEY": SECRET_AWS}
    for key, value in secrets.items():   # trust auth and moto accept any
        monkeypatch.setenv(key, value)
    stack.env.update(secrets)

    # -- the CLI, its successes and its failures --------------------------------------------
    outputs = []

    def run(*args: str) -> None:
        result = bec(*args)
        outputs.append((" ".join(args), result.output + result.stderr))

    q = setup_job(stack)
    (w, i), = add_volumes(stack, 1, pages=3)
    entries = manifest(stack, w, i) + [{"filename": "gone.jpg"}, {"filename": "../up.jpg"}]
    put_manifest(stack.s3, SOURCE_BUCKET, w, i, entries)  # two error rows, with their messages
    for args in (["jobs", "list"], ["jobs", "show", "ldv1"], ["queue", "enqueue", "--job-name", "ldv1",
                 "--volume", f"{w},{i}", "--volume", "W404,I404"],
                 ["queue", "stats", "--job-name", "ldv1"], ["jobs", "show", "missing"],
                 ["jobs", "create", "--name", "ldv1"], ["db", "init"], ["--help"]):
        run(*args)
    send(stack, q["queue"], ["not json"])

    port = free_port()
    worker = start_worker(stack, "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
                          "--shutdown-after-empty", "0", env=secrets)
    try:
        worker.wait_for("Successfully processed", timeout=90)
        worker.wait_for("failed terminally", timeout=30)
        worker.wait_for("Poison message", timeout=30)
        kids = worker.wait_children(["controller", "fetch-0", "infer-0", "post-0"])
        for proc in [psutil.Process(worker.process.pid), *kids.values()]:
            assert_no_secret(" ".join(proc.cmdline()), f"command line of {proc.name()}")

        # -- the metrics endpoint: metrics, or nothing; never a file ------------------------
        status, headers, body = http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert b"bec_pages_total" in body
        assert_only_metrics(body)
        assert_no_secret(body, "/metrics")
        for path in (b"/", b"/../../etc/passwd", b"../../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd",
                     b"//etc/passwd", b"/etc/passwd", b"/metrics?name[]=../../etc/passwd",
                     b"/proc/self/environ", b"/favicon.ico"):
            status, _, body = http(port, b"GET " + path + b" HTTP/1.0\r\n\r\n")
            assert status in (200, 400, 404), (path, status)
            assert_only_metrics(body)
            assert_no_secret(body, path.decode())
        for method in (b"POST", b"PUT", b"DELETE"):
            status, _, body = http(port, method + b" /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            assert status in (404, 405, 501), (method, status)
            assert_no_secret(body, method.decode())
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait(60) == 0, worker.output
    run("jobs", "stats", "ldv1")
    run("jobs", "tasks", "ldv1")
    run("jobs", "errors", "ldv1")
    run("workers", "list")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    run("queue", "stats", "--job-name", "ldv1")             # an SQS failure
    monkeypatch.setenv("BEC_SQL_DATABASE", "no_such_db")
    run("jobs", "list")                                      # a database failure
    assert "no_such_db" in outputs[-1][1] and "cannot reach" in outputs[-2][1]

    for what, text in outputs:
        assert_no_secret(text, f"`bec {what}`")
    assert "Poison message" in worker.output and "Successfully processed" in worker.output
    assert_no_secret(worker.output, "the worker's log")

    # -- artifacts and database rows --------------------------------------------------------
    row = stack.db.row("SELECT s3_etag FROM task_executions WHERE status = 'done'")
    for key in (artifacts.parquet_key("ldv1", w, i, row["s3_etag"]),
                artifacts.success_key("ldv1", w, i, row["s3_etag"])):
        assert_no_secret(stack.s3.get_object(Bucket=DEST_BUCKET, Key=key)["Body"].read(), key)
    pages = read_parquet(stack, w, i, row["s3_etag"])
    assert len(pages) == 5 and sum(not p["ok"] for p in pages) == 2
    for table in ("jobs", "workers", "volumes", "task_executions"):
        for found in stack.db.rows(f"SELECT row_to_json(t)::text AS j FROM {table} t"):
            assert_no_secret(found["j"], f"table {table}")
