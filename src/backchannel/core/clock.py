"""The injected clock: monotonic time for deadlines, wall time for what users see."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Time source; tests may inject a fake one."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""

    def time(self) -> float:
        """Seconds since the epoch."""


class SystemClock:
    """The real clock."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)
