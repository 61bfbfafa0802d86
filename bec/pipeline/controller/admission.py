"""Admission: a received message becomes a volume to run, or is given its fate at once.

Reading the manifest and claiming the task row (``bec.control.lifecycle.admit``), and an earlier
attempt's finished pages (``bec.control.partial``), talk to S3 and PostgreSQL: they run in a small
thread pool of their own, off the main loop, and each reports back as an event. This room
also remembers which volumes are being admitted (a duplicate of one is not admitted twice)
and says, in the log and the counters, what became of a message that is not run here.
"""
from __future__ import annotations

import logging
import queue
from concurrent.futures import ThreadPoolExecutor

from bec.control import lifecycle, partial
from bec.control.lifecycle import Admission, Received, Verdict
from bec.pipeline.controller.volumes import Counters

log = logging.getLogger("bec.controller")


class Admitter:
    """Puts ``("admitted", adm, label, received_at)`` and ``("readmitted", key, adm)`` on ``events``."""

    def __init__(self, svc: lifecycle.Services, events: queue.Queue, counters: Counters) -> None:
        self.svc = svc
        self.events = events
        self.counters = counters
        self._admitting: set[tuple[str, str]] = set()
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="admit")

    def __len__(self) -> int:
        """Messages being admitted (a volume each, or poison)."""
        return len(self._admitting)

    def has_label(self, label: tuple[str, str]) -> bool:
        return label in self._admitting

    def admit(self, message: Received, label: tuple[str, str] | None, received_at: float) -> None:
        if label:
            self._admitting.add(label)
        self._pool.submit(self._admit, message, label, received_at)

    def readmit(self, key: int, message: Received) -> None:
        """A held message's whole admission again (the claim finds its own row)."""
        self._pool.submit(self._readmit, key, message)

    def requeue(self, message: Received, delay_s: int, why: str) -> None:
        """Hand a message back unspent, from the pool (it talks to SQS)."""
        self._pool.submit(lifecycle.requeue, self.svc, message, delay_s, why)

    def landed(self, adm: Admission, label: tuple[str, str] | None) -> None:
        """An admission is back in the main loop with its verdict."""
        if label:
            self._admitting.discard(label)
        self.counters.by_verdict[adm.verdict.value] += 1

    def close(self) -> None:
        """Admissions not started yet are dropped: their messages come back after their timeout."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- in the pool ---------------------------------------------------------------------------
    def _admit(self, message: Received, label: tuple[str, str] | None, received_at: float) -> None:
        self.events.put(("admitted", self.admission(message), label, received_at))

    def _readmit(self, key: int, message: Received) -> None:
        self.events.put(("readmitted", key, self.admission(message)))

    def admission(self, message: Received) -> Admission:
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

    # -- verdicts ------------------------------------------------------------------------------
    def report(self, adm: Admission) -> None:
        """What became of a message not run here (neither admitted nor held), in the log."""
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
        elif adm.verdict is Verdict.ALREADY_DONE:
            self.counters.volumes_skipped += 1
            log.info("Volume %s is already done; message %s deleted", adm.label, mid)
        elif adm.verdict is Verdict.NOT_CLAIMABLE:
            log.info("Volume %s is running elsewhere; message %s handed back unspent, looked at again in "
                     "%d s", adm.label, mid, lifecycle.recheck_delay_s(self.svc))
