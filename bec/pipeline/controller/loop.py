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

Page results are not kept until a volume ends: each volume's rows go to its Parquet file
(``bec.volumefile``) in manifest order as they complete. No page is dispatched more than
``reorder_window`` pages ahead of the first row not yet written, so the results held while
an earlier page is still in flight stay bounded, whatever the volume's length.

Outages pause the whole controller, never the volumes' receive counts: while PostgreSQL
does not answer, nothing is received and every message whose task row could not be settled
is *held* (kept hidden) until a probe finds the database writable again, then its step is
done again; while S3 fails as a whole (unreachable, expired credentials), nothing is
received and the volumes in flight are given back unspent, until a probe of both buckets
answers.
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
import functools

import botocore.exceptions
import numpy as np

from bec import aws, jobkinds, lifecycle, metrics, partial
from bec.artifacts import PageOutcome
from bec.db import Database
from bec.errors import BadInput, BecError, page_error_class
from bec.lifecycle import Admission, Received, Verdict
from bec.localarchive import probe_client, source_client
from bec.pipeline import slots as S
from bec.pipeline.backoff import BackoffWatch
from bec.pipeline.child import ChildContext
from bec.pipeline.messages import (PAGE_CHANGED, PAGE_S3_UNAVAILABLE, Drain, Fetch, Finished, Gone, PageDone,
                                   PageFailed, PipelineReady, ReleaseNow, Stop, Track, Untrack)
from bec.pipeline.slots import decode_result
from bec.volumefile import VolumeFile

log = logging.getLogger("bec.controller")

RETIRE_S = 10.0          # a recovered slot rests this long before reuse
SCAN_EVERY_S = 0.5       # how often slot ownership is checked against live processes
PAGE_TIMEOUT_S = 600.0   # a page in the pipeline longer than this is presumed lost
DONE_MESSAGE_LOST_S = 10.0  # a slot handed to us this long ago with no message: the message is lost
RECEIVE_GRACE_S = 2.0    # beyond the long poll's own wait, for a receive in flight at the end
STOP_RECEIVE_WAIT_S = 5.0  # ... when the supervisor stops the run (it kills the controller at 10 s)
PROBE_EVERY_S = 5.0      # how often a service found unavailable is asked again
CRASH_BUDGET = 2         # crashes of its holder while working on a page before it is an error row


@dataclass
class VolumeRun:
    key: int
    adm: Admission
    out: VolumeFile          # its rows, written as they complete
    todo: collections.deque[int]
    visible_until: float
    finishing: bool = False
    remaining: int = -1  # pages without an outcome yet
    # page → crashes of a process while it worked on that page (decode, post-processing)
    crashes: collections.Counter = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        if self.remaining < 0:
            self.remaining = len(self.todo)

    @property
    def complete(self) -> bool:
        return self.remaining == 0

    @property
    def pages(self) -> int:
        return self.out.n


