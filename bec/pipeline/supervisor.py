"""Supervisor: the worker's main process. Spawns, watches and stops every other process.

    supervisor ─┬─ controller ........ SQS, manifests, claims, visibility, finalisation
                ├─ fetch-0 … fetch-N-1  S3 GET + decode → frame in a slot
                ├─ infer-0 (per GPU) .. batched model → line mask in the slot
                └─ post-0 … ........... contours, skew, second pass → result in the slot

It registers the worker row and heartbeats it; restarts a dead child with back-off (and
gives up, exit 1, when one keeps dying); keeps a ledger of the messages the controller
holds so that, if the controller dies, they are released at once instead of waiting
out their visibility timeout. SIGTERM/SIGINT drain (finish within ``grace``, release the
rest); a second signal releases at once.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bec import __version__
from bec.control import jobkinds, tasks
from bec.edges import aws
from bec.observe import metrics, telemetry
from bec.control.db import Database
from bec.errors import BecError, ModelError, Unavailable
from bec.pipeline.child import ChildSpec, PipelineSpec, child_main
from bec.pipeline.messages import (Drain, Fatal, Finished, Mailbox, PipelineReady, Ready, ReleaseNow, Stop,
                                   Track, Untrack)
from bec.pipeline.slots import STATE_NAMES, SlotPool

log = logging.getLogger("bec.supervisor")

HEARTBEAT_S = 5.0
CHECK_S = 0.25
MAX_CRASHES = 5           # crashes of one role within CRASH_WINDOW_S before giving up
CRASH_WINDOW_S = 300.0
STOP_TIMEOUT_S = 10.0

CONTROLLER = "bec.pipeline.controller"  # every kind's; the other roles' modules are the kind's


def model_identity(model_path: str) -> dict[str, str]:
    """File name and sha256 of the checkpoint (without loading torch in the supervisor)."""
    if model_path == "null":
        return {"name": "null", "sha256": ""}
    path = Path(model_path)
    if not path.is_file():
        raise ModelError(f"model file not found: {model_path} (set BEC_LD_MODEL_PATH or --model-path)")
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"name": path.name, "sha256": digest.hexdigest()}


#: Most single-threaded model replicas a CPU host runs by default; past that, replicas get
#: more threads each. Every replica costs its own torch runtime, weights and activations
#: (~150 MB for the small model) and its share of the slot pool.
CPU_MAX_REPLICAS = 8


def cpu_inference_layout(model_path: str, cores: int, procs: int | None = None,
                         threads: int | None = None) -> tuple[int, int]:
    """(inference processes, torch threads in each) on a CPU host; ``procs``/``threads`` are the
    operator's choice where given, the rest follows from the cores.

    A real model runs as one single-threaded replica per core (up to ``CPU_MAX_REPLICAS``) rather
    than one process with a thread per core: an OpenMP team waits at every barrier for its
    slowest thread, and on a host whose cores it shares with the fetch and post processes one of
    its threads is always the one that was preempted. Replicas have no barrier to wait at; a
    preempted one just runs later. Measured, small model, 2 cores (Xeon), 720 pages, pipeline
    pages/s, three interleaved runs each: 1 process × 2 threads 12.8 / 12.7 / 14.4 (inference
    CPU 106–117 ms/page), 2 processes × 1 thread 15.5 / 15.3 / 16.1 (95–99 ms/page), for 310 MB
    more peak PSS.

    The null model stays one process with one thread: it only tiles and stitches, which is
    cheaper than handing half of it to another thread, and one process keeps up with every
    decode process the host can run.
    """
    if model_path == "null":
        return procs or 1, threads or 1
    if procs is None:
        procs = max(1, min(cores // (threads or 1), CPU_MAX_REPLICAS))
    return procs, threads or max(1, cores // procs)


#: How long (busy-wait iterations) an idle OpenMP thread of a CPU inference process spins
#: before it sleeps. libgomp's default (300,000) suits a machine the model has to itself; in
#: the pipeline the fetch and post processes share the cores, and a thread spinning at a
#: barrier burns the CPU they need. Measured, small model, 2 cores, pipeline pages/s:
#: default 23.1, 30,000 24.5, 10,000 25.5, 3,000 25.4, 1,000 26.9, 300 23.6, 0 24.0;
#: with the helpers at nice 19, 10,000 gives 26.7. An operator's own GOMP_SPINCOUNT wins.
CPU_GOMP_SPINCOUNT = "10000"


def slot_count(p: PipelineSpec, batch: int) -> int:
    """Enough slots for every stage to have work queued: ``batch`` pages per model process."""
    return p.n_fetch * (p.fetch_threads + 2) + p.n_infer * 2 * batch + 2 * p.n_post + 4


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """Spawn re-runs the parent's main *script* in every child (so that its functions can be
    unpickled there). The ``bec`` console script imports the whole CLI (boto3, psycopg, rich,
    click): ~0.75 s of CPU per child, for nothing: a child's entry point is
    ``bec.pipeline.child``. ``python -m bec`` needs nothing: spawn skips a ``__main__`` module."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or getattr(main, "__spec__", None) is not None:
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


