"""The job-level Prometheus exporter: what a job has left and what it has done.

Workers export what *they* do (``bec.observe.metrics``); a job's backlog lives elsewhere — in its
SQS queues and in ``task_executions`` — and no worker should report it (N workers would
report it N times, and none when all are stopped). ``bec exporter`` runs once per
deployment and exports, per job (label ``job``, the job's name):

* ``bec_job_queue_messages{queue="tasks|dlq", state="visible|in_flight"}`` (SQS's
  approximate counts),
* ``bec_job_tasks{status}`` (the four statuses and ``stalled``: running under a worker that
  stopped heartbeating, nobody's work until taken over; zeros included),
* ``bec_job_images_done`` and ``bec_job_page_errors`` (over ``done`` tasks),

plus ``bec_exporter_up`` (0 when the last refresh could not reach PostgreSQL or SQS: the
reason is logged as a warning, the exporter keeps serving). Values are computed at
scrape time by a custom collector and cached for ``interval`` seconds, so a busy
Prometheus (or several) cannot turn scrapes into database load. The ETA is left to
Grafana (queue depth × pages per volume ÷ the workers' pages/s).

Scrape it with ``honor_labels: true`` (see ``grafana/prometheus.yml``): its ``job`` label
names the BEC job, which Prometheus would otherwise rename to ``exported_job``.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import botocore.exceptions
import psycopg

from bec.control import jobs as jobstore
from bec.edges import aws
from bec.config import DbParams
from bec.control.db import Database
from bec.errors import BecError

log = logging.getLogger("bec.exporter")

QUEUE_STATES = (("visible", "ApproximateNumberOfMessages"),
                ("in_flight", "ApproximateNumberOfMessagesNotVisible"))


def queue_depth(sqs: Any, url: str) -> dict[str, int]:
    """SQS's approximate counts of a queue: ``{"visible": n, "in_flight": m}``."""
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[a for _, a in QUEUE_STATES])
    values = attrs.get("Attributes", {})
    return {state: int(values.get(attr, 0)) for state, attr in QUEUE_STATES}


@dataclass
class JobSample:
    name: str
    tasks: dict[str, int]
    images_done: int
    page_errors: int
    queues: dict[str, dict[str, int]] = field(default_factory=dict)  # tasks|dlq → state → n


@dataclass
class Snapshot:
    up: bool
    jobs: list[JobSample]
    taken_at: float  # wall clock, for bec_exporter_last_refresh_timestamp_seconds
    duration_s: float


