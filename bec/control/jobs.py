"""Jobs: rows in ``jobs`` with their config and queue URLs, and the SQL views over their tasks."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from bec.control.db import Database
from bec.errors import BadInput

STATUSES = ("running", "done", "retryable_failed", "terminal_failed")
#: What `jobs stats` and the exporter show: a ``running`` task whose worker stopped or went
#: silent (killed -9, host lost) is nobody's work any more; it is ``stalled`` until its
#: message comes back and another worker takes it over.
SHOWN_STATUSES = ("running", "stalled", "done", "retryable_failed", "terminal_failed")
#: Seconds without a heartbeat after which a worker is taken for dead (the worker's own
#: ``--stale-after`` default, ``bec.control.tasks.STALE_AFTER_S``).
STALE_AFTER_S = 60.0

# A task row ``t`` whose worker is alive: not stopped, heartbeat within %(stale)s seconds.
# The same rule as the claim's (bec.control.tasks.claim), read the other way round.
_LIVE_HOLDER = """EXISTS (SELECT 1 FROM workers w
                    WHERE w.worker_id = t.worker_id AND w.stopped_at IS NULL
                      AND w.last_heartbeat_at > now() - make_interval(secs => %(stale)s))"""
_SHOWN_STATUS = f"""CASE WHEN t.status = 'running' AND NOT {_LIVE_HOLDER} THEN 'stalled'
                         ELSE t.status::text END"""
_SHOWN_ORDER = "(VALUES ('running', 1), ('stalled', 2), ('done', 3), ('retryable_failed', 4), " \
               "('terminal_failed', 5)) AS s(status, ord)"


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


def sharing_queues(db: Database, urls: tuple[str, ...], except_id: int | None = None) -> list[tuple[str, str]]:
    """Other jobs using any of ``urls`` as their tasks queue or DLQ: (job name, url) pairs.

    Two jobs on one queue take each other's messages, and deleting the queues of one would
    leave the other with none."""
    rows = db.rows(
        """
        SELECT name, u.url FROM jobs, unnest(%(urls)s::text[]) AS u(url)
         WHERE (queue_url = u.url OR dlq_url = u.url)
           AND (%(except)s::bigint IS NULL OR id <> %(except)s::bigint)
         ORDER BY id
        """, {"urls": list(urls), "except": except_id})
    return [(r["name"], r["url"]) for r in rows]


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


def status_stats(db: Database, job_id: int, stale_after_s: float = STALE_AFTER_S) -> list[dict[str, Any]]:
    """One row per status (zeros included; ``stalled`` only when there are such tasks),
    computed in SQL."""
    return db.rows(
        f"""
        SELECT s.status,
               count(t.id) AS count,
               coalesce(sum(t.total_images), 0) AS total_images,
               coalesce(sum(t.nb_errors), 0) AS total_errors,
               coalesce(avg(t.total_duration_ms), 0) AS avg_duration_ms
        FROM {_SHOWN_ORDER}
        LEFT JOIN (SELECT t.*, {_SHOWN_STATUS} AS shown FROM task_executions t
                    WHERE t.job_id = %(job)s) t ON t.shown = s.status
        GROUP BY s.status, s.ord
        HAVING s.status <> 'stalled' OR count(t.id) > 0
        ORDER BY s.ord
        """, {"job": job_id, "stale": stale_after_s})


def overall_stats(db: Database, job_id: int, stale_after_s: float = STALE_AFTER_S) -> dict[str, Any]:
    """Totals over the job's tasks; a stalled task's images are nobody's work: not counted."""
    return db.row(
        f"""
        SELECT count(*) AS total_tasks,
               coalesce(sum(total_images) FILTER (WHERE shown <> 'stalled'), 0) AS total_images,
               coalesce(sum(nb_errors), 0) AS total_errors,
               count(*) FILTER (WHERE status = 'done' AND nb_errors > 0) AS done_with_errors,
               coalesce(sum(nb_errors) FILTER (WHERE status = 'done'), 0) AS done_errors,
               coalesce(avg(total_duration_ms), 0) AS avg_task_ms,
               coalesce(sum(total_duration_ms) FILTER (WHERE total_duration_ms IS NOT NULL)
                        / nullif(sum(total_images) FILTER (WHERE total_duration_ms IS NOT NULL), 0),
                        0) AS avg_page_ms
        FROM (SELECT t.*, {_SHOWN_STATUS} AS shown FROM task_executions t WHERE t.job_id = %(job)s) t
        """, {"job": job_id, "stale": stale_after_s}) or {}


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
def exporter_totals(db: Database, stale_after_s: float = STALE_AFTER_S) -> list[dict[str, Any]]:
    """Every job × every shown status (zeros included): task count, images and page errors."""
    return db.rows(
        f"""
        SELECT j.id AS job_id, j.name, j.queue_url, j.dlq_url, s.status,
               count(t.id) AS count,
               coalesce(sum(t.total_images), 0) AS total_images,
               coalesce(sum(t.nb_errors), 0) AS total_errors
        FROM jobs j
        CROSS JOIN {_SHOWN_ORDER}
        LEFT JOIN (SELECT t.*, {_SHOWN_STATUS} AS shown FROM task_executions t) t
               ON t.job_id = j.id AND t.shown = s.status
        GROUP BY j.id, s.status, s.ord ORDER BY j.id, s.ord
        """, {"stale": stale_after_s})


def live_workers(db: Database, job_id: int, stale_after_s: float = STALE_AFTER_S) -> int:
    """Workers of the job that are running and heartbeating (within ``stale_after_s``)."""
    row = db.row(
        """
        SELECT count(*) AS n FROM workers
         WHERE job_id = %(job)s AND stopped_at IS NULL
           AND last_heartbeat_at > now() - make_interval(secs => %(stale)s)
        """, {"job": job_id, "stale": stale_after_s})
    return int(row["n"]) if row else 0


#: The window of the first throughput estimate of `jobs stats --watch` (later ones are
#: measured between refreshes).
RECENT_S = 300


def progress_sample(db: Database, job_id: int) -> dict[str, Any]:
    """What the watch measures its rate from, on the database's clock: pages of done tasks
    so far (``pages_done``, at ``at``), pages per volume, and a first estimate: the pages of
    the volumes done in the last five minutes (``recent_pages``) over the time since the
    first of them was claimed, at most five minutes (``recent_span_s``). Dividing by the
    whole window instead read 0.37 pages/s for a worker that had run 40 s at 8 pages/s."""
    return db.row(
        f"""
        SELECT extract(epoch FROM now())::float8 AS at,
               coalesce(sum(total_images), 0)::float8 AS pages_done,
               coalesce(avg(total_images), 0)::float8 AS avg_pages_per_volume,
               count(*) FILTER (WHERE done_at >= now() - make_interval(secs => {RECENT_S})) AS recent_volumes,
               coalesce(sum(total_images) FILTER (WHERE done_at >= now() - make_interval(secs => {RECENT_S})), 0)::float8
                   AS recent_pages,
               least({RECENT_S}, extract(epoch FROM now() - min(least(started_at, done_at))
                       FILTER (WHERE done_at >= now() - make_interval(secs => {RECENT_S}))))::float8
                   AS recent_span_s
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
