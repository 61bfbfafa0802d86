"""The volume book: the volumes in flight, what each of their pages came to, the run's counters.

Page results are not kept until a volume ends: each volume's rows go to its Parquet file
(``bec.edges.volumefile``) in manifest order as they complete (the dispatcher bounds how far ahead
of the first row not yet written a page may be: see ``dispatch``). A volume is complete once
every page has an outcome; the book then hands it on to be finished, once.

It is a room of the controller's main thread: the receiver and extender threads only read
copies of it (``runs``, ``queued_pages``), taken in one step under the GIL.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bec.observe import metrics
from bec.edges.artifacts import PageOutcome
from bec.errors import page_error_class
from bec.control.lifecycle import Admission, Verdict
from bec.edges.volumefile import VolumeFile

log = logging.getLogger("bec.controller")


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


class VolumeBook:
    """The volumes in flight by key, their page outcomes, and the counters of the run.

    ``kind`` is the job kind (``bec.control.jobkinds.JobKind``: its stage names, its Parquet);
    ``next_key`` numbers volumes (one sequence with the held messages'); ``on_complete`` is
    called once with a volume whose every page has an outcome, marked ``finishing``."""

    def __init__(self, kind: Any, next_key: Callable[[], int],
                 on_complete: Callable[[VolumeRun], None]) -> None:
        self.kind = kind
        self._next_key = next_key
        self._on_complete = on_complete
        self._runs: dict[int, VolumeRun] = {}
        self.counters = Counters()

    # -- the volumes -----------------------------------------------------------------------------
    def open(self, adm: Admission, metadata: dict[str, str], visible_until: float) -> VolumeRun:
        """A volume admitted: its file (resumed where an earlier attempt left pages), its pages to do."""
        key = self._next_key()
        n = len(adm.manifest.entries)
        out = VolumeFile(n, metadata, adm.partial.resume if adm.partial else None, kind=self.kind)
        todo = out.to_do()
        metrics.PAGES_RESUMED.inc(n - len(todo))
        vol = self._runs[key] = VolumeRun(key, adm, out, collections.deque(todo), visible_until)
        log.info("Processing message: %s for volume %s (%d pages, version %s, attempt %d)",
                 adm.message.message_id, adm.label, n, adm.manifest.version, adm.attempt)
        return vol

    def get(self, key: int) -> VolumeRun | None:
        return self._runs.get(key)

    def pop(self, key: int) -> VolumeRun | None:
        return self._runs.pop(key, None)

    def __len__(self) -> int:
        return len(self._runs)

    def runs(self) -> list[VolumeRun]:
        # list() copies the values in one step under the GIL: the main thread adds and removes
        # volumes meanwhile, and iterating the live dict from another thread raised and killed it
        return list(self._runs.values())

    def items(self) -> list[tuple[int, VolumeRun]]:
        return list(self._runs.items())

    def running(self) -> list[VolumeRun]:
        """The volumes not yet finishing (nor given back)."""
        return [v for v in self._runs.values() if not v.finishing]

    def any_finishing(self) -> bool:
        return any(v.finishing for v in self._runs.values())

    def queued_pages(self) -> int:
        """Pages waiting for a slot, over every volume (safe from another thread)."""
        return sum(len(v.todo) for v in self.runs())

    def has_label(self, label: tuple[str, str]) -> bool:
        return any((v.adm.w_id, v.adm.i_id) == label for v in self.runs())

    # -- pages -----------------------------------------------------------------------------------
    def record(self, vol: VolumeRun, page: int, outcome: PageOutcome) -> None:
        """A page's outcome (a second one for the same page changes nothing)."""
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
            self._on_complete(vol)

    # -- what became of a volume -----------------------------------------------------------------
    def count_outcome(self, adm: Admission, verdict: Verdict, pages: int, errors: int,
                      out: VolumeFile | None = None) -> None:
        """A volume's end, in the metrics, the counters and the log."""
        seconds = time.time() - adm.claimed_at
        if verdict is Verdict.NOT_CLAIMABLE:  # taken over while it ran: lifecycle.let_go said so
            metrics.VOLUMES.labels("taken_over").inc()
            return
        if verdict is Verdict.RELEASED:
            metrics.VOLUMES.labels("released").inc()
            log.info("Released volume %s (message %s handed back unspent): %s", adm.label,
                     adm.message.message_id, adm.reason)
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
