"""``bec jobs``: create, list, show, update, delete jobs; their task statistics."""
from __future__ import annotations

import json
import signal
import threading
import time
from datetime import timezone
from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from bec.control import jobs as jobstore, queues
from bec.edges import aws
from bec.cli.context import AppContext, err, out, pass_app, stale_after_setting, valid_job_name
from bec.errors import BadInput, BecError, Unavailable, page_error_class
from bec.control.ids import check_i_id, check_job_name, check_w_id, queue_names
from bec.control.jobkinds import validate_config
from bec.present.jobstats import progress_lines, status_table, totals_lines
from bec.present.throughput import SmoothedRate


@click.group()
def jobs() -> None:
    """Create and inspect jobs (each job has a tasks queue and a DLQ)."""


def read_config(config_file: str | None, config_text: str | None, job_name: str) -> dict[str, Any]:
    if config_file and config_text:
        raise BadInput("give either --config or --config-text, not both")
    if config_file:
        try:
            text = Path(config_file).read_text()
        except OSError as exc:
            raise BadInput(f"cannot read config file {config_file}: {exc.strerror}") from None
        config = jobstore.parse_config_text(text, f"config file {config_file}")
    elif config_text is not None:
        config = jobstore.parse_config_text(config_text, "--config-text")
    else:
        config = {}
    notes: list[str] = []
    config = validate_config(job_name, config, notes)
    for note in notes:
        err.print(f"Note: {note}", markup=False)
    return config


@jobs.command("create")
@click.option("--name", "name", required=True, callback=valid_job_name, help="Job name: letters, digits, '-' and '_'.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON config file.")
@click.option("--config-text", help="JSON config given inline.")
@click.option("--queue-url", help="Use this existing tasks queue instead of bec_{name}_tasks.")
@click.option("--dlq-url", help="Use this existing DLQ instead of bec_{name}_dlq.")
@click.option("--max-receive-count", type=click.IntRange(1, 1000), default=queues.DEFAULT_MAX_RECEIVE_COUNT,
              show_default=True, help="Deliveries before SQS moves a message to the DLQ.")
@click.option("--visibility-timeout", type=click.IntRange(0, 43200), default=queues.DEFAULT_VISIBILITY,
              show_default=True, help="Default visibility timeout of a new tasks queue (s).")
@pass_app
def create(app: AppContext, name: str, config_file: str | None, config_text: str | None,
           queue_url: str | None, dlq_url: str | None, max_receive_count: int,
           visibility_timeout: int) -> None:
    """Create a job and its SQS queues (reused when they exist)."""
    check_job_name(name)
    if bool(queue_url) != bool(dlq_url):
        raise BadInput("--queue-url and --dlq-url go together")
    config = read_config(config_file, config_text, name)
    db = app.db
    if jobstore.find(db, name):
        raise BadInput(f"job {name!r} already exists (see `bec jobs show {name}`)")
    sqs = app.sqs
    with aws.cli_errors("SQS", aws.endpoint_of(sqs)):
        if queue_url and dlq_url:
            for url in (queue_url, dlq_url):
                with aws.cli_errors(f"SQS queue {url}", aws.endpoint_of(sqs)):
                    queues.queue_arn(sqs, url)  # proves it exists and is reachable
            out.print(f"Using existing queues for job '{name}'...")
            out.print(f"✓ Using queue: {queue_url}")
            out.print(f"✓ Using DLQ: {dlq_url}")
        else:
            out.print(f"Creating SQS queues for job '{name}'...")
            pair = queues.ensure_queues(sqs, *queue_names(name), max_receive_count=max_receive_count,
                                        visibility_timeout=visibility_timeout)
            queue_url, dlq_url = pair.queue_url, pair.dlq_url
            out.print(f"✓ {'Created' if pair.created_queue else 'Reused'} queue: {queue_url}")
            out.print(f"✓ {'Created' if pair.created_dlq else 'Reused'} DLQ: {dlq_url}")
    job = jobstore.insert(db, name, config, queue_url, dlq_url)
    out.print(f"✓ Created job: id={job.id}, name={job.name}")
    for other, url in jobstore.sharing_queues(db, (queue_url, dlq_url), except_id=job.id):
        err.print(f"Warning: job {other!r} uses {queues.queue_name_of(url)} too: the two jobs' "
                  "workers take each other's messages (give each job its own queues)", markup=False)


@jobs.command("list")
@pass_app
def list_jobs(app: AppContext) -> None:
    """List all jobs."""
    table = Table()
    for column in ("ID", "Name", "Queue", "Config"):
        table.add_column(column)
    for job in jobstore.all_jobs(app.db):
        config = json.dumps(job.config)
        table.add_row(str(job.id), job.name, queues.queue_name_of(job.queue_url),
                      config if len(config) <= 12 else config[:8] + "...")
    out.print(table)


