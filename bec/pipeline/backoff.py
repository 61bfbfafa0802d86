"""Messages this worker hid for later: until they are back, its queue is not empty.

A retried volume's message is made invisible for a back-off (``--retry-delay``, doubling per
receive), a volume running elsewhere is looked at again after ``--stale-after`` + 2 s. While
such a message is hidden, SQS answers "empty", and a worker run with ``--shutdown-after-empty``
used to count those polls and exit: the message came back to a queue nobody polled.

The controller hands the lifecycle this wrapper of its SQS client. It passes every call
through and notes when a message this worker delays on its tasks queue comes back (a
visibility change or a delayed send), whoever in the lifecycle decided it; the controller
counts no empty poll before then.
"""
from __future__ import annotations

import threading
import time
from typing import Any


#: SQS makes a message visible again about, not exactly, when told: a poll that starts this
#: soon after is not yet taken for an empty queue.
MARGIN_S = 2.0


class BackoffWatch:
    def __init__(self, sqs: Any, queue_url: str) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._lock = threading.Lock()
        self._back_at = 0.0  # monotonic time the last hidden message is visible again

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sqs, name)

    def _hidden_for(self, seconds: Any) -> None:
        try:
            delay = float(seconds)
        except (TypeError, ValueError):
            return
        if delay > 0:
            with self._lock:
                self._back_at = max(self._back_at, time.monotonic() + delay + MARGIN_S)

    def change_message_visibility(self, **kwargs: Any) -> Any:
        answer = self._sqs.change_message_visibility(**kwargs)
        if kwargs.get("QueueUrl") == self._queue_url:
            self._hidden_for(kwargs.get("VisibilityTimeout", 0))
        return answer

    def send_message(self, **kwargs: Any) -> Any:
        answer = self._sqs.send_message(**kwargs)
        if kwargs.get("QueueUrl") == self._queue_url:
            self._hidden_for(kwargs.get("DelaySeconds", 0))
        return answer

    def waiting_s(self) -> float:
        """Seconds until the last message this worker hid is visible again (0: none hidden)."""
        with self._lock:
            return max(0.0, self._back_at - time.monotonic())
