"""The slot dispatcher: free slots out to the fetch processes, pages back, lost pages redone.

It is the only room of the controller that writes the shared slot table (``slots``): the
free list, each slot's generation, the dispatch of pages to the least loaded fetch process,
a slot handed back with its page's outcome, and the scan for pages lost with their holder.

Pages lost with a dead process are found from slot ownership (``slots``) and redone; a
slot that was taken back is retired for a while before reuse, so a late write from a
stale holder can never land in another page's data.

Page results are not kept until a volume ends: each volume's rows go to its Parquet file
(``bec.edges.volumefile``) in manifest order as they complete. No page is dispatched more than
``reorder_window`` pages ahead of the first row not yet written, so the results held while
an earlier page is still in flight stay bounded, whatever the volume's length.
"""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any, Callable

import numpy as np

from bec.observe import metrics
from bec.edges.artifacts import PageOutcome
from bec.pipeline import slots as S
from bec.pipeline.controller.volumes import VolumeBook, VolumeRun
from bec.pipeline.messages import Fetch, Gone, PageDone, PageFailed
from bec.pipeline.slots import SlotPool, decode_result

log = logging.getLogger("bec.controller")

RETIRE_S = 10.0          # a recovered slot rests this long before reuse
SCAN_EVERY_S = 0.5       # how often slot ownership is checked against live processes
PAGE_TIMEOUT_S = 600.0   # a page in the pipeline longer than this is presumed lost
DONE_MESSAGE_LOST_S = 10.0  # a slot handed to us this long ago with no message: the message is lost
CRASH_BUDGET = 2         # crashes of its holder while working on a page before it is an error row

Timings = tuple[float, float, float, float]


class SlotDispatcher:
    """The slots of one controller, over the shared table of ``pool``.

    ``kind`` is the job kind (a page's input bytes, a page's outcome from its result);
    ``pid_of`` names the live process of a role (0: none); ``send`` passes a ``Fetch`` to a
    fetch role without waiting (False: its queue is full; raises ``Gone``)."""

    def __init__(self, pool: SlotPool, book: VolumeBook, kind: Any, *, fetch_roles: list[str],
                 fetch_depth: int, pid_of: Callable[[str], int], send: Callable[[str, Fetch], bool],
                 source_bucket: str) -> None:
        self.pool, self.table, self.book, self.kind = pool, pool.table, book, kind
        self.fetch_roles, self.fetch_depth, self.source_bucket = fetch_roles, fetch_depth, source_bucket
        self._pid_of, self._send = pid_of, send
        self.free: collections.deque[int] = collections.deque()
        self.retired: dict[int, float] = {}
        self.dispatched_at = np.zeros(len(self.table), dtype=np.float64)
        # A page is dispatched only this far ahead of its volume's first unwritten row: the
        # results that finish ahead of a slow (or redone) page wait in memory for it.
        self.reorder_window = 2 * len(self.table)
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

    def free_slot(self, slot: int) -> None:
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
            pid = self._pid_of(role)
            load[role] = int(np.count_nonzero(owners == pid)) if pid else self.fetch_depth
        return load

    def dispatch(self) -> None:
        if not self.free or not len(self.book):
            return
        load = self._fetch_load()
        for vol in self.book.runs():
            while vol.todo and self.free:
                page = vol.todo[0]
                if page >= vol.out.next_row + self.reorder_window:
                    break  # this volume waits for an earlier page; the others go on
                entry = vol.adm.manifest.entries[page]
                if entry.problem:
                    vol.todo.popleft()
                    self.book.record(vol, page, PageOutcome.failed(entry.filename, "manifest", "invalid_entry",
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
                row["owner"] = self._pid_of(role)
                row["state"] = S.FETCH
                msg = Fetch(slot, gen, self.source_bucket, vol.adm.manifest.key(entry), entry.size or 0,
                            vol.adm.manifest.read_at, alone=page in vol.crashes)
                try:
                    sent = self._send(role, msg)
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

    # -- pages back ----------------------------------------------------------------------------
    def _take(self, slot: int, gen: int) -> tuple[VolumeRun | None, int, np.void] | None:
        row = self.table[slot]
        if int(row["gen"]) != gen or int(row["state"]) != S.DONE:
            return None
        vol = self.book.get(int(row["volume"]))
        return vol, int(row["page"]), row

    def page_done(self, msg: PageDone) -> None:
        """A page finished: its outcome read from the slot and recorded, the slot freed."""
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
        self.free_slot(msg.slot)
        if vol is not None:
            self.book.record(vol, page, outcome)

    def page_failed(self, msg: PageFailed) -> tuple[VolumeRun | None, int, str | None, Timings] | None:
        """A page failed: its slot freed. Returns its volume (None: gone meanwhile), page, etag
        and timings for the caller to decide what the failure means; None for a stale message."""
        taken = self._take(msg.slot, msg.gen)
        if taken is None:
            return None
        vol, page, row = taken
        metrics.S3_READ.inc(int(row["nbytes"]))
        timings, etag = self._timings(row), row["etag"].decode() or None
        self.free_slot(msg.slot)
        return vol, page, etag, timings

    @staticmethod
    def _timings(row: np.void) -> Timings:
        return (float(row["fetch_ms"]), float(row["decode_ms"]), float(row["infer_ms"]),
                float(row["post_ms"]))

    # -- recovery ------------------------------------------------------------------------------
    def scan(self) -> None:
        """Redo pages held by dead processes (or stuck too long); return rested slots."""
        now = time.monotonic()
        if now - self._last_scan < SCAN_EVERY_S:
            return
        self._last_scan = now
        metrics.VOLUMES_IN_FLIGHT.set(len(self.book))
        metrics.PAGES_WAITING.set(self.book.queued_pages())
        for slot, until in list(self.retired.items()):
            if now >= until:
                del self.retired[slot]
                self.free_slot(slot)
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
            vol = self.book.get(int(row["volume"]))
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
            self.book.counters.pages_redone += 1
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
        self.book.record(vol, page, PageOutcome.failed(
            entry.filename, stage, kind,
            f"the {stage} process died {vol.crashes[page]} times while working on this page"))
