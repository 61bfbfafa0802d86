"""The whole pipeline: a real ``bec worker`` (processes, shared memory, SQS, PostgreSQL)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bec.control.db import Database
from bec.devstack.moto import free_port


@dataclass
class Stack:
    env: dict[str, str]
    db: Database
    sqs: Any


def _tree_memory(procs: list[psutil.Process], with_pss: bool) -> tuple[int, int | None]:
    """(RSS, PSS) summed over the worker's processes; PSS shares common pages fairly. PSS costs
    the reader ~17 CPU ms for a worker's tree (the kernel walks every mapped page), RSS nearly
    nothing, so PSS is read only ``with_pss``."""
    rss = pss = 0
    for p in procs:
        try:
            if with_pss:
                info = p.memory_full_info()
                pss += getattr(info, "pss", info.rss)
            else:
                info = p.memory_info()
            rss += info.rss
        except psutil.Error:
            pass
    return rss, (pss if with_pss else None)


def _cpu_by_process(root: psutil.Process) -> dict[str, float]:
    """CPU seconds used so far by each of the worker's processes (by role name)."""
    out: dict[str, float] = {}
    for p in [root] + root.children(recursive=True):
        try:
            name = p.name() if p.pid != root.pid else "supervisor"
            t = p.cpu_times()
            out[name] = out.get(name, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


def _scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def run_worker(stack: Stack, job: str, volumes: list[tuple[str, str]], pages: int, model: str,
               procs: int, source: str, extra: list[str] | None = None, timeout: float = 3600,
               log_path: Path | None = None, device: str = "cpu", precision: str = "fp32",
               config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start a worker, wait until it is ready, enqueue, wait until every volume is done.

    The job's config carries the device and precision, and the worker is told the device, so
    a ``--device cuda`` benchmark runs its pipeline on the GPU too.
    """
    installed = Path(sys.executable).with_name("bec")
    bec = [str(installed)] if installed.exists() else [sys.executable, "-m", "bec"]
    job_config = {**(config or {}), "use_gpu": device == "cuda", "precision": precision}
    subprocess.run([*bec, "jobs", "create", "--name", job, "--config-text", json.dumps(job_config)],
                   env=stack.env, check=True, capture_output=True)
    job_row = stack.db.row("SELECT id, queue_url, config FROM jobs WHERE name = %s", (job,))
    port = free_port()
    cmd = [*bec, "worker", "--job-name", job, "--model-path", model, "--procs", str(procs),
           "--poll-wait", "1", "--shutdown-after-empty", "0", "--s3-source-bucket", source,
           "--metrics-port", str(port), "--metrics-addr", "127.0.0.1", "--device", device, *(extra or [])]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if log is not subprocess.DEVNULL:
                log.write(line)

    threading.Thread(target=pump, daemon=True).start()
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while not any("processes ready" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("worker did not start:\n" + "".join(lines[-30:]))
        time.sleep(0.05)
    before = _scrape(port)
    cpu_before = _cpu_by_process(root)
    for start in range(0, len(volumes), 10):
        stack.sqs.send_message_batch(QueueUrl=job_row["queue_url"], Entries=[
            {"Id": str(n), "MessageBody": json.dumps({"w_id": w, "i_id": i})}
            for n, (w, i) in enumerate(volumes[start:start + 10])])
    peak = peak_pss = 0
    samples: list[int] = []
    pss_samples: list[int] = []
    deadline = time.monotonic() + timeout
    # The observer shares the worker's cores: listing a process tree scans every process on the
    # host, so the tree is listed every few seconds; RSS is read twice a second, PSS every 2 s.
    # Listing it and reading PSS five times a second cost 5 CPU ms per page, 4 % of a 2-core host.
    tree: list[psutil.Process] = []
    listed = 0.0
    while True:
        if time.monotonic() - listed > 5:
            tree, listed = [root] + root.children(recursive=True), time.monotonic()
        rss, pss = _tree_memory(tree, with_pss=len(samples) % 4 == 0)
        peak = max(peak, rss)
        if pss is not None:
            peak_pss = max(peak_pss, pss)
            pss_samples.append(pss)
        samples.append(rss)
        row = stack.db.row("SELECT count(*) FILTER (WHERE status = 'done') AS done, "
                           "count(*) FILTER (WHERE status <> 'done' AND status <> 'running') AS failed "
                           "FROM task_executions WHERE job_id = %s", (job_row["id"],))
        if row["done"] + row["failed"] >= len(volumes):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("worker stopped early:\n" + "".join(lines[-30:]))
        time.sleep(0.5)
    after = _scrape(port)
    cpu_after = _cpu_by_process(root)
    cpu_ms = {k: round(1000 * (v - cpu_before.get(k, 0.0)) / pages, 2) for k, v in cpu_after.items()}
    span = stack.db.row("SELECT extract(epoch FROM max(done_at) - min(started_at)) AS seconds, "
                        "sum(total_images) AS pages, sum(nb_errors) AS errors FROM task_executions "
                        "WHERE job_id = %s", (job_row["id"],))
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    seconds = float(span["seconds"])
    replicas = max(1, sum(1 for name in cpu_after if name.startswith("bec-infer")))
    # busy seconds of one inference process (the mean over the replicas of a CPU host)
    busy = (after.get("bec_inference_busy_seconds_total", 0)
            - before.get("bec_inference_busy_seconds_total", 0)) / replicas

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    long_waits = delta("bec_inference_wait_seconds_count") - delta("bec_inference_wait_seconds_bucket{le=0.1}")
    return {"procs": procs, "inference_procs": replicas, "device": device, "job_config": job_row["config"],
            "pages": int(span["pages"]), "errors": int(span["errors"] or 0),
            "seconds": round(seconds, 3), "pages_per_s": round(int(span["pages"]) / seconds, 2),
            "tiles": int(delta("bec_inference_tiles_total")),
            "tiles_per_s": round(delta("bec_inference_tiles_total") / seconds, 2) if seconds else 0.0,
            "peak_rss_mb": round(peak / 2**20, 1), "peak_pss_mb": round(peak_pss / 2**20, 1),
            "median_pss_mb": round(sorted(pss_samples)[len(pss_samples) // 2] / 2**20, 1),
            "inference_busy_s": round(busy, 3), "inference_idle_s": round(max(0.0, seconds - busy), 3),
            "inference_busy_ratio": round(busy / seconds, 3) if seconds else 0.0,
            "inference_waits_over_100ms": int(long_waits), "failed_volumes": int(row["failed"]),
            "cpu_ms_per_page_by_process": cpu_ms}
