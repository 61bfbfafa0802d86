"""The controller's main loop: the rooms wired to the lifecycle (admit → dispatch → record → finish).

It owns the volumes in flight and the free slots (through its rooms). Its main loop only
moves descriptors (never blocks on the network): SQS long-polls run in a receiver thread,
admissions (manifest, claim) and finalisations (Parquet, success.json, DB, delete) in small
thread pools, visibility extensions in their own thread. Messages are received ahead of
need (up to ``max_volumes_in_flight`` volumes) so that the next volume's pages are already
flowing while the current one drains.

Each room has one concern and is driven from here: ``receiver`` (the SQS long poll),
``admission`` (manifest and claim, in a pool), ``volumes`` (the volume book: page outcomes,
counters), ``dispatch`` (the slot table: dispatch, pages back, lost pages redone), ``finish``
(a volume's end, in a pool), ``holds`` (database and storage outages, the probe),
``extender`` (visibility). The rooms' threads and pools report back as events on one queue,
handled here by ``on_<event>``; this loop also decides how many messages to receive, and
drains and stops the run.
"""
from __future__ import annotations

import functools
import itertools
import logging
import queue
import time

from bec.control import jobkinds, lifecycle, partial
from bec.edges import aws
from bec.observe import metrics
from bec.edges.artifacts import PageOutcome
from bec.control.db import Database
from bec.errors import BadInput
from bec.control.lifecycle import Admission, Received, Verdict
from bec.edges.localarchive import probe_client, source_client
from bec.pipeline.backoff import BackoffWatch
from bec.pipeline.child import ChildContext
from bec.pipeline.controller.admission import Admitter
from bec.pipeline.controller.dispatch import SlotDispatcher
from bec.pipeline.controller.extender import Extender
from bec.pipeline.controller.finish import Finisher
from bec.pipeline.controller.holds import Holds
from bec.pipeline.controller.receiver import Receiver
from bec.pipeline.controller.volumes import Counters, VolumeBook
from bec.pipeline.messages import (PAGE_CHANGED, PAGE_S3_UNAVAILABLE, Drain, Finished, Message, PageDone,
                                   PageFailed, PipelineReady, ReleaseNow, Stop, Untrack)
from bec.edges.volumefile import VolumeFile

log = logging.getLogger("bec.controller")