@jobs.command("show")
@click.argument("name", callback=valid_job_name)
@pass_app
def show(app: AppContext, name: str) -> None:
    """Show a job's queues and configuration."""
    job = jobstore.get(app.db, name)
    out.print(f"Job {job.id}")
    out.print(f"Name: {job.name}")
    out.print(f"Queue URL: {job.queue_url}")
    out.print(f"DLQ URL: {job.dlq_url}")
    out.print("Configuration:")
    out.print(json.dumps(job.config, indent=2), markup=False)


@jobs.command("update")
@click.argument("name", callback=valid_job_name)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="JSON config file.")
@click.option("--config-text", help="JSON config given inline.")
@pass_app
def update(app: AppContext, name: str, config_file: str | None, config_text: str | None) -> None:
    """Replace a job's configuration."""
    check_job_name(name)
    if not config_file and config_text is None:
        raise BadInput("give the new configuration with --config FILE or --config-text JSON")
    config = read_config(config_file, config_text, name)
    job = jobstore.update_config(app.db, name, config)
    out.print(f"✓ Updated job: id={job.id}, name={job.name}")


@jobs.command("delete")
@click.argument("name", callback=valid_job_name)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--delete-queues", is_flag=True, help="Also delete the job's SQS queues.")
@pass_app
def delete(app: AppContext, name: str, yes: bool, delete_queues: bool) -> None:
    """Delete a job and its task history (queues only with --delete-queues)."""
    job = jobstore.get(app.db, name)
    if delete_queues:
        for other, url in jobstore.sharing_queues(app.db, (job.queue_url, job.dlq_url), except_id=job.id):
            raise BadInput(f"job {other!r} uses {queues.queue_name_of(url)} too: not deleting queues "
                           f"another job needs (delete job {name!r} without --delete-queues)")
    if not yes:
        what = " and its SQS queues" if delete_queues else ""
        click.confirm(f"Delete job '{name}' (id={job.id}), its task history{what}?", abort=True)
    if delete_queues:
        sqs = app.sqs
        for url in (job.queue_url, job.dlq_url):
            with aws.cli_errors(f"SQS queue {queues.queue_name_of(url)}", aws.endpoint_of(sqs)):
                sqs.delete_queue(QueueUrl=url)
            out.print(f"✓ Deleted queue: {url}")
    removed = jobstore.delete(app.db, job.id)
    out.print(f"✓ Deleted job: id={job.id}, name={job.name} ({removed} task rows)")


@jobs.command("stats")
@click.argument("name", callback=valid_job_name)
@click.option("--watch", is_flag=True, help="Keep the view up to date, with pages/s and an ETA (Ctrl-C exits).")
@click.option("--interval", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--iterations", type=click.IntRange(1), default=None, hidden=True,
              help="Stop --watch after this many refreshes (for tests).")
@click.option("--stale-after", type=click.FloatRange(1), default=None,
              help="Seconds without a heartbeat after which a worker counts as dead: its running "
                   "tasks show as stalled [default: 60, as the worker's; env BEC_STALE_AFTER].")
@pass_app
def stats(app: AppContext, name: str, watch: bool, interval: float, iterations: int | None,
          stale_after: float | None) -> None:
    """Task counts, images, errors and durations by status."""
    db = app.db
    job = jobstore.get(db, name)
    stale_after_s = stale_after_setting(app, stale_after)
    if watch:
        _watch_stats(app, job, interval, iterations, stale_after_s)
        return
    out.print(f"Job Statistics: {job.name} (id={job.id})")
    out.print()
    out.print(status_table(db, job, stale_after_s))
    out.print()
    for line in totals_lines(db, job, stale_after_s):
        out.print(line)


def _watch_view(app: AppContext, job: jobstore.Job, interval: float, rate: SmoothedRate,
                stale_after_s: float) -> Any:
    from rich.console import Group

    from bec.observe.exporter import queue_depth

    db = app.db
    parts: list[Any] = [Text(f"Job Statistics: {job.name} (id={job.id})"), Text(""),
                        status_table(db, job, stale_after_s), Text("")]
    parts += [Text(line) for line in totals_lines(db, job, stale_after_s)]
    depth: dict[str, int] | None = None
    why = None
    try:
        with aws.cli_errors(f"SQS queue {queues.queue_name_of(job.queue_url)}", aws.endpoint_of(app.sqs)):
            depth = queue_depth(app.sqs, job.queue_url)
    except BecError as exc:
        why = str(exc)
    sample = jobstore.progress_sample(db, job.id)
    span = float(sample.get("recent_span_s") or 0)
    first = float(sample["recent_pages"]) / span if span > 0 and sample.get("recent_volumes") else None
    rate.update(float(sample["at"]), float(sample["pages_done"]), first)
    live = jobstore.live_workers(db, job.id, stale_after_s)
    parts.append(Text(""))
    parts += [Text(line) for line in progress_lines(sample, rate, live, stale_after_s, depth, why)]
    parts.append(Text(""))
    parts.append(Text(f"Updated {time.strftime('%H:%M:%S')}, every {interval:g}s — Ctrl-C to exit",
                      style="dim"))
    return Group(*parts)


