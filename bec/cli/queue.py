"""``bec queue``: enqueue volumes, queue statistics, purge, redrive from the DLQ."""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from bec.control import jobs as jobstore, queues, volume_list
from bec.edges import aws
from bec.cli.context import AppContext, err, out, pass_app, valid_job_name
from bec.errors import BadInput
from bec.control.ids import check_job_name

PROGRESS_FROM = 200  # show a progress bar from this many messages on


@click.group()
def queue() -> None:
    """Work with a job's SQS queues."""


def _sqs_queue(url: str) -> str:
    """How an SQS failure names its queue ("SQS queue ldv1-tasks"): a job has two."""
    return f"SQS queue {queues.queue_name_of(url)}"


def _progress(total: int, label: str) -> Progress:
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, disable=total < PROGRESS_FROM)


def _read_volumes(file: str | None, volumes: tuple[str, ...]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if file:
        try:
            if file == "-":
                lines = sys.stdin.read().splitlines()
            else:
                lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise BadInput(f"cannot read volume file {file}: {reason}") from None
        found.extend(volume_list.parse_lines(lines, file))
    for i, text in enumerate(volumes, start=1):
        found.append(volume_list.parse_volume(text, f"--volume #{i}"))
    if not file and not volumes:
        raise BadInput("nothing to enqueue: give --file FILE or --volume W_ID,I_ID")
    return found


@queue.command("enqueue")
@click.option("--job-name", required=True, callback=valid_job_name, help="The job whose queue this is.")
@click.option("--file", "file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Volume list: one 'W_ID,I_ID' or 'W_ID I_ID' per line, '#' comments ('-' = stdin).")
@click.option("--volume", "volumes", multiple=True, metavar="W_ID,I_ID", help="A volume (repeatable).")
@pass_app
def enqueue(app: AppContext, job_name: str, file: str | None, volumes: tuple[str, ...]) -> None:
    """Send one task message per volume to the job's queue."""
    check_job_name(job_name)
    wanted, duplicates = volume_list.dedupe(_read_volumes(file, volumes))
    job = jobstore.get(app.db, job_name)
    bodies = queues.bodies_for_volumes(wanted)
    sqs = app.sqs
    with aws.cli_errors(_sqs_queue(job.queue_url), aws.endpoint_of(sqs)), \
            _progress(len(bodies), "Enqueueing") as bar:
        task = bar.add_task("send", total=len(bodies))
        report = queues.send_bodies(sqs, job.queue_url, bodies,
                                    on_progress=lambda n: bar.advance(task, n))
    name = queues.queue_name_of(job.queue_url)
    dup = f" ({duplicates} duplicate{'s' if duplicates != 1 else ''} skipped)" if duplicates else ""
    out.print(f"✓ Enqueued {report.sent} volume{'s' if report.sent != 1 else ''} to {name}{dup}")
    if report.failed:
        for body, reason in report.failed[:20]:
            err.print(f"✗ not sent: {body} ({reason})", markup=False)
        raise BadInput(f"{len(report.failed)} volume(s) could not be enqueued; run the command "
                       "again with the same input (the worker skips finished volumes)")


def _when(epoch: str | None) -> str:
    if not epoch:
        return "-"
    return datetime.fromtimestamp(float(epoch), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@queue.command("stats")
@click.option("--job-name", required=True, callback=valid_job_name, help="The job whose queue this is.")
@pass_app
def stats(app: AppContext, job_name: str) -> None:
    """Message counts of the job's queue (and its DLQ)."""
    job = jobstore.get(app.db, job_name)
    sqs = app.sqs
    with aws.cli_errors(_sqs_queue(job.queue_url), aws.endpoint_of(sqs)):
        attrs = queues.queue_attributes(sqs, job.queue_url)
    with aws.cli_errors(_sqs_queue(job.dlq_url), aws.endpoint_of(sqs)):
        dlq = queues.depth(sqs, job.dlq_url)
    table = Table()
    table.add_column("Metric")
    table.add_column("Value")
    table.add_row("Messages Available", attrs.get("ApproximateNumberOfMessages", "0"))
    table.add_row("Messages In Flight", attrs.get("ApproximateNumberOfMessagesNotVisible", "0"))
    table.add_row("Messages Delayed", attrs.get("ApproximateNumberOfMessagesDelayed", "0"))
    table.add_row("DLQ Messages", str(dlq["visible"] + dlq["in_flight"]))
    table.add_row("Created", _when(attrs.get("CreatedTimestamp")))
    table.add_row("Last Modified", _when(attrs.get("LastModifiedTimestamp")))
    out.print(table)


@queue.command("purge")
@click.option("--job-name", required=True, callback=valid_job_name, help="The job whose queue this is.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dlq", "purge_dlq", is_flag=True, help="Purge the job's DLQ instead of its tasks queue.")
@pass_app
def purge(app: AppContext, job_name: str, yes: bool, purge_dlq: bool) -> None:
    """Delete every message of the job's queue (irreversible)."""
    job = jobstore.get(app.db, job_name)
    url = job.dlq_url if purge_dlq else job.queue_url
    if not yes:
        click.confirm(f"Delete ALL messages of {queues.queue_name_of(url)}? This is irreversible",
                      abort=True)
    sqs = app.sqs
    with aws.cli_errors(_sqs_queue(url), aws.endpoint_of(sqs)):
        sqs.purge_queue(QueueUrl=url)
    out.print(f"✓ Purged queue: {url}")


@queue.command("redrive")
@click.option("--job-name", callback=valid_job_name, help="Move every message of this job's DLQ back to its tasks queue.")
@click.option("--source-queue-url", help="Queue to take messages from (usually a DLQ).")
@click.option("--dest-queue-url", help="Queue to send them to.")
@click.option("--max-messages", type=click.IntRange(1), default=None,
              help="Stop after this many messages (default: all).")
@pass_app
def redrive(app: AppContext, job_name: str | None, source_queue_url: str | None,
            dest_queue_url: str | None, max_messages: int | None) -> None:
    """Move messages from a dead-letter queue back to a tasks queue."""
    if job_name:
        if source_queue_url or dest_queue_url:
            raise BadInput("give either --job-name or --source-queue-url/--dest-queue-url")
        job = jobstore.get(app.db, job_name)
        source_queue_url, dest_queue_url = job.dlq_url, job.queue_url
    elif not (source_queue_url and dest_queue_url):
        raise BadInput("give --job-name, or both --source-queue-url and --dest-queue-url")
    sqs = app.sqs
    arns = []
    for url in (source_queue_url, dest_queue_url):
        with aws.cli_errors(_sqs_queue(url), aws.endpoint_of(sqs)):
            arns.append(queues.queue_arn(sqs, url))
    if arns[0] == arns[1]:  # a move onto itself would never run out of messages
        raise BadInput(f"the source and destination are the same queue "
                       f"({queues.queue_name_of(source_queue_url)}): nothing to move")
    with aws.cli_errors("SQS", aws.endpoint_of(sqs)):
        if max_messages is None:
            single_try = app.client("sqs", max_attempts=1)
            handle = queues.start_move_task(single_try, arns[0], arns[1])
            if handle:
                out.print(f"✓ Started SQS message move task {handle} from "
                          f"{queues.queue_name_of(source_queue_url)} to "
                          f"{queues.queue_name_of(dest_queue_url)} (runs server-side)")
                return
        waiting = queues.depth(sqs, source_queue_url)["visible"]
        total = min(waiting, max_messages) if max_messages else waiting
        with _progress(total, "Moving") as bar:
            task = bar.add_task("move", total=total or None)
            report = queues.move_messages(sqs, source_queue_url, dest_queue_url,
                                          max_messages=max_messages,
                                          on_progress=lambda n: bar.advance(task, n))
    out.print(f"✓ Moved {report.moved} message{'s' if report.moved != 1 else ''} from "
              f"{queues.queue_name_of(source_queue_url)} to {queues.queue_name_of(dest_queue_url)}")
    if report.left:
        out.print(f"  {report.left} message{'s' if report.left != 1 else ''} came back to "
                  f"{queues.queue_name_of(source_queue_url)} during the move (failed again) or "
                  "repeated one already moved: left there, each message is moved once per run")
