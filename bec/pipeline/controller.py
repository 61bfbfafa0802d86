"""Controller process: SQS in, pages out to the pipeline, artifacts and verdicts back.

It owns the volumes in flight and the free slots. Its main loop only moves descriptors
(never blocks on the network): SQS long-polls run in a receiver thread, admissions
(manifest, claim) and finalisations (Parquet, success.json, DB, delete) in small thread
pools, visibility extensions in their own thread. Messages are received ahead of need
(up to ``max_volumes_in_flight`` volumes) so that the next volume's pages are already
flowing while the current one drains.

Pages lost with a dead process are found from slot ownership (``slots``) and redone; a
slot that was taken back is retired for a while before reuse, so a late write from a
stale holder can never land in another page's data.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import botocore.exceptions
import numpy as np

from bec import aws, jobkinds, lifecycle, metrics
from bec.artifacts import PageOutcome
from bec.db import Database
from bec.errors import BadInput, BecError
from bec.lifecycle import Admission, Received, Verdict
from bec.localarchive import source_client
from bec.pipeline import slots as S
from bec.pipeline.child import ChildContext
from bec.pipeline.messages import (Drain, Fetch, Finished, Gone, PageDone, PageFailed, PipelineReady,
                                   ReleaseNow, Stop, Track, Untrack)
from bec.pipeline.slots import decode_result

log = logging.getLogger("bec.controller")

RETIRE_S = 10.0          # a recovered slot rests this long before reuse
SCAN_EVERY_S = 0.5       # how often slot ownership is checked against live processes
PAGE_TIMEOUT_S = 600.0   # a page in the pipeline longer than this is presumed lost
DONE_MESSAGE_LOST_S = 10.0  # a slot handed to us this long ago with no message: the message is lost
RECEIVE_GRACE_S = 2.0    # beyond the long poll's own wait, for a receive in flight at the end
STOP_RECEIVE_WAIT_S = 5.0  # ... when the supervisor stops the run (it kills the controller at 10 s)


@dataclass
class VolumeRun:
    key: int
    adm: Admission
    outcomes: list[PageOutcome | None]
    todo: collections.deque[int]
    visible_until: float
    finishing: bool = False
    remaining: int = -1  # pages without an outcome yet

    def __post_init__(self) -> None:
        if self.remaining < 0:
            self.remaining = len(self.outcomes)

    @property
    def complete(self) -> bool:
        return self.remaining == 0


@dataclass
class Counters:
    volumes_done: int = 0
    volumes_retry: int = 0
    volumes_skipped: int = 0
    poison: int = 0
    terminal: int = 0
    pages: int = 0
    page_errors: int = 0
    pages_redone: int = 0
    by_verdict: collections.Counter = field(default_factory=collections.Counter)


class Controller:
    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        p = ctx.pipeline
        self.p = p
        self.pool = ctx.slots
        self.table = ctx.slots.table
        self.db = Database(p.db, min_size=1, max_size=4, application_name="bec-controller")
        self.sqs = aws.client("sqs", p.region)
        self.kind = jobkinds.kind_of(p.job_name)
        assert self.kind is not None, p.job_name  # the worker refuses a job of no kind
        self.svc = lifecycle.Services(
            db=self.db, s3=aws.client("s3", p.region), source=source_client(p.source_bucket, p.region),
            sqs=self.sqs, job_name=p.job_name,
            job_id=p.job_id, worker_id=p.worker_id, worker_name=p.extra.get("worker_name", ""),
            source_bucket=p.source_bucket, dest_bucket=p.dest_bucket, queue_url=p.queue_url,
            dlq_url=p.dlq_url, config=p.config, model=p.model_identity, retry_delay=p.retry_delay,
            stale_after_s=p.stale_after_s)
        self.events: queue.Queue = queue.Queue()
        self.volumes: dict[int, VolumeRun] = {}
        self.admitting: set[tuple[str, str]] = set()
        self.active_labels: set[tuple[str, str]] = set()
        self.next_key = 1
        self.free: collections.deque[int] = collections.deque()
        self.retired: dict[int, float] = {}
        self.dispatched_at = np.zeros(len(self.table), dtype=np.float64)
        self.fetch_roles = [f"fetch-{i}" for i in range(p.n_fetch)]
        self.fetch_depth = p.fetch_threads + 2
        self.draining = False
        self.drain_deadline = float("inf")
        self.stopping = False
        self.empty_polls = 0
        self.pipeline_ready = threading.Event()  # set by the supervisor's PipelineReady
        self.unseen = 0  # received by the receiver thread, not yet taken in by the main loop
        # Set when the main loop has taken in the receiver's last result: the next receive is
        # decided on counts that include it (an empty poll that ends the run starts no other).
        self.taken_in = threading.Event()
        self.taken_in.set()
        self.receiver_thread: threading.Thread | None = None
        # how long the end of the run waits for a receive still in flight (see close)
        self.last_receive_wait_s = p.poll_wait + RECEIVE_GRACE_S
        self.database_down = False
        self.next_db_probe = 0.0
        self.counters = Counters()
        self.admit_pool = ThreadPoolExecutor(2, thread_name_prefix="admit")
        self.finish_pool = ThreadPoolExecutor(2, thread_name_prefix="finish")
        self._last_scan = 0.0
        self._done_since: dict[tuple[int, int], float] = {}  # (slot, gen) handed to us → first seen
        self._reset_slots()

    # -- slots ---------------------------------------------------------------------------------
    def _reset_slots(self) -> None:
        """At (re)start nothing in the table is ours: bump every generation, rest busy slots."""
        now = time.monotonic()
        for slot in range(len(self.table)):
            row = self.table[slot]
            row["gen"] = int(row["gen"]) + 1
            if int(row["state"]) == S.FREE:
                self.free.append(slot)
            else:
                row["state"] = S.RETIRED
                self.retired[slot] = now + RETIRE_S

    def _free_slot(self, slot: int) -> None:
        row = self.table[slot]
        row["gen"] = int(row["gen"]) + 1
        row["state"] = S.FREE
        row["owner"] = 0
        self.free.append(slot)

    def _retire(self, slot: int) -> None:
        row = self.table[slot]
        row["gen"] = int(row["gen"]) + 1
        row["state"] = S.RETIRED
        self.retired[slot] = time.monotonic() + RETIRE_S

    # -- dispatch ------------------------------------------------------------------------------
    def _fetch_load(self) -> dict[str, int]:
        busy = self.table["state"] == S.FETCH
        owners = self.table["owner"][busy]
        load = {}
        for role in self.fetch_roles:
            pid = self.ctx.pid_of(role)
            load[role] = int(np.count_nonzero(owners == pid)) if pid else self.fetch_depth
        return load

    def dispatch(self) -> None:
        if not self.free or not self.volumes:
            return
        load = self._fetch_load()
        for vol in list(self.volumes.values()):
            while vol.todo and self.free:
                page = vol.todo[0]
                entry = vol.adm.manifest.entries[page]
                if entry.problem:
                    vol.todo.popleft()
                    self._record(vol, page, PageOutcome.failed(entry.filename, "manifest", "invalid_entry",
                                                               entry.problem))
                    continue
                role = min(load, key=load.get)
                if load[role] >= self.fetch_depth:
                    return
                slot = self.free.popleft()
                row = self.table[slot]
                gen = int(row["gen"]) + 1
                row["gen"] = gen
                row["volume"], row["page"], row["pass_no"] = vol.key, page, 1
                row["rotation"], row["binary_ready"], row["result_len"] = float("nan"), 0, 0
                row["skew"], row["tps_n"] = 0.0, 0
                for name in ("fetch_ms", "decode_ms", "infer_ms", "post_ms"):
                    row[name] = 0.0
                page_input = self.kind.page_input(vol.adm.inputs, page)  # e.g. the page's ldv1 lines
                if page_input:
                    self.pool.write_result(slot, page_input)
                row["owner"] = self.ctx.pid_of(role)
                row["state"] = S.FETCH
                msg = Fetch(slot, gen, self.p.source_bucket, vol.adm.manifest.key(entry))
                try:
                    sent = self.ctx.mailbox.try_send(role, msg)
                except Gone:
                    sent = False
                    load[role] = self.fetch_depth
                if not sent:
                    row["state"], row["owner"] = S.FREE, 0
                    self.free.appendleft(slot)
                    load[role] = self.fetch_depth
                    if all(v >= self.fetch_depth for v in load.values()):
                        return
                    continue
                vol.todo.popleft()
                self.dispatched_at[slot] = time.monotonic()
                load[role] += 1

    # -- results -------------------------------------------------------------------------------
    def _record(self, vol: VolumeRun, page: int, outcome: PageOutcome) -> None:
        if vol.outcomes[page] is None:
            vol.outcomes[page] = outcome
            vol.remaining -= 1
            self.counters.pages += 1
            self.counters.page_errors += int(not outcome.ok)
            metrics.PAGES.labels("ok" if outcome.ok else "error").inc()
            if not outcome.ok:
                metrics.PAGE_ERRORS.labels(outcome.error_stage or "", outcome.error_type or "").inc()
            for stage, ms in zip(self.kind.stage_names, outcome.timings):
                if ms > 0:
                    metrics.STAGE_SECONDS.labels(stage).observe(ms / 1000)
        if vol.complete and not vol.finishing:
            vol.finishing = True
            self.finish_pool.submit(self._finish, vol)

    def _take(self, slot: int, gen: int) -> tuple[VolumeRun | None, int, np.void] | None:
        row = self.table[slot]
        if int(row["gen"]) != gen or int(row["state"]) != S.DONE:
            return None
        vol = self.volumes.get(int(row["volume"]))
        return vol, int(row["page"]), row

    def on_page_done(self, msg: PageDone) -> None:
        taken = self._take(msg.slot, msg.gen)
        if taken is None:
            return
        vol, page, row = taken
        metrics.S3_READ.inc(int(row["nbytes"]))
        if vol is not None:
            entry = vol.adm.manifest.entries[page]
            result = decode_result(self.pool.read_result(msg.slot))
            outcome = self.kind.outcome(
                entry.filename, result, etag=row["etag"].decode() or None,
                size=(int(row["orig_w"]), int(row["orig_h"])),
                frame=(int(row["frame_w"]), int(row["frame_h"])), timings=self._timings(row))
        self._free_slot(msg.slot)
        if vol is not None:
            self._record(vol, page, outcome)

    def on_page_failed(self, msg: PageFailed) -> None:
        taken = self._take(msg.slot, msg.gen)
        if taken is None:
            return
        vol, page, row = taken
        metrics.S3_READ.inc(int(row["nbytes"]))
        timings, etag = self._timings(row), row["etag"].decode() or None
        self._free_slot(msg.slot)
        if vol is not None:
            entry = vol.adm.manifest.entries[page]
            self._record(vol, page, PageOutcome.failed(entry.filename, msg.stage, msg.error, msg.message,
                                                       etag=etag, timings=timings))

    @staticmethod
    def _timings(row: np.void) -> tuple[float, float, float, float]:
        return (float(row["fetch_ms"]), float(row["decode_ms"]), float(row["infer_ms"]),
                float(row["post_ms"]))

    # -- recovery ------------------------------------------------------------------------------
    def scan(self) -> None:
        """Redo pages held by dead processes (or stuck too long); return rested slots."""
        now = time.monotonic()
        if now - self._last_scan < SCAN_EVERY_S:
            return
        self._last_scan = now
        metrics.VOLUMES_IN_FLIGHT.set(len(self.volumes))
        metrics.PAGES_WAITING.set(sum(len(v.todo) for v in self.volumes.values()))
        for slot, until in list(self.retired.items()):
            if now >= until:
                del self.retired[slot]
                self._free_slot(slot)
        live = set(int(x) for x in self.pool.pids if x)
        me = os.getpid()
        busy = np.isin(self.table["state"], (S.FETCH, S.INFER, S.POST, S.DONE))
        done_since: dict[tuple[int, int], float] = {}
        for slot in np.flatnonzero(busy):
            row = self.table[slot]
            owner = int(row["owner"])
            if owner == me and int(row["state"]) == S.DONE:
                # Its message is on its way to us, unless its sender died between handing the
                # slot over and sending: then no message comes, and the volume would wait for ever.
                key = (int(slot), int(row["gen"]))
                done_since[key] = self._done_since.get(key, now)
                if now - done_since[key] < DONE_MESSAGE_LOST_S:
                    continue
                why = "its message was lost"
            else:
                stuck = now - self.dispatched_at[slot] > PAGE_TIMEOUT_S
                if owner in live and not stuck:
                    continue
                why = "stuck" if stuck else "died"
            vol = self.volumes.get(int(row["volume"]))
            page = int(row["page"])
            self._retire(int(slot))
            if vol is not None and vol.outcomes[page] is None:
                vol.todo.appendleft(page)
                self.counters.pages_redone += 1
                metrics.PAGES_REDONE.inc()
                log.info("redoing page %d of %s (holder %s)", page, vol.adm.label, why)
        self._done_since = done_since

    # -- SQS receive (thread) ------------------------------------------------------------------
    def _want_more(self) -> int:
        in_flight = len(self.volumes) + len(self.admitting) + self.unseen
        if self.draining or self.stopping or in_flight >= self.p.max_volumes_in_flight:
            return 0
        k = self.p.shutdown_after_empty
        if k and self.empty_polls >= k:
            return 0  # the run ends once idle: one more receive could take a message nobody reads
        if self.database_down and not self._database_back():
            return 0  # every message received now would burn one of its receives
        # list() copies the values in one step under the GIL: the main thread adds and removes
        # volumes meanwhile, and iterating the live dict here raised and killed this thread
        queued_pages = sum(len(v.todo) for v in list(self.volumes.values()))
        if queued_pages > 2 * len(self.table):
            return 0  # enough pages are waiting for slots already
        return min(10, self.p.max_volumes_in_flight - in_flight)

    def _database_back(self) -> bool:
        """While PostgreSQL is unreachable, probe it (every few seconds) before receiving."""
        now = time.monotonic()
        if now < self.next_db_probe:
            return False
        self.next_db_probe = now + 5.0
        try:
            self.db.row("SELECT 1 AS ok")
        except BecError:
            return False
        log.info("PostgreSQL answers again: receiving resumes")
        self.database_down = False
        return True

    def receiver(self) -> None:
        """The SQS receive thread. Nothing may end it but a stop: a receiver that died would
        leave a worker that heartbeats, looks healthy, and never takes another volume."""
        while not self.pipeline_ready.wait(0.1):
            if self.stopping or self.draining:
                return
        while not self.stopping and not self.draining:
            try:
                self._receive_loop()
            except Exception:
                log.exception("SQS receiver failed unexpectedly; it goes on in 1 s")
                time.sleep(1.0)

    def _receive_loop(self) -> None:
        pause = 1.0
        while not self.stopping and not self.draining:
            if not self.taken_in.wait(0.1):
                continue
            want = self._want_more()
            if not want:
                time.sleep(0.05)
                continue
            try:
                got = self.sqs.receive_message(
                    QueueUrl=self.p.queue_url, MaxNumberOfMessages=want,
                    WaitTimeSeconds=self.p.poll_wait, VisibilityTimeout=self.p.visibility_timeout,
                    AttributeNames=["ApproximateReceiveCount"]).get("Messages", [])
                pause = 1.0
                metrics.SQS_RECEIVES.inc()
                metrics.SQS_MESSAGES.inc(len(got))
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                log.warning("SQS receive failed (%s); retrying in %.0fs", aws.error_code(exc), pause)
                time.sleep(pause)
                pause = min(pause * 2, 60.0)
                continue
            received = [Received.from_sqs(m) for m in got]
            for message in received:  # the supervisor releases them if this process dies
                self.ctx.mailbox.send("supervisor", Track(message.receipt))
            self.unseen += len(got)
            self.taken_in.clear()
            self.events.put(("received", received, time.monotonic()))

    def on_received(self, messages: list[Received], at: float) -> None:
        try:
            self._take_in(messages, at)
        finally:
            self.taken_in.set()

    def _take_in(self, messages: list[Received], at: float) -> None:
        self.unseen -= len(messages)
        if not messages:
            if not self.volumes and not self.admitting:
                self.empty_polls += 1
            return
        self.empty_polls = 0
        for message in messages:
            if self.draining or self.stopping:
                lifecycle.set_visibility(self.svc, message, 0)
                self.ctx.mailbox.send("supervisor", Untrack(message.receipt))
                continue
            try:
                label = lifecycle.parse_body(message.body)
            except Exception:  # poison (or worse): admission routes it to the DLQ
                label = None
            if label and (label in self.admitting or label in self.active_labels):
                # a duplicate of a volume we hold: it returns later and is skipped
                log.info("Message %s (received %d times) duplicates volume %s/%s in progress here; "
                         "left to SQS", message.message_id, message.receive_count, *label)
                self.ctx.mailbox.send("supervisor", Untrack(message.receipt))
                continue
            if label:
                self.admitting.add(label)
            self.admit_pool.submit(self._admit, message, label, at)

    def _admit(self, message: Received, label: tuple[str, str] | None, received_at: float) -> None:
        try:
            adm = lifecycle.admit(self.svc, message)
        except Exception as exc:  # never lose track of a message because of a bug
            log.exception("admission of message %s failed", message.message_id)
            adm = Admission(Verdict.RETRY, message, reason=f"{type(exc).__name__}: {exc}")
            lifecycle.set_visibility(self.svc, message, lifecycle.backoff_s(self.svc, message.receive_count))
        self.events.put(("admitted", adm, label, received_at))

    def on_admitted(self, adm: Admission, label: tuple[str, str] | None, received_at: float) -> None:
        if label:
            self.admitting.discard(label)
        self.counters.by_verdict[adm.verdict.value] += 1
        if adm.verdict is not Verdict.ADMITTED:
            metrics.VOLUMES.labels(adm.verdict.value).inc()
            self.ctx.mailbox.send("supervisor", Untrack(adm.message.receipt))
        mid = adm.message.message_id
        if adm.verdict is Verdict.POISON:
            self.counters.poison += 1
            log.warning("Poison message %s sent to the DLQ: %s", mid, adm.reason)
        elif adm.verdict is Verdict.TERMINAL:
            self.counters.terminal += 1
            log.warning("Volume %s failed terminally (message %s to the DLQ): %s", adm.label, mid, adm.reason)
        elif adm.verdict is Verdict.RETRY:
            log.warning("Volume %s will be retried (message %s): %s", adm.label, mid, adm.reason)
            if adm.database_down and not self.database_down:
                self.database_down = True
                self.next_db_probe = time.monotonic() + 5.0
                log.warning("PostgreSQL is unreachable: no new messages until it answers")
        elif adm.verdict is Verdict.ALREADY_DONE:
            self.counters.volumes_skipped += 1
            log.info("Volume %s is already done; message %s deleted", adm.label, mid)
        elif adm.verdict is Verdict.NOT_CLAIMABLE:
            log.info("Volume %s is done or running elsewhere; message %s looked at again in %ds",
                     adm.label, mid, lifecycle.recheck_delay_s(self.svc))
        elif self.draining or self.stopping:
            lifecycle.release(self.svc, adm, "released: worker shutting down")
            self.ctx.mailbox.send("supervisor", Untrack(adm.message.receipt))
        else:
            key = self.next_key
            self.next_key += 1
            n = len(adm.manifest.entries)
            self.volumes[key] = VolumeRun(key, adm, [None] * n, collections.deque(range(n)),
                                          received_at + self.p.visibility_timeout)
            self.active_labels.add((adm.w_id, adm.i_id))
            log.info("Processing message: %s for volume %s (%d pages, version %s, attempt %d)",
                     mid, adm.label, n, adm.manifest.version, adm.attempt)

    # -- finish (thread) -----------------------------------------------------------------------
    def _finish(self, vol: VolumeRun) -> None:
        try:
            verdict = lifecycle.finish(self.svc, vol.adm, list(vol.outcomes))  # type: ignore[arg-type]
        except Exception as exc:
            log.exception("finishing %s failed", vol.adm.label)
            lifecycle.retry_later(self.svc, vol.adm, f"{type(exc).__name__}: {exc}")
            verdict = Verdict.RETRY
        self.events.put(("finished", vol.key, verdict))

    def on_finished(self, key: int, verdict: Verdict) -> None:
        vol = self.volumes.pop(key, None)
        if vol is None:
            return
        self.active_labels.discard((vol.adm.w_id, vol.adm.i_id))
        self.ctx.mailbox.send("supervisor", Untrack(vol.adm.message.receipt))
        pages = len(vol.outcomes)
        errors = sum(1 for o in vol.outcomes if o is not None and not o.ok)
        seconds = time.time() - vol.adm.claimed_at
        if verdict is Verdict.NOT_CLAIMABLE:  # taken over while it ran: lifecycle.let_go said so
            metrics.VOLUMES.labels("taken_over").inc()
            return
        metrics.VOLUMES.labels("done" if verdict is Verdict.ADMITTED else "retry").inc()
        if verdict is Verdict.ADMITTED:
            metrics.VOLUME_SECONDS.observe(seconds)
            self.counters.volumes_done += 1
            log.info("Successfully processed message: %s", vol.adm.message.message_id)
            log.info("volume %s v%s done: %d pages, %d errors, %.1f s (%.0f ms/page)",
                     vol.adm.label, vol.adm.manifest.version, pages, errors, seconds,
                     1000 * seconds / max(1, pages),
                     extra={"volume": vol.adm.label, "outcome": "done", "pages": pages,
                            "errors": errors, "seconds": round(seconds, 3)})
        else:
            self.counters.volumes_retry += 1
            log.warning("volume %s v%s not done (%d pages, %d errors): will be retried",
                        vol.adm.label, vol.adm.manifest.version, pages, errors,
                        extra={"volume": vol.adm.label, "outcome": "retry", "pages": pages,
                               "errors": errors})

    # -- visibility (thread) -------------------------------------------------------------------
    def extender(self) -> None:
        vt = self.p.visibility_timeout
        margin = max(1.0, vt / 2)
        while not self.stopping:
            time.sleep(min(1.0, max(0.2, vt / 6)))
            now = time.monotonic()
            due = {id(v.adm.message): v for v in list(self.volumes.values())
                   if now > v.visible_until - margin}
            messages = [v.adm.message for v in due.values()]
            for start in range(0, len(messages), 10):
                for message in lifecycle.extend_visibility(self.svc, messages[start:start + 10], vt):
                    due[id(message)].visible_until = now + vt

    # -- shutdown ------------------------------------------------------------------------------
    def release_all(self, reason: str) -> None:
        for key, vol in list(self.volumes.items()):
            if vol.finishing:
                continue
            self.volumes.pop(key, None)
            lifecycle.release(self.svc, vol.adm, reason)  # settles it: never extended again
            metrics.VOLUMES.labels("released").inc()
            self.active_labels.discard((vol.adm.w_id, vol.adm.i_id))
            self.ctx.mailbox.send("supervisor", Untrack(vol.adm.message.receipt))
            log.info("Released volume %s (message %s visible again)", vol.adm.label, vol.adm.message.message_id)

    def _hand_back_last_receive(self) -> None:
        """A receive still in flight when the run ends may bring messages that SQS has made
        invisible for the visibility timeout, with nobody left to process them: wait for it
        and make them visible again. Not when told to release at once (a second signal), and
        briefly when the supervisor stops the run (it kills a controller that lingers): a
        message taken by that last poll then returns only after its visibility timeout."""
        thread, wait_s = self.receiver_thread, self.last_receive_wait_s
        if thread is not None and self.ctx.parent_alive():
            thread.join(min(0.2, wait_s))  # a receiver not in a receive leaves at once
            if thread.is_alive() and wait_s > 0:
                log.info("Waiting up to %.0f s for the last SQS receive to return, to make what it "
                         "brings visible again (a second signal stops at once)", wait_s)
                deadline = time.monotonic() + wait_s
                while thread.is_alive() and time.monotonic() < deadline:
                    msg = self.ctx.mailbox.recv(timeout=0.1)
                    if isinstance(msg, (ReleaseNow, Stop)) or not self.ctx.parent_alive():
                        break  # the run is over: nothing else in the mailbox matters now
        while True:
            try:
                kind, *args = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "received":
                self.on_received(*args)  # stopping: each message is made visible and untracked

    def done(self) -> str | None:
        """Why the controller may stop now, or None."""
        idle = not self.volumes and not self.admitting and self.events.empty()
        if self.stopping:
            return "stopped"
        if self.draining:
            if idle:
                return "drained"
            if time.monotonic() > self.drain_deadline:
                self.release_all("released: grace period over")
                if not any(v.finishing for v in self.volumes.values()):
                    return "grace period over"
            return None
        k = self.p.shutdown_after_empty
        if k and self.empty_polls >= k and idle:
            return f"{k} empty polls"
        return None

    # -- main loop -----------------------------------------------------------------------------
    def handle(self, msg: object) -> None:
        if isinstance(msg, PageDone):
            self.on_page_done(msg)
        elif isinstance(msg, PageFailed):
            self.on_page_failed(msg)
        elif isinstance(msg, Drain):
            if not self.draining:
                log.info("Draining: no new volumes; %d in flight get %.0f s to finish",
                         len(self.volumes), msg.grace)
            self.draining = True
            self.drain_deadline = min(self.drain_deadline, time.monotonic() + msg.grace)
        elif isinstance(msg, ReleaseNow):
            self.draining = True
            self.last_receive_wait_s = 0.0  # at once means at once
            self.drain_deadline = 0.0
            self.release_all("released: worker stopping now")
        elif isinstance(msg, Stop):
            self.release_all("released: worker stopping")
            self.stopping = True
            self.last_receive_wait_s = min(self.last_receive_wait_s, STOP_RECEIVE_WAIT_S)
        elif isinstance(msg, PipelineReady):
            self.pipeline_ready.set()

    def run(self) -> str:
        self.receiver_thread = threading.Thread(target=self.receiver, name="receiver", daemon=True)
        self.receiver_thread.start()
        threading.Thread(target=self.extender, name="extender", daemon=True).start()
        while True:
            msg = self.ctx.mailbox.recv(timeout=0.02)
            while msg is not None:
                self.handle(msg)
                msg = self.ctx.mailbox.recv(timeout=0)
            while True:
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    break
                kind, *args = event
                getattr(self, f"on_{kind}")(*args)
            self.scan()
            self.dispatch()
            reason = self.done()
            if reason:
                return reason
            if not self.ctx.parent_alive():
                return "supervisor gone"

    def close(self) -> None:
        self.stopping = True
        self._hand_back_last_receive()
        self.admit_pool.shutdown(wait=True, cancel_futures=True)
        self.finish_pool.shutdown(wait=True)
        self.db.close()


def run(ctx: ChildContext) -> None:
    controller = Controller(ctx)
    ctx.ready()
    try:
        reason = controller.run()
    except BadInput as exc:
        log.error("controller: %s", exc)
        reason = f"error: {exc}"
    finally:
        controller.close()
    c = controller.counters
    log.info("controller finished (%s): %d volumes done, %d to retry, %d skipped, %d poison, "
             "%d terminal; %d pages (%d errors, %d redone)", reason, c.volumes_done, c.volumes_retry,
             c.volumes_skipped, c.poison, c.terminal, c.pages, c.page_errors, c.pages_redone)
    ctx.mailbox.send("supervisor", Finished(reason))
