"""`bec worker` end to end on the local stack: real processes, real S3/SQS/PostgreSQL state."""
from __future__ import annotations

import json
import signal
import time

import pytest

from bec.edges.archive import volume_prefix
from bec.devstack.volumes import put_manifest
from bec.ldv1.preprocess import frame_size
from clihelp import ok
from conftest import DEST_BUCKET, SOURCE_BUCKET
from workerkit import (no_shm_leak,  # noqa: F401 - fixture
                       add_volumes, enqueue, manifest, queue_counts, read_parquet, read_success,
                       run_worker, send, setup_job, start_worker, tasks)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_shm_leak")]


def assert_volume_done(stack, w, i, pages):
    version = stack.db.row("SELECT last_s3_etag FROM volumes WHERE bdrc_w_id=%s AND bdrc_i_id=%s", (w, i))["last_s3_etag"]
    rows = read_parquet(stack, w, i, version)
    entries = manifest(stack, w, i)
    assert [r["img_file_name"] for r in rows] == [e["filename"] for e in entries]
    assert len(rows) == pages
    return version, rows


def test_volumes_end_to_end(stack):
    q = setup_job(stack)
    vols = add_volumes(stack, 2, pages=5)
    enqueue(stack, q["queue"], vols)
    run = run_worker(stack)
    out = run.output
    for line in ("Starting BEC Worker", "Job: ldv1", "Region: us-east-1", "Source bucket: archive.tbrc.org",
                 "Dest bucket: bec-test-artifacts", "Worker initialized: worker_id=1, job_id=1",
                 f"Queue: {q['queue']}", f"DLQ: {q['dlq']}", "Worker completed successfully",
                 "Worker shutdown complete"):
        assert line in out, line
    assert out.count("Successfully processed message:") == 2

    rows = tasks(stack)
    assert [(r["w_id"], r["i_id"], r["status"], r["attempt"]) for r in rows] == [
        ("W22084", "I0000", "done", 1), ("W22084", "I0001", "done", 1)]
    for row, (w, i) in zip(rows, vols):
        assert row["total_images"] == 5 and row["nb_errors"] == 0
        assert row["total_duration_ms"] > 0 and row["avg_duration_per_page_ms"] == pytest.approx(row["total_duration_ms"] / 5)
        assert row["done_at"] is not None and row["worker_id"] == 1
        version, pages = assert_volume_done(stack, w, i, 5)
        assert row["s3_etag"] == version
        prefix = volume_prefix(w, i)
        for page, entry in zip(pages, manifest(stack, w, i)):
            head = stack.s3.head_object(Bucket=SOURCE_BUCKET, Key=prefix + entry["filename"])
            assert page["ok"] and page["source_etag"] == head["ETag"].strip('"')
            assert (page["width"], page["height"]) == (entry["width"], entry["height"])
            assert (page["frame_width"], page["frame_height"]) == frame_size(entry["width"], entry["height"])
        marker = read_success(stack, w, i, version)
        assert marker["total_images"] == 5 and marker["nb_errors"] == 0
        assert marker["model"] == {"name": "null", "sha256": ""}
        assert marker["worker"]["id"] == 1 and marker["job_config"]["precision"] == "fp32"
    assert queue_counts(stack, q["queue"]) == (0, 0)
    worker = stack.db.row("SELECT * FROM workers")
    assert worker["stopped_at"] is not None


def test_mixed_formats_decode(stack):
    """RGB and gray JPEG and Group 4 TIFF pages all decode (to the frame rule's size)."""
    q = setup_job(stack)
    vols = add_volumes(stack, 1, pages=6, kinds=("jpeg_rgb", "jpeg_gray", "tiff_g4"))
    enqueue(stack, q["queue"], vols)
    run_worker(stack)
    _, rows = assert_volume_done(stack, *vols[0], 6)
    assert all(r["ok"] for r in rows), rows
    assert [r["img_file_name"].rsplit(".", 1)[1] for r in rows] == ["jpg", "jpg", "tif"] * 2


