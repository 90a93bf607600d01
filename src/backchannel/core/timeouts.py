"""Which timeout a call gets: per call, else the app's default, else the server's, capped."""

from __future__ import annotations

import math


def parse_timeout(raw: str) -> float:
    """Parse a ``?timeout=`` value in seconds.

    Raises:
        ValueError: not a finite number above zero.
    """
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"timeout {raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {raw!r}")
    return value


def resolve_timeout(
    requested: float | None,
    app_default: float | None,
    server_default: float,
    server_max: float,
) -> float:
    """Return the timeout in force: the first one given, capped by ``server_max``."""
    if requested is not None:
        chosen = requested
    elif app_default is not None:
        chosen = app_default
    else:
        chosen = server_default
    return min(chosen, server_max)
