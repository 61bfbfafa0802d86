"""Jobs: rows in ``jobs`` with their config and queue URLs, and the SQL views over their tasks."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from bec.db import Database
from bec.errors import BadInput

STATUSES = ("running", "done", "retryable_failed", "terminal_failed")


@dataclass(frozen=True)
class Job:
    id: int
    name: str
    config: dict[str, Any]
    queue_url: str
    dlq_url: str


def parse_config_text(text: str, source: str) -> dict[str, Any]:
    """A job config is a JSON object; anything else is bad input naming its source."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno} "
                       f"column {exc.colno}") from None
    if not isinstance(value, dict):
        raise BadInput(f"{source} must be a JSON object ({{...}}), got {type(value).__name__}")
    return value


def _job(row: dict[str, Any]) -> Job:
    return Job(id=row["id"], name=row["name"], config=row["config"] or {},
               queue_url=row["queue_url"], dlq_url=row["dlq_url"])


def find(db: Database, name: str) -> Job | None:
    row = db.row("SELECT id, name, config, queue_url, dlq_url FROM jobs WHERE name = %s", (name,))
    return _job(row) if row else None


def get(db: Database, name: str) -> Job:
    job = find(db, name)
    if job is None:
        raise BadInput(f"unknown job {name!r} (see `bec jobs list`)")
    return job


def all_jobs(db: Database) -> list[Job]:
    return [_job(r) for r in db.rows(
        "SELECT id, name, config, queue_url, dlq_url FROM jobs ORDER BY id")]


def insert(db: Database, name: str, config: dict[str, Any], queue_url: str, dlq_url: str) -> Job:
    row = db.row(
        "INSERT INTO jobs (name, config, queue_url, dlq_url) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (name) DO NOTHING RETURNING id, name, config, queue_url, dlq_url",
        (name, Jsonb(config), queue_url, dlq_url))
    if row is None:
        raise BadInput(f"job {name!r} already exists (see `bec jobs show {name}`)")
    return _job(row)


def update_config(db: Database, name: str, config: dict[str, Any]) -> Job:
    row = db.row(
        "UPDATE jobs SET config = %s, updated_at = now() WHERE name = %s "
        "RETURNING id, name, config, queue_url, dlq_url", (Jsonb(config), name))
    if row is None:
        raise BadInput(f"unknown job {name!r} (see `bec jobs list`)")
    return _job(row)


def delete(db: Database, job_id: int) -> int:
    """Delete a job and (by cascade) its task rows; returns how many task rows went."""
    with db.transaction() as conn:
        n = conn.execute("SELECT count(*) FROM task_executions WHERE job_id = %s",
                         (job_id,)).fetchone()[0]
        conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
    return int(n)


def status_stats(db: Database, job_id: int) -> list[dict[str, Any]]:
    """One row per status (all four, zeros included), computed in SQL."""
    return db.rows(
        """
        SELECT s.status::text AS status,
               count(t.id) AS count,
               coalesce(sum(t.total_images), 0) AS total_images,
               coalesce(sum(t.nb_errors), 0) AS total_errors,
               coalesce(avg(t.total_duration_ms), 0) AS avg_duration_ms
        FROM unnest(enum_range(NULL::task_status)) AS s(status)
        LEFT JOIN task_executions t ON t.status = s.status AND t.job_id = %s
        GROUP BY s.status ORDER BY s.status
        """, (job_id,))


def overall_stats(db: Database, job_id: int) -> dict[str, Any]:
    return db.row(
        """
        SELECT count(*) AS total_tasks,
               coalesce(sum(total_images), 0) AS total_images,
               coalesce(sum(nb_errors), 0) AS total_errors,
               count(*) FILTER (WHERE status = 'done' AND nb_errors > 0) AS done_with_errors,
               coalesce(sum(nb_errors) FILTER (WHERE status = 'done'), 0) AS done_errors,
               coalesce(avg(total_duration_ms), 0) AS avg_task_ms,
               coalesce(sum(total_duration_ms) FILTER (WHERE total_duration_ms IS NOT NULL)
                        / nullif(sum(total_images) FILTER (WHERE total_duration_ms IS NOT NULL), 0),
                        0) AS avg_page_ms
        FROM task_executions WHERE job_id = %s
        """, (job_id,)) or {}


def recent_tasks(db: Database, job_id: int, limit: int, status: str | None) -> list[dict[str, Any]]:
    return db.rows(
        """
        SELECT t.id, v.bdrc_w_id AS w_id, v.bdrc_i_id AS i_id, t.status::text AS status,
               t.total_images, t.nb_errors, t.total_duration_ms, t.attempt,
               coalesce(w.worker_name, '-') AS worker, t.error_reason
        FROM task_executions t
        JOIN volumes v ON v.id = t.volume_id
        LEFT JOIN workers w ON w.worker_id = t.worker_id
        WHERE t.job_id = %(job)s AND (%(status)s::task_status IS NULL OR t.status = %(status)s::task_status)
        ORDER BY t.id DESC
        LIMIT %(limit)s
        """, {"job": job_id, "status": status, "limit": limit})