def test_an_unreadable_success_marker_is_processed_again(stack):
    """success.json means done, but one that is not a JSON object (written by hand, damaged)
    tells nothing: the volume is processed again and a true marker written, instead of a
    done row with 0 images."""
    from bec.edges import artifacts
    from bec.edges.archive import read_manifest

    q = setup_job(stack)
    [(w, i)] = vols = add_volumes(stack, 1, pages=3)
    version = read_manifest(stack.s3, SOURCE_BUCKET, w, i).version
    stack.s3.put_object(Bucket=DEST_BUCKET, Key=artifacts.success_key("ldv1", w, i, version), Body=b"{trunc")
    enqueue(stack, q["queue"], vols)
    run = run_worker(stack)
    assert "is unreadable (6 bytes): processing the volume again" in run.output
    [row] = tasks(stack)
    assert (row["status"], row["total_images"], row["nb_errors"]) == ("done", 3, 0)
    assert read_success(stack, w, i, version)["total_images"] == 3
    assert_volume_done(stack, w, i, 3)


def test_duplicate_messages_make_one_task(stack):
    q = setup_job(stack)
    vols = add_volumes(stack, 1, pages=3)
    enqueue(stack, q["queue"], vols * 3)
    # Duplicates of the running volume are looked at again stale_after + 2 s later (the worker
    # waits for them before counting empty polls): a short stale_after keeps the test short.
    run = run_worker(stack, "--stale-after", "10")
    rows = tasks(stack)
    assert len(rows) == 1 and rows[0]["status"] == "done" and rows[0]["attempt"] == 1
    assert run.output.count("Successfully processed message:") == 1
    # the duplicates were left to SQS (returning later) or recognised as done and deleted
    visible, in_flight = queue_counts(stack, q["queue"])
    assert visible + in_flight <= 2


def test_a_worker_that_stops_on_empty_polls_leaves_no_receive_open(stack):
    """The run ends only after its last poll has returned, and starts no other. A long poll
    still open in SQS after the worker has gone would take the next message and hide it for
    the visibility timeout, with nobody left to process it."""
    q = setup_job(stack)
    run = run_worker(stack)  # an empty queue: two empty polls (of 1 s), then the worker exits
    assert "Worker completed successfully (2 empty polls)" in run.output
    enqueue(stack, q["queue"], add_volumes(stack, 1, pages=1))
    time.sleep(1.5)  # a poll left open would have taken the message by now
    assert queue_counts(stack, q["queue"]) == (1, 0)


def test_poison_messages_go_to_dlq_with_reason(stack):
    q = setup_job(stack)
    bodies = ["not json", "[1,2]", json.dumps({"w_id": "W1"}), json.dumps({"w_id": "W1", "i_id": "I1", "x": 1}),
              json.dumps({"w_id": "../etc", "i_id": "I1"}), json.dumps({"w_id": "W1", "i_id": "I1'; DROP TABLE jobs;--"}),
              "x" * 5000]
    send(stack, q["queue"], bodies)
    run = run_worker(stack)
    assert run.output.count("Poison message") == len(bodies)
    got = []
    while batch := stack.sqs.receive_message(QueueUrl=q["dlq"], MaxNumberOfMessages=10,
                                             MessageAttributeNames=["All"]).get("Messages", []):
        for m in batch:
            got.append((m["Body"], m["MessageAttributes"]["bec_reason"]["StringValue"]))
            stack.sqs.delete_message(QueueUrl=q["dlq"], ReceiptHandle=m["ReceiptHandle"])
    reasons = dict(got)
    assert sorted(reasons) == sorted(bodies)
    assert reasons["not json"] == "message body is not JSON"
    assert "lacks i_id" in reasons[json.dumps({"w_id": "W1"})]
    assert "unexpected keys: x" in reasons[json.dumps({"w_id": "W1", "i_id": "I1", "x": 1})]
    assert "invalid work id" in reasons[json.dumps({"w_id": "../etc", "i_id": "I1"})]
    assert "too large" in reasons["x" * 5000]
    assert tasks(stack) == [] and queue_counts(stack, q["queue"]) == (0, 0)
    assert stack.db.row("SELECT count(*) AS n FROM jobs")["n"] == 1


