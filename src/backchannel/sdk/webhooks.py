"""Check backchannel's event webhooks on the receiving side.

Each webhook carries ``X-Backchannel-Timestamp`` and ``X-Backchannel-Signature:
sha256=<hex>``, an HMAC-SHA256 over ``timestamp + "." + body``. Its key is the SHA-256 hex
digest of the application secret, because the server stores only that digest. Example::

    ok = verify_webhook(
        APP_SECRET,
        body,
        headers["X-Backchannel-Timestamp"],
        headers["X-Backchannel-Signature"],
    )
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["signing_key", "verify_webhook"]


def signing_key(secret: str) -> bytes:
    """The HMAC key of an application's webhooks: ``sha256_hex(secret)`` as ASCII bytes."""
    # The server's stored form of the secret, recomputed here: the SDK imports no server code.
    return hashlib.sha256(secret.encode()).hexdigest().encode("ascii")


def verify_webhook(
    secret: str,
    body: bytes,
    timestamp: str,
    signature: str,
    *,
    tolerance: float = 300,
    now: float | None = None,
) -> bool:
    """True when ``signature`` signs ``body`` at ``timestamp`` and the timestamp is fresh.

    Args:
        secret: the application secret.
        body: the raw request body, unchanged.
        timestamp: the ``X-Backchannel-Timestamp`` header.
        signature: the ``X-Backchannel-Signature`` header (``sha256=<hex>``).
        tolerance: the largest accepted distance in seconds from ``now``, against replays.
        now: the current unix time (default: the system clock).

    Returns:
        False for a wrong signature, a malformed header or a stale timestamp.
    """
    if not (timestamp.isascii() and timestamp.isdigit()):
        return False
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        return False
    scheme, _, digest = signature.partition("=")
    if scheme != "sha256":
        return False
    mac = hmac.new(signing_key(secret), timestamp.encode("ascii") + b".", hashlib.sha256)
    mac.update(body)
    # Bytes on both sides: compare_digest refuses non-ASCII str, and a header may hold any.
    return hmac.compare_digest(mac.hexdigest().encode(), digest.encode(errors="replace"))