# -- observability: the exporter, `jobs stats --watch`, `jobs errors` -------------------------
def exporter_totals(db: Database) -> list[dict[str, Any]]:
    """Every job × every status (zeros included): task count, images and page errors."""
    return db.rows(
        """
        SELECT j.id AS job_id, j.name, j.queue_url, j.dlq_url, s.status::text AS status,
               count(t.id) AS count,
               coalesce(sum(t.total_images), 0) AS total_images,
               coalesce(sum(t.nb_errors), 0) AS total_errors
        FROM jobs j
        CROSS JOIN unnest(enum_range(NULL::task_status)) AS s(status)
        LEFT JOIN task_executions t ON t.job_id = j.id AND t.status = s.status
        GROUP BY j.id, s.status ORDER BY j.id, s.status
        """)


def throughput(db: Database, job_id: int) -> dict[str, Any]:
    """Pages per second of volumes done in the last 5 and 15 minutes, and pages per volume.

    Volume-grained (a volume's pages count when it is done), over the whole window.
    """
    return db.row(
        """
        SELECT coalesce(sum(total_images) FILTER (WHERE done_at >= now() - interval '5 minutes'), 0)
                   / 300.0 AS pages_per_s_5m,
               coalesce(sum(total_images) FILTER (WHERE done_at >= now() - interval '15 minutes'), 0)
                   / 900.0 AS pages_per_s_15m,
               count(*) FILTER (WHERE done_at >= now() - interval '5 minutes') AS volumes_5m,
               count(*) FILTER (WHERE done_at >= now() - interval '15 minutes') AS volumes_15m,
               coalesce(avg(total_images), 0) AS avg_pages_per_volume
        FROM task_executions
        WHERE job_id = %s AND status = 'done'
        """, (job_id,)) or {}


FAILED = ("retryable_failed", "terminal_failed")


#: ``volume`` filters below: (w_id, i_id), or None for every volume of the job.
Volume = tuple[str, str]
_OF_VOLUME = "(%(w)s::text IS NULL OR (v.bdrc_w_id = %(w)s AND v.bdrc_i_id = %(i)s))"


def _volume_params(volume: Volume | None) -> dict[str, str | None]:
    return {"w": volume[0] if volume else None, "i": volume[1] if volume else None}


def recent_failures(db: Database, job_id: int, limit: int, volume: Volume | None = None) -> list[dict[str, Any]]:
    """Failed tasks (retryable or terminal), most recent first."""
    return db.rows(
        f"""
        SELECT t.id, v.bdrc_w_id AS w_id, v.bdrc_i_id AS i_id, t.s3_etag AS version,
               t.status::text AS status, t.attempt, coalesce(t.done_at, t.started_at) AS at,
               t.error_reason
        FROM task_executions t
        JOIN volumes v ON v.id = t.volume_id
        WHERE t.job_id = %(job)s AND t.status IN ('retryable_failed', 'terminal_failed') AND {_OF_VOLUME}
        ORDER BY coalesce(t.done_at, t.started_at) DESC, t.id DESC
        LIMIT %(limit)s
        """, {"job": job_id, "limit": limit, **_volume_params(volume)})


def failure_reasons(db: Database, job_id: int, limit: int = 10, volume: Volume | None = None) -> list[dict[str, Any]]:
    """Failed tasks' reasons, grouped with their numbers masked ("3 of 8 pages" ~ "5 of 9
    pages"); each group with its count and its most recent text as the example."""
    return db.rows(
        f"""
        SELECT count(*) AS count,
               (array_agg(coalesce(t.error_reason, '(no reason recorded)')
                          ORDER BY coalesce(t.done_at, t.started_at) DESC, t.id DESC))[1] AS example
        FROM task_executions t
        JOIN volumes v ON v.id = t.volume_id
        WHERE t.job_id = %(job)s AND t.status IN ('retryable_failed', 'terminal_failed') AND {_OF_VOLUME}
        GROUP BY regexp_replace(coalesce(t.error_reason, ''), '[0-9]+(\\.[0-9]+)?', 'N', 'g')
        ORDER BY count(*) DESC, max(t.id) DESC
        LIMIT %(limit)s
        """, {"job": job_id, "limit": limit, **_volume_params(volume)})


def recent_done_with_errors(db: Database, job_id: int, limit: int,
                            volume: Volume | None = None) -> list[dict[str, Any]]:
    """Done tasks that had page errors, most recent first (their success.json says which)."""
    return db.rows(
        f"""
        SELECT t.id, v.bdrc_w_id AS w_id, v.bdrc_i_id AS i_id, t.s3_etag AS version, t.nb_errors,
               t.total_images, t.attempt
        FROM task_executions t
        JOIN volumes v ON v.id = t.volume_id
        WHERE t.job_id = %(job)s AND t.status = 'done' AND t.nb_errors > 0 AND {_OF_VOLUME}
        ORDER BY t.done_at DESC NULLS LAST, t.id DESC
        LIMIT %(limit)s
        """, {"job": job_id, "limit": limit, **_volume_params(volume)})