class JobExporter:
    """A prometheus_client collector; ``refresh`` is the only place that does I/O."""

    def __init__(self, db_params: DbParams, sqs_factory: Callable[[], Any], interval: float = 15.0,
                 connect_timeout: float = 5.0, stale_after_s: float = jobstore.STALE_AFTER_S) -> None:
        self.db_params = db_params
        self.stale_after_s = stale_after_s
        self.sqs_factory = sqs_factory
        self.interval = interval
        self.connect_timeout = connect_timeout
        self._db: Database | None = None
        self._sqs: Any = None
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._taken_mono = 0.0
        self.last_success: float | None = None

    # -- I/O ---------------------------------------------------------------------------------
    def _database(self) -> Database:
        if self._db is None:
            self._db = Database(self.db_params, min_size=1, max_size=1,
                                connect_timeout=self.connect_timeout, application_name="bec-exporter")
        return self._db

    def _drop_database(self) -> None:
        """After a failure, start from a fresh pool: a pool whose server went away would
        make the next scrape wait for its full checkout timeout."""
        if self._db is not None:
            try:
                self._db.pool.close(timeout=0)
            except Exception:  # closing a broken pool must not break the scrape
                pass
            self._db = None

    def refresh(self) -> Snapshot:
        started = time.perf_counter()
        try:
            rows = jobstore.exporter_totals(self._database(), self.stale_after_s)
        except (BecError, psycopg.Error) as exc:
            log.warning("exporter: cannot read task counts from PostgreSQL at %s: %s",
                        self.db_params.describe(), _first_line(exc))
            self._drop_database()
            return Snapshot(False, [], time.time(), time.perf_counter() - started)
        up = True
        samples: dict[int, JobSample] = {}
        urls: dict[int, tuple[str, str]] = {}
        for row in rows:
            sample = samples.get(row["job_id"])
            if sample is None:
                sample = samples[row["job_id"]] = JobSample(row["name"], {}, 0, 0)
                urls[row["job_id"]] = (row["queue_url"], row["dlq_url"])
            sample.tasks[row["status"]] = int(row["count"])
            if row["status"] == "done":
                sample.images_done = int(row["total_images"])
                sample.page_errors = int(row["total_errors"])
        for job_id, sample in samples.items():
            for queue, url in zip(("tasks", "dlq"), urls[job_id]):
                try:
                    if self._sqs is None:
                        self._sqs = self.sqs_factory()
                    sample.queues[queue] = queue_depth(self._sqs, url)
                except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                    up = False
                    log.warning("exporter: cannot read SQS queue %s of job %s: %s: %s", url,
                                sample.name, aws.error_code(exc), _first_line(exc))
        if up:
            self.last_success = time.time()
        return Snapshot(up, list(samples.values()), time.time(), time.perf_counter() - started)

    def snapshot(self) -> Snapshot:
        """The cached values, refreshed when older than ``interval`` (one refresh at a time)."""
        with self._lock:
            now = time.monotonic()
            if self._snapshot is None or now - self._taken_mono >= self.interval:
                self._snapshot = self.refresh()
                self._taken_mono = time.monotonic()
            return self._snapshot

    def close(self) -> None:
        with self._lock:
            self._drop_database()

    # -- collector protocol ------------------------------------------------------------------
    def describe(self) -> Iterable[Any]:
        return []  # nothing to describe without I/O: registration must not touch the DB

    def collect(self) -> Iterable[Any]:
        snap = self.snapshot()
        return families(snap, self.last_success)


def families(snap: Snapshot, last_success: float | None) -> list[Any]:
    # imported here: ``bec jobs`` imports this module, and the worker must choose
    # prometheus_client's storage before the library is first imported
    from prometheus_client.core import GaugeMetricFamily

    up = GaugeMetricFamily("bec_exporter_up",
                           "1 when the last refresh reached PostgreSQL and every SQS queue, else 0",
                           value=1.0 if snap.up else 0.0)
    duration = GaugeMetricFamily("bec_exporter_refresh_duration_seconds",
                                 "Time the last refresh took", value=snap.duration_s)
    found: list[Any] = [up, duration]
    if last_success is not None:
        found.append(GaugeMetricFamily("bec_exporter_last_success_timestamp_seconds",
                                       "Unix time of the last refresh that reached every source",
                                       value=last_success))
    if not snap.up and not snap.jobs:
        return found
    queue = GaugeMetricFamily("bec_job_queue_messages",
                              "Messages in a job's SQS queue (tasks or dlq), visible or in flight "
                              "(SQS's approximate counts)", labels=["job", "queue", "state"])
    tasks = GaugeMetricFamily("bec_job_tasks", "Task executions of a job by status",
                              labels=["job", "status"])
    images = GaugeMetricFamily("bec_job_images_done", "Images of a job's done tasks",
                               labels=["job"])
    errors = GaugeMetricFamily("bec_job_page_errors", "Failed images (page errors) of a job's done tasks",
                               labels=["job"])
    for job in snap.jobs:
        for name, states in job.queues.items():
            for state, n in states.items():
                queue.add_metric([job.name, name, state], float(n))
        for status in jobstore.SHOWN_STATUSES:
            tasks.add_metric([job.name, status], float(job.tasks.get(status, 0)))
        images.add_metric([job.name], float(job.images_done))
        errors.add_metric([job.name], float(job.page_errors))
    return found + [queue, tasks, images, errors]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