class Controller:
    """One controller process: its services, its rooms, and the loop that drives them."""

    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        p = ctx.pipeline
        self.p = p
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
        self.events: queue.Queue = queue.Queue()  # what the rooms' threads and pools report
        keys = itertools.count(1)  # volumes and held messages
        self.finisher = Finisher(self.svc, self.events)
        self.book = VolumeBook(self.kind, keys.__next__, on_complete=self.finisher.finish)
        self.admission = Admitter(self.svc, self.events, self.book.counters)
        self.holds = Holds(self.db.writable, self.svc.storage_probes, self.events, keys.__next__)
        self.dispatcher = SlotDispatcher(
            ctx.slots, self.book, self.kind, fetch_roles=[f"fetch-{i}" for i in range(p.n_fetch)],
            fetch_depth=p.fetch_threads + 2, pid_of=ctx.pid_of, send=ctx.mailbox.try_send,
            source_bucket=p.source_bucket)
        self.receiver = Receiver(
            self.sqs, self.backoffs, self.events, queue_url=p.queue_url, poll_wait=p.poll_wait,
            visibility_timeout=p.visibility_timeout, shutdown_after_empty=p.shutdown_after_empty,
            want=self.want_more, tell_supervisor=self._tell_supervisor)
        self.extender = Extender(p.visibility_timeout, lambda: [*self.book.runs(), *self.holds.values()],
                                 functools.partial(lifecycle.extend_visibility, self.svc))
        self.draining = False
        self.drain_deadline = float("inf")
        self.stopping = False

    @property
    def counters(self) -> Counters:
        return self.book.counters

    def _tell_supervisor(self, msg: Message) -> None:
        self.ctx.mailbox.send("supervisor", msg)

    def _untrack(self, message: Received) -> None:
        self._tell_supervisor(Untrack(message.receipt))

    # -- receiving ------------------------------------------------------------------------------
    def want_more(self) -> int:
        """How many messages the receiver asks for now (its thread asks)."""
        in_flight = len(self.book) + len(self.admission) + self.receiver.unseen
        if self.draining or self.stopping or in_flight >= self.p.max_volumes_in_flight:
            return 0
        if self.receiver.ran_dry:
            return 0  # the run ends once idle: one more receive could take a message nobody reads
        if self.holds.paused:
            return 0  # every message received now would be handed back, or burn one of its receives
        if self.book.queued_pages() > 2 * len(self.ctx.slots.table):
            return 0  # enough pages are waiting for slots already
        return min(10, self.p.max_volumes_in_flight - in_flight)

    def on_received(self, messages: list[Received], at: float) -> None:
        with self.receiver.taking_in(messages):
            self.receiver.count_poll(len(messages), idle=not len(self.book) and not len(self.admission))
            for message in messages:
                self._take_in(message, at)

    def _take_in(self, message: Received, at: float) -> None:
        if self.draining or self.stopping:
            lifecycle.requeue(self.svc, message, 0, "worker stopping")  # not the message's fault
            self._untrack(message)
            return
        try:
            label = lifecycle.parse_body(message.body)
        except Exception:  # poison (or worse): admission routes it to the DLQ
            label = None
        if label and (self.admission.has_label(label) or self.book.has_label(label)
                      or self.holds.has_label(label)):
            # A duplicate of a volume held here: handed back unspent, to be looked at once
            # this worker could be done with it (it is then already done, or claimable).
            delay = lifecycle.recheck_delay_s(self.svc)
            log.info("Message %s (received %d times) duplicates volume %s/%s in progress here; "
                     "handed back for another look in %d s", message.message_id, message.receive_count,
                     *label, delay)
            self._untrack(message)
            self.admission.requeue(message, delay, "duplicate")
            return
        self.admission.admit(message, label, at)

    # -- admitted -------------------------------------------------------------------------------
    def on_admitted(self, adm: Admission, label: tuple[str, str] | None, received_at: float) -> None:
        self.admission.landed(adm, label)
        if adm.verdict is Verdict.HELD:  # still ours, tracked, and extended
            self.holds.hold(adm, label, received_at + self.p.visibility_timeout)
            return
        if adm.verdict is not Verdict.ADMITTED:
            metrics.VOLUMES.labels(adm.verdict.value).inc()
            self._untrack(adm.message)
            self.admission.report(adm)
            if adm.verdict is Verdict.RELEASED:  # S3 failed as a whole before any claim
                self._storage_outage(adm.reason)
        elif self.draining or self.stopping or self.holds.storage_down:
            reason = "released: S3 unavailable" if self.holds.storage_down else "released: worker shutting down"
            verdict = lifecycle.release(self.svc, adm, reason)
            if adm.partial is not None and adm.partial.resume is not None:
                adm.partial.resume.release()
            if verdict is Verdict.HELD:
                self.holds.hold(adm, label, received_at + self.p.visibility_timeout)
            else:
                self._untrack(adm.message)
        else:
            vol = self.book.open(adm, partial.file_metadata(self.svc), received_at + self.p.visibility_timeout)
            if not vol.todo:  # every page was finished by an earlier attempt
                self.finisher.finish(vol)

    def on_readmitted(self, key: int, adm: Admission) -> None:
        held = self.holds.unhold(key)
        label = held.label if held else None
        visible_until = held.visible_until if held else time.monotonic()
        self.on_admitted(adm, label, visible_until - self.p.visibility_timeout)

    # -- pages ----------------------------------------------------------------------------------
    def on_page_failed(self, msg: PageFailed) -> None:
        back = self.dispatcher.page_failed(msg)
        if back is None:
            return
        vol, page, etag, timings = back
        if msg.error == PAGE_S3_UNAVAILABLE:  # S3's failure, not the page's: no error row
            self._storage_outage(msg.message)
            return
        if msg.error == PAGE_CHANGED and vol is not None:
            # The volume is being rewritten: its result would mix two versions. It is given back
            # unspent, and read again (a new manifest, a new version) once the upload settles.
            self.finisher.release(vol, f"released: {msg.message}: the volume changed while it ran",
                                  lifecycle.recheck_delay_s(self.svc))
            return
        if vol is not None:
            entry = vol.adm.manifest.entries[page]
            self.book.record(vol, page, PageOutcome.failed(entry.filename, msg.stage, msg.error, msg.message,
                                                           etag=etag, timings=timings))

    # -- outages --------------------------------------------------------------------------------
    def _storage_outage(self, reason: str) -> None:
        """S3 fails as a whole: receive nothing, and give every volume in flight back unspent."""
        running = self.book.running()
        if self.holds.storage_outage(reason, len(running)):
            for vol in running:
                self.finisher.release(vol, f"released: S3 unavailable: {reason}"[:1000])

    def on_service_back(self, service: str) -> None:
        for key, held in self.holds.service_back(service):
            if held.adm.pending:
                self.finisher.settle(key, held.adm)  # its settlement again
            else:
                self.admission.readmit(key, held.adm.message)  # its whole admission again

    def on_settled(self, key: int, verdict: Verdict) -> None:
        held = self.holds.settled(key, verdict)
        if held is not None:
            self._untrack(held.adm.message)
            self._count_outcome(held.adm, verdict, held.pages, held.errors)

    # -- finished -------------------------------------------------------------------------------
    def on_finished(self, key: int, verdict: Verdict) -> None:
        vol = self.book.pop(key)
        if vol is None:
            return
        label = (vol.adm.w_id, vol.adm.i_id)
        pages, errors = vol.pages, vol.out.tally.nb_errors
        if verdict is Verdict.HELD:  # its row could not be settled: the message stays ours
            self.holds.hold(vol.adm, label, vol.visible_until, pages, errors)
            return
        self._untrack(vol.adm.message)
        self._count_outcome(vol.adm, verdict, pages, errors, vol.out)

    def _count_outcome(self, adm: Admission, verdict: Verdict, pages: int, errors: int,
                       out: VolumeFile | None = None) -> None:
        self.book.count_outcome(adm, verdict, pages, errors, out)
        if verdict is Verdict.RELEASED and adm.unavailable == "storage":
            self._storage_outage(adm.reason)

    # -- shutdown -------------------------------------------------------------------------------
    def release_all(self, reason: str) -> None:
        """The run ends: every volume in flight is given back (its message requeued unspent:
        a drain is not the volume's fault), and the held messages are left as they are."""
        for key, vol in self.book.items():
            if vol.finishing:
                continue
            self.book.pop(key)
            vol.out.discard()
            if lifecycle.release(self.svc, vol.adm, reason) is Verdict.HELD:
                vol.adm.message.settled.set()  # never released on a guess: see Holds.abandon
                log.warning("Volume %s: message %s left hidden until its visibility timeout (its task "
                            "could not be released: the database did not answer)", vol.adm.label,
                            vol.adm.message.message_id)
                continue
            metrics.VOLUMES.labels("released").inc()
            self._untrack(vol.adm.message)
            log.info("Released volume %s (message %s visible again)", vol.adm.label, vol.adm.message.message_id)
        self.holds.abandon()

    def done(self) -> str | None:
        """Why the controller may stop now, or None."""
        idle = not len(self.book) and not len(self.admission) and not len(self.holds) and self.events.empty()
        if self.stopping:
            return "stopped"
        if self.draining:
            if idle:
                return "drained"
            if time.monotonic() > self.drain_deadline:
                self.release_all("released: grace period over")
                if not self.book.any_finishing():
                    return "grace period over"
            return None
        k = self.p.shutdown_after_empty
        if self.receiver.ran_dry and idle:
            return f"{k} empty polls"
        return None

    def _drain(self) -> None:
        self.draining = True
        self.receiver.stop()

    def _stop(self) -> None:
        self.stopping = True
        self.receiver.stop()
        self.extender.stop()
        self.holds.stop()

    # -- main loop ------------------------------------------------------------------------------
    def handle(self, msg: object) -> None:
        if isinstance(msg, PageDone):
            self.dispatcher.page_done(msg)
        elif isinstance(msg, PageFailed):
            self.on_page_failed(msg)
        elif isinstance(msg, Drain):
            if not self.draining:
                log.info("Draining: no new volumes; %d in flight get %.0f s to finish",
                         len(self.book), msg.grace)
            self._drain()
            self.drain_deadline = min(self.drain_deadline, time.monotonic() + msg.grace)
        elif isinstance(msg, ReleaseNow):
            self._drain()
            self.receiver.no_wait_at_the_end()
            self.drain_deadline = 0.0
            self.release_all("released: worker stopping now")
        elif isinstance(msg, Stop):
            self.release_all("released: worker stopping")
            self._stop()
            self.receiver.brief_wait_at_the_end()
        elif isinstance(msg, PipelineReady):
            self.receiver.pipeline_ready.set()

    def run(self) -> str:
        self.receiver.start()
        self.extender.start()
        self.holds.start()
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
            self.dispatcher.scan()
            self.dispatcher.dispatch()
            reason = self.done()
            if reason:
                return reason
            if not self.ctx.parent_alive():
                return "supervisor gone"

    def close(self) -> None:
        self._stop()
        self.receiver.hand_back(self.ctx.parent_alive, self.ctx.mailbox.recv, self.on_received)
        self.admission.close()
        self.finisher.close()
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
