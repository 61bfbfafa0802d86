"""The extender: keeps the messages of the volumes in flight, and of the held ones, hidden.

A volume may run longer than the queue's visibility timeout: its message is made invisible
again for another timeout each time half of it has gone, in a thread of its own (a change of
visibility is a call to SQS, and the main loop never waits on the network). The lifecycle
never extends a message once it is settled (``lifecycle.extend_visibility``).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

from bec.control.lifecycle import Admission, Received
from bec.pipeline.controller.room import ThreadRoom

log = logging.getLogger("bec.controller")


class Hidden(Protocol):
    """A volume in flight (``volumes.VolumeRun``) or a held message (``holds.Held``)."""

    adm: Admission
    visible_until: float  # monotonic time its message shows again unless extended


Extend = Callable[[list[Received], int], list[tuple[Received, int]]]


class Extender(ThreadRoom):
    """``holders`` lists what is to be kept hidden now (copies: it is called from the thread);
    ``extend`` makes messages invisible for that many seconds more and returns those it
    extended, each with its new timeout (``lifecycle.extend_visibility``). ``stop``: no
    extension after the current one."""

    thread_name = "extender"

    def __init__(self, visibility_timeout: int, holders: Callable[[], list[Hidden]], extend: Extend) -> None:
        super().__init__()
        self.visibility_timeout = visibility_timeout
        self._holders, self._extend = holders, extend

    def _run(self) -> None:
        vt = self.visibility_timeout
        margin = max(1.0, vt / 2)
        while not self._stopping:
            time.sleep(min(1.0, max(0.2, vt / 6)))
            try:
                self.extend_due(vt, margin)
            except Exception:  # a bug: reported, and extensions go on
                log.exception("visibility extension failed unexpectedly")

    def extend_due(self, vt: int, margin: float) -> None:
        """Volumes running, and messages held while the database does not answer."""
        now = time.monotonic()
        due = {id(h.adm.message): h for h in self._holders() if now > h.visible_until - margin}
        messages = [h.adm.message for h in due.values()]
        for start in range(0, len(messages), 10):
            for message, seconds in self._extend(messages[start:start + 10], vt):
                due[id(message)].visible_until = now + seconds
