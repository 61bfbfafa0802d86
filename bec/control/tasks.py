"""The SQL of the task lifecycle: volume rows, the atomic claim, outcomes, worker rows.

Each function is one statement (or one short transaction) so that concurrent workers
can only interleave at statement boundaries, where PostgreSQL's row locks decide.
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from bec.control.db import Database

#: A running task whose worker has not heartbeated for this long is up for grabs.
STALE_AFTER_S = 60.0


@dataclass(frozen=True)
class Claim:
    task_id: int
    attempt: int


def ensure_volume(db: Database, w_id: str, i_id: str, version: str | None, nb_images: int | None) -> int:
    row = db.row(
        """
        INSERT INTO volumes (bdrc_w_id, bdrc_i_id, last_s3_etag, nb_images)
        VALUES (%s, %s, %s, %s)
        ON CONFLICT (bdrc_w_id, bdrc_i_id) DO UPDATE
           SET last_s3_etag = coalesce(EXCLUDED.last_s3_etag, volumes.last_s3_etag),
               nb_images = coalesce(EXCLUDED.nb_images, volumes.nb_images),
               updated_at = now()
        RETURNING id
        """, (w_id, i_id, version, nb_images))
    assert row is not None
    return int(row["id"])


def claim(db: Database, job_id: int, volume_id: int, version: str, worker_id: int,
          total_images: int, stale_after_s: float = STALE_AFTER_S, token: str = "") -> Claim | None:
    """Take the task in one statement; None when it is done or running healthily elsewhere.

    Claimable: no row yet; a retryable (or terminal: an operator redrove it) failure; a
    ``running`` row whose worker stopped or went silent (crashed), or that this very worker
    holds (its controller restarted and lost track of it).

    Idempotent by ``token`` (one receive of one message): when the reply to a claim is lost
    after PostgreSQL committed it, the same claim made again finds its own row and gets it
    back as it was (same attempt), instead of leaving a ``running`` row nobody knows of.
    """
    row = db.row(
        """
        INSERT INTO task_executions AS t
               (job_id, volume_id, s3_etag, status, attempt, worker_id, started_at, total_images,
                claim_token)
        VALUES (%(job)s, %(volume)s, %(version)s, 'running', 1, %(worker)s, now(), %(images)s,
                %(token)s)
        ON CONFLICT (job_id, volume_id, s3_etag) DO UPDATE
           SET status = 'running', worker_id = EXCLUDED.worker_id, claim_token = EXCLUDED.claim_token,
               attempt = CASE WHEN t.status = 'running' AND t.worker_id = EXCLUDED.worker_id
                               AND t.claim_token = EXCLUDED.claim_token
                              THEN t.attempt ELSE t.attempt + 1 END,
               started_at = now(), done_at = NULL, total_images = EXCLUDED.total_images,
               nb_errors = NULL, total_duration_ms = NULL, avg_duration_per_page_ms = NULL,
               error_reason = NULL
         WHERE t.status IN ('retryable_failed', 'terminal_failed')
            OR (t.status = 'running' AND (
                    t.worker_id IS NULL
                 OR t.worker_id = EXCLUDED.worker_id
                 OR NOT EXISTS (
                        SELECT 1 FROM workers w
                         WHERE w.worker_id = t.worker_id
                           AND w.stopped_at IS NULL
                           AND w.last_heartbeat_at > now() - make_interval(secs => %(stale)s))))
        RETURNING id, attempt
        """, {"job": job_id, "volume": volume_id, "version": version, "worker": worker_id,
              "images": total_images, "stale": stale_after_s, "token": token or None})
    return Claim(int(row["id"]), int(row["attempt"])) if row else None


def task_status(db: Database, job_id: int, volume_id: int, version: str) -> str | None:
    """The status of one version's task (why a claim was refused), or None without a row."""
    row = db.row("SELECT status::text AS status FROM task_executions "
                 "WHERE job_id = %s AND volume_id = %s AND s3_etag = %s", (job_id, volume_id, version))
    return row["status"] if row else None


def mark_done(db: Database, task_id: int, worker_id: int, attempt: int, total_images: int,
              nb_errors: int, total_duration_ms: float) -> bool:
    """Record success; False when the claim is no longer this worker's.

    Only the claim's holder (worker and attempt) may settle a task. A worker whose heartbeat
    went stale while it worked (a partition, a stalled host) may find its volume taken over:
    the new holder finishes it, and nothing this worker says may end that claim."""
    avg = total_duration_ms / total_images if total_images else 0.0
    return db.execute(
        """
        UPDATE task_executions
           SET status = 'done', done_at = now(), total_images = %s, nb_errors = %s,
               total_duration_ms = %s, avg_duration_per_page_ms = %s, error_reason = NULL
         WHERE id = %s AND worker_id = %s AND attempt = %s AND status = 'running'
        """, (total_images, nb_errors, total_duration_ms, avg, task_id, worker_id, attempt)) == 1


