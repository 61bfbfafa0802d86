"""Job ldv1 through `bec worker`: real models, the production checkpoint format, config checks."""
from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import torch

from bec.devstack.stack import shipped_model
from bec.ldv1.deeplab import DeepLabV3Plus
from workerkit import (add_volumes, enqueue, queue_counts, read_parquet, run_worker, setup_job, start_worker,
                       tasks)

pytestmark = pytest.mark.slow


def test_production_format_checkpoint_runs_through_the_worker(stack, tmp_path):
    """DeepLabV3+ saved as production does ({"state_dict"}, `module.` prefixes) loads and runs."""
    torch.manual_seed(0)
    path = tmp_path / "ldv1-production.pth"
    model = DeepLabV3Plus().eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    q = setup_job(stack, {"max_tiles_per_batch": 4})
    vols = add_volumes(stack, 1, pages=2, kinds=("jpeg_gray",), size=(1200, 400))
    enqueue(stack, q["queue"], vols)
    run = run_worker(stack, model=str(path), timeout=300)
    assert "Model: ldv1-production.pth" in run.output
    row, = tasks(stack)
    assert row["status"] == "done" and row["nb_errors"] == 0
    pages = read_parquet(stack, *vols[0], row["s3_etag"])
    assert len(pages) == 2 and all(p["ok"] for p in pages)
    marker = json.loads(stack.s3.get_object(
        Bucket="bec-test-artifacts",
        Key=f"ldv1/{vols[0][0]}/{vols[0][1]}/{row['s3_etag']}/success.json")["Body"].read())
    import hashlib
    assert marker["model"] == {"name": "ldv1-production.pth", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_a_cpu_worker_runs_one_small_model_replica_per_core(stack):
    """On a CPU host a real model runs as single-threaded replicas, one per core (≤ 8); pages
    reach every replica (slots are routed slot mod replicas) and the volume is whole.
    The job asks for fp16, the default and the guide's example: on a CPU that runs in fp32,
    said once in the start-up lines, not as a Python warning from each replica."""
    cores = len(os.sched_getaffinity(0))
    replicas = min(cores, 8)
    model = shipped_model()
    q = setup_job(stack, {"precision": "fp16"})
    vols = add_volumes(stack, 1, pages=6, kinds=("jpeg_gray",), size=(1200, 400))
    enqueue(stack, q["queue"], vols)
    run = run_worker(stack, model=str(model), timeout=300)
    assert f"{replicas} inference (cpu × {cores // replicas} threads)" in run.output, run.output
    assert "precision fp16 (runs in fp32: no fast fp16 path on this device)" in run.output
    assert "Warning" not in run.output, run.output
    # the volume was waiting before the worker started; it is taken only once every replica
    # has loaded and warmed up the model
    lines = run.output.splitlines()
    ready = next(n for n, line in enumerate(lines) if "processes ready" in line)
    taken = next(n for n, line in enumerate(lines) if "Processing message:" in line)
    assert ready < taken, run.output
    row, = tasks(stack)
    assert row["status"] == "done" and row["nb_errors"] == 0
    pages = read_parquet(stack, *vols[0], row["s3_etag"])
    assert len(pages) == 6 and all(p["ok"] for p in pages)


def test_two_batches_in_flight_find_the_same_lines_as_one(stack):
    """``batches_in_flight`` 2 (a GPU's default) leaves each batch unfinished until the next is
    submitted. Forced on CPU it must give the very lines of one batch at a time (every page's
    mask stitched into its own slot, in order), and the batches must really have overlapped.
    One single-threaded inference process, so a core is left to the fetch process (nice 19):
    beside a model on every core it gets no CPU while they compute, and no frame would be
    waiting when a batch is submitted (a CI run saw no overlap that way)."""
    from bec.devstack.volumes import make_volume
    from test_worker_metrics import scrape, value
    from workerkit import SOURCE_BUCKET

    from bec.devstack.moto import free_port

    model = str(shipped_model())
    q = setup_job(stack, {"batch_size": 1, "batches_in_flight": 1})
    for i_id in ("I0000", "I0001"):  # the same six pages twice
        make_volume(stack.s3, SOURCE_BUCKET, "W22084", i_id, 6, seed=0, kinds=("jpeg_gray",), size=(1200, 400))
    enqueue(stack, q["queue"], [("W22084", "I0000")])
    run_worker(stack, "--infer-procs", "1", "--infer-threads", "1", model=model, timeout=300)
    stack.db.execute("UPDATE jobs SET config = config || '{\"batches_in_flight\": 2}'::jsonb")
    enqueue(stack, q["queue"], [("W22084", "I0001")])
    port = free_port()
    run = start_worker(stack, "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
                       "--shutdown-after-empty", "0", "--infer-procs", "1", "--infer-threads", "1", model=model)
    try:
        run.wait_for("Successfully processed", timeout=240)
        overlapped = value(scrape(port), "bec_inference_overlapped_batches_total")
    finally:
        run.signal(signal.SIGTERM)
        assert run.wait(60) == 0, run.output
    assert overlapped >= 1, run.output
    rows = {r["i_id"]: r for r in tasks(stack)}
    assert {r["status"] for r in rows.values()} == {"done"}
    one, two = (read_parquet(stack, "W22084", i_id, rows[i_id]["s3_etag"]) for i_id in ("I0000", "I0001"))
    assert sum(p["nb_contours"] for p in one) > 0
    assert [p["img_file_name"][4:] for p in two] == [p["img_file_name"][4:] for p in one]  # 0000…/0001… + page
    assert [p["contours"] for p in two] == [p["contours"] for p in one]


def test_bent_and_skewed_pages_through_the_worker_land_on_the_readers_corrected_page(stack):
    """A volume of straight, bent and skewed pecha pages: the Parquet says how each page was
    corrected, and a reader who rebuilds the corrected page (cv2 rotation, then the ``tps``
    spline) finds what the model drew on the page's true lines, and about the true count."""
    import cv2
    import numpy as np

    from bec.devstack.volumes import make_volume
    from bec.ldv1.correction import corrected_page
    from workerkit import SOURCE_BUCKET

    q = setup_job(stack)
    made = make_volume(stack.s3, SOURCE_BUCKET, "W22084", "I0000", 6, seed=7, kinds=("jpeg_gray", "tiff_g4"),
                       size=(2400, 700), geometries=("straight", "bent", "skewed"))
    enqueue(stack, q["queue"], [("W22084", "I0000")])
    run_worker(stack, model=str(shipped_model()), timeout=300)
    row, = tasks(stack)
    assert row["status"] == "done" and row["nb_errors"] == 0
    pages = read_parquet(stack, "W22084", "I0000", row["s3_etag"])
    found = []
    for page, truth in zip(pages, made):
        assert page["ok"] and page["img_file_name"] == truth.filename
        if truth.geometry == "bent":
            assert page["tps_points"] and page["tps_alpha"] == 0.5
        if truth.geometry == "skewed":
            assert page["rotation_angle"] is not None and abs(page["rotation_angle"]) >= 3
        # The reader's rebuild of the page's true line bands (the generator's labels).
        labels = corrected_page(truth.line_labels, page["rotation_angle"], page["tps_points"], page["tps_alpha"],
                                nearest=True)
        near = cv2.dilate(labels.astype(np.uint16), np.ones((9, 9), np.uint8)).astype(np.int32)
        on_own = total = 0.0
        for contour in page["contours"]:
            inside = np.zeros(labels.shape, np.uint8)
            cv2.fillPoly(inside, [np.array([[p["x"], p["y"]] for p in contour], np.int32).reshape(-1, 1, 2)], 1)
            under = near[inside > 0]
            if (under > 0).any():
                on_own += float((under == np.bincount(under[under > 0]).argmax()).sum())
            total += float(len(under))
        # What the model draws lies on the lines of the rebuilt page (a stray mark may not).
        assert on_own >= 0.85 * total, (truth.filename, truth.geometry, on_own / total)
        found.append((page["nb_lines"], truth.n_lines))
    # Line counts within ±max(1, 10 %) on most pages (the model's score is measured elsewhere).
    assert sum(abs(a - b) <= max(1, 0.1 * b) for a, b in found) >= len(found) - 1, found
    assert {t.geometry for t in made} == {"straight", "bent", "skewed"}


def test_kill_9_of_inference_while_a_batch_is_held_back(stack):
    """With two batches in flight a computed batch waits, unfinished, while the next one is
    submitted. Killing the inference process then loses the pages of both: they are taken
    back, redone inside the same claim, once each, and the volumes are whole."""
    import urllib.error

    from bec.devstack.moto import free_port
    from test_worker_metrics import scrape, value

    q = setup_job(stack, {"batch_size": 1, "batches_in_flight": 2})
    vols = add_volumes(stack, 2, pages=8, kinds=("jpeg_gray",), size=(1200, 400))
    enqueue(stack, q["queue"], vols)
    port = free_port()
    run = start_worker(stack, "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
                       "--infer-procs", "1", "--infer-threads", "1", model=str(shipped_model()))
    victim = run.wait_children(["infer-0"])["infer-0"]
    deadline = time.monotonic() + 120
    overlapped = 0.0
    while overlapped < 1:  # a batch has been held back: the next ones will be too
        assert time.monotonic() < deadline and run.process.poll() is None, run.output
        try:
            overlapped = value(scrape(port), "bec_inference_overlapped_batches_total")
        except (urllib.error.URLError, ConnectionError):
            pass  # the endpoint is not up yet
        time.sleep(0.05)
    victim.kill()
    assert run.wait(300) == 0, run.output
    assert f"infer-0 (pid {victim.pid}) died" in run.output
    assert "redoing page" in run.output, run.output  # the dead process' pages were taken back
    rows = tasks(stack)
    assert [(r["i_id"], r["status"], r["attempt"], r["nb_errors"]) for r in rows] == \
        [(i, "done", 1, 0) for _, i in vols]
    for row in rows:
        pages = read_parquet(stack, row["w_id"], row["i_id"], row["s3_etag"])
        assert len(pages) == 8 and all(p["ok"] for p in pages)


def test_missing_model_is_a_clear_error(stack, tmp_path):
    setup_job(stack)
    run = start_worker(stack, model=str(tmp_path / "nope.pth"))
    assert run.wait(60) == 1
    assert "Error: model file not found:" in run.output and "Traceback" not in run.output
    assert stack.db.row("SELECT count(*) AS n FROM workers")["n"] == 0


def test_corrupt_model_stops_the_worker_with_the_reason(stack, tmp_path):
    q = setup_job(stack)
    vols = add_volumes(stack, 1, pages=2)
    enqueue(stack, q["queue"], vols)  # waiting before the worker starts
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x80\x04 definitely not a checkpoint" * 100)
    run = start_worker(stack, model=str(bad))
    assert run.wait(120) == 1
    assert re.search(r"Error: infer-\d+: model checkpoint 'corrupt.pth' cannot be read", run.output), run.output
    worker = stack.db.row("SELECT stopped_at FROM workers")
    assert worker["stopped_at"] is not None
    # a worker that never got ready took nothing: no claim, and the message was never received
    assert tasks(stack) == [] and "Processing message:" not in run.output
    assert queue_counts(stack, q["queue"]) == (1, 0)


def test_invalid_job_config_is_rejected_at_worker_start(stack):
    setup_job(stack)
    stack.db.execute("UPDATE jobs SET config = '{\"batch_sise\": 4}'::jsonb")
    run = start_worker(stack)
    assert run.wait(60) == 1
    assert "unknown ldv1 config key 'batch_sise'" in run.output
    stack.db.execute("UPDATE jobs SET config = '{\"precision\": 16}'::jsonb")
    run = start_worker(stack)
    assert run.wait(60) == 1
    assert "'precision' must be a string" in run.output
