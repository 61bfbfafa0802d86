"""The finisher: a volume's end (Parquet, success.json, DB, delete), off the main loop.

Finishing a volume, giving one back, and settling again a message whose row could not be
settled all talk to S3, PostgreSQL and SQS: they run in a small thread pool of their own,
and each always reports its verdict back to the main loop as an event, whatever fails (a
volume whose end raised would stay ``finishing`` for ever, its row running and its message
extended without end).
"""
from __future__ import annotations

import logging
import queue
from concurrent.futures import ThreadPoolExecutor

from bec.control import lifecycle
from bec.control.lifecycle import Admission, Verdict
from bec.pipeline.controller.volumes import VolumeRun

log = logging.getLogger("bec.controller")


class Finisher:
    """Puts ``("finished", key, verdict)`` and ``("settled", key, verdict)`` on ``events``."""

    def __init__(self, svc: lifecycle.Services, events: queue.Queue) -> None:
        self.svc = svc
        self.events = events
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="finish")

    def finish(self, vol: VolumeRun) -> None:
        """Every page of the volume has an outcome (or an earlier attempt had them all)."""
        vol.finishing = True
        self._pool.submit(self._finish, vol)

    def release(self, vol: VolumeRun, reason: str, delay_s: int = 0) -> None:
        """Give one volume back (in the finish pool: it talks to the database and SQS)."""
        if vol.finishing:
            return
        vol.finishing = True
        vol.todo.clear()
        self._pool.submit(self._release_in_thread, vol, reason, delay_s)

    def settle(self, key: int, adm: Admission) -> None:
        """A held message's settlement (``adm.pending``), tried again now the database answers."""
        self._pool.submit(self._settle, key, adm)

    def close(self) -> None:
        """Waits for what was submitted: each ends in a verdict the database must record."""
        self._pool.shutdown(wait=True)

    # -- in the pool ---------------------------------------------------------------------------
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

    def _release_in_thread(self, vol: VolumeRun, reason: str, delay_s: int) -> None:
        verdict = Verdict.RETRY
        try:
            verdict = lifecycle.release(self.svc, vol.adm, reason, delay_s)
        except Exception as exc:
            log.exception("releasing %s failed", vol.adm.label)
            verdict = self._retry_after_bug(vol.adm, exc)
        finally:
            self.events.put(("finished", vol.key, verdict))

    def _settle(self, key: int, adm: Admission) -> None:
        verdict = Verdict.HELD
        try:
            verdict = adm.pending()
        except Exception as exc:
            log.exception("settling %s failed", adm.label)
            verdict = self._retry_after_bug(adm, exc)
        finally:
            self.events.put(("settled", key, verdict))

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
