"""grafana/: every panel of the dashboard answers from a real Prometheus scraping a real
worker and a real `bec exporter`; provisioning and the scrape example hold together;
promtool accepts what the worker exports."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from bec.edges.archive import volume_prefix
from bec.devstack.moto import free_port
from bec.devstack.volumes import put_manifest
from conftest import SOURCE_BUCKET
from workerkit import add_volumes, enqueue, manifest, send, setup_job, start_worker, tasks

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "grafana"
BEC = str(Path(sys.executable).with_name("bec"))
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                                      reason="Debian's prometheus package (prometheus, promtool) is not "
                                             "installed: apt-get install prometheus")

#: Panels fed by workers of an ocr job only (the OCR row): this file's worker runs ldv1.
OCR_PANELS = ("OCR lines/s", "OCR mean confidence", "OCR errors")
# How the test stands in for Grafana's variables ($job and $instance: "All", i.e. allValue).
VARIABLES = {"__rate_interval": "1m", "__interval": "5s", "__range": "5m", "job": ".*", "instance": ".*"}


def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboard.json").read_text())


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found.append(panel)
        found += all_panels(panel.get("panels", []))  # collapsed rows keep their panels inside
    return found


def targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of every panel."""
    found = []
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


def expand(expr: str) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in VARIABLES, f"unknown dashboard variable ${name} in {expr}"
        return VARIABLES[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)


def variable_queries() -> list[str]:
    """The template variables' label_values(selector, label) queries, as selectors."""
    found = []
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, query
        found.append((expand(match.group(1)), match.group(2)))
    return found


def exported_names() -> set[str]:
    """Every sample name the worker and the exporter can export, from their own code."""
    from prometheus_client.metrics import MetricWrapperBase

    from bec.observe import exporter, metrics
    from bec.ocr import metrics as ocr_metrics
    from bec.pipeline.supervisor import Supervisor

    names = set()
    for obj in [*vars(metrics).values(), *vars(ocr_metrics).values()]:
        if isinstance(obj, MetricWrapperBase):
            kind, name = obj._type, obj._name
            names |= {"counter": {f"{name}_total"}, "gauge": {name},
                      "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"}}[kind]
    fake = SimpleNamespace(slots=SimpleNamespace(table=np.zeros(4, dtype=[("state", np.int8)])))
    families = Supervisor.slot_metrics(fake)  # type: ignore[arg-type]
    families += Supervisor.process_metrics(SimpleNamespace(children={}))  # type: ignore[arg-type]
    snap = exporter.Snapshot(True, [exporter.JobSample("j", {"done": 1}, 1, 1,
                                                       {"tasks": {"visible": 1}})], 0.0, 0.0)
    families += exporter.families(snap, 1.0)
    return names | {f.name for f in families}


