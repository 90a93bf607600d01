"""Native tunnel names and tokens: reserved per device credential, stable across reconnects.

A device credential (app and device) opens a tunnel under a name, a DNS label. The first
credential to use a name keeps it; the same credential reconnecting gets it back at once.
The tunnel's ``/go/{token}`` token is derived from a server secret, the credential and the
name (HMAC-SHA256), so it is the same on every reconnect and after restarts, while the store
holds only its hash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from backchannel.core.clock import Clock
from backchannel.core.credentials import hash_secret
from backchannel.core.outcomes import TunnelRefused
from backchannel.state.store import Store, TunnelName

_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SECRET_SETTING = "tunnel_secret"


def valid_name(name: str) -> bool:
    """True for a DNS label in lower case: letters, digits and inner hyphens, 1-63 long."""
    return _NAME.fullmatch(name) is not None


def default_name(app_id: str, device_id: str) -> str:
    """The name of a device's tunnel when it asks for none: stable and DNS-safe."""
    digest = hashlib.sha256(f"{app_id}\0{device_id}".encode()).hexdigest()
    return f"d-{digest[:12]}"


class TunnelNames:
    """Claims names for credentials and resolves tokens and names back to them."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        self._secret = b""
        self._by_name: dict[str, TunnelName] = {}
        self._by_token: dict[str, TunnelName] = {}

    async def init_secret(self) -> None:
        """Load the server's token secret, or make one at first start."""
        stored = await self._store.get_setting(_SECRET_SETTING)
        if stored is None:
            stored = secrets.token_hex(32)
            await self._store.set_setting(_SECRET_SETTING, stored)
        self._secret = bytes.fromhex(stored)

    def token_for(self, app_id: str, device_id: str, name: str) -> str:
        """The tunnel's token: 43 URL-safe characters (256 bits)."""
        assert self._secret, "init_secret() first"
        mac = hmac.new(self._secret, f"{app_id}\0{device_id}\0{name}".encode(), "sha256")
        return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()

    async def claim(self, app_id: str, device_id: str, name: str | None) -> tuple[TunnelName, str]:
        """Reserve ``name`` for the credential (or take it back); return it and its token."""
        name = name or default_name(app_id, device_id)
        if not valid_name(name):
            raise TunnelRefused(
                f"invalid tunnel name {name!r}: use 1-63 lower-case letters, digits and "
                "inner hyphens"
            )
        token = self.token_for(app_id, device_id, name)
        wanted = TunnelName(name, app_id, device_id, hash_secret(token), self._clock.time())
        held = await self._store.claim_tunnel_name(wanted)
        if (held.app_id, held.device_id) != (app_id, device_id):
            raise TunnelRefused(f"the tunnel name {name!r} is reserved by another device")
        self._remember(held)
        return held, token

    async def by_token_hash(self, token_hash: str) -> TunnelName | None:
        """The tunnel whose token has this hash, or None."""
        record = self._by_token.get(token_hash)
        if record is None:
            record = await self._store.get_tunnel_name_by_token(token_hash)
            if record is not None:
                self._remember(record)
        return record

    async def by_name(self, name: str) -> TunnelName | None:
        """The tunnel reserved under ``name``, or None."""
        if not valid_name(name):
            return None
        record = self._by_name.get(name)
        if record is None:
            record = await self._store.get_tunnel_name(name)
            if record is not None:
                self._remember(record)
        return record

    async def release(self, name: str) -> bool:
        """Free a name (admin action)."""
        record = self._by_name.pop(name, None)
        if record is not None:
            self._by_token.pop(record.token_hash, None)
        return await self._store.delete_tunnel_name(name)

    def _remember(self, record: TunnelName) -> None:
        self._by_name[record.name] = record
        self._by_token[record.token_hash] = record
