"""Running real `bec worker` processes against the test stack, and reading what they left."""
from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import pyarrow.parquet as pq

from bec.edges import artifacts
from bec.devstack.volumes import ensure_bucket, make_volume
from conftest import DEST_BUCKET, SOURCE_BUCKET, Stack

BEC = str(Path(sys.executable).with_name("bec"))
JOB = "ldv1"


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.fixture
def no_shm_leak():
    """Whatever the test does to a worker, no shared-memory segment may stay behind.

    A new entry must still be there after 5 s to count: tests run in parallel (xdist), and
    another test's process may hold a short-lived one (a semaphore between create and
    unlink) at the moment this one looks.
    """
    before = shm_entries()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        time.sleep(0.5)
        leaked = {e for e in shm_entries() - before if not e.startswith("PostgreSQL")}
        if not leaked or time.monotonic() > deadline:
            break
    assert not leaked, f"/dev/shm entries left behind: {leaked}"


def setup_job(stack: Stack, config: dict[str, Any] | None = None, job: str = JOB) -> dict[str, str]:
    from clihelp import ok

    cfg = {"use_gpu": False, "precision": "fp32", **(config or {})}
    ok("jobs", "create", "--name", job, "--config-text", json.dumps(cfg))
    ensure_bucket(stack.s3, SOURCE_BUCKET)
    ensure_bucket(stack.s3, DEST_BUCKET)
    row = stack.db.row("SELECT queue_url, dlq_url FROM jobs WHERE name = %s", (job,))
    return {"queue": row["queue_url"], "dlq": row["dlq_url"]}


def add_volumes(stack: Stack, count: int, pages: int, start: int = 0, **kw: Any) -> list[tuple[str, str]]:
    vols = []
    for n in range(start, start + count):
        w, i = "W22084", f"I{n:04d}"
        make_volume(stack.s3, SOURCE_BUCKET, w, i, pages, seed=n, **kw)
        vols.append((w, i))
    return vols


def send(stack: Stack, queue_url: str, bodies: list[str]) -> None:
    for body in bodies:
        stack.sqs.send_message(QueueUrl=queue_url, MessageBody=body)


def enqueue(stack: Stack, queue_url: str, vols: list[tuple[str, str]]) -> None:
    send(stack, queue_url, [json.dumps({"w_id": w, "i_id": i}) for w, i in vols])


