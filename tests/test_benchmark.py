"""A tiny configuration of `python -m benchmarks.ldv1`, so the benchmark cannot rot."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_tiny_benchmark_runs_every_part(tmp_path, monkeypatch):
    from benchmarks import ldv1

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "result.json"
    ldv1.main(["--pages", "8", "--volumes", "2", "--procs", "1", "--model", "null", "--source", "folder",
               "--batch-tiles", "4", "--batches-in-flight", "2", "--infer-procs", "2", "--repeat", "2", "--json", str(out), "--out", str(tmp_path / "bench")])
    result = json.loads(out.read_text())
    names = [s["name"] for s in result["stages"]]
    assert any(n.startswith("fetch") for n in names)
    # decode as the fetch process does it (its threads), and on one thread with each library
    decodes = {n: s["pages"] for n, s in zip(names, result["stages"]) if n.startswith("decode")}
    assert decodes == {"decode 1p×4t [pipeline (turbojpeg for JPEG, Pillow for TIFF)]": 8,
                       "decode 1p×1t [pipeline (turbojpeg for JPEG, Pillow for TIFF)]": 8,
                       "decode 1p×1t [Pillow (pillow-simd)]": 8}
    assert any(n.startswith("infer") for n in names) and any(n.startswith("post") for n in names)
    assert all(s["pages_per_s"] > 0 for s in result["stages"])
    run, = result["pipeline"]
    assert run["pages"] == 8 and run["errors"] == 0 and run["failed_volumes"] == 0
    # two runs, the reported one is the (lower) median of them
    assert len(run["pages_per_s_runs"]) == 2 and run["pages_per_s"] == min(run["pages_per_s_runs"])
    assert 0 < run["efficiency"] and run["pages_per_s"] > 0 and run["peak_pss_mb"] > 0
    assert run["slowest_stage"] in {"decode", "infer", "post", "parquet"}  # named, not just a rate
    # the worker's job (read back from PostgreSQL) got the benchmark's options
    assert run["device"] == "cpu" and run["job_config"]["max_tiles_per_batch"] == 4
    assert run["job_config"]["batches_in_flight"] == 2
    # --infer-procs: the worker ran two inference processes, and inference alone was measured so
    infer_row = next(s for s in result["stages"] if s["name"].startswith("infer"))
    assert run["inference_procs"] == 2 and infer_row["procs"] == 2
    assert run["job_config"]["use_gpu"] is False and run["job_config"]["precision"] == "fp32"
    assert [b["pages"] for b in result["baselines"]] == [8, 8]
    assert all(b["ceiling_ratio"] == round(run["ceiling_pages_per_s"] / b["pages_per_s"], 2)
               for b in result["baselines"])
    assert "turbojpeg_gray_ms" in result["decoders"]
    # the model alone (tiles already on the device) is the inference process' yardstick; the
    # pipeline's tiles are the worker's own count (null model: no second passes, the same tiles)
    by_name = dict(zip(names, result["stages"]))
    alone = by_name["model alone (device-resident tiles, full batches)"]
    infer = next(s for n, s in by_name.items() if n.startswith("infer"))
    assert alone["batch_tiles"] == 3 and alone["tiles"] > 0 and alone["tiles_per_s"] > 0
    assert run["tiles"] == infer["tiles"] > 8 and run["tiles_per_s"] > 0
    assert run["model_alone_ratio"] == round(run["tiles_per_s"] / alone["tiles_per_s"], 3)


def test_inference_replicas_do_the_work_of_one_process(tmp_path):
    """Inference alone as a CPU worker lays it out (two replicas side by side): the same pages,
    tiles and results, in corpus order, as one process with the same threads per replica."""
    import torch

    from benchmarks import corpus as C
    from benchmarks import pagework as W
    from benchmarks import stages
    from bec.devstack.stack import shipped_model
    from bec.ldv1.segmenter import load_segmenter

    corpus = C.build(6, 2, cache_dir=tmp_path)
    cfg = W.config(max_tiles_per_batch=4)
    model = str(shipped_model())
    torch.set_num_threads(1)
    seg = load_segmenter(model, torch.device("cpu"), "fp32", threshold=cfg["line_threshold"], tile=cfg["tile_size"])
    frames = [W.decode_frame(p.data, cfg) for *_, p in corpus.items()]
    one, _, expected = stages.infer_and_post(seg, frames, cfg)
    two, post, got = stages.infer_and_post_replicas(model, "cpu", "fp32", cfg, (2, 1), 6, 6, 2, tmp_path)
    assert two.pages == one.pages == 6 and post.pages == 6
    assert two.extra["procs"] == 2 and two.extra["threads"] == 1
    assert two.extra["tiles"] == one.extra["tiles"] > 6 and two.seconds > 0 and two.cpu_s > 0
    assert [(o.width, o.height, o.skew_angle, len(o.contours)) for o in got] == \
        [(o.width, o.height, o.skew_angle, len(o.contours)) for o in expected]
    for a, b in zip(got, expected):
        assert all((ca == cb).all() for ca, cb in zip(a.contours, b.contours))


def test_repeat_below_one_is_refused_before_any_work(tmp_path, capsys):
    from benchmarks import ldv1

    with pytest.raises(SystemExit) as exited:
        ldv1.main(["--repeat", "0", "--out", str(tmp_path / "bench")])
    assert exited.value.code == 2 and "must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_device_check_without_its_kit_says_what_to_do(tmp_path):
    """On a bare GPU machine without .devkit the prepared check stops at once, saying how to
    build the kit, instead of failing later on a missing module."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(script, tmp_path / "benchmarks" / "device_check.sh")
    done = subprocess.run(["bash", str(tmp_path / "benchmarks" / "device_check.sh")], capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert done.returncode == 2
    assert "run scripts/device-kit.sh" in done.stderr and "carry .devkit" in done.stderr
    assert not (tmp_path / "out" / "gpu.json").exists()