@dataclass
class Child:
    role: str
    process: Any = None
    crashes: deque = field(default_factory=deque)
    restart_at: float | None = None


class Supervisor:
    def __init__(self, pipeline: PipelineSpec, db: Database, slots: SlotPool) -> None:
        self.p = pipeline
        self.db = db
        self.slots = slots
        self.mp = multiprocessing.get_context("spawn")
        self.mailbox = Mailbox(pipeline.namespace, "supervisor")
        self.mailbox.start_reader()
        self.children = {role: Child(role) for role in pipeline.roles if role != "supervisor"}
        self.ledger: set[str] = set()  # receipts of the messages the controller holds
        self.unreleased = ""  # a dead controller's tasks and messages wait for release (the reason)
        self.next_release_try = 0.0
        self.release_warned = False
        self.signals = 0
        self._said: set[bool] = set()  # which signal reactions were logged (a retried one is not)
        self.finished: str | None = None
        self.fatal: str | None = None
        self.exit_code = 0
        self._stop_heartbeat = threading.Event()
        self.ready: set[str] = set()
        self.announced_ready = False
        self.started = time.monotonic()
        self.sqs = aws.client("sqs", pipeline.region)
        self.stage_modules = jobkinds.kind_of(pipeline.job_name).stage_modules  # type: ignore[union-attr]
        if pipeline.device == "cpu":  # read by libgomp when a child loads torch
            os.environ.setdefault("GOMP_SPINCOUNT", CPU_GOMP_SPINCOUNT)

    # -- children ------------------------------------------------------------------------------
    def spawn(self, child: Child) -> None:
        role = child.role.split("-")[0]
        module = CONTROLLER if role == "controller" else self.stage_modules[role]
        spec = ChildSpec(child.role, module, self.p, os.getpid())
        proc = self.mp.Process(target=child_main, args=(spec,), name=f"bec-{child.role}", daemon=False)
        with _main_script_hidden():
            proc.start()
        child.process = proc
        child.restart_at = None

    def check_children(self) -> None:
        now = time.monotonic()
        for child in self.children.values():
            proc = child.process
            if proc is not None and proc.exitcode is not None:
                self.slots.pids[self.p.role_index(child.role)] = 0
                proc.join(0)
                child.process = None
                if self.finished or self.fatal:
                    continue
                child.crashes.append(now)
                while child.crashes and now - child.crashes[0] > CRASH_WINDOW_S:
                    child.crashes.popleft()
                log.warning("%s (pid %d) died with exit code %s; restarting (crash %d in %.0f s)",
                            child.role, proc.pid, proc.exitcode, len(child.crashes), CRASH_WINDOW_S)
                telemetry.mark_dead(proc.pid)
                metrics.RESTARTS.labels(child.role.split("-")[0]).inc()
                if len(child.crashes) > MAX_CRASHES:
                    self.fatal = f"{child.role} crashed {len(child.crashes)} times in {CRASH_WINDOW_S:.0f} s"
                    continue
                child.restart_at = now + min(30.0, 0.5 * 2 ** (len(child.crashes) - 1))
                if child.role == "controller":
                    self.unreleased = "released: controller restarted"
            if child.role == "controller" and self.unreleased and not self._release_dead_controllers():
                continue  # no new controller while the dead one's tasks are not released
            if child.process is None and child.restart_at is not None and now >= child.restart_at \
                    and not self.finished and not self.fatal:
                self.spawn(child)

    def _release_dead_controllers(self) -> bool:
        """Release what a dead controller held; tried again (every heartbeat) while PostgreSQL
        does not answer. A restarted controller could claim meanwhile, and releasing "every
        running task of this worker" would then take its new claims too: it waits."""
        now = time.monotonic()
        if now < self.next_release_try:
            return False
        self.next_release_try = now + HEARTBEAT_S
        if not self.release_ledger(self.unreleased):
            return False
        self.unreleased = ""
        return True

    def release_ledger(self, reason: str) -> bool:
        """Messages the (dead) controller held: visible again now; their tasks retryable.

        Every ``running`` task of this worker is released (the dead controller held them
        all), including a claim its admit thread made just before it died: left ``running``
        under this live worker, every other worker would find it "running elsewhere" until
        its message went to the DLQ. The rows go before the messages, so that whoever
        receives a message next can claim it; when the rows cannot be released (PostgreSQL
        does not answer), the messages are not released either (False): they stay hidden,
        and come back at the end of their visibility timeout at the latest."""
        try:
            tasks.release_running(self.db, self.p.worker_id, reason)
        except Unavailable as exc:
            if self.ledger and not self.release_warned:
                log.warning("could not mark this worker's tasks retryable (%s): their %d message(s) are "
                            "not released until it can", exc, len(self.ledger))
            self.release_warned = True
            return False
        self.release_warned = False
        for receipt in list(self.ledger):
            try:
                self.sqs.change_message_visibility(QueueUrl=self.p.queue_url, ReceiptHandle=receipt,
                                                   VisibilityTimeout=0)
            except Exception as exc:  # the message may be deleted already
                log.debug("release of a message failed: %s", exc)
            self.ledger.discard(receipt)
        return True

    # -- heartbeat -----------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Nothing may end this thread but the stop: a worker whose heartbeat stopped looks
        dead while it works, and another worker takes its volumes over and runs them twice."""
        while not self._stop_heartbeat.wait(HEARTBEAT_S):
            try:
                tasks.heartbeat(self.db, self.p.worker_id)
                metrics.HEARTBEAT.set_to_current_time()
            except BecError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:  # unclassified: a bug, reported, and the heartbeat goes on
                log.exception("heartbeat failed unexpectedly; trying again in %.0f s", HEARTBEAT_S)

    # -- signals -------------------------------------------------------------------------------
    def on_signal(self, signum: int, _frame: Any) -> None:
        self.signals += 1

    def react_to_signals(self, seen: int, grace: float) -> int:
        """Tell the controller to drain (first signal) or release at once (second); returns the
        signals handled. One the controller could not be told of (its mailbox is not bound
        yet: it is starting or restarting) is told again at the next check, not dropped."""
        if self.signals == seen:
            return seen
        release = self.signals >= 2
        if release not in self._said:
            self._said.add(release)
            if release:
                log.info("Second signal: releasing in-flight volumes now")
            else:
                log.info("Signal received: draining (grace %.0f s); send it again to stop at once", grace)
        if not self.mailbox.send("controller", ReleaseNow() if release else Drain(grace), timeout=1):
            return seen
        return self.signals

    # -- metrics -------------------------------------------------------------------------------
    def slot_metrics(self) -> list[Any]:
        """Scrape-time view of the slot pool: how many slots sit in each stage."""
        from prometheus_client.core import GaugeMetricFamily

        table = self.slots.table
        if table is None:
            return []
        by_state = GaugeMetricFamily("bec_slots", "Shared-memory slots by state", labels=["state"])
        counts = np.bincount(table["state"], minlength=len(STATE_NAMES))
        for index, name in enumerate(STATE_NAMES):
            by_state.add_metric([name], float(counts[index]))
        capacity = GaugeMetricFamily("bec_slots_capacity", "Shared-memory slots in the pool",
                                     value=float(len(table)))
        return [by_state, capacity]

    def process_metrics(self) -> list[Any]:
        """Resident memory of every process of the worker, by role and kind (anon = its own
        heap, file = mapped libraries, shmem = the slot pool), read from /proc at scrape
        time: a slow leak in one process shows as one rising line over days."""
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("bec_process_resident_memory_bytes",
                                   "Resident memory of the worker's processes", labels=["role", "kind"])
        pids = {"supervisor": os.getpid()}
        pids.update({role: c.process.pid for role, c in self.children.items()
                     if c.process is not None and c.process.pid})
        for role, pid in pids.items():
            try:
                parts = telemetry.resident_memory(pid)
            except OSError:
                continue  # exited between listing and reading
            for kind, size in parts.items():
                family.add_metric([role, kind], float(size))
        return [family]

    def scrape_metrics(self) -> list[Any]:
        return self.slot_metrics() + self.process_metrics()

    # -- main ----------------------------------------------------------------------------------
    def run(self, grace: float, metrics_port: int = 0, metrics_addr: str = telemetry.LOCAL_ONLY) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        metrics.INFO.labels(__version__, self.p.job_name, self.p.model_identity.get("sha256", ""),
                            self.p.device).set(1)
        metrics.start_series()
        if metrics_port:
            self.metrics_server = telemetry.serve(metrics_port, metrics_addr, self.scrape_metrics)
        for child in self.children.values():
            self.spawn(child)
        threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True).start()
        seen = 0
        hard_deadline = float("inf")
        while True:
            msg = self.mailbox.recv(timeout=CHECK_S)
            while msg is not None:
                self.handle(msg)
                msg = self.mailbox.recv(timeout=0)
            if self.signals and hard_deadline == float("inf"):
                hard_deadline = time.monotonic() + grace + 30
            seen = self.react_to_signals(seen, grace)
            self.check_children()
            if self.finished or self.fatal:
                break
            if time.monotonic() > hard_deadline:
                log.warning("controller did not finish within the grace period; stopping")
                break
            if self.children["controller"].process is None and seen:
                break  # draining and the controller is gone: nothing left to wait for
        return self.shutdown()

    def handle(self, msg: object) -> None:
        if isinstance(msg, Track):
            self.ledger.add(msg.receipt)
        elif isinstance(msg, Untrack):
            self.ledger.discard(msg.receipt)
        elif isinstance(msg, Finished):
            self.finished = msg.reason
        elif isinstance(msg, Fatal):
            self.fatal = f"{msg.role}: {msg.reason}"
        elif isinstance(msg, Ready):
            self.ready.add(msg.role)
            if self.ready >= set(self.children):
                if not self.announced_ready:
                    self.announced_ready = True
                    log.info("All %d processes ready (%.1f s)", len(self.children), time.monotonic() - self.started)
                # Again after any restart: a restarted controller waits for this before it
                # takes volumes, and telling a running one twice changes nothing.
                self.mailbox.send("controller", PipelineReady(), timeout=1)

    def shutdown(self) -> int:
        controller = self.children["controller"].process
        if controller is not None and controller.exitcode is None:
            self.mailbox.send("controller", Stop(), timeout=1)
            controller.join(STOP_TIMEOUT_S)
        # pick up the controller's last words (Untrack of the volumes it released)
        for msg in self.mailbox.drain():
            self.handle(msg)
        for child in self.children.values():
            if child.process is not None and child.process.exitcode is None:
                self.mailbox.send(child.role, Stop(), timeout=0.5)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children.values():
            proc = child.process
            if proc is None:
                continue
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.exitcode is None:
                log.warning("%s did not stop; killing it", child.role)
                proc.kill()
                proc.join(5)
        self.release_ledger("released: worker stopped")
        self._stop_heartbeat.set()
        try:
            tasks.mark_worker_stopped(self.db, self.p.worker_id)
        except BecError as exc:
            log.warning("could not mark the worker stopped: %s", exc)
        self.mailbox.close()
        if getattr(self, "metrics_server", None) is not None:
            self.metrics_server.shutdown()
        if self.fatal:
            log.error("Error: %s", self.fatal)
            return 1
        log.info("Worker completed successfully (%s)", self.finished or "stopped")
        return 0


def new_namespace(worker_id: int) -> str:
    return f"{worker_id}-{uuid.uuid4().hex[:12]}"
