"""The pages/s of `bec jobs stats --watch`: measured between refreshes, smoothed.

A job's progress is known at volume grain (a volume's pages count when it is done), so the
rate between two refreshes jumps: nothing for a while, then a whole volume at once. An
exponentially weighted mean over the refreshes, with a time constant (not a count of
refreshes, so that a short ``--interval`` does not make it jumpier), follows a change in
speed within about a minute and holds steady in between. Until a second refresh has given
a difference, the rate is the database's first estimate (see ``bec.control.jobs.progress_sample``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

TIME_CONSTANT_S = 60.0


@dataclass
class SmoothedRate:
    time_constant_s: float = TIME_CONSTANT_S
    rate: float | None = None          # pages/s, None until known
    measured: bool = False             # True once it comes from refreshes, not the first estimate
    _last: tuple[float, float] | None = None  # (at, pages done) of the previous refresh

    def update(self, at: float, pages_done: float, first_estimate: float | None = None) -> float | None:
        """Take a refresh's total of done pages at time ``at`` (seconds, one clock)."""
        if self._last is None:
            self._last = (at, pages_done)
            self.rate = first_estimate
            return self.rate
        last_at, last_pages = self._last
        elapsed = at - last_at
        if elapsed <= 0:
            return self.rate
        # a deleted or reset task can lower the total: that is no negative speed
        between = max(0.0, pages_done - last_pages) / elapsed
        self._last = (at, pages_done)
        if self.rate is None:
            self.rate = between
        else:
            weight = 1.0 - math.exp(-elapsed / self.time_constant_s)
            self.rate += weight * (between - self.rate)
        self.measured = True
        return self.rate