def test_missing_manifest_is_terminal_and_goes_to_dlq(stack):
    q = setup_job(stack)
    enqueue(stack, q["queue"], [("W404", "I404")])
    run_worker(stack)
    rows = tasks(stack)
    assert [(r["status"], r["s3_etag"]) for r in rows] == [("terminal_failed", "")]
    assert "manifest missing" in rows[0]["error_reason"]
    msgs = stack.sqs.receive_message(QueueUrl=q["dlq"], MessageAttributeNames=["All"])["Messages"]
    assert "manifest missing" in msgs[0]["MessageAttributes"]["bec_reason"]["StringValue"]


@pytest.mark.parametrize("option, value, said", [
    ("--s3-source-bucket", "no-such-archive", "the source bucket 'no-such-archive' does not exist"),
    ("--s3-dest-bucket", "no-such-results", "the destination bucket 'no-such-results' does not exist"),
    ("--s3-source-bucket", "file:///no/such/folder", "the source folder '/no/such/folder' does not exist"),
], ids=["source", "dest", "folder"])
def test_a_bucket_that_does_not_exist_stops_the_worker_before_it_takes_a_volume(stack, option, value, said):
    """A typo in a bucket name is the worker's fault, not the volumes': before, a wrong source
    bucket sent every volume to the DLQ as "manifest missing" and the worker exited 0."""
    q = setup_job(stack)
    enqueue(stack, q["queue"], add_volumes(stack, 1, pages=2))
    run = start_worker(stack, option, value)
    assert run.wait(60) == 1
    assert said in run.output and "Traceback" not in run.output
    assert "Starting BEC Worker" not in run.output  # refused before registering or receiving
    assert queue_counts(stack, q["queue"]) == (1, 0) and queue_counts(stack, q["dlq"]) == (0, 0)
    assert tasks(stack) == []
    assert stack.db.row("SELECT count(*) AS n FROM workers")["n"] == 0


def test_a_manifest_that_appears_later_leaves_one_done_task(stack):
    """The "manifest missing" row (version '') stood for a volume without a version; once the
    volume is processed at its real version, the statistics must not count it terminal too."""
    q = setup_job(stack)
    enqueue(stack, q["queue"], [("W22084", "I0000")])
    run_worker(stack)
    assert [(r["status"], r["s3_etag"]) for r in tasks(stack)] == [("terminal_failed", "")]
    [vol] = add_volumes(stack, 1, pages=2)  # W22084/I0000 arrives in the archive
    enqueue(stack, q["queue"], [vol])
    run_worker(stack)
    rows = tasks(stack)
    assert [r["status"] for r in rows] == ["done"] and rows[0]["s3_etag"] != ""
    assert "Total Tasks: 1" in ok("jobs", "stats", "ldv1")


def test_invalid_manifest_is_terminal(stack):
    q = setup_job(stack)
    put_manifest(stack.s3, SOURCE_BUCKET, "W1", "I1", [], raw=b"\x1f\x8bnot really gzip")
    put_manifest(stack.s3, SOURCE_BUCKET, "W1", "I2", [])
    enqueue(stack, q["queue"], [("W1", "I1"), ("W1", "I2")])
    run_worker(stack)
    reasons = sorted(r["error_reason"] for r in tasks(stack))
    assert [r["status"] for r in tasks(stack)] == ["terminal_failed"] * 2
    assert "gzip data is corrupt" in reasons[0] and "lists no images" in reasons[1]


