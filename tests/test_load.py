"""Load and endurance: many workers on one queue; one worker fed for minutes.

The soak runs ``SOAK_SECONDS`` (default 30 in CI; the closing figures come from 600) and
writes what it sampled to ``SOAK_REPORT`` when that is set (not BEC_ variables: the stack
fixture clears those).
"""
from __future__ import annotations

import collections
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from bec.edges.archive import volume_prefix
from bec.devstack.volumes import render
from bec.observe.telemetry import resident_memory
from workerkit import (no_shm_leak,  # noqa: F401 - fixture
                       SOURCE_BUCKET, enqueue, link_folder_volume, queue_counts, read_parquet, setup_job,
                       shm_entries, start_worker, tasks)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_shm_leak")]


def _upload_small_volumes(stack: Any, count: int, pages: int) -> list[tuple[str, str]]:
    """``count`` volumes of ``pages`` pages, all one small generated JPEG (cheap to store)."""
    from bec.devstack.volumes import put_manifest

    data, page = render("jpeg_gray", np.random.default_rng(3), 800, 300)
    h, w = page.image.shape
    vols = []
    for n in range(count):
        w_id, i_id = "W4000", f"I{n:04d}"
        prefix = volume_prefix(w_id, i_id)
        names = [f"p{k:03d}.jpg" for k in range(pages)]
        for name in names:
            stack.s3.put_object(Bucket=SOURCE_BUCKET, Key=prefix + name, Body=data)
        put_manifest(stack.s3, SOURCE_BUCKET, w_id, i_id,
                     [{"filename": name, "width": w, "height": h} for name in names])
        vols.append((w_id, i_id))
    return vols


def test_four_workers_on_one_queue_share_200_volumes_without_a_double_grant(stack):
    q = setup_job(stack)
    vols = _upload_small_volumes(stack, 200, pages=2)
    runs = [start_worker(stack, "--shutdown-after-empty", "4", "--max-volumes-in-flight", "4")
            for _ in range(4)]
    for run in runs:
        run.wait_for("processes ready", timeout=120)
    started = time.monotonic()
    enqueue(stack, q["queue"], vols)
    for run in runs:
        assert run.wait(300) == 0, run.output
    rows = tasks(stack)
    seconds = max(r["done_at"] for r in rows).timestamp() - min(r["started_at"] for r in rows).timestamp()
    per_volume = collections.Counter((r["w_id"], r["i_id"]) for r in rows)
    # one task row per volume, every one done at the first attempt: the claim never granted twice
    assert set(per_volume) == set(vols) and set(per_volume.values()) == {1}
    assert {r["status"] for r in rows} == {"done"} and {r["attempt"] for r in rows} == {1}
    by_worker = collections.Counter(r["worker_id"] for r in rows)
    processed = [run.output.count("Successfully processed") for run in runs]
    assert sum(processed) == 200 and sorted(processed) == sorted(by_worker.values())
    assert len(by_worker) == 4, by_worker  # all four took part
    for r in rows[::20]:
        assert len(read_parquet(stack, r["w_id"], r["i_id"], r["s3_etag"])) == 2
    # nothing left to do and nothing dead-lettered; SQS may deliver a message twice, and a
    # duplicate of a volume still in progress is left in flight (it returns later, finds
    # success.json and is deleted), so a stray in-flight message is not a loss
    visible, in_flight = queue_counts(stack, q["queue"])
    assert visible == 0 and in_flight <= 2 and queue_counts(stack, q["dlq"]) == (0, 0)
    print(f"\nload: 4 workers, 200 volumes, 400 pages in {seconds:.1f} s "
          f"({200 / seconds:.1f} volumes/s, {400 / seconds:.1f} pages/s; "
          f"{time.monotonic() - started:.1f} s until the last worker left); per worker {sorted(processed)}")


