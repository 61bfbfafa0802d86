"""``bec workers``: the worker supervisors known to the database."""
from __future__ import annotations

from datetime import datetime, timezone

import click
from rich.table import Table

from bec.cli.context import AppContext, out, pass_app, stale_after_setting


def age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def _stamp(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@click.group()
def workers() -> None:
    """Inspect worker supervisors."""


@workers.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include stopped workers (default: last 50).")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True,
              help="How many workers to show, newest first.")
@click.option("--stale-after", type=click.FloatRange(1), default=None,
              help="Seconds without a heartbeat after which a running worker is marked stale "
                   "[default: 60, as the worker's; env BEC_STALE_AFTER].")
@pass_app
def list_workers(app: AppContext, show_all: bool, limit: int, stale_after: float | None) -> None:
    """Workers with their heartbeat age; a silent running worker is marked stale."""
    stale_after_s = stale_after_setting(app, stale_after)
    rows = app.db.rows(
        """
        SELECT w.worker_id, w.worker_name, w.hostname, w.started_at, w.stopped_at,
               extract(epoch FROM now() - w.last_heartbeat_at) AS heartbeat_age,
               j.name AS job_name
        FROM workers w LEFT JOIN jobs j ON j.id = w.job_id
        WHERE %(all)s OR w.stopped_at IS NULL OR w.stopped_at > now() - interval '1 day'
        ORDER BY w.worker_id DESC LIMIT %(limit)s
        """, {"all": show_all, "limit": limit})
    table = Table()
    for column in ("ID", "Name", "Host", "Job", "Started", "Last Heartbeat", "Stopped", "State"):
        table.add_column(column)
    for row in rows:
        hb = float(row["heartbeat_age"])
        if row["stopped_at"] is not None:
            state = "stopped"
        elif hb > stale_after_s:
            state = "[red]stale[/red]"
        else:
            state = "[green]active[/green]"
        table.add_row(str(row["worker_id"]), row["worker_name"], row["hostname"],
                      row["job_name"] or "-", _stamp(row["started_at"]), age(hb),
                      _stamp(row["stopped_at"]), state)
    out.print(table)
