"""``python -m benchmarks.ldv1``: every stage alone, the whole pipeline, and the baselines.

One run, one generated corpus (seeded, shaped like the archive), one model:

* stages alone — S3 fetch, decode (PyTurboJPEG vs Pillow side by side), inference (tiles/s),
  post-processing, Parquet writing — pages/s and per-page ms (median, p95);
* the whole pipeline through the real ``bec worker`` (processes, shared memory, SQS,
  PostgreSQL) at each ``--procs``, against its ceiling (the slowest stage's pages/s for the
  same resources): efficiency = e2e ÷ ceiling;
* the baselines a user would write: a sequential loop and a ``DataLoader``;
* optionally (``--memory``) peak RSS summed over the worker's processes at larger sizes.

Results print as a table and go to ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from benchmarks import corpus as C
from benchmarks import e2e, stages
from benchmarks import pagework as W
from bec.pipeline.child import PipelineSpec

OUT = Path("bench-out")
console = Console(width=150)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _model_path(kind: str, out: Path) -> str:
    if kind == "null":
        return "null"
    if kind == "small":
        from bec.devstack.stack import shipped_model

        path = shipped_model()
        if path.exists():
            return str(path)
        from bec.ldv1.checkpoint import save_checkpoint
        from bec.ldv1.smallnet import SmallLineNet

        path = out / "small-random.pth"
        save_checkpoint(SmallLineNet(), path, arch="bec-small-v1")
        return str(path)
    import torch

    from bec.ldv1.deeplab import DeepLabV3Plus

    path = out / "ldv1-random.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save({"state_dict": DeepLabV3Plus().state_dict()}, path)
    return str(path)


def _local_stack(tmp: Path) -> tuple[e2e.Stack, Any, list]:
    """A private moto server and a fresh database for this run."""
    import boto3

    from bec.config import DbParams
    from bec.control.db import Database
    from bec.devstack import moto as motostack
    from bec.devstack import postgres as pgstack

    moto = motostack.start(log_path=tmp / "moto.log")
    pg = pgstack.find_or_start(tmp / "pgdata")
    dbname = f"bec_bench_{os.getpid()}"
    pgstack.create_database(pg, dbname)
    params = DbParams(pg.host, pg.port, pg.user, None, dbname)
    db = Database(params, max_size=2)
    db.apply_schema()
    env = {**os.environ, "BEC_SQL_HOST": pg.host, "BEC_SQL_PORT": str(pg.port), "BEC_SQL_USER": pg.user,
           "BEC_SQL_DATABASE": dbname, "BEC_REGION": "us-east-1", "BEC_DEST_S3_BUCKET": "bench-artifacts",
           "AWS_ENDPOINT_URL": moto.url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto.url)
    for bucket in ("archive.tbrc.org", "bench-artifacts"):
        s3.create_bucket(Bucket=bucket)
    sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=moto.url)

    def close() -> None:
        db.close()
        moto.stop()
        pgstack.drop_database(pg, dbname)
        if pg.data_dir:
            pgstack.stop_private(pg)

    return e2e.Stack(env, db, sqs), s3, [close]


def parser() -> argparse.ArgumentParser:
    """Every option with its help and its default (shown by ``--help``)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ldv1", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # 720 pages keep the worker busy ~25 s on two CPU cores with the small model; at 240 pages
    # (9 s) filling and draining the pipeline was 1 s of the run, and efficiency read 0.82
    # instead of 0.84-0.93 in steady state.
    ap.add_argument("--pages", type=_at_least_one, default=720,
                    help="pages of the generated corpus (enough to keep the worker busy in steady state)")
    ap.add_argument("--volumes", type=_at_least_one, default=12, help="volumes the corpus is split into")
    ap.add_argument("--procs", default="1,2", help="comma-separated fetch/decode process counts")
    ap.add_argument("--model", choices=["null", "small", "ldv1"], default="small",
                    help="null: no model (the data plane alone); small: the shipped model; "
                         "ldv1: the production architecture with random weights")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                    help="the job's precision (fp16 on a CPU runs in fp32)")
    ap.add_argument("--batch-tiles", type=_at_least_one, default=None,
                    help="the job's max_tiles_per_batch (unset: the job config's default)")
    ap.add_argument("--infer-procs", type=_at_least_one, default=None,
                    help="the worker's inference processes (unset: its own layout; on a GPU one per device)")
    ap.add_argument("--batches-in-flight", type=int, choices=[0, 1, 2], default=None,
                    help="the job's batches_in_flight (0 auto: 2 on a GPU, 1 on CPU; unset: the job's default)")
    ap.add_argument("--source", choices=["s3", "folder"], default="s3",
                    help="serve the corpus from the local stack's S3 (moto) or from a folder")
    ap.add_argument("--memory", default="",
                    help="comma-separated corpus sizes, e.g. 1000,5000: peak RSS of null-model runs at each "
                         "(empty: none)")
    ap.add_argument("--repeat", type=_at_least_one, default=1,
                    help="whole-pipeline runs per process count, taking turns; each reports its median")
    ap.add_argument("--skip-baselines", action="store_true",
                    help="leave out the sequential loop and the DataLoader")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    ap.add_argument("--out", type=Path, default=OUT,
                    help="work folder: corpus cache, local stack, worker logs")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    from bec.pipeline import heap

    heap.keep_freed_memory()  # stages alone and baselines get the heap the worker's processes have

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    procs_list = [int(p) for p in args.procs.split(",") if p]
    cores = len(os.sched_getaffinity(0))
    results: dict[str, Any] = {
        "config": {**vars(args), "json": str(args.json) if args.json else None, "out": str(out),
                   "cores": cores, "python": platform.python_version(), "machine": platform.machine()},
        "stages": [], "pipeline": [], "baselines": [], "memory": []}
    overrides: dict[str, Any] = {"max_tiles_per_batch": args.batch_tiles} if args.batch_tiles else {}
    if args.batches_in_flight is not None:
        overrides["batches_in_flight"] = args.batches_in_flight
    cfg = W.config(precision=args.precision, use_gpu=args.device == "cuda", **overrides)

    console.rule(f"benchmarks.ldv1 — model {args.model} on {args.device}, {args.pages} pages, {cores} cores")
    t = time.perf_counter()
    corpus = C.build(args.pages, args.volumes, cache_dir=cache)
    items = corpus.items()
    console.print(f"corpus: {corpus.pages} pages in {len(corpus.volumes)} volumes "
                  f"({corpus.bytes_total() / corpus.pages / 1000:.0f} kB/page), ready in {time.perf_counter() - t:.1f}s")
    stack, s3, closers = _local_stack(out)
    try:
        folder = out / "archive"
        if args.source == "s3":
            C.publish(corpus, C.s3_writer(s3, "archive.tbrc.org"))
            source = "archive.tbrc.org"
        else:
            shutil.rmtree(folder, ignore_errors=True)
            C.publish(corpus, C.folder_writer(folder))
            source = f"file://{folder.resolve()}"
        model_path = _model_path(args.model, out)
        keys = [f"{W.volume_prefix(w, i)}{name}" for w, i, name, _ in items]

        # -- stages alone -------------------------------------------------------------------
        # Decode as the fetch processes do it (in their fetch threads), for the rates; one
        # thread in one process, turbojpeg and Pillow, for the per-page latency on an idle core.
        threads = PipelineSpec.fetch_threads  # the worker's default
        fetch_rows: dict[int, dict[str, Any]] = {}
        decode_rows: dict[int, dict[str, Any]] = {}
        for p in procs_list:
            fetch_rows[p] = stages.as_dict(stages.fetch(keys, source, "us-east-1", p, threads))
            decode_rows[p] = stages.as_dict(stages.decode(len(items), args.pages, args.volumes, cache, p, threads))
            results["stages"] += [fetch_rows[p], decode_rows[p]]
        for pillow in (False, True):
            results["stages"].append(stages.as_dict(stages.decode(len(items), args.pages, args.volumes, cache, 1, 1,
                                                                  force_pillow=pillow)))
        results["decoders"] = stages.decoders_side_by_side([p.data for *_, p in items], [p.kind for *_, p in items])

        import torch

        from bec.ldv1.segmenter import load_segmenter

        from bec.pipeline.supervisor import cpu_inference_layout

        # Inference alone runs as the worker lays it out: on a CPU host, model replicas side
        # by side (see cpu_inference_layout); on a GPU one process.
        layout = cpu_inference_layout(model_path, cores, args.infer_procs) if args.device == "cpu" else (1, cores)
        # The baselines are what a user would write: one process, torch's threads = the cores.
        baseline_threads = 1 if model_path == "null" else cores
        torch.set_num_threads(baseline_threads)
        segmenter = load_segmenter(model_path, torch.device(args.device), args.precision,
                                   threshold=cfg["line_threshold"], tile=cfg["tile_size"])
        frames: list[W.Frame] = []  # decoded here only where this process runs the model
        if layout[0] > 1:
            infer, post, outcomes = stages.infer_and_post_replicas(model_path, args.device, args.precision, cfg,
                                                                   layout, len(items), args.pages, args.volumes,
                                                                   cache)
        else:
            torch.set_num_threads(layout[1])
            frames = [W.decode_frame(p.data, cfg) for *_, p in items]
            infer, post, outcomes = stages.infer_and_post(segmenter, frames, cfg)
        results["stages"] += [stages.as_dict(infer), stages.as_dict(post),
                              stages.as_dict(stages.parquet(outcomes, max(1, len(items) // args.volumes)))]
        # the inference process' yardstick: the model alone, in this process (on a GPU, the device)
        results["stages"].append(stages.as_dict(stages.model_alone(segmenter, [p.data for *_, p in items], cfg)))
        results["stages"] += [stages.as_dict(r) for r in stages.host_to_device(frames, args.device)]

        # -- the pipeline -------------------------------------------------------------------
        by_name = {s["name"]: s for s in results["stages"]}
        vols = [(w, i) for w, i, _ in corpus.volumes]
        # With --repeat the process counts take turns (1, 2, 1, 2…), so a neighbour's load on a
        # shared host lands on every count alike; each count reports its median run.
        runs: dict[int, list[dict[str, Any]]] = {p: [] for p in procs_list}
        for k in range(args.repeat):
            for p in procs_list:
                runs[p].append(e2e.run_worker(stack, f"ldv1-bench-{p}-{k}-{int(time.time())}", vols, corpus.pages,
                                              model_path, p, source, log_path=out / f"worker-p{p}.log",
                                              device=args.device, precision=args.precision, config=overrides,
                                              extra=["--infer-procs", str(args.infer_procs)] if args.infer_procs else None))
        for p in procs_list:
            ordered = sorted(runs[p], key=lambda r: r["pages_per_s"])
            run = ordered[(len(ordered) - 1) // 2]
            run["pages_per_s_runs"] = [r["pages_per_s"] for r in runs[p]]
            decode_p, fetch_p = decode_rows[p], fetch_rows[p]
            limits = {"decode": decode_p["pages_per_s"], "infer": infer.pages_per_s,
                      "post": post.pages_per_s, "parquet": by_name["parquet (build + write)"]["pages_per_s"]}
            if args.source == "s3":
                limits["fetch"] = fetch_p["pages_per_s"]
            # Stages that share the same cores cannot each run at their solo rate: the CPU
            # budget (cores ÷ the CPU time all stages spend per page) is a ceiling too.
            cpu_ms = (fetch_p["cpu_ms_per_page"] + decode_p["cpu_ms_per_page"] + by_name[infer.name]["cpu_ms_per_page"]
                      + by_name[post.name]["cpu_ms_per_page"]
                      + by_name["parquet (build + write)"]["cpu_ms_per_page"])
            limits["cpu budget"] = 1000 * cores / cpu_ms if cpu_ms else float("inf")
            slowest = min(limits, key=limits.get)
            run["ceiling_stage"] = slowest
            run["ceiling_pages_per_s"] = round(limits[slowest], 2)
            run["efficiency"] = round(run["pages_per_s"] / limits[slowest], 3)
            stage = min((k for k in limits if k != "cpu budget"), key=limits.get)
            run["slowest_stage"] = stage
            run["slowest_stage_pages_per_s"] = round(limits[stage], 2)
            run["cpu_budget_pages_per_s"] = round(limits["cpu budget"], 2)
            run["decode_only_ratio"] = round(run["pages_per_s"] / decode_p["pages_per_s"], 3)
            if (alone := by_name.get("model alone (device-resident tiles, full batches)")) and alone["tiles_per_s"]:
                run["model_alone_ratio"] = round(run["tiles_per_s"] / alone["tiles_per_s"], 3)
            results["pipeline"].append(run)

        # -- baselines ----------------------------------------------------------------------
        if not args.skip_baselines:
            from benchmarks import baselines

            torch.set_num_threads(baseline_threads)
            seq = baselines.sequential(items, source, "us-east-1", segmenter, cfg)
            results["baselines"].append(seq)
            for p in procs_list:
                results["baselines"].append(baselines.dataloader(items, source, "us-east-1", segmenter, cfg, p))
            best = max(results["pipeline"], key=lambda r: r["pages_per_s"])
            # The most any pipeline could gain over a baseline on these cores: its best ceiling
            # (where the CPU budget binds, every core busy with nothing but the stages' own work).
            ceiling = max(r["ceiling_pages_per_s"] for r in results["pipeline"])
            for b in results["baselines"]:
                b["pipeline_ratio"] = round(best["pages_per_s"] / b["pages_per_s"], 2)
                b["ceiling_ratio"] = round(ceiling / b["pages_per_s"], 2)

        # -- memory -------------------------------------------------------------------------
        for n in [int(x) for x in args.memory.split(",") if x]:
            big = C.build(n, max(1, n // 40), cache_dir=cache)
            big_folder = out / f"archive-{n}"
            shutil.rmtree(big_folder, ignore_errors=True)
            C.publish(big, C.folder_writer(big_folder))
            run = e2e.run_worker(stack, f"ldv1-mem-{n}-{int(time.time())}", [(w, i) for w, i, _ in big.volumes],
                                 big.pages, "null", max(procs_list), f"file://{big_folder.resolve()}")
            results["memory"].append({"pages": n, **run})
            shutil.rmtree(big_folder, ignore_errors=True)
    finally:
        for close in closers:
            close()
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
        console.print(f"results → {args.json}")
    return results


def _figure(value: float | None, fmt: str = "{:.1f}") -> str:
    """A measured figure, or "—" for one the stage did not measure (never a made-up 0.0)."""
    return "—" if value is None else fmt.format(value)


def report(results: dict[str, Any]) -> None:
    t = Table(title="Stages alone")
    for col in ("stage", "pages/s", "median ms", "p95 ms", "CPU ms/page", "notes"):
        t.add_column(col, justify="left" if col in ("stage", "notes") else "right")
    for s in results["stages"]:
        notes = ", ".join(f"{k}={v}" for k, v in s.items() if k in ("tiles_per_s", "tiles", "threads",
                                                                     "second_pass_pages", "bytes_per_page", "gb_per_s",
                                                                     "procs", "second_pass_share", "dewarped_pages",
                                                                     "post_ms_dewarped", "post_ms_rotated",
                                                                     "post_ms_straight"))
        t.add_row(escape(s["name"]), f"{s['pages_per_s']:.1f}", _figure(s.get("median_ms")),
                  _figure(s.get("p95_ms")), _figure(s.get("cpu_ms_per_page")), notes)
    console.print(t)
    if results.get("decoders"):
        console.print("JPEG decoders, ms/page single-threaded: " + ", ".join(
            f"{k}={v}" for k, v in results["decoders"].items()))
    t = Table(title="Whole pipeline (bec worker)")
    for col in ("procs", "pages/s", "ceiling (binding)", "efficiency", "slowest stage", "CPU budget",
                "÷ decode-only", "tiles/s", "÷ model alone", "inference busy", "peak PSS MB"):
        t.add_column(col, justify="right")
    for r in results["pipeline"]:
        spread = r.get("pages_per_s_runs", [])
        rate = f"{r['pages_per_s']:.2f}" + (f" ({min(spread):.1f}–{max(spread):.1f})" if len(spread) > 1 else "")
        t.add_row(str(r["procs"]), rate, f"{r['ceiling_pages_per_s']:.2f} ({r['ceiling_stage']})",
                  f"{r['efficiency']:.2f}",
                  f"{r['slowest_stage']} ({r['slowest_stage_pages_per_s']:.2f})" if "slowest_stage" in r
                  else f"{r['slowest_stage_pages_per_s']:.2f}",
                  f"{r['cpu_budget_pages_per_s']:.2f}", f"{r['decode_only_ratio']:.2f}",
                  f"{r['tiles_per_s']:.1f}", f"{r['model_alone_ratio']:.2f}" if "model_alone_ratio" in r else "–",
                  f"{r['inference_busy_ratio']:.0%}" + (f" (each of {r['inference_procs']})"
                                                         if r.get("inference_procs", 1) > 1 else ""),
                  f"{r['peak_pss_mb']:.0f}")
    console.print(t)
    if results["baselines"]:
        t = Table(title="Baselines (same model, data and post-processing)")
        for col in ("baseline", "pages/s", "pipeline ×", "ceiling ×"):
            t.add_column(col)
        for b in results["baselines"]:
            t.add_row(b["name"], f"{b['pages_per_s']:.2f}", f"{b['pipeline_ratio']:.2f}", f"{b['ceiling_ratio']:.2f}")
        console.print(t)
    if results["memory"]:
        t = Table(title="Memory (null model, peak RSS summed over the worker's processes)")
        for col in ("pages", "pages/s", "peak RSS MB", "peak PSS MB", "median PSS MB"):
            t.add_column(col, justify="right")
        for m in results["memory"]:
            t.add_row(str(m["pages"]), f"{m['pages_per_s']:.1f}", f"{m['peak_rss_mb']:.0f}",
                      f"{m['peak_pss_mb']:.0f}", f"{m['median_pss_mb']:.0f}")
        console.print(t)


if __name__ == "__main__":
    main()
