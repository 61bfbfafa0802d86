"""``python -m benchmarks.ocr``: the ocr job's speed, against its ceiling and a sequential loop.

One generated corpus (book pages and pechas with their text, stored as the archive stores
them: gray JPEG, RGB JPEG, Group 4 TIFF) on a private local stack, three measurements:

* **OCR alone** (the ceiling): the pages already decoded in memory, read by ``--ocr-procs``
  processes of one single-threaded Tesseract each, as the worker's OCR processes read them;
* **sequential** (the baseline a user would write): one process, per page S3 GET, decode, OCR;
* **pipeline**: a real ``bec worker`` on the job (processes, shared memory, SQS, PostgreSQL).

With ``--repeat N`` the ceiling and the pipeline are measured N times each, taking turns, and
their medians are compared (a host shared with other work slows whichever runs in a busy spell).

Each reports pages/s and lines/s, and per core; the pipeline's efficiency is its pages/s ÷ the
ceiling's for the same OCR processes, and its CPU efficiency the OCR alone's CPU per page ÷ the
whole worker's (every process: fetch, decode, controller, OCR), which other work on a shared
host does not move. Page-level OCR by default; ``--lines-from-ldv1`` first
runs ldv1 (the shipped small model) over the corpus, then reads BEC's lines (the ceiling then
reads the same lines: corrected page, cut, single-line OCR). Results print as a table and go
to ``--json``.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_THREAD_LIMIT", "1")  # before anything loads libtesseract

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console(width=150)
SOURCE = "archive.tbrc.org"
FORMATS = ("jpeg_gray", "tiff_g4", "jpeg_rgb")


def _bec() -> list[str]:
    installed = Path(sys.executable).with_name("bec")
    return [str(installed)] if installed.exists() else [sys.executable, "-m", "bec"]


# -- the corpus --------------------------------------------------------------------------------
def build_corpus(s3: Any, pages: int, volumes: int, kinds: list[str], seed: int) -> list[tuple[str, str, str]]:
    """Upload the volumes; returns (w, i, key) per page, in order."""
    from bec.edges.archive import volume_prefix
    from bec.devstack.volumes import make_volume

    keys = []
    per = max(1, pages // volumes)
    for v in range(volumes):
        w, i = "W1BENCH", f"I{v:04d}"
        made = make_volume(s3, SOURCE, w, i, per, seed=seed + v, kinds=FORMATS, page_kinds=kinds)
        keys += [(w, i, volume_prefix(w, i) + page.filename) for page in made]
    return keys


# -- OCR alone (the ceiling) --------------------------------------------------------------------
_reader: Any = None
_items: list[Any] = []


def _init_reader(lines_from: bool, items: list[Any] | None = None) -> None:
    """One engine per process; the pages handed over once, at start (not pickled per page)."""
    global _reader, _items
    _items = items or []
    from bec.ocr.config import OcrConfig
    from bec.ocr.tesseract import Engine, find_language_data

    cfg = OcrConfig()
    _reader = (Engine(find_language_data(cfg.lang), cfg.lang, cfg.psm, cfg.line_psm, cfg.dpi), cfg.line_margin,
               lines_from)


def _read(item: tuple[Any, Any]) -> int:
    """One page as the OCR process reads it; returns its lines."""
    gray, given = item
    engine, margin, lines_from = _reader
    if not lines_from:
        return len(engine.read_page(gray))
    from bec.ldv1.correction import Correction, correct_frame
    from bec.ocr.cutting import cut_lines

    page = correct_frame(gray, Correction(given["rotation_angle"], given["tps_points"], given["tps_alpha"]),
                         (gray.shape[1], gray.shape[0]))
    lines = cut_lines(page, given["contours"], given["line_index"], margin)
    return sum(1 for crop in lines if engine.read_line(crop.image)[0])


def _read_at(index: int) -> tuple[int, float]:
    """(lines, CPU seconds) of one page."""
    started = time.process_time()
    lines = _read(_items[index])
    return lines, time.process_time() - started


def ocr_alone(items: list[tuple[Any, Any]], procs: int, lines_from: bool) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs, initializer=_init_reader, initargs=(lines_from, items)) as pool:
        pool.map(_read_at, range(procs), chunksize=1)        # every engine loaded and warm
        started = time.perf_counter()
        done = list(pool.imap_unordered(_read_at, range(len(items)), chunksize=1))
        seconds = time.perf_counter() - started
    return _rates("OCR alone", len(items), sum(n for n, _ in done), seconds, procs, sum(c for _, c in done))


# -- the sequential baseline --------------------------------------------------------------------
def sequential(s3: Any, keys: list[tuple[str, str, str]], givens: list[Any], lines_from: bool) -> dict[str, Any]:
    from bec.edges import imaging

    _init_reader(lines_from)
    _read((_decoded(s3, keys[0]), givens[0]))                # the engine warm, as in the pool
    started, cpu = time.perf_counter(), time.process_time()
    lines = 0
    for (_, _, key), given in zip(keys, givens):
        data = s3.get_object(Bucket=SOURCE, Key=key)["Body"].read()
        gray = imaging.decode(data, 120_000_000).gray
        lines += _read((gray, given))
    return _rates("sequential (fetch, decode, OCR per page)", len(keys), lines, time.perf_counter() - started, 1,
                  time.process_time() - cpu)


def _decoded(s3: Any, key: tuple[str, str, str]) -> Any:
    from bec.edges import imaging

    return imaging.decode(s3.get_object(Bucket=SOURCE, Key=key[2])["Body"].read(), 120_000_000).gray


# -- the pipeline --------------------------------------------------------------------------------
def run_job(stack: Any, job: str, config: dict[str, Any], volumes: list[tuple[str, str]], extra: list[str],
            log_path: Path) -> tuple[float, int, float]:
    """A real worker over ``volumes``: (seconds from the first claim to the last done, pages, CPU
    seconds of all the worker's processes meanwhile)."""
    from benchmarks.e2e import _cpu_by_process

    subprocess.run([*_bec(), "jobs", "create", "--name", job, "--config-text", json.dumps(config)],
                   env=stack.env, check=True, capture_output=True)
    job_row = stack.db.row("SELECT id, queue_url FROM jobs WHERE name = %s", (job,))
    cmd = [*_bec(), "worker", "--job-name", job, "--poll-wait", "1", "--shutdown-after-empty", "0",
           "--metrics-port", "0", *extra]
    proc = subprocess.Popen(cmd, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
    deadline = time.monotonic() + 180
    while not any("processes ready" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("worker did not start:\n" + "".join(lines[-30:]))
        time.sleep(0.05)
    root = psutil.Process(proc.pid)
    cpu_before = sum(_cpu_by_process(root).values())
    for start in range(0, len(volumes), 10):
        stack.sqs.send_message_batch(QueueUrl=job_row["queue_url"], Entries=[
            {"Id": str(n), "MessageBody": json.dumps({"w_id": w, "i_id": i})}
            for n, (w, i) in enumerate(volumes[start:start + 10])])
    deadline = time.monotonic() + 3600
    while True:
        row = stack.db.row("SELECT count(*) FILTER (WHERE status = 'done') AS done, "
                           "count(*) FILTER (WHERE status NOT IN ('done', 'running')) AS failed "
                           "FROM task_executions WHERE job_id = %s", (job_row["id"],))
        if row["done"] + row["failed"] >= len(volumes):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("worker stopped early:\n" + "".join(lines[-30:]))
        time.sleep(0.25)
    cpu = sum(_cpu_by_process(root).values()) - cpu_before
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    log_path.write_text("".join(lines))
    if row["failed"]:
        raise RuntimeError(f"{row['failed']} volumes failed; see {log_path}")
    span = stack.db.row("SELECT extract(epoch FROM max(done_at) - min(started_at)) AS seconds, "
                        "sum(total_images) AS pages FROM task_executions WHERE job_id = %s", (job_row["id"],))
    return float(span["seconds"]), int(span["pages"]), cpu


def _lines_written(s3: Any, bucket: str, job: str) -> int:
    import io

    import pyarrow.parquet as pq

    total = 0
    for obj in s3.list_objects_v2(Bucket=bucket, Prefix=f"{job}/").get("Contents", []):
        if obj["Key"].endswith(".parquet"):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            total += sum(pq.read_table(io.BytesIO(body), columns=["nb_lines"]).column("nb_lines").to_pylist())
    return total


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median pages/s (its own lines/s with it)."""
    ranked = sorted(runs, key=lambda run: run["pages_per_s"])
    return dict(ranked[len(ranked) // 2], repeat=len(runs))


def _rates(name: str, pages: int, lines: int, seconds: float, procs: int, cpu_s: float) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0))
    return {"name": name, "pages": pages, "lines": lines, "seconds": round(seconds, 2), "ocr_procs": procs,
            "cpu_ms_per_page": round(1000 * cpu_s / pages, 1),
            "pages_per_s": round(pages / seconds, 3), "lines_per_s": round(lines / seconds, 2),
            "pages_per_s_per_core": round(pages / seconds / cores, 3),
            "lines_per_s_per_core": round(lines / seconds / cores, 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bec.tools.synth import KINDS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.ocr", description=__doc__.split("\n")[0])
    ap.add_argument("--pages", type=int, default=48)
    ap.add_argument("--volumes", type=int, default=4)
    ap.add_argument("--kinds", default="book,pecha,woodblock,manuscript", help=f"page kinds in turn ({', '.join(KINDS)})")
    ap.add_argument("--ocr-procs", type=int, default=None, help="OCR processes [default: one per core]")
    ap.add_argument("--procs", type=int, default=1, help="the worker's fetch/decode processes")
    ap.add_argument("--lines-from-ldv1", action="store_true", help="run ldv1 first and read its lines")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--repeat", type=int, default=1, help="OCR-alone and pipeline runs, taking turns; medians")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from benchmarks.ldv1 import _local_stack

    cores = len(os.sched_getaffinity(0))
    ocr_procs = args.ocr_procs or cores
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bec-bench-ocr-"))
    tmp.chmod(0o711)
    stack, s3, closers = _local_stack(tmp)
    results: dict[str, Any] = {"host": {"cores": cores, "cpu": platform.processor() or platform.machine()},
                               "pages": args.pages, "kinds": kinds, "lines_from": "ldv1" if args.lines_from_ldv1 else None}
    try:
        console.print(f"corpus: {args.pages} pages ({', '.join(kinds)}) in {args.volumes} volumes …")
        keys = build_corpus(s3, args.pages, args.volumes, kinds, args.seed)
        volumes = sorted({(w, i) for w, i, _ in keys})
        givens: list[Any] = [None] * len(keys)
        if args.lines_from_ldv1:
            from bec.devstack.stack import shipped_model
            from bec.ocr.ldv1lines import read_volume_lines

            console.print("ldv1 over the corpus (the shipped small model) …")
            run_job(stack, "ldv1", {"use_gpu": False, "precision": "fp32"}, volumes,
                    ["--model-path", str(shipped_model()), "--procs", str(args.procs)], tmp / "ldv1.log")
            givens = []
            for w, i in volumes:
                from bec.edges.archive import read_manifest

                manifest = read_manifest(s3, SOURCE, w, i)
                got = read_volume_lines(s3, "bench-artifacts", "ldv1", w, i, manifest.version,
                                        [e.filename for e in manifest.entries])
                givens += [got.page(n) for n in range(len(manifest.entries))]
        frames = [(_decoded(s3, key), given) for key, given in zip(keys, givens)]
        config = {"lines_from": "ldv1"} if args.lines_from_ldv1 else {}
        ceilings, pipelines = [], []
        for r in range(args.repeat):  # taking turns, so that a busy spell of the host hits both
            console.print(f"OCR alone ({r + 1}/{args.repeat}) …")
            ceilings.append(ocr_alone(frames, ocr_procs, args.lines_from_ldv1))
            console.print(f"pipeline ({r + 1}/{args.repeat}) …")
            job = "ocr" if r == 0 else f"ocr-run{r + 1}"
            seconds, pages, cpu = run_job(stack, job, config, volumes,
                                        ["--procs", str(args.procs), "--infer-procs", str(ocr_procs)],
                                        tmp / f"{job}.log")
            pipelines.append(_rates(f"pipeline (bec worker, {args.procs} fetch + {ocr_procs} OCR)", pages,
                                    _lines_written(s3, "bench-artifacts", job), seconds, ocr_procs, cpu))
        del frames
        console.print("sequential …")
        baseline = sequential(s3, keys, givens, args.lines_from_ldv1)
        ceiling = _median(ceilings)
        pipeline = _median(pipelines)
        pipeline["efficiency"] = round(pipeline["pages_per_s"] / ceiling["pages_per_s"], 3)
        pipeline["efficiency_each_turn"] = [round(p["pages_per_s"] / c["pages_per_s"], 3)
                                            for p, c in zip(pipelines, ceilings)]
        # CPU per page: the worker's whole tree against the OCR alone. Unlike wall-clock rates it
        # does not move when other work on the host takes cores away from both.
        pipeline["cpu_efficiency"] = round(ceiling["cpu_ms_per_page"] / pipeline["cpu_ms_per_page"], 3)
        pipeline["vs_sequential"] = round(pipeline["pages_per_s"] / baseline["pages_per_s"], 2)
        results["turns"] = {"ocr_alone": ceilings, "pipeline": pipelines}
        results["runs"] = [ceiling, baseline, pipeline]
    finally:
        for close in closers:
            close()
        shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"ocr job, {'lines from ldv1' if args.lines_from_ldv1 else 'page-level'}, "
                        f"{args.pages} pages, {cores} cores")
    for col in ("run", "pages/s", "lines/s", "pages/s/core", "lines/s/core", "CPU ms/page", "efficiency",
                "CPU efficiency", "× sequential"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for run in results["runs"]:
        table.add_row(run["name"], f"{run['pages_per_s']:.2f}", f"{run['lines_per_s']:.1f}",
                      f"{run['pages_per_s_per_core']:.2f}", f"{run['lines_per_s_per_core']:.1f}",
                      f"{run['cpu_ms_per_page']:.0f}",
                      f"{run['efficiency']:.2f}" if "efficiency" in run else "",
                      f"{run['cpu_efficiency']:.2f}" if "cpu_efficiency" in run else "",
                      f"{run['vs_sequential']:.2f}" if "vs_sequential" in run else "")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