def test_bad_pages_become_error_rows(stack):
    q = setup_job(stack, {"max_image_pixels": 50_000_000})  # 6 of 8 pages fail, all deterministic
    (w, i), = add_volumes(stack, 1, pages=2)
    prefix = volume_prefix(w, i)
    entries = manifest(stack, w, i)
    good = stack.s3.get_object(Bucket=SOURCE_BUCKET, Key=prefix + entries[0]["filename"])["Body"].read()
    from PIL import Image
    import io
    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, "TIFF", compression="group4")
    bad = {"empty.jpg": b"", "truncated.jpg": good[: len(good) // 3], "text.jpg": b"hello, not an image",
           "bomb.tif": bomb.getvalue()}
    for name, data in bad.items():
        stack.s3.put_object(Bucket=SOURCE_BUCKET, Key=prefix + name, Body=data)
    entries += [{"filename": n, "width": 10, "height": 10} for n in bad]
    entries += [{"filename": "missing.jpg", "width": 10, "height": 10}, {"filename": "../escape.jpg"}]
    put_manifest(stack.s3, SOURCE_BUCKET, w, i, entries)
    enqueue(stack, q["queue"], [(w, i)])
    run_worker(stack)
    row, = tasks(stack)
    _, pages = assert_volume_done(stack, w, i, 8)
    verdicts = {p["img_file_name"]: (p["ok"], p["error_stage"], p["error_type"]) for p in pages}
    assert row["status"] == "done" and row["total_images"] == 8 and row["nb_errors"] == 6, verdicts
    assert verdicts["empty.jpg"] == (False, "decode", "empty_file")
    assert verdicts["truncated.jpg"] == (False, "decode", "corrupt_image")
    assert verdicts["text.jpg"] == (False, "decode", "unsupported_format")
    assert verdicts["bomb.tif"] == (False, "decode", "too_large")
    assert verdicts["missing.jpg"] == (False, "fetch", "missing_object")
    assert verdicts["../escape.jpg"] == (False, "manifest", "invalid_entry")
    assert all(p["error_message"] for p in pages if not p["ok"])
    assert sum(p["ok"] for p in pages) == 2
    # what every row has, failed ones included, the file's schema promises (non-null)
    import pyarrow.parquet as pq
    from bec.edges import artifacts
    body = stack.s3.get_object(Bucket=DEST_BUCKET, Key=artifacts.parquet_key("ldv1", w, i, row["s3_etag"]))["Body"]
    schema = pq.read_schema(io.BytesIO(body.read()))
    assert {f.name for f in schema if not f.nullable} == {
        "img_file_name", "ok", "nb_contours", "contours", "contours_bboxes", "nb_lines", "line_index",
        "fetch_ms", "decode_ms", "infer_ms", "post_ms"}
    failed = [p for p in pages if not p["ok"]]
    assert all(p["rotation_angle"] is None and p["tps_points"] is None and p["skew_angle"] is None
               for p in failed)


def test_cpu_host_scheduling_of_the_processes(stack):
    """On CPU the model's threads own the cores: helpers are niced, OpenMP spins briefly; and
    no child carries what it does not use."""
    setup_job(stack)
    run = start_worker(stack, "--shutdown-after-empty", "0")
    try:
        kids = run.wait_children(["controller", "fetch-0", "infer-0", "post-0"])
        run.wait_for("processes ready", timeout=60)
        assert kids["fetch-0"].nice() == 19 and kids["post-0"].nice() == 19
        assert kids["controller"].nice() == 0 and kids["infer-0"].nice() == 0  # heartbeats never wait
        assert kids["infer-0"].environ()["GOMP_SPINCOUNT"] == "10000"
        # Spawn does not re-run the ``bec`` script in the children (it would import the whole
        # CLI in each): psycopg's libpq is loaded where the database is used, nowhere else.
        libpq = {role: any("psycopg" in m.path for m in kid.memory_maps()) for role, kid in kids.items()}
        assert libpq == {"controller": True, "fetch-0": False, "infer-0": False, "post-0": False}
    finally:
        run.signal(signal.SIGTERM)
        assert run.wait(60) == 0, run.output


def test_cpu_inference_layout_replicas_per_core():
    """A real model: one single-threaded replica per core up to 8, then more threads each; the
    null model: one process, one thread; the operator's choice wins and fills in the rest."""
    from bec.pipeline.supervisor import cpu_inference_layout

    model = "small.pth"
    assert cpu_inference_layout(model, 1) == (1, 1)
    assert cpu_inference_layout(model, 2) == (2, 1)
    assert cpu_inference_layout(model, 8) == (8, 1)
    assert cpu_inference_layout(model, 32) == (8, 4)
    assert cpu_inference_layout(model, 4, procs=1) == (1, 4)
    assert cpu_inference_layout(model, 4, threads=2) == (2, 2)
    assert cpu_inference_layout("null", 16) == (1, 1)
    assert cpu_inference_layout("null", 16, procs=2) == (2, 1)


def test_image_files_over_max_image_bytes_are_refused_before_they_are_read(stack):
    """A fetch thread held the whole object before anything looked at it (a 2 GB file, 2 GB a
    thread). Now the manifest's size refuses a page without a GET, the GET's Content-Length
    before its body is read; both are error rows (fetch/too_large) and the volume goes on."""
    from faultproxy import FaultProxy

    q = setup_job(stack, {"max_error_ratio": 1.0, "max_image_bytes": 400_000})
    (w, i), = add_volumes(stack, 1, pages=1, kinds=["jpeg_gray"])
    prefix = volume_prefix(w, i)
    entries = manifest(stack, w, i)
    good = stack.s3.get_object(Bucket=SOURCE_BUCKET, Key=prefix + entries[0]["filename"])["Body"].read()
    assert len(good) < 400_000
    stack.s3.put_object(Bucket=SOURCE_BUCKET, Key=prefix + "listed_big.jpg", Body=good)
    stack.s3.put_object(Bucket=SOURCE_BUCKET, Key=prefix + "big.jpg", Body=good + bytes(500_000))
    entries += [{"filename": "listed_big.jpg", "width": 10, "height": 10, "size": 3_000_000},
                {"filename": "big.jpg", "width": 10, "height": 10}]
    put_manifest(stack.s3, SOURCE_BUCKET, w, i, entries)
    enqueue(stack, q["queue"], [(w, i)])
    gets: list[str] = []
    proxy = FaultProxy(stack.moto.url, lambda method, path: gets.append(path) if method == "GET" else False)
    try:
        run_worker(stack, env={"AWS_ENDPOINT_URL_S3": proxy.url})
    finally:
        proxy.close()
    _, pages = assert_volume_done(stack, w, i, 3)
    by_name = {p["img_file_name"]: p for p in pages}
    assert by_name[entries[0]["filename"]]["ok"]
    listed, big = by_name["listed_big.jpg"], by_name["big.jpg"]
    assert (listed["ok"], listed["error_stage"], listed["error_type"]) == (False, "fetch", "too_large")
    assert "is 3,000,000 bytes (by the manifest), over the limit of 400,000 (max_image_bytes)" in listed["error_message"]
    assert (big["ok"], big["error_stage"], big["error_type"]) == (False, "fetch", "too_large")
    assert "bytes (its Content-Length)" in big["error_message"]
    assert not any(p.endswith("listed_big.jpg") for p in gets)   # never fetched
    assert any(p.endswith("/big.jpg") for p in gets)


def test_a_rewritten_manifest_in_a_folder_source_is_a_new_version(stack, tmp_path):
    """With --s3-source-bucket file://…, the version came from the file's mtime (ns, hex) and
    size: its first six digits change every ~18 minutes, so a manifest rewritten within them
    (same size) kept its version and the volume was skipped as done. It is the content's MD5
    now, as S3's ETag is."""
    from bec.edges.archive import read_manifest
    from bec.devstack.volumes import manifest_bytes
    from bec.edges.localarchive import DirectoryS3
    from workerkit import link_folder_volume

    root = tmp_path / "archive"
    root.mkdir()
    original = root / "page.jpg"
    from bec.devstack.volumes import render
    import numpy as np
    data, page = render("jpeg_gray", np.random.default_rng(3))
    original.write_bytes(data)
    link_folder_volume(root, "W1", "I1", [(original, "jpg", page.image.shape)], 2)
    q = setup_job(stack)
    source = f"file://{root}"
    enqueue(stack, q["queue"], [("W1", "I1")])
    run_worker(stack, "--s3-source-bucket", source)
    path = root / volume_prefix("W1", "I1") / "dimensions.json"
    first = read_manifest(DirectoryS3(source), source, "W1", "I1").version
    stat = path.stat()
    entries = json.loads(__import__("gzip").decompress(path.read_bytes()))
    entries[0], entries[1] = entries[1], entries[0]            # same size, other content
    path.write_bytes(manifest_bytes(entries))
    import os
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    second = read_manifest(DirectoryS3(source), source, "W1", "I1").version
    assert second != first
    enqueue(stack, q["queue"], [("W1", "I1")])
    run_worker(stack, "--s3-source-bucket", source)
    rows = tasks(stack)
    assert sorted((r["s3_etag"], r["status"]) for r in rows) == sorted([(first, "done"), (second, "done")])