@dataclass
class WorkerRun:
    """A `bec worker` subprocess whose output is collected line by line."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.process.poll() is not None:
                time.sleep(0.2)
                if any(text in line for line in self.lines):
                    return
                raise AssertionError(f"worker exited ({self.process.returncode}) before {text!r}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output}")

    def wait(self, timeout: float = 180.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"worker still running after {timeout}s:\n{self.output}")

    def children(self) -> dict[str, psutil.Process]:
        """Live child processes by role (their names are bec-<role>)."""
        found = {}
        for child in psutil.Process(self.process.pid).children():
            try:
                name = child.name()
            except psutil.Error:
                continue
            if name.startswith("bec-"):
                found[name[4:]] = child
        return found

    def wait_children(self, roles: list[str], timeout: float = 60.0) -> dict[str, psutil.Process]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = self.children()
            if all(r in kids for r in roles):
                return kids
            time.sleep(0.1)
        raise AssertionError(f"children {roles} not all up: {list(self.children())}\n{self.output}")

    def kill_all(self) -> None:
        try:
            procs = [psutil.Process(self.process.pid)] + psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.process.wait(10)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)


def start_worker(stack: Stack, *args: str, model: str = "null", procs: int = 1,
                 env: dict[str, str] | None = None, job: str = JOB) -> WorkerRun:
    cmd = [BEC, "worker", "--job-name", job, "--model-path", model, "--poll-wait", "1",
           "--shutdown-after-empty", "2", "--procs", str(procs), "--retry-delay", "0"]
    if "--metrics-port" not in args:
        cmd += ["--metrics-port", "0"]  # tests run workers side by side
    cmd += list(args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **stack.env, "PYTHONUNBUFFERED": "1", **(env or {})},
                            cwd=stack.workdir)
    run = WorkerRun(proc)
    threading.Thread(target=run._pump, daemon=True).start()
    return run


def run_worker(stack: Stack, *args: str, timeout: float = 180.0, **kw: Any) -> WorkerRun:
    run = start_worker(stack, *args, **kw)
    code = run.wait(timeout)
    time.sleep(0.1)
    assert code == 0, f"worker exit code {code}:\n{run.output}"
    return run


def tasks(stack: Stack) -> list[dict[str, Any]]:
    return stack.db.rows(
        "SELECT t.*, t.status::text AS status, v.bdrc_w_id AS w_id, v.bdrc_i_id AS i_id "
        "FROM task_executions t JOIN volumes v ON v.id = t.volume_id ORDER BY v.bdrc_i_id, t.id")


def read_parquet(stack: Stack, w: str, i: str, version: str, job: str = JOB) -> list[dict[str, Any]]:
    body = stack.s3.get_object(Bucket=DEST_BUCKET, Key=artifacts.parquet_key(job, w, i, version))["Body"].read()
    return pq.read_table(io.BytesIO(body)).to_pylist()


def read_success(stack: Stack, w: str, i: str, version: str, job: str = JOB) -> dict[str, Any]:
    body = stack.s3.get_object(Bucket=DEST_BUCKET, Key=artifacts.success_key(job, w, i, version))["Body"].read()
    return json.loads(body)


def manifest(stack: Stack, w: str, i: str) -> list[dict[str, Any]]:
    from bec.edges.archive import MANIFEST, volume_prefix

    body = stack.s3.get_object(Bucket=SOURCE_BUCKET, Key=volume_prefix(w, i) + MANIFEST)["Body"].read()
    return json.loads(gzip.decompress(body))


def queue_counts(stack: Stack, url: str) -> tuple[int, int]:
    attrs = stack.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def add_repeated_volume(stack: Stack, w: str, i: str, pages: int, seed: int = 7) -> None:
    """A long volume made fast: one generated page uploaded ``pages`` times."""
    import numpy as np

    from bec.edges.archive import volume_prefix
    from bec.devstack.volumes import put_manifest, render

    data, page = render("jpeg_gray", np.random.default_rng(seed))
    h, wd = page.image.shape
    prefix = volume_prefix(w, i)
    names = [f"p{n:05d}.jpg" for n in range(pages)]
    for name in names:
        stack.s3.put_object(Bucket=SOURCE_BUCKET, Key=prefix + name, Body=data)
    put_manifest(stack.s3, SOURCE_BUCKET, w, i, [{"filename": n, "width": wd, "height": h} for n in names])


def link_folder_volume(root: Path, w: str, i: str, originals: list[tuple[Path, str, tuple[int, int]]],
                       pages: int) -> None:
    """A volume in a folder archive (``--s3-source-bucket file://<root>``) whose pages are hard
    links to ``originals`` ((path, extension, (height, width))) in turn: thousands of pages cost
    a few files on disk and no uploads."""
    from bec.edges.archive import MANIFEST, volume_prefix
    from bec.devstack.volumes import manifest_bytes

    folder = root / volume_prefix(w, i)
    folder.mkdir(parents=True)
    entries = []
    for k in range(pages):
        path, ext, (h, wd) = originals[k % len(originals)]
        name = f"p{k:05d}.{ext}"
        os.link(path, folder / name)
        entries.append({"filename": name, "width": wd, "height": h})
    (folder / MANIFEST).write_bytes(manifest_bytes(entries))


def add_repeated_folder_volume(root: Path, w: str, i: str, pages: int, seed: int = 7) -> None:
    """``add_repeated_volume`` in a folder archive, for tests about SQS rather than S3 (1,000
    PUTs to moto take ~16 s on a 2-core host)."""
    import numpy as np

    from bec.devstack.volumes import render

    data, page = render("jpeg_gray", np.random.default_rng(seed))
    original = root / f"original-{seed}.jpg"
    root.mkdir(parents=True, exist_ok=True)
    original.write_bytes(data)
    link_folder_volume(root, w, i, [(original, "jpg", page.image.shape)], pages)


def long_volumes(stack: Stack, count: int, pages: int) -> list[tuple[str, str]]:
    """Volumes long enough to be still in flight when a fault lands, even on a fast host."""
    vols = [("W1", f"I{n}") for n in range(count)]
    for w, i in vols:
        add_repeated_volume(stack, w, i, pages)
    return vols
