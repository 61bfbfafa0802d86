"""What ``bec jobs stats`` shows: the status table, the totals, and the watch's progress
lines (pages/s, live workers, the queue and its ETA).

Kept apart from the command so that the wording of the view can change (or be tested) without
the command's options, signals and refresh loop."""
from __future__ import annotations

from typing import Any

from rich.table import Table

from bec.control import jobs as jobstore
from bec.present.throughput import TIME_CONSTANT_S, SmoothedRate


def _ms(value: Any) -> str:
    return f"{float(value):.2f}" if value else "0"


def status_table(db: Any, job: jobstore.Job, stale_after_s: float) -> Table:
    table = Table(title="Task Execution Status")
    table.add_column("Status")
    for column in ("Count", "Total Images", "Total Errors", "Avg Duration (ms)"):
        table.add_column(column, justify="right")
    for row in jobstore.status_stats(db, job.id, stale_after_s):
        table.add_row(row["status"], str(row["count"]), str(row["total_images"]),
                      str(row["total_errors"]), _ms(row["avg_duration_ms"]))
    return table


def totals_lines(db: Any, job: jobstore.Job, stale_after_s: float) -> list[str]:
    total = jobstore.overall_stats(db, job.id, stale_after_s)
    return ["Overall Totals:",
            f"  Total Tasks: {total['total_tasks']}",
            f"  Total Images: {total['total_images']}",
            f"  Total Errors: {total['total_errors']}",
            f"  Volumes Done with Page Errors: {total['done_with_errors']} "
            f"({total['done_errors']} error rows; see `bec jobs errors`)",
            f"  Avg Duration per Task: {float(total['avg_task_ms']):.2f} ms",
            f"  Avg Duration per Page: {float(total['avg_page_ms']):.2f} ms"]


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def progress_lines(sample: dict[str, Any], rate: SmoothedRate, live_workers: int, stale_after_s: float,
                   depth: dict[str, int] | None, depth_error: str | None = None) -> list[str]:
    """Pages/s (between refreshes, smoothed), live workers, the queue and its ETA."""
    avg_pages = float(sample.get("avg_pages_per_volume") or 0)
    recent = int(sample.get("recent_volumes") or 0)
    if rate.rate is None:
        speed = f"— (no volume done in the last {jobstore.RECENT_S // 60} minutes)"
    elif rate.measured:
        speed = f"{rate.rate:.2f} (between refreshes, smoothed over ~{TIME_CONSTANT_S:.0f} s)"
    else:
        speed = (f"{rate.rate:.2f} ({plural(recent, 'volume')} done in the last "
                 f"{duration(float(sample.get('recent_span_s') or 0))} of work)")
    lines = ["Throughput:", f"  Pages/s: {speed}", f"  Avg Pages per Volume: {avg_pages:.1f}"]
    if live_workers:
        lines.append(f"  Workers: {live_workers} live")
    else:
        lines.append(f"  Workers: none live (no worker of this job heartbeated in the last {stale_after_s:g} s)")
    if depth is None:
        lines.append(f"  Queue: unavailable ({depth_error or 'unknown error'})")
        lines.append("  ETA: -")
        return lines
    queued = depth["visible"] + depth["in_flight"]
    lines.append(f"  Queue: {plural(queued, 'volume')} ({depth['visible']} visible, {depth['in_flight']} in flight)")
    per_s = rate.rate or 0.0
    if queued == 0:
        lines.append("  ETA: done (queue empty)")
    elif not live_workers:
        lines.append("  ETA: - (no live worker serves this job)")
    elif per_s <= 0 or avg_pages <= 0:
        lines.append("  ETA: - (no pages done lately)")
    else:
        lines.append(f"  ETA: {duration(queued * avg_pages / per_s)} "
                     f"({queued} × {avg_pages:.1f} pages ÷ {per_s:.2f} pages/s)")
    return lines
