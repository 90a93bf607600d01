"""Per-application traffic counters for the app info route (Cometa's ``stats`` object)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class AppStats:
    """Counters of one application on this node; latency in ms with a running variance."""

    messages: int = 0
    errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    _n: int = 0
    _mean: float = 0.0
    _m2: float = 0.0
    latency_min: float = math.inf
    latency_max: float = 0.0

    def record(self, sent: int, received: int, latency_ms: float) -> None:
        """Count one successful call (Welford's update keeps the variance in O(1))."""
        self.messages += 1
        self.bytes_down += sent
        self.bytes_up += received
        self._n += 1
        delta = latency_ms - self._mean
        self._mean += delta / self._n
        self._m2 += delta * (latency_ms - self._mean)
        if latency_ms < self.latency_min:
            self.latency_min = latency_ms
        if latency_ms > self.latency_max:
            self.latency_max = latency_ms

    def as_cometa(self, num_devices: int, websockets: int) -> dict[str, Any]:
        """The ``stats`` object; values are strings, as Cometa's were."""
        std = math.sqrt(self._m2 / self._n) if self._n > 1 else 0.0
        lo = self.latency_min if self._n else 0.0
        return {
            "num_devices": str(num_devices),
            "messages": str(self.messages),
            "errors": str(self.errors),
            "bytes_up": str(self.bytes_up),
            "bytes_down": str(self.bytes_down),
            "latency": f"{self._mean:.3f}",
            "latency_min": f"{lo:.3f}",
            "latency_max": f"{self.latency_max:.3f}",
            "std_deviation": f"{std:.3f}",
            "websockets": str(websockets),
        }