@dataclass
class Held:
    """A message kept hidden while PostgreSQL does not answer: its admission (``adm.pending``
    None) or its settlement (``adm.pending``) is done again once the database answers."""

    adm: Admission
    label: tuple[str, str] | None
    visible_until: float
    pages: int = 0
    errors: int = 0
    busy: bool = False  # being tried again now


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
        self.backoffs = BackoffWatch(self.sqs, p.queue_url)  # what the lifecycle hides for later
        probes = (functools.partial(aws.probe, probe_client(p.source_bucket, p.region), p.source_bucket),
                  functools.partial(aws.probe, aws.single_try_client("s3", p.region), p.dest_bucket))
        self.svc = lifecycle.Services(
            db=self.db, s3=aws.client("s3", p.region), source=source_client(p.source_bucket, p.region),
            sqs=self.backoffs, job_name=p.job_name,
            job_id=p.job_id, worker_id=p.worker_id, worker_name=p.extra.get("worker_name", ""),
            source_bucket=p.source_bucket, dest_bucket=p.dest_bucket, queue_url=p.queue_url,
            dlq_url=p.dlq_url, config=p.config, model=p.model_identity, retry_delay=p.retry_delay,
            stale_after_s=p.stale_after_s, max_receive_count=p.max_receive_count, storage_probes=probes)
        self.events: queue.Queue = queue.Queue()
        self.volumes: dict[int, VolumeRun] = {}
        self.admitting: set[tuple[str, str]] = set()
        self.active_labels: set[tuple[str, str]] = set()
        self.next_key = 1
        self.free: collections.deque[int] = collections.deque()
        self.retired: dict[int, float] = {}
        self.dispatched_at = np.zeros(len(self.table), dtype=np.float64)
        # A page is dispatched only this far ahead of its volume's first unwritten row: the
        # results that finish ahead of a slow (or redone) page wait in memory for it.
        self.reorder_window = 2 * len(self.table)
        self.fetch_roles = [f"fetch-{i}" for i in range(p.n_fetch)]
        self.fetch_depth = p.fetch_threads + 2
        self.draining = False
        self.drain_deadline = float("inf")
        self.stopping = False
        self.empty_polls = 0
        self._said_backoff = False
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
        self.storage_down = False
        self.held: dict[int, Held] = {}
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
                if page >= vol.out.next_row + self.reorder_window:
                    break  # this volume waits for an earlier page; the others go on
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
                row["rotation"], row["binary_ready"], row["result_len"], row["busy"] = float("nan"), 0, 0, 0
                row["skew"], row["tps_n"] = 0.0, 0
                for name in ("fetch_ms", "decode_ms", "infer_ms", "post_ms"):
                    row[name] = 0.0
                page_input = self.kind.page_input(vol.adm.inputs, page)  # e.g. the page's ldv1 lines
                if page_input:
                    self.pool.write_result(slot, page_input)
                row["owner"] = self.ctx.pid_of(role)
                row["state"] = S.FETCH
                msg = Fetch(slot, gen, self.p.source_bucket, vol.adm.manifest.key(entry), entry.size or 0,
                            vol.adm.manifest.read_at, alone=page in vol.crashes)
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
        if vol.out.add(page, outcome):
            vol.remaining -= 1
            self.counters.pages += 1
            self.counters.page_errors += int(not outcome.ok)
            metrics.PAGES.labels("ok" if outcome.ok else "error").inc()
            if not outcome.ok:
                metrics.PAGE_ERRORS.labels(outcome.error_stage or "", outcome.error_type or "",
                                           page_error_class(outcome.error_type)).inc()
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
        if msg.error == PAGE_S3_UNAVAILABLE:  # S3's failure, not the page's: no error row
            self._storage_outage(msg.message)
            return
        if msg.error == PAGE_CHANGED and vol is not None:
            # The volume is being rewritten: its result would mix two versions. It is given back
            # unspent, and read again (a new manifest, a new version) once the upload settles.
            self._release(vol, f"released: {msg.message}: the volume changed while it ran",
                          lifecycle.recheck_delay_s(self.svc))
            return
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
            state, busy = int(row["state"]), why == "died" and bool(row["busy"])
            self._retire(int(slot))
            if vol is None or vol.out.has(page):
                continue
            if busy:
                vol.crashes[page] += 1
                if vol.crashes[page] >= CRASH_BUDGET:
                    self._crashed(vol, page, state)
                    continue
            vol.todo.appendleft(page)
            self.counters.pages_redone += 1
            metrics.PAGES_REDONE.inc()
            log.info("redoing page %d of %s (holder %s)", page, vol.adm.label,
                     f"{why} while working on it: redone alone" if busy else why)
        self._done_since = done_since

    def _crashed(self, vol: VolumeRun, page: int, state: int) -> None:
        """A page whose holder died twice while working on it: an error row, and the worker goes
        on. Requeued without limit, one such page crashed its decoder until the supervisor gave
        up on the role and stopped the worker, releasing every volume in flight, and so on, on
        every worker that took the volume."""
        entry = vol.adm.manifest.entries[page]
        stage, kind = ("post", "crashed_postprocess") if state == S.POST else ("decode", "crashed_decoder")
        log.warning("page %d (%s) of %s crashed its %s process %d times: recorded as an error",
                    page, entry.filename, vol.adm.label, stage, vol.crashes[page])
        self._record(vol, page, PageOutcome.failed(
            entry.filename, stage, kind,
            f"the {stage} process died {vol.crashes[page]} times while working on this page"))

    # -- SQS receive (thread) ------------------------------------------------------------------
    def _want_more(self) -> int:
        in_flight = len(self.volumes) + len(self.admitting) + self.unseen
        if self.draining or self.stopping or in_flight >= self.p.max_volumes_in_flight:
            return 0
        k = self.p.shutdown_after_empty
        if k and self.empty_polls >= k:
            return 0  # the run ends once idle: one more receive could take a message nobody reads
        if self.database_down or self.storage_down or self.held:
            return 0  # every message received now would be handed back, or burn one of its receives
        # list() copies the values in one step under the GIL: the main thread adds and removes
        # volumes meanwhile, and iterating the live dict here raised and killed this thread
        queued_pages = sum(len(v.todo) for v in list(self.volumes.values()))
        if queued_pages > 2 * len(self.table):
            return 0  # enough pages are waiting for slots already
        return min(10, self.p.max_volumes_in_flight - in_flight)

    # -- outages -------------------------------------------------------------------------------
    def _database_outage(self, reason: str) -> None:
        if not self.database_down:
            self.database_down = True
            log.warning("PostgreSQL is unavailable (%s): no new messages until it answers", reason)

    def _storage_outage(self, reason: str) -> None:
        """S3 fails as a whole: receive nothing, and give every volume in flight back unspent
        (its pages would all fail, and the volume spend a receive on a retry)."""
        if self.storage_down:
            return
        self.storage_down = True
        running = [v for v in self.volumes.values() if not v.finishing]
        log.warning("S3 is unavailable (%s): no new messages until it answers; giving back the %d "
                    "volume(s) in flight", reason, len(running))
        for vol in running:
            self._release(vol, f"released: S3 unavailable: {reason}"[:1000])

    def _release(self, vol: VolumeRun, reason: str, delay_s: int = 0) -> None:
        """Give one volume back (in the finish pool: it talks to the database and SQS)."""
        if vol.finishing:
            return
        vol.finishing = True
        vol.todo.clear()
        self.finish_pool.submit(self._release_in_thread, vol, reason, delay_s)

    def _release_in_thread(self, vol: VolumeRun, reason: str, delay_s: int) -> None:
        verdict = Verdict.RETRY
        try:
            verdict = lifecycle.release(self.svc, vol.adm, reason, delay_s)
        except Exception as exc:
            log.exception("releasing %s failed", vol.adm.label)
            verdict = self._retry_after_bug(vol.adm, exc)
        finally:
            self.events.put(("finished", vol.key, verdict))

    def prober(self) -> None:
        """Asks the services found unavailable, every few seconds, whether they answer again
        (its own thread: a probe may wait for a timeout, and nothing else may wait on it)."""
        while not self.stopping:
            time.sleep(PROBE_EVERY_S)
            try:
                if self.database_down:
                    self._probe_database()
                if self.storage_down:
                    self._probe_storage()
            except Exception:  # a bug: reported, and probing goes on
                log.exception("probing the services failed unexpectedly")

    def _probe_database(self) -> None:
        try:
            self.db.writable()  # a read-only server answers SELECT 1 and refuses every claim
        except BecError:
            return
        self.events.put(("service_back", "database"))

    def _probe_storage(self) -> None:
        failures = [down for down in (check() for check in self.svc.storage_probes) if down]
        if not failures:
            self.events.put(("service_back", "storage"))

    def on_service_back(self, service: str) -> None:
        if service == "storage" and self.storage_down:
            self.storage_down = False
            log.info("S3 answers again: receiving resumes")
        elif service == "database" and self.database_down:
            self.database_down = False
            log.info("PostgreSQL answers again: %s", f"trying the {len(self.held)} held message(s) again"
                     if self.held else "receiving resumes")
            for key, held in self.held.items():
                if not held.busy:
                    held.busy = True
                    pool = self.finish_pool if held.adm.pending else self.admit_pool
                    pool.submit(self._retry_held, key, held)

    def _retry_held(self, key: int, held: Held) -> None:
        """Its settlement, or its whole admission (the claim finds its own row), again."""
        if held.adm.pending is None:
            self.events.put(("readmitted", key, self._admission(held.adm.message)))
            return
        verdict = Verdict.HELD
        try:
            verdict = held.adm.pending()
        except Exception as exc:
            log.exception("settling %s failed", held.adm.label)
            verdict = self._retry_after_bug(held.adm, exc)
        finally:
            self.events.put(("settled", key, verdict))

    def _hold(self, adm: Admission, label: tuple[str, str] | None, visible_until: float,
              pages: int = 0, errors: int = 0) -> None:
        key = self.next_key
        self.next_key += 1
        self.held[key] = Held(adm, label, visible_until, pages, errors)
        if label:
            self.active_labels.add(label)
        log.warning("Volume %s: %s; message %s kept until the database answers", adm.label,
                    adm.reason or "the database did not answer", adm.message.message_id)
        self._database_outage(adm.reason)

    def _unhold(self, key: int) -> Held | None:
        """Forget a held message (None when the end of the run abandoned it meanwhile)."""
        held = self.held.pop(key, None)
        if held is not None and held.label:
            self.active_labels.discard(held.label)
        return held

    def on_readmitted(self, key: int, adm: Admission) -> None:
        held = self._unhold(key)
        label = held.label if held else None
        visible_until = held.visible_until if held else time.monotonic()
        self.on_admitted(adm, label, visible_until - self.p.visibility_timeout)

    def on_settled(self, key: int, verdict: Verdict) -> None:
        held = self.held.get(key)
        if held is not None and verdict is Verdict.HELD:
            held.busy = False
            self._database_outage(held.adm.reason)
            return
        held = self._unhold(key)
        if held is not None and verdict is not Verdict.HELD:
            self.ctx.mailbox.send("supervisor", Untrack(held.adm.message.receipt))
            self._count_outcome(held.adm, verdict, held.pages, held.errors)

    def _abandon_held(self) -> None:
        """The run ends with messages whose rows could not be settled: never released on a
        guess. They stay hidden until their visibility timeout; the supervisor releases them
        at the end if it can release this worker's tasks, and a row left running is claimable
        once this worker has stopped."""
        for key in list(self.held):
            held = self._unhold(key)
            if held is None:
                continue
            held.adm.message.settled.set()
            log.warning("Volume %s: message %s left hidden until its visibility timeout (its task could "
                        "not be settled: the database did not answer)", held.adm.label,
                        held.adm.message.message_id)

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
            if not self.volumes and not self.admitting and not self._in_backoff():
                self.empty_polls += 1
            return
        self.empty_polls = 0
        for message in messages:
            if self.draining or self.stopping:
                lifecycle.requeue(self.svc, message, 0, "worker stopping")  # not the message's fault
                self.ctx.mailbox.send("supervisor", Untrack(message.receipt))
                continue
            try:
                label = lifecycle.parse_body(message.body)
            except Exception:  # poison (or worse): admission routes it to the DLQ
                label = None
            if label and (label in self.admitting or label in self.active_labels):
                # A duplicate of a volume held here: handed back unspent, to be looked at once
                # this worker could be done with it (it is then already done, or claimable).
                delay = lifecycle.recheck_delay_s(self.svc)
                log.info("Message %s (received %d times) duplicates volume %s/%s in progress here; "
                         "handed back for another look in %d s", message.message_id, message.receive_count,
                         *label, delay)
                self.ctx.mailbox.send("supervisor", Untrack(message.receipt))
                self.admit_pool.submit(lifecycle.requeue, self.svc, message, delay, "duplicate")
                continue
            if label:
                self.admitting.add(label)
            self.admit_pool.submit(self._admit, message, label, at)

    def _in_backoff(self) -> bool:
        """A message this worker hid for later (a retry's back-off, a recheck) is still on its
        way back: the queue only looks empty. Said once per wait when the run would end."""
        waiting = self.backoffs.waiting_s()
        if waiting > 0 and self.p.shutdown_after_empty and not self._said_backoff:
            self._said_backoff = True
            log.info("Empty poll, but a message this worker delayed is visible again in %.0f s: "
                     "waiting for it before counting empty polls", waiting)
        elif waiting <= 0:
            self._said_backoff = False
        return waiting > 0

    def _admit(self, message: Received, label: tuple[str, str] | None, received_at: float) -> None:
        self.events.put(("admitted", self._admission(message), label, received_at))

    def _admission(self, message: Received) -> Admission:
        try:
            adm = lifecycle.admit(self.svc, message)
            if adm.verdict is Verdict.ADMITTED:
                adm.partial = partial.load(self.svc, adm)  # an earlier attempt's finished pages
            return adm
        except Exception as exc:  # never lose track of a message because of a bug
            log.exception("admission of message %s failed", message.message_id)
            adm = Admission(Verdict.RETRY, message, reason=f"{type(exc).__name__}: {exc}")
            lifecycle.set_visibility(self.svc, message, lifecycle.backoff_s(self.svc, message.receive_count))
            return adm

    def on_admitted(self, adm: Admission, label: tuple[str, str] | None, received_at: float) -> None:
        if label:
            self.admitting.discard(label)
        self.counters.by_verdict[adm.verdict.value] += 1
        if adm.verdict is Verdict.HELD:  # still ours, tracked, and extended
            self._hold(adm, label, received_at + self.p.visibility_timeout)
            return
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
        elif adm.verdict is Verdict.RELEASED:  # S3 failed as a whole before any claim
            log.warning("Volume %s: message %s handed back unspent: %s", adm.label, mid, adm.reason)
            self._storage_outage(adm.reason)
        elif adm.verdict is Verdict.ALREADY_DONE:
            self.counters.volumes_skipped += 1
            log.info("Volume %s is already done; message %s deleted", adm.label, mid)
        elif adm.verdict is Verdict.NOT_CLAIMABLE:
            log.info("Volume %s is running elsewhere; message %s handed back unspent, looked at again in "
                     "%d s", adm.label, mid, lifecycle.recheck_delay_s(self.svc))
        elif self.draining or self.stopping or self.storage_down:
            reason = "released: S3 unavailable" if self.storage_down else "released: worker shutting down"
            verdict = lifecycle.release(self.svc, adm, reason)
            if adm.partial is not None and adm.partial.resume is not None:
                adm.partial.resume.release()
            if verdict is Verdict.HELD:
                self._hold(adm, label, received_at + self.p.visibility_timeout)
            else:
                self.ctx.mailbox.send("supervisor", Untrack(adm.message.receipt))
        else:
            key = self.next_key
            self.next_key += 1
            n = len(adm.manifest.entries)
            out = VolumeFile(n, partial.file_metadata(self.svc), adm.partial.resume if adm.partial else None,
                             kind=self.kind)
            todo = out.to_do()
            metrics.PAGES_RESUMED.inc(n - len(todo))
            self.volumes[key] = VolumeRun(key, adm, out, collections.deque(todo),
                                          received_at + self.p.visibility_timeout)
            self.active_labels.add((adm.w_id, adm.i_id))
            log.info("Processing message: %s for volume %s (%d pages, version %s, attempt %d)",
                     mid, adm.label, n, adm.manifest.version, adm.attempt)
            if not todo:  # every page was finished by an earlier attempt
                vol = self.volumes[key]
                vol.finishing = True
                self.finish_pool.submit(self._finish, vol)

    # -- finish (thread) -----------------------------------------------------------------------
    def _finish(self, vol: VolumeRun) -> None:
        """Always reports back, whatever fails: a finish that raised left the volume
        ``finishing`` for ever, its row running and its message extended without end."""
        verdict = Verdict.RETRY
        try:
            verdict = lifecycle.finish(self.svc, vol.adm, vol.out)
        except Exception as exc:
            log.exception("finishing %s failed", vol.adm.label)
            verdict = self._retry_after_bug(vol.adm, exc)
        finally:
            vol.out.discard()
            self.events.put(("finished", vol.key, verdict))

    def _retry_after_bug(self, adm: Admission, exc: Exception) -> Verdict:
        """An unclassified error (a bug): route the volume to a retry; if even that fails, stop
        extending its message, which SQS then shows again after its visibility timeout."""
        try:
            return lifecycle.retry_later(self.svc, adm, f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("could not record the failure of %s: its message returns after its "
                          "visibility timeout", adm.label)
            adm.message.settled.set()
            return Verdict.RETRY

    def on_finished(self, key: int, verdict: Verdict) -> None:
        vol = self.volumes.pop(key, None)
        if vol is None:
            return
        label = (vol.adm.w_id, vol.adm.i_id)
        self.active_labels.discard(label)
        pages, errors = vol.pages, vol.out.tally.nb_errors
        if verdict is Verdict.HELD:  # its row could not be settled: the message stays ours
            self._hold(vol.adm, label, vol.visible_until, pages, errors)
            return
        self.ctx.mailbox.send("supervisor", Untrack(vol.adm.message.receipt))
        self._count_outcome(vol.adm, verdict, pages, errors, vol.out)

    def _count_outcome(self, adm: Admission, verdict: Verdict, pages: int, errors: int,
                       out: VolumeFile | None = None) -> None:
        seconds = time.time() - adm.claimed_at
        if verdict is Verdict.NOT_CLAIMABLE:  # taken over while it ran: lifecycle.let_go said so
            metrics.VOLUMES.labels("taken_over").inc()
            return
        if verdict is Verdict.RELEASED:
            metrics.VOLUMES.labels("released").inc()
            log.info("Released volume %s (message %s handed back unspent): %s", adm.label,
                     adm.message.message_id, adm.reason)
            if adm.unavailable == "storage":
                self._storage_outage(adm.reason)
            return
        metrics.VOLUMES.labels("done" if verdict is Verdict.ADMITTED else "retry").inc()
        version = adm.manifest.version if adm.manifest else "?"
        if verdict is Verdict.ADMITTED:
            metrics.VOLUME_SECONDS.observe(seconds)
            self.counters.volumes_done += 1
            log.info("Successfully processed message: %s", adm.message.message_id)
            detail = ({"transient_errors": out.tally.transient_errors, "resumed": out.tally.resumed,
                       "row_groups": out.row_groups, "held_max": out.held_max} if out is not None else {})
            more = (" ({transient_errors} transient), {resumed} resumed".format(**detail) if detail else "")
            after = ("; {row_groups} row groups, at most {held_max} page results held".format(**detail)
                     if detail else "")
            log.info("volume %s v%s done: %d pages, %d errors%s, %.1f s (%.0f ms/page)%s",
                     adm.label, version, pages, errors, more, seconds, 1000 * seconds / max(1, pages), after,
                     extra={"volume": adm.label, "outcome": "done", "pages": pages,
                            "errors": errors, "seconds": round(seconds, 3), **detail})
        else:
            self.counters.volumes_retry += 1
            transient = out.tally.transient_errors if out is not None else 0
            log.warning("volume %s v%s not done (%d pages, %d errors, %d transient): will be retried",
                        adm.label, version, pages, errors, transient,
                        extra={"volume": adm.label, "outcome": "retry", "pages": pages,
                               "errors": errors, "transient_errors": transient})

    # -- visibility (thread) -------------------------------------------------------------------
    def extender(self) -> None:
        vt = self.p.visibility_timeout
        margin = max(1.0, vt / 2)
        while not self.stopping:
            time.sleep(min(1.0, max(0.2, vt / 6)))
            try:
                self._extend_due(vt, margin)
            except Exception:  # a bug: reported, and extensions go on
                log.exception("visibility extension failed unexpectedly")

    def _extend_due(self, vt: int, margin: float) -> None:
        """Volumes running, and messages held while the database does not answer."""
        now = time.monotonic()
        holders: list[VolumeRun | Held] = [*list(self.volumes.values()), *list(self.held.values())]
        due = {id(h.adm.message): h for h in holders if now > h.visible_until - margin}
        messages = [h.adm.message for h in due.values()]
        for start in range(0, len(messages), 10):
            for message, seconds in lifecycle.extend_visibility(self.svc, messages[start:start + 10], vt):
                due[id(message)].visible_until = now + seconds

    # -- shutdown ------------------------------------------------------------------------------
    def release_all(self, reason: str) -> None:
        """The run ends: every volume in flight is given back (its message requeued unspent:
        a drain is not the volume's fault), and the held messages are left as they are."""
        for key, vol in list(self.volumes.items()):
            if vol.finishing:
                continue
            self.volumes.pop(key, None)
            vol.out.discard()
            self.active_labels.discard((vol.adm.w_id, vol.adm.i_id))
            if lifecycle.release(self.svc, vol.adm, reason) is Verdict.HELD:
                vol.adm.message.settled.set()  # never released on a guess: see _abandon_held
                log.warning("Volume %s: message %s left hidden until its visibility timeout (its task "
                            "could not be released: the database did not answer)", vol.adm.label,
                            vol.adm.message.message_id)
                continue
            metrics.VOLUMES.labels("released").inc()
            self.ctx.mailbox.send("supervisor", Untrack(vol.adm.message.receipt))
            log.info("Released volume %s (message %s visible again)", vol.adm.label, vol.adm.message.message_id)
        self._abandon_held()

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
        idle = not self.volumes and not self.admitting and not self.held and self.events.empty()
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
        threading.Thread(target=self.prober, name="prober", daemon=True).start()
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
