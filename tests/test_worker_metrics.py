"""The worker's Prometheus endpoint: every process aggregated, values that match the work done."""
from __future__ import annotations

import signal
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bec.devstack.moto import free_port
from workerkit import add_volumes, enqueue, setup_job, start_worker

pytestmark = pytest.mark.slow


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_endpoint_aggregates_children(stack):
    q = setup_job(stack)
    vols = add_volumes(stack, 2, pages=4)
    enqueue(stack, q["queue"], vols)
    port = free_port()
    run = start_worker(stack, "--metrics-port", str(port), "--shutdown-after-empty", "0")  # default address
    try:
        for _ in range(2):
            run.wait_for("Successfully processed", timeout=90)
        # by default the endpoint listens on this host only (it listened on every address)
        from test_exporter import listening_addresses
        assert listening_addresses(run.process.pid, port) == {"127.0.0.1"}
        assert f"Metrics: http://127.0.0.1:{port}/metrics" in run.output
        import time
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            samples = scrape(port)
            if value(samples, "bec_volumes_total", outcome="done") == 2:
                break
            time.sleep(0.5)
        assert value(samples, "bec_volumes_total", outcome="done") == 2
        assert value(samples, "bec_pages_total", outcome="ok") == 8
        for stage in ("fetch", "decode", "infer", "post"):
            assert value(samples, "bec_stage_seconds_count", stage=stage) == 8, stage
        assert value(samples, "bec_stage_seconds_count", stage="write") == 2
        assert value(samples, "bec_inference_tiles_total") >= 8
        assert value(samples, "bec_inference_batches_total") >= 1
        from workerkit import SOURCE_BUCKET  # images and manifests, to the byte
        listed = stack.s3.list_objects_v2(Bucket=SOURCE_BUCKET)["Contents"]
        assert value(samples, "bec_s3_read_bytes_total") == sum(o["Size"] for o in listed)
        # series a healthy worker never touches exist at 0, so their panels read 0, not "No data"
        for name, labels in (("bec_child_restarts_total", {"kind": "fetch"}),
                             ("bec_sqs_dlq_sends_total", {"reason": "poison"}),
                             ("bec_volumes_total", {"outcome": "taken_over"})):
            assert (name, tuple(sorted(labels.items()))) in samples and value(samples, name, **labels) == 0
        assert value(samples, "bec_s3_written_bytes_total") > 0
        assert value(samples, "bec_sqs_receive_calls_total") >= 1
        assert value(samples, "bec_sqs_messages_received_total") == 2
        assert value(samples, "bec_sqs_deletes_total") == 2
        assert value(samples, "bec_slots_capacity") > 0
        assert value(samples, "bec_slots", state="free") > 0
        for role in ("supervisor", "controller", "fetch-0", "infer-0", "post-0"):
            assert value(samples, "bec_process_resident_memory_bytes", role=role, kind="anon") > 10 * 2**20, role
        assert value(samples, "bec_process_resident_memory_bytes", role="fetch-0", kind="shmem") > 0
        assert any(k[0] == "bec_worker_info" and dict(k[1]).get("job") == "ldv1" for k in samples)
        assert not any("W22084" in str(k) or "I0000" in str(k) for k in samples)  # no per-volume labels
        # a restarted child keeps its counted work
        kids = run.children()
        kids["controller"].kill()
        run.wait_for("controller (pid", timeout=10)
        time.sleep(2)
        after = scrape(port)
        assert value(after, "bec_pages_total", outcome="ok") == 8
        assert value(after, "bec_child_restarts_total", kind="controller") == 1
    finally:
        run.signal(signal.SIGTERM)
        assert run.wait(60) == 0


def test_json_logs_one_line_per_volume(stack):
    import json

    from workerkit import run_worker

    q = setup_job(stack)
    vols = add_volumes(stack, 2, pages=2)
    enqueue(stack, q["queue"], vols)
    run = run_worker(stack, "--log-json")
    entries = [json.loads(line) for line in run.lines if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["message"] == "Starting BEC Worker" for e in entries)
    volumes = [e for e in entries if e.get("outcome") == "done"]
    assert sorted(e["volume"] for e in volumes) == sorted(f"{w}/{i}" for w, i in vols)
    assert all(e["pages"] == 2 and e["errors"] == 0 and e["seconds"] > 0 for e in volumes)
