"""A tiny configuration of `python -m benchmarks.ldv1`, so the benchmark cannot rot."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_tiny_benchmark_runs_every_part(tmp_path, monkeypatch):
    from benchmarks import ldv1

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "result.json"
    ldv1.main(["--pages", "8", "--volumes", "2", "--procs", "1", "--model", "null", "--source", "folder",
               "--batch-tiles", "4", "--json", str(out), "--out", str(tmp_path / "bench")])
    result = json.loads(out.read_text())
    names = [s["name"] for s in result["stages"]]
    assert any(n.startswith("fetch") for n in names) and any(n.startswith("decode 1p [pipeline") for n in names)
    assert any(n.startswith("infer") for n in names) and any(n.startswith("post") for n in names)
    assert all(s["pages_per_s"] > 0 for s in result["stages"])
    run, = result["pipeline"]
    assert run["pages"] == 8 and run["errors"] == 0 and run["failed_volumes"] == 0
    assert 0 < run["efficiency"] and run["pages_per_s"] > 0 and run["peak_pss_mb"] > 0
    # the worker's job (read back from PostgreSQL) got the benchmark's options
    assert run["device"] == "cpu" and run["job_config"]["max_tiles_per_batch"] == 4
    assert run["job_config"]["use_gpu"] is False and run["job_config"]["precision"] == "fp32"
    assert [b["pages"] for b in result["baselines"]] == [8, 8]
    assert "turbojpeg_gray_ms" in result["decoders"]