def _watch_stats(app: AppContext, job: jobstore.Job, interval: float, iterations: int | None,
                 stale_after_s: float) -> None:
    """Redraw until Ctrl-C. Ctrl-C is how a watch ends, so it only sets a flag: raised as
    KeyboardInterrupt it could land inside the database pool or an HTTP call and leave a lock
    held (a CI run saw the command hang there). A second Ctrl-C interrupts at once."""
    from rich.live import Live

    stop = threading.Event()

    def on_ctrl_c(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    main_thread = threading.current_thread() is threading.main_thread()  # signals reach only it
    previous = signal.signal(signal.SIGINT, on_ctrl_c) if main_thread else None
    try:
        rate = SmoothedRate()
        with Live(_watch_view(app, job, interval, rate, stale_after_s), console=out, auto_refresh=False,
                  redirect_stdout=False, redirect_stderr=False) as live:
            done = 1
            while (iterations is None or done < iterations) and not stop.wait(interval):
                try:
                    view = _watch_view(app, job, interval, rate, stale_after_s)
                except Unavailable as exc:  # the database blinked: keep the last view, say so
                    err.print(f"Warning: {exc}")
                    continue
                live.update(view, refresh=True)
                done += 1
    except KeyboardInterrupt:
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def _volume_label(w_id: str, i_id: str, width: int = 17) -> str:
    label = f"{w_id}/{i_id}"
    return label if len(label) <= width else label[:width - 3] + "..."


@jobs.command("tasks")
@click.argument("name", callback=valid_job_name)
@click.option("--limit", type=click.IntRange(1, 100000), default=10, show_default=True,
              help="How many of the most recent task executions to show.")
@click.option("--status", type=click.Choice(jobstore.STATUSES), default=None,
              help="Only tasks in this status.")
@pass_app
def tasks(app: AppContext, name: str, limit: int, status: str | None) -> None:
    """Recent task executions, newest first."""
    db = app.db
    job = jobstore.get(db, name)
    out.print(f"Recent Task Executions: {job.name} (id={job.id})")
    out.print()
    table = Table()
    table.add_column("ID")
    table.add_column("Volume")
    table.add_column("Status")
    for column in ("Images", "Errors", "Duration (s)"):
        table.add_column(column, justify="right")
    table.add_column("Worker")
    rows = jobstore.recent_tasks(db, job.id, limit, status)
    if not rows:
        out.print(f"No task executions with status {status}." if status else "No task executions yet.")
        return
    for row in rows:
        running = row["status"] == "running"
        duration = None if running or row["total_duration_ms"] is None else row["total_duration_ms"] / 1000
        table.add_row(str(row["id"]), _volume_label(row["w_id"], row["i_id"]), row["status"],
                      "-" if running else _cell(row["total_images"]),
                      "-" if running else _cell(row["nb_errors"]),
                      _cell(duration, "{:.1f}"), row["worker"])
    out.print(table)


MARKERS_READ = 50


def _when(value: Any) -> str:
    if value is None:
        return "-"
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _volume_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, str] | None:
    """``--volume W22084/I0886`` (or ``W22084,I0886``) → validated ids, before any service."""
    if value is None:
        return None
    parts = value.strip().replace(",", "/").split("/")
    if len(parts) != 2:
        raise click.BadParameter(f"expected W_ID/I_ID (e.g. W22084/I0886), got {value.strip()[:60]!r}")
    try:
        return check_w_id(parts[0].strip()), check_i_id(parts[1].strip())
    except BadInput as exc:
        raise click.BadParameter(str(exc)) from None


