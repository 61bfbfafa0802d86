"""``bec demo``: the whole system on the local stack, with pictures of what it found.

Brings the local stack up, generates BDRC-layout volumes of archive-like Tibetan pages
(``bec.tools.synth``: pechas, book pages, tables of contents; JPEG and Group 4 TIFF) into
the archive bucket, creates job ``ldv1`` with the shipped model,
enqueues the volumes, runs ``bec worker --procs 2`` to completion, prints the job's
statistics; then job ``ocr`` reads the text of every page on ldv1's lines (``lines_from``)
through its own worker run. ``demo-out/`` holds every page with its detected lines drawn
over it and the text read beside it (with its CER against the generated text), an
``index.html`` gallery per volume. Each step runs the real ``bec`` command.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

import click

from bec.cli.context import out

if TYPE_CHECKING:
    from bec.devstack import stack

VOLUMES = [("W22084", "I0886"), ("W22084", "I0887"), ("W1KG13780", "I1KG15541"),
           ("W22084", "I0888"), ("W22084", "I0889"), ("W22084", "I0890")]
JOB = "ldv1"
OCR_JOB = "ocr"


def _bec(*args: str, log: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("bec"))
    if log is not None:
        with log.open("w") as fh:
            return subprocess.run([exe, *args], stdout=fh, stderr=subprocess.STDOUT, check=check)
    return subprocess.run([exe, *args], check=check)


def _drain_leftovers(state: stack.StackState, job: str = JOB) -> None:
    """Messages an interrupted earlier demo left in the (reused) queue would be processed too.
    (PurgeQueue is refused within 60 s of the last one, so re-runs delete them one by one.)"""
    import boto3

    from bec.devstack import stack

    sqs = boto3.client("sqs", region_name=stack.REGION, endpoint_url=state.moto_url)
    url = sqs.get_queue_url(QueueName=f"bec_{job}_tasks")["QueueUrl"]
    while batch := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        sqs.delete_message_batch(QueueUrl=url, Entries=[
            {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(batch)])


def _fresh_job(state: stack.StackState, s3: object, job: str, config: str, volumes: list[tuple[str, str]]) -> None:
    """Job ``job`` created anew, without the artifacts an earlier demo left (the worker would skip
    those volumes) or messages it left in the queue."""
    from bec.control.db import Database
    from bec.devstack import stack

    with Database(state.db_params(), max_size=1) as db:
        if db.row("SELECT 1 FROM jobs WHERE name = %s", (job,)):
            _bec("jobs", "delete", job, "--yes")
    for w, i in volumes:
        listing = s3.list_objects_v2(Bucket=stack.DEST_BUCKET, Prefix=f"{job}/{w}/{i}/").get("Contents", [])  # type: ignore[attr-defined]
        for obj in listing:
            s3.delete_object(Bucket=stack.DEST_BUCKET, Key=obj["Key"])  # type: ignore[attr-defined]
    _bec("jobs", "create", "--name", job, "--config-text", config)
    _drain_leftovers(state, job)


def _run_worker(state: stack.StackState, job: str, procs: int, log_path: Path, n_volumes: int) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bec.control.db import Database

    exe = str(Path(sys.executable).with_name("bec"))
    with log_path.open("w") as log_fh:
        worker = subprocess.Popen([exe, "worker", "--job-name", job, "--procs", str(procs), "--poll-wait", "1",
                                   "--shutdown-after-empty", "2"], stdout=log_fh, stderr=subprocess.STDOUT)
        columns = (TextColumn("   volumes"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=out) as bar, Database(state.db_params(), max_size=1) as db:
            task = bar.add_task("volumes", total=n_volumes)
            while worker.poll() is None:
                done = db.row("SELECT count(*) AS n FROM task_executions t JOIN jobs j ON j.id = t.job_id "
                              "WHERE j.name = %s AND t.status = 'done'", (job,))["n"]
                bar.update(task, completed=done)
                time.sleep(0.5)
            bar.update(task, completed=n_volumes)
    if worker.returncode != 0:
        raise click.ClickException(f"the {job} worker failed (exit {worker.returncode}); see {log_path}")


@click.command("demo")
@click.option("--volumes", "n_volumes", type=click.IntRange(1, len(VOLUMES)), default=3, show_default=True,
              help="Generated volumes to enqueue.")
@click.option("--pages", type=click.IntRange(1, 200), default=4, show_default=True, help="Pages per volume.")
@click.option("--procs", type=click.IntRange(1, 64), default=2, show_default=True,
              help="The worker's fetch/decode processes.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Folder for the drawn pages and the gallery (index.html).")
@click.option("--model-path", default=None, help="Checkpoint to use [default: the shipped small model].")
def command(n_volumes: int, pages: int, procs: int, out_dir: str, model_path: str | None) -> None:
    """Run the whole system on a local stack: ldv1, then ocr on its lines; draw lines and text."""
    # Imported here, not at the top: every `bec` command imports this module, and these
    # (pyarrow, numpy, the image stack) would add ~0.12 s to each.
    import boto3

    from bec.edges import artifacts
    from bec.control.db import Database
    from bec.devstack import stack
    from bec.devstack.volumes import make_volume
    from bec.present.gallery import index_html, render_volume

    out.rule("BEC demo")
    out.print("1. Local stack (moto S3/SQS + PostgreSQL)")
    state = stack.up()
    stack.apply_env(state)
    if model_path:
        os.environ["BEC_LD_MODEL_PATH"] = model_path
    for name, text in stack.status(state).items():
        out.print(f"   {name}: {text}")
    s3 = boto3.client("s3", region_name=stack.REGION, endpoint_url=state.moto_url)
    volumes = VOLUMES[:n_volumes]

    out.print(f"2. Generating {len(volumes)} volumes × {pages} pages (JPEG RGB/gray, Group 4 TIFF; "
              "every other page bent or skewed by a known amount) "
              f"into s3://{stack.SOURCE_BUCKET}")
    truths = {}
    for n, (w, i) in enumerate(volumes):
        made = make_volume(s3, stack.SOURCE_BUCKET, w, i, pages, seed=4242 + n,
                           geometries=("straight", "bent", "straight", "skewed"))
        truths[(w, i)] = {page.filename: "\n".join(page.line_texts) for page in made}

    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    jobs = ((JOB, '{"use_gpu": false, "precision": "fp32", "batch_size": 8, "max_tiles_per_batch": 16}'),
            (OCR_JOB, '{"model": "tesseract", "lang": "bod", "lines_from": "ldv1"}'))
    stats: dict[str, str] = {}
    for step, (job, config) in zip((3, 6), jobs):
        out.print(f"{step}. Job '{job}' (a fresh one: the demo owns the local stack's database)")
        _fresh_job(state, s3, job, config, volumes)
        out.print(f"{step + 1}. Enqueue")
        _bec("queue", "enqueue", "--job-name", job, *[a for w, i in volumes for a in ("--volume", f"{w},{i}")])
        log_path = target / ("worker.log" if job == JOB else f"worker-{job}.log")
        out.print(f"{step + 2}. bec worker --job-name {job} --procs {procs}   (log: {log_path})")
        _run_worker(state, job, procs, log_path, len(volumes))
        stats[job] = subprocess.run([str(Path(sys.executable).with_name("bec")), "jobs", "stats", job],
                                    capture_output=True, text=True).stdout
        out.print(f"   bec jobs stats {job}")
        out.print(stats[job], markup=False)

    out.print(f"9. Drawing the detected lines and the text read into {target}/")
    pictures = []
    with Database(state.db_params(), max_size=1) as db:
        for w, i in volumes:
            row = db.row("SELECT last_s3_etag FROM volumes WHERE bdrc_w_id = %s AND bdrc_i_id = %s", (w, i))
            key = artifacts.success_key(JOB, w, i, row["last_s3_etag"]) if row else None
            if key is None:
                continue
            pictures.append(render_volume(s3, stack.SOURCE_BUCKET, stack.DEST_BUCKET, JOB, w, i,
                                          row["last_s3_etag"], target, ocr_job=OCR_JOB, truth=truths[(w, i)]))
    (target / "index.html").write_text(index_html(pictures, stats[JOB] + stats[OCR_JOB]))
    for v in pictures:
        lines = sum(p["nb_contours"] for p in v.pages)
        cer = f", CER {v.cer:.1%} against the generated text" if v.cer is not None else ""
        out.print(f"   {v.w_id}/{v.i_id}: {len(v.pages)} pages, {lines} lines{cer} → {v.folder}/index.html")
    out.print(f"Open {target.resolve()}/index.html. The stack is still up: "
              f'eval "$(bec dev env)" and try any command of the guide.')
