"""What the controller's rooms with a thread of their own share: starting and stopping it.

The receiver, the probe of the holds and the extender each run one daemon thread that loops
until its room is stopped. Stopping only sets a flag: the thread ends after its current step
(a long poll, a probe, a wait), and nobody waits for it but the receiver's hand-back.
"""
from __future__ import annotations

import threading


class ThreadRoom:
    """A room whose thread runs ``_run`` until ``stop``; ``thread_name`` names it (ps, logs)."""

    thread_name = "room"

    def __init__(self) -> None:
        self._stopping = False
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """The thread ends after its current step (a daemon thread: the process need not wait)."""
        self._stopping = True

    def _run(self) -> None:
        raise NotImplementedError
