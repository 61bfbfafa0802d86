"""Holds: what the controller keeps while PostgreSQL or S3 is out, and the probe of both.

Outages pause the whole controller, never the volumes' receive counts: while PostgreSQL
does not answer, nothing is received and every message whose task row could not be settled
is *held* (kept hidden) until a probe finds the database writable again, then its step is
done again; while S3 fails as a whole (unreachable, expired credentials), nothing is
received and the volumes in flight are given back unspent, until a probe of both buckets
answers.

The held messages and the two outage flags are the main loop's; the probe runs in a thread
of its own (a probe may wait for a timeout, and nothing else may wait on it) and only puts a
``("service_back", service)`` event on the loop's queue.
"""
from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import Callable

from bec.errors import BecError
from bec.control.lifecycle import Admission, Verdict
from bec.pipeline.controller.room import ThreadRoom

log = logging.getLogger("bec.controller")

PROBE_EVERY_S = 5.0      # how often a service found unavailable is asked again


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


class Holds(ThreadRoom):
    """``writable`` raises ``BecError`` while the database cannot take a claim; each of
    ``storage_probes`` returns None, or what is wrong with its bucket; ``next_key`` numbers
    held messages (one sequence with the volumes'). ``stop`` ends the probe after its wait."""

    thread_name = "prober"

    def __init__(self, writable: Callable[[], object], storage_probes: tuple[Callable[[], str | None], ...],
                 events: queue.Queue, next_key: Callable[[], int]) -> None:
        super().__init__()
        self._writable, self._storage_probes = writable, storage_probes
        self.events, self._next_key = events, next_key
        self._held: dict[int, Held] = {}
        self.database_down = False
        self.storage_down = False

    # -- what the receiver asks ----------------------------------------------------------------
    @property
    def paused(self) -> bool:
        """Every message received now would be handed back, or burn one of its receives."""
        return self.database_down or self.storage_down or bool(self._held)

    def __len__(self) -> int:
        return len(self._held)

    def values(self) -> list[Held]:
        """The held messages (a copy: safe from another thread)."""
        return list(self._held.values())

    def has_label(self, label: tuple[str, str]) -> bool:
        return any(h.label == label for h in self.values())

    # -- outages -------------------------------------------------------------------------------
    def database_outage(self, reason: str) -> None:
        if not self.database_down:
            self.database_down = True
            log.warning("PostgreSQL is unavailable (%s): no new messages until it answers", reason)

    def storage_outage(self, reason: str, in_flight: int) -> bool:
        """S3 fails as a whole: receive nothing. True when it has just been found out: the
        caller then gives the ``in_flight`` volumes back unspent (their pages would all fail,
        and each volume spend a receive on a retry)."""
        if self.storage_down:
            return False
        self.storage_down = True
        log.warning("S3 is unavailable (%s): no new messages until it answers; giving back the %d "
                    "volume(s) in flight", reason, in_flight)
        return True

    def service_back(self, service: str) -> list[tuple[int, Held]]:
        """A probe found ``service`` answering again. Returns the held messages to try again
        now (marked busy): each one's settlement, or its whole admission."""
        again: list[tuple[int, Held]] = []
        if service == "storage" and self.storage_down:
            self.storage_down = False
            log.info("S3 answers again: receiving resumes")
        elif service == "database" and self.database_down:
            self.database_down = False
            log.info("PostgreSQL answers again: %s", f"trying the {len(self._held)} held message(s) again"
                     if self._held else "receiving resumes")
            for key, held in self._held.items():
                if not held.busy:
                    held.busy = True
                    again.append((key, held))
        return again

    # -- held messages -------------------------------------------------------------------------
    def hold(self, adm: Admission, label: tuple[str, str] | None, visible_until: float,
             pages: int = 0, errors: int = 0) -> None:
        key = self._next_key()
        self._held[key] = Held(adm, label, visible_until, pages, errors)
        log.warning("Volume %s: %s; message %s kept until the database answers", adm.label,
                    adm.reason or "the database did not answer", adm.message.message_id)
        self.database_outage(adm.reason)

    def unhold(self, key: int) -> Held | None:
        """Forget a held message (None when the end of the run abandoned it meanwhile)."""
        return self._held.pop(key, None)

    def settled(self, key: int, verdict: Verdict) -> Held | None:
        """A held message's settlement tried again: the message, when it is settled now
        (for the caller to untrack and count), else None (still held, or abandoned)."""
        held = self._held.get(key)
        if held is not None and verdict is Verdict.HELD:
            held.busy = False
            self.database_outage(held.adm.reason)
            return None
        held = self.unhold(key)
        return held if held is not None and verdict is not Verdict.HELD else None

    def abandon(self) -> None:
        """The run ends with messages whose rows could not be settled: never released on a
        guess. They stay hidden until their visibility timeout; the supervisor releases them
        at the end if it can release this worker's tasks, and a row left running is claimable
        once this worker has stopped."""
        for key in list(self._held):
            held = self.unhold(key)
            if held is None:
                continue
            held.adm.message.settled.set()
            log.warning("Volume %s: message %s left hidden until its visibility timeout (its task could "
                        "not be settled: the database did not answer)", held.adm.label,
                        held.adm.message.message_id)

    # -- the probe (thread) --------------------------------------------------------------------
    def _run(self) -> None:
        """Asks the services found unavailable, every few seconds, whether they answer again
        (its own thread: a probe may wait for a timeout, and nothing else may wait on it)."""
        while not self._stopping:
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
            self._writable()  # a read-only server answers SELECT 1 and refuses every claim
        except BecError:
            return
        self.events.put(("service_back", "database"))

    def _probe_storage(self) -> None:
        failures = [down for down in (check() for check in self._storage_probes) if down]
        if not failures:
            self.events.put(("service_back", "storage"))
