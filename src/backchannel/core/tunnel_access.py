"""Access control on a tunnel's public side: basic auth, bearer token, IP lists, rate limit.

The agent declares the rules when it opens the tunnel (``X-Backchannel-Tunnel``); they live
with the connected tunnel, in memory, and are checked by the ingress before anything is
forwarded. Passwords and tokens are kept as SHA-256 digests and compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from backchannel.core.clock import Clock
from backchannel.core.networks import Network
from backchannel.core.outcomes import TunnelRefused
from backchannel.core.ratelimit import RateLimiter


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a public request is refused."""

    status: int
    error: str
    detail: str
    headers: dict[str, str] = field(default_factory=dict)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@dataclass(slots=True)
class TunnelAccess:
    """One tunnel's rules. Empty rules let everyone through."""

    basic_digest: bytes | None = None
    bearer_digest: bytes | None = None
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    limiter: RateLimiter | None = None

    @property
    def needs_credentials(self) -> bool:
        """True when callers must authenticate."""
        return self.basic_digest is not None or self.bearer_digest is not None

    def check(self, remote: str, authorization: str | None) -> Refusal | None:
        """None when the caller may go through, else the refusal."""
        if self.deny or self.allow:
            try:
                address = ipaddress.ip_address(remote)
            except ValueError:
                return Refusal(403, "ip_not_allowed", "the caller's address is unknown")
            if any(address in net for net in self.deny):
                return Refusal(403, "ip_denied", f"{remote} is on this tunnel's deny list")
            if self.allow and not any(address in net for net in self.allow):
                return Refusal(
                    403, "ip_not_allowed", f"{remote} is not on this tunnel's allow list"
                )
        if self.needs_credentials and not self._authenticated(authorization or ""):
            challenge = 'Basic realm="backchannel tunnel"' if self.basic_digest else "Bearer"
            return Refusal(
                401,
                "tunnel_auth_required",
                "this tunnel needs credentials",
                {"WWW-Authenticate": challenge},
            )
        if self.limiter is not None:
            wait = self.limiter.check(remote)
            if wait:
                return Refusal(
                    429,
                    "rate_limited",
                    f"more than {self.limiter.rate:g} requests per second from {remote}",
                    {"Retry-After": str(RateLimiter.retry_after(wait))},
                )
        return None

    def _authenticated(self, authorization: str) -> bool:
        scheme, _, value = authorization.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if scheme == "bearer" and self.bearer_digest is not None:
            return hmac.compare_digest(_digest(value), self.bearer_digest)
        if scheme == "basic" and self.basic_digest is not None:
            try:
                pair = base64.b64decode(value, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return False
            return hmac.compare_digest(_digest(pair), self.basic_digest)
        return False


def parse_access(options: dict[str, Any], clock: Clock) -> TunnelAccess:
    """Build the rules from the agent's tunnel options; TunnelRefused names a bad one."""
    access = TunnelAccess()
    basic = options.get("basic_auth")
    if basic is not None:
        if not isinstance(basic, str) or ":" not in basic or basic.startswith(":"):
            raise TunnelRefused("basic_auth must be 'user:password'")
        access.basic_digest = _digest(basic)
    bearer = options.get("bearer")
    if bearer is not None:
        if not isinstance(bearer, str) or not bearer:
            raise TunnelRefused("bearer must be a non-empty string")
        access.bearer_digest = _digest(bearer)
    access.allow = _networks(options.get("allow_ip"), "allow_ip")
    access.deny = _networks(options.get("deny_ip"), "deny_ip")
    rate = options.get("rate_limit")
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1e6:
            raise TunnelRefused("rate_limit must be a positive number of requests per second")
        access.limiter = RateLimiter(float(rate), max(1, int(rate * 2)), clock)
    return access


def _networks(value: Any, what: str) -> tuple[Network, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TunnelRefused(f"{what} must be a list of CIDRs")
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in value)
    except ValueError as exc:
        raise TunnelRefused(f"{what}: {exc}") from None