def record_done_from_marker(db: Database, job_id: int, volume_id: int, version: str,
                            worker_id: int, marker: dict[str, Any]) -> None:
    """``success.json`` exists but the DB may not say so (crash between the two): fix the DB."""
    images = int(marker.get("total_images", 0) or 0)
    duration = float(marker.get("total_duration_ms", 0.0) or 0.0)
    db.execute(
        """
        INSERT INTO task_executions AS t
               (job_id, volume_id, s3_etag, status, worker_id, done_at, total_images, nb_errors,
                total_duration_ms, avg_duration_per_page_ms)
        VALUES (%s, %s, %s, 'done', %s, now(), %s, %s, %s, %s)
        ON CONFLICT (job_id, volume_id, s3_etag) DO UPDATE
           SET status = 'done', done_at = coalesce(t.done_at, now()),
               total_images = EXCLUDED.total_images, nb_errors = EXCLUDED.nb_errors,
               total_duration_ms = EXCLUDED.total_duration_ms,
               avg_duration_per_page_ms = EXCLUDED.avg_duration_per_page_ms, error_reason = NULL
         WHERE t.status <> 'done'
        """, (job_id, volume_id, version, worker_id, images, int(marker.get("nb_errors", 0) or 0),
              duration, duration / images if images else 0.0))


def mark_failed(db: Database, task_id: int, worker_id: int, attempt: int | None, *, terminal: bool,
                reason: str, nb_errors: int | None = None, total_duration_ms: float | None = None) -> bool:
    """Record a failure of this worker's claim (``attempt`` None: any claim of this worker,
    for the supervisor's release of a dead controller's tasks); False when it is not ours."""
    return db.execute(
        """
        UPDATE task_executions
           SET status = %s, done_at = now(), error_reason = %s,
               nb_errors = coalesce(%s, nb_errors), total_duration_ms = coalesce(%s, total_duration_ms)
         WHERE id = %s AND worker_id = %s AND attempt = coalesce(%s::int, attempt)
           AND status = 'running'
        """, ("terminal_failed" if terminal else "retryable_failed", reason[:2000], nb_errors,
              total_duration_ms, task_id, worker_id, attempt)) == 1


def record_terminal(db: Database, job_id: int, volume_id: int, version: str, worker_id: int,
                    reason: str) -> None:
    """A terminal verdict before any claim (missing/invalid manifest): upsert the row."""
    db.execute(
        """
        INSERT INTO task_executions AS t (job_id, volume_id, s3_etag, status, worker_id, done_at,
                                          error_reason, total_images)
        VALUES (%s, %s, %s, 'terminal_failed', %s, now(), %s, 0)
        ON CONFLICT (job_id, volume_id, s3_etag) DO UPDATE
           SET status = 'terminal_failed', attempt = t.attempt + 1, worker_id = EXCLUDED.worker_id,
               done_at = now(), error_reason = EXCLUDED.error_reason
         WHERE t.status <> 'done'
        """, (job_id, volume_id, version, worker_id, reason[:2000]))


def forget_missing_manifest(db: Database, job_id: int, volume_id: int) -> int:
    """The volume has a manifest now (it was just claimed at a real version): an earlier
    "manifest missing" row (version '') no longer stands for anything, and left alone it
    would count a finished volume as terminal in every statistic for ever."""
    return db.execute(
        "DELETE FROM task_executions WHERE job_id = %s AND volume_id = %s AND s3_etag = '' "
        "AND status = 'terminal_failed'", (job_id, volume_id))


def forget_superseded(db: Database, job_id: int, volume_id: int, version: str,
                      stale_after_s: float = STALE_AFTER_S) -> int:
    """Another version of the volume was just claimed (its manifest changed). A task of an
    older version left ``running`` by a worker that is gone (it died while the manifest
    changed) is never finished nor claimed again, since no message names that version any
    more, and it counted as running in every statistic for ever: it is dropped. One held by a
    live worker is left to it (it finishes its version)."""
    return db.execute(
        """
        DELETE FROM task_executions t
         WHERE t.job_id = %(job)s AND t.volume_id = %(volume)s AND t.s3_etag NOT IN (%(version)s, '')
           AND t.status = 'running'
           AND NOT EXISTS (
                   SELECT 1 FROM workers w
                    WHERE w.worker_id = t.worker_id
                      AND w.stopped_at IS NULL
                      AND w.last_heartbeat_at > now() - make_interval(secs => %(stale)s))
        """, {"job": job_id, "volume": volume_id, "version": version, "stale": stale_after_s})


# -- workers ----------------------------------------------------------------------------------
def register_worker(db: Database, name: str, job_id: int, tags: dict[str, Any]) -> int:
    row = db.row(
        "INSERT INTO workers (worker_name, hostname, job_id, tags) VALUES (%s, %s, %s, %s) "
        "RETURNING worker_id", (name, socket.gethostname(), job_id, Jsonb(tags)))
    assert row is not None
    return int(row["worker_id"])


def heartbeat(db: Database, worker_id: int) -> None:
    db.execute("UPDATE workers SET last_heartbeat_at = now() WHERE worker_id = %s", (worker_id,))


def mark_worker_stopped(db: Database, worker_id: int) -> None:
    db.execute("UPDATE workers SET stopped_at = now(), last_heartbeat_at = now() "
               "WHERE worker_id = %s AND stopped_at IS NULL", (worker_id,))


def release_running(db: Database, worker_id: int, reason: str) -> int:
    """Every task this worker still holds goes back to retryable (shutdown, crash recovery)."""
    return db.execute(
        "UPDATE task_executions SET status = 'retryable_failed', done_at = now(), error_reason = %s "
        "WHERE worker_id = %s AND status = 'running'", (reason, worker_id))


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