def _page_error_list(row: dict[str, Any], marker: dict[str, Any], bucket: str, job: str) -> None:
    """One volume's failed pages, grouped by type, from its success.json."""
    from bec.edges.artifacts import parquet_key

    out.print()
    out.print(f"Page errors of {row['w_id']}/{row['i_id']} version {row['version']} (done at attempt "
              f"{row['attempt']}): {row['nb_errors']} of {row['total_images']} pages", markup=False)
    listed = marker.get("errors") if isinstance(marker.get("errors"), list) else []
    if listed:
        table = Table()
        for column in ("Error Type", "Class", "Stage", "Page", "Message"):
            table.add_column(column, overflow="fold")
        for entry in sorted(listed, key=lambda e: (str(e.get("type")), int(e.get("index") or 0))):
            table.add_row(Text(str(entry.get("type"))), page_error_class(entry.get("type")),
                          Text(str(entry.get("stage") or "-")),
                          Text(f"#{entry.get('index')} {entry.get('file')}"), Text(str(entry.get("message") or "")))
        out.print(table)
    where = f"s3://{bucket}/{parquet_key(job, row['w_id'], row['i_id'], row['version'])}"
    if len(listed) < int(row["nb_errors"] or 0):
        shown = f"the first {len(listed)} are listed" if listed else "its success.json lists none"
        out.print(f"  ({shown}; every failed page is a row with ok = false in {where})", markup=False)


@jobs.command("errors")
@click.argument("name", callback=valid_job_name)
@click.option("--limit", type=click.IntRange(1, 100000), default=10, show_default=True,
              help="Failed tasks to list.")
@click.option("--s3-dest-bucket", default=None, help="Bucket of the artifacts [env BEC_DEST_S3_BUCKET].")
@click.option("--volume", callback=_volume_option, default=None, metavar="W_ID/I_ID",
              help="Only this volume; its done version's failed pages are listed one by one.")
@pass_app
def errors(app: AppContext, name: str, limit: int, s3_dest_bucket: str | None,
           volume: tuple[str, str] | None) -> None:
    """Recent failed tasks, the most common failure reasons, and the page errors of done
    volumes by type (deterministic: the page itself; transient: S3 or device trouble)."""
    db = app.db
    job = jobstore.get(db, name)
    which = f", volume {volume[0]}/{volume[1]}" if volume else ""
    out.print(f"Recent Failed Tasks: {job.name} (id={job.id}){which}")
    out.print()
    table = Table()
    table.add_column("ID")
    table.add_column("Volume")
    table.add_column("Status")
    table.add_column("Attempt", justify="right")
    table.add_column("When (UTC)")
    table.add_column("Error Reason", overflow="fold")
    for row in jobstore.recent_failures(db, job.id, limit, volume):
        table.add_row(str(row["id"]), f"{row['w_id']}/{row['i_id']}", row["status"], str(row["attempt"]),
                      _when(row["at"]), Text(row["error_reason"] or "-"))
    out.print(table)

    out.print()
    out.print("Most common failure reasons (numbers aside):")
    reasons = jobstore.failure_reasons(db, job.id, volume=volume)
    if reasons:
        table = Table()
        table.add_column("Tasks", justify="right")
        table.add_column("Reason (latest example)", overflow="fold")
        for row in reasons:
            table.add_row(str(row["count"]), Text(row["example"]))
        out.print(table)
    else:
        out.print("  none")

    out.print()
    out.print("Most common page errors:")
    bucket = s3_dest_bucket or app.settings.get("BEC_DEST_S3_BUCKET")
    if not bucket:
        out.print("  (set BEC_DEST_S3_BUCKET or pass --s3-dest-bucket to read them from success.json)")
        return
    rows = jobstore.recent_done_with_errors(db, job.id, MARKERS_READ, volume)
    if not rows:
        out.print("  none (no done task has page errors)")
        return
    with aws.cli_errors("S3", aws.configured_endpoint("s3")):
        from bec.edges.artifacts import read_success_markers
        markers = read_success_markers(app.client("s3"), bucket, job.name, rows)
    totals: dict[str, list[int]] = {}
    problems = [problem for _row, marker, problem in markers if marker is None]
    for _row, marker, _problem in markers:
        for kind, count in (marker or {}).get("errors_by_type", {}).items():
            entry = totals.setdefault(str(kind), [0, 0])
            entry[0] += int(count or 0)
            entry[1] += 1
    table = Table()
    table.add_column("Error Type")
    table.add_column("Class")
    table.add_column("Pages", justify="right")
    table.add_column("Volumes", justify="right")
    for kind, (pages, volumes) in sorted(totals.items(), key=lambda kv: (-kv[1][0], kv[0])):
        table.add_row(Text(kind), page_error_class(kind), str(pages), str(volumes))
    out.print(table)
    note = f"  from the success.json of the {len(rows)} most recent done volumes with page errors"
    if problems:
        note += f" ({len(problems)} could not be read, e.g. {problems[0]})"
    out.print(note, markup=False)
    if volume:
        for row, marker, _problem in markers:
            if marker is not None:
                _page_error_list(row, marker, bucket, job.name)