# -- soak ---------------------------------------------------------------------------------------
class Feeder:
    """Keeps the queue a few volumes deep with fresh volumes whose pages are hard links to a
    JPEG and a Group 4 TIFF, so thousands of pages cost a few files on disk."""

    def __init__(self, stack: Any, queue_url: str, root: Path, pages: int) -> None:
        self.stack, self.queue_url, self.root, self.pages = stack, queue_url, root, pages
        rng = np.random.default_rng(11)
        self.originals = []
        for kind, ext in (("jpeg_gray", "jpg"), ("tiff_g4", "tif")):
            data, page = render(kind, rng)
            path = root / f"original.{ext}"
            path.write_bytes(data)
            self.originals.append((path, ext, page.image.shape))
        self.sent: list[tuple[str, str]] = []
        self.stop = threading.Event()

    def make_volume(self, n: int) -> tuple[str, str]:
        w_id, i_id = "W5000", f"I{n:05d}"
        link_folder_volume(self.root, w_id, i_id, self.originals, self.pages)
        return w_id, i_id

    def run(self) -> None:
        while not self.stop.is_set():
            visible, in_flight = queue_counts(self.stack, self.queue_url)
            for _ in range(max(0, 6 - visible)):
                vol = self.make_volume(len(self.sent))
                enqueue(self.stack, self.queue_url, [vol])
                self.sent.append(vol)
            self.stop.wait(0.5)


def sample_tree(root: psutil.Process) -> dict[str, Any]:
    rss = fds = threads = 0
    by_process: dict[str, float] = {}
    for p in [root] + root.children(recursive=True):
        try:
            with p.oneshot():
                mine = p.memory_info().rss
                fds += p.num_fds()
                threads += p.num_threads()
                by_process["supervisor" if p.pid == root.pid else p.name()] = {
                    kind: round(size / 2**20, 1) for kind, size in resident_memory(p.pid).items()}
                rss += mine
        except (psutil.Error, OSError):
            pass
    shm = len({e for e in shm_entries() if not e.startswith("PostgreSQL")})
    return {"rss_mb": rss / 2**20, "fds": fds, "threads": threads, "shm": shm, "rss_mb_by_process": by_process}


SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "30"))


@pytest.mark.timeout(SOAK_SECONDS + 300)
def test_soak_null_model_resources_stay_flat(stack, tmp_path):
    seconds = SOAK_SECONDS
    q = setup_job(stack)
    archive = tmp_path / "archive"
    archive.mkdir()
    feeder = Feeder(stack, q["queue"], archive, pages=40)
    run = start_worker(stack, "--s3-source-bucket", f"file://{archive}", "--shutdown-after-empty", "3")
    run.wait_for("processes ready", timeout=120)
    root = psutil.Process(run.process.pid)
    feeding = threading.Thread(target=feeder.run, daemon=True)
    feeding.start()
    samples: list[dict[str, float]] = []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        assert run.process.poll() is None, run.output
        samples.append({"t": time.monotonic() - start, **sample_tree(root)})
        time.sleep(1.0)
    feeder.stop.set()
    feeding.join(10)
    assert run.wait(180) == 0, run.output
    rows = tasks(stack)
    assert {r["status"] for r in rows} == {"done"} and len(rows) == len(feeder.sent)
    pages = sum(r["total_images"] for r in rows)
    assert sum(r["nb_errors"] for r in rows) == 0

    # after the first quarter (imports, pools and caches filling), nothing may keep growing
    steady = [s for s in samples if s["t"] >= seconds / 4]
    half = len(steady) // 2
    early, late = steady[:half], steady[half:]

    def figures(key: str) -> dict[str, float]:
        return {"early_median": statistics.median(s[key] for s in early),
                "late_median": statistics.median(s[key] for s in late),
                "early_max": max(s[key] for s in early), "late_max": max(s[key] for s in late)}

    report = {"seconds": seconds, "pages": pages, "volumes": len(rows),
              "pages_per_s": round(pages / seconds, 1),
              **{key: figures(key) for key in ("rss_mb", "fds", "threads", "shm")}}
    print("\nsoak:", json.dumps(report))
    if os.environ.get("SOAK_REPORT"):
        Path(os.environ["SOAK_REPORT"]).write_text(json.dumps({**report, "samples": samples}, indent=1))
    assert pages >= 1000, report
    rss = report["rss_mb"]
    assert rss["late_median"] <= rss["early_median"] * 1.05 + 25, report
    assert report["fds"]["late_max"] <= report["fds"]["early_max"] + 4, report
    assert report["threads"]["late_max"] <= report["threads"]["early_max"] + 2, report
    assert report["shm"]["late_max"] <= report["shm"]["early_max"], report
