"""The receiver: the SQS long poll, in a thread, and what the end of the run does with it.

Messages are received ahead of need (up to ``max_volumes_in_flight`` volumes) so that the
next volume's pages are already flowing while the current one drains; how many to ask for
is the main loop's answer (``want``). One receive at a time: the next is decided only once
the main loop has taken in the last one's messages, so an empty poll that ends the run
starts no other. A failed receive is retried after a pause that doubles up to a minute.

It also counts the empty polls that end an idle run (``--shutdown-after-empty``), but none
while a message this worker hid for later is on its way back (``backoff``), and at the end
hands back the last receive: see ``hand_back``.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator

import botocore.exceptions

from bec.edges import aws
from bec.observe import metrics
from bec.control.lifecycle import Received
from bec.pipeline.backoff import BackoffWatch
from bec.pipeline.controller.room import ThreadRoom
from bec.pipeline.messages import Message, ReleaseNow, Stop, Track

log = logging.getLogger("bec.controller")

RECEIVE_GRACE_S = 2.0    # beyond the long poll's own wait, for a receive in flight at the end
STOP_RECEIVE_WAIT_S = 5.0  # ... when the supervisor stops the run (it kills the controller at 10 s)


class Receiver(ThreadRoom):
    """Puts ``("received", messages, at)`` on ``events``; tells the supervisor to ``Track``
    each message (``tell_supervisor``) before the main loop sees it. ``stop``: no receive
    after the one in flight (a drain, or the end of the run)."""

    thread_name = "receiver"

    def __init__(self, sqs: Any, backoffs: BackoffWatch, events: queue.Queue, *, queue_url: str,
                 poll_wait: int, visibility_timeout: int, shutdown_after_empty: int,
                 want: Callable[[], int], tell_supervisor: Callable[[Message], object]) -> None:
        super().__init__()
        self.sqs, self.backoffs, self.events = sqs, backoffs, events
        self._poll = {"QueueUrl": queue_url, "WaitTimeSeconds": poll_wait,
                      "VisibilityTimeout": visibility_timeout}
        self.shutdown_after_empty = shutdown_after_empty
        self._want, self._tell_supervisor = want, tell_supervisor
        self.empty_polls = 0
        self._said_backoff = False
        self.pipeline_ready = threading.Event()  # set by the supervisor's PipelineReady
        self.unseen = 0  # received by the receiver thread, not yet taken in by the main loop
        # Set when the main loop has taken in the receiver's last result: the next receive is
        # decided on counts that include it (an empty poll that ends the run starts no other).
        self.taken_in = threading.Event()
        self.taken_in.set()
        # how long the end of the run waits for a receive still in flight (see hand_back)
        self.last_receive_wait_s = poll_wait + RECEIVE_GRACE_S

    # -- the main loop's side ------------------------------------------------------------------
    def no_wait_at_the_end(self) -> None:
        """Told to release at once: the end of the run waits for no receive in flight."""
        self.last_receive_wait_s = 0.0  # at once means at once

    def brief_wait_at_the_end(self) -> None:
        """The supervisor stops the run, and kills a controller that lingers."""
        self.last_receive_wait_s = min(self.last_receive_wait_s, STOP_RECEIVE_WAIT_S)

    @contextlib.contextmanager
    def taking_in(self, messages: list[Received]) -> Iterator[None]:
        """The main loop takes in a receive's messages: the next receive waits until it has."""
        try:
            self.unseen -= len(messages)
            yield
        finally:
            self.taken_in.set()

    def count_poll(self, got: int, idle: bool) -> None:
        """An empty poll counts towards the end of an idle run; one that got messages resets."""
        if got:
            self.empty_polls = 0
        elif idle and not self._in_backoff():
            self.empty_polls += 1

    @property
    def ran_dry(self) -> bool:
        """The queue gave ``--shutdown-after-empty`` empty polls in a row: the run ends once idle."""
        k = self.shutdown_after_empty
        return bool(k and self.empty_polls >= k)

    def _in_backoff(self) -> bool:
        """A message this worker hid for later (a retry's back-off, a recheck) is still on its
        way back: the queue only looks empty. Said once per wait when the run would end."""
        waiting = self.backoffs.waiting_s()
        if waiting > 0 and self.shutdown_after_empty and not self._said_backoff:
            self._said_backoff = True
            log.info("Empty poll, but a message this worker delayed is visible again in %.0f s: "
                     "waiting for it before counting empty polls", waiting)
        elif waiting <= 0:
            self._said_backoff = False
        return waiting > 0

    def hand_back(self, parent_alive: Callable[[], bool], recv: Callable[..., object],
                  take_in: Callable[[list[Received], float], None]) -> None:
        """A receive still in flight when the run ends may bring messages that SQS has made
        invisible for the visibility timeout, with nobody left to process them: wait for it
        and make them visible again. Not when told to release at once (a second signal), and
        briefly when the supervisor stops the run (it kills a controller that lingers): a
        message taken by that last poll then returns only after its visibility timeout.

        ``recv`` reads the controller's mailbox while waiting (a ``ReleaseNow`` or ``Stop``
        ends the wait); ``take_in`` is the main loop's, which hands each message back once the
        run is stopping. Other events still queued are dropped: nobody is left to act on them."""
        thread, wait_s = self.thread, self.last_receive_wait_s
        if thread is not None and parent_alive():
            thread.join(min(0.2, wait_s))  # a receiver not in a receive leaves at once
            if thread.is_alive() and wait_s > 0:
                log.info("Waiting up to %.0f s for the last SQS receive to return, to make what it "
                         "brings visible again (a second signal stops at once)", wait_s)
                deadline = time.monotonic() + wait_s
                while thread.is_alive() and time.monotonic() < deadline:
                    msg = recv(timeout=0.1)
                    if isinstance(msg, (ReleaseNow, Stop)) or not parent_alive():
                        break  # the run is over: nothing else in the mailbox matters now
        while True:
            try:
                kind, *args = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "received":
                take_in(*args)  # stopping: each message is made visible and untracked

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        """The SQS receive thread. Nothing may end it but a stop: a receiver that died would
        leave a worker that heartbeats, looks healthy, and never takes another volume."""
        while not self.pipeline_ready.wait(0.1):
            if self._stopping:
                return
        while not self._stopping:
            try:
                self._receive_loop()
            except Exception:
                log.exception("SQS receiver failed unexpectedly; it goes on in 1 s")
                time.sleep(1.0)

    def _receive_loop(self) -> None:
        pause = 1.0
        while not self._stopping:
            if not self.taken_in.wait(0.1):
                continue
            want = self._want()
            if not want:
                time.sleep(0.05)
                continue
            try:
                got = self.sqs.receive_message(
                    MaxNumberOfMessages=want, AttributeNames=["ApproximateReceiveCount"],
                    **self._poll).get("Messages", [])
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
                self._tell_supervisor(Track(message.receipt))
            self.unseen += len(got)
            self.taken_in.clear()
            self.events.put(("received", received, time.monotonic()))