def test_every_query_uses_exported_metrics_and_provisioning_holds():
    board = dashboard()
    assert board["uid"] == "bec-workers"
    names = exported_names()
    queries = [e for _, e in targets()] + [s for s, _ in variable_queries()]
    used = {m for e in queries for m in re.findall(r"\bbec_\w+", e)}
    assert used - names == set(), f"the dashboard queries metrics nobody exports: {used - names}"
    # the panels the operators asked for are there
    titles = {p["title"] for p in all_panels(board["panels"])}
    for title in ("Pages/s", "Volumes done/s", "Queue depth", "ETA", "Volume failures by outcome",
                  "Page errors by type", "Stage latency p50", "Stage latency p95", "Slot occupancy",
                  "Pages waiting", "Inference batch fill", "Inference tiles/s", "Accelerator busy",
                  "S3 bandwidth", "Database errors and pool wait", "Child restarts", "Volumes in flight",
                  "Memory per process"):
        assert title in titles, title
    # every panel and query goes through the $datasource variable, defaulting to the provisioned uid
    for panel in all_panels(board["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    variables = {v["name"]: v for v in board["templating"]["list"]}
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    prometheus = [s for s in sources if s["type"] == "prometheus"]
    assert len(prometheus) == 1
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == prometheus[0]["uid"]
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/bec.yml").read_text())["providers"]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    folder = providers[0]["options"]["path"]
    assert f"dashboard.json:{folder}/dashboard.json" in (GRAFANA / "provisioning/dashboards/bec.yml").read_text()
    # the scrape example: workers on :9108, the exporter on :9109, labels honoured
    scrape = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())["scrape_configs"]
    ports = {c["job_name"]: {t.rsplit(":", 1)[1] for sc in c["static_configs"] for t in sc["targets"]}
             for c in scrape}
    assert ports == {"bec-workers": {"9108"}, "bec-exporter": {"9109"}}
    assert all(c["honor_labels"] for c in scrape)


@needs_prometheus
def test_promtool_accepts_the_configs():
    check = subprocess.run([PROMTOOL, "check", "config", str(GRAFANA / "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15).read().decode()


def promtool_check_metrics(text: str) -> tuple[int, str]:
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    return check.returncode, check.stdout + check.stderr


def wait_until(what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def add_volume_with_missing_page(stack, i_id: str) -> tuple[str, str]:
    (w, i), = add_volumes(stack, 1, pages=4, start=int(i_id[1:]))
    entries = manifest(stack, w, i) + [{"filename": "missing.jpg", "width": 10, "height": 10}]
    put_manifest(stack.s3, SOURCE_BUCKET, w, i, entries)
    assert stack.s3.list_objects_v2(Bucket=SOURCE_BUCKET, Prefix=volume_prefix(w, i) + "missing")["KeyCount"] == 0
    return w, i


@needs_prometheus
def test_every_panel_answers_from_a_real_prometheus(stack, tmp_path):
    q = setup_job(stack)
    # two rounds of the same kinds of work: a series is born at its first value, and Prometheus
    # (without created timestamps) sees a rate only once a scraped series moves
    rounds = [add_volumes(stack, 1, pages=4) + [add_volume_with_missing_page(stack, "I0003"), ("W404", "I404")],
              add_volumes(stack, 2, pages=4, start=1) + [add_volume_with_missing_page(stack, "I0004"),
                                                         ("W405", "I405")]]
    worker_port, exporter_port, prom_port = free_port(), free_port(), free_port()
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())  # the shipped example, retargeted
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    for job in config["scrape_configs"]:
        job["scrape_interval"] = "1s"
        port = worker_port if job["job_name"] == "bec-workers" else exporter_port
        job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    logs = (tmp_path / "prometheus.log").open("w")
    env = {**os.environ, **stack.env}
    procs = [
        subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                         stdout=logs, stderr=subprocess.STDOUT, cwd=tmp_path),
        subprocess.Popen([BEC, "exporter", "--port", str(exporter_port), "--addr", "127.0.0.1",
                          "--interval", "1"], stdout=logs, stderr=subprocess.STDOUT, env=env, cwd=tmp_path),
    ]
    run = start_worker(stack, "--metrics-port", str(worker_port), "--metrics-addr", "127.0.0.1",
                       "--shutdown-after-empty", "0")
    try:
        # work starts once Prometheus watches, so that rates see it happen
        def both_up() -> bool:
            try:
                return sorted(float(r["value"][1]) for r in query(prom_port, "up")) == [1, 1]
            except OSError:  # Prometheus itself still starting
                assert procs[0].poll() is None, (tmp_path / "prometheus.log").read_text()
                return False
        wait_until("Prometheus to scrape the worker and the exporter", both_up, 30)
        statuses = ["done"] * 2 + ["terminal_failed"]
        for n, work in enumerate(rounds):
            enqueue(stack, q["queue"], work)        # good volumes, one with a missing page, one terminal
            send(stack, q["queue"], ["not json"])   # poison: straight to the DLQ
            wait_until(f"round {n + 1} of the volumes to be processed",
                       lambda: sorted(t["status"] for t in tasks(stack)) == statuses, 60)
            if n == 0:
                seen = {"sum(bec_sqs_dlq_sends_total)": "2", "count(bec_page_errors_total)": "1",
                        'sum(bec_volumes_total{outcome="done"})': "2", 'sum(bec_job_tasks{status="done"})': "2"}
                wait_until("Prometheus to see round 1", lambda: all(
                    [r["value"][1] for r in query(prom_port, e)] == [v] for e, v in seen.items()), 20)
                statuses = ["done"] * 5 + ["terminal_failed"] * 2
        run.wait_children(["fetch-0"])["fetch-0"].kill()        # a child restart, for that panel
        run.wait_for("fetch-0 (pid", timeout=15)

        # The OCR row's panels answer from workers of an ocr job (test_worker_ocr scrapes them).
        exprs = [(title, expand(e)) for title, e in targets() if title not in OCR_PANELS]
        exprs += [(f"variable {label}", sel) for sel, label in variable_queries()]

        empty: list[tuple[str, str]] = []

        def all_answer() -> bool:
            empty[:] = [(title, e) for title, e in exprs if not query(prom_port, e)]
            return not empty
        try:
            wait_until("every panel to answer", all_answer, 40, every=1)
        except AssertionError:
            raise AssertionError("panels with no data:\n" + "\n".join(f"  {t}: {e}" for t, e in empty)) from None
        for sel, label in variable_queries():
            assert all(label in r["metric"] for r in query(prom_port, sel)), sel
        # the values behind them are the work done (labels honoured: job = the BEC job); the
        # exporter refreshes every second and Prometheus scrapes every second: let them catch up
        expected = {'bec_job_tasks{job="ldv1",status="done"}': 5.0,
                    'bec_job_tasks{job="ldv1",status="terminal_failed"}': 2.0,
                    'bec_job_images_done{job="ldv1"}': 22.0,
                    'bec_job_page_errors{job="ldv1"}': 2.0,
                    # the terminal volumes and the poison messages
                    'bec_job_queue_messages{job="ldv1",queue="dlq",state="visible"}': 4.0,
                    'sum(bec_job_queue_messages{job="ldv1",queue="tasks"})': 0.0,
                    'sum(bec_volumes_total{outcome="done"})': 5.0,
                    'sum(bec_pages_total)': 22.0, 'sum(bec_page_errors_total)': 2.0}
        current: dict[str, list[float]] = {}

        def settled() -> bool:
            current.update({e: [float(r["value"][1]) for r in query(prom_port, e)] for e in expected})
            return all(current[e] == [v] for e, v in expected.items())
        try:
            wait_until("the values of the work done", settled, 20)
        except AssertionError:
            raise AssertionError(f"expected {expected}, Prometheus says {current}") from None
        # the work is seen happening (all of it scraped, above): rates above zero, quantiles
        # that are numbers
        for title in ("Pages/s", "Volumes done/s", "Volume failures by outcome", "Page errors by type",
                      "Inference tiles/s", "S3 bandwidth", "Stage latency p50", "Stage latency p95",
                      "Inference batch fill", "Inference wait for pages"):
            first = next(e for t, e in exprs if t == title)
            values = [float(r["value"][1]) for r in query(prom_port, first)]
            assert any(v > 0 for v in values), (title, first, values)

        errors = query(prom_port, "bec_page_errors_total")
        assert [(r["metric"]["stage"], r["metric"]["error_type"], r["metric"]["class"]) for r in errors] == [
            ("fetch", "missing_object", "deterministic")]
        eta = [r for t, e in exprs if t == "ETA" for r in query(prom_port, e)]
        # queue empty, pages/s above zero: 0 s left (NaN would mean the join or a division failed)
        assert [(r["metric"], r["value"][1]) for r in eta] == [({"job": "ldv1"}, "0")]
        # every kind's series exists from the start (at 0): the panel reads 0, not "No data";
        # the fetch restart is counted once Prometheus has scraped after it
        want = [("controller", "0"), ("fetch", "1"), ("infer", "0"), ("post", "0")]
        restarts: list[tuple[str, str]] = []

        def restart_seen() -> bool:
            restarts[:] = sorted((r["metric"]["kind"], r["value"][1])
                                 for r in query(prom_port, "bec_child_restarts_total"))
            return restarts == want
        try:
            wait_until("Prometheus to see the fetch restart", restart_seen, 15)
        except AssertionError:
            raise AssertionError(f"restarts: {restarts}, expected {want}") from None

        # promtool has nothing to say about what the worker and the exporter export
        assert promtool_check_metrics(scrape(worker_port)) == (0, "")
        assert promtool_check_metrics(scrape(exporter_port)) == (0, "")
    finally:
        run.signal(signal.SIGTERM)
        try:
            code = run.wait(60)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            logs.close()
    assert code == 0, run.output
