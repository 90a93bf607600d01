"""An in-process store on plain dicts; nothing survives the process."""

from __future__ import annotations

from backchannel.state.store import (
    AlreadyExists,
    AppRecord,
    DeviceCredential,
    TunnelName,
    TunnelToken,
)


class MemoryStore:
    """A :class:`~backchannel.state.store.Store` kept in dicts, for tests and single runs."""

    def __init__(self) -> None:
        self._apps: dict[str, AppRecord] = {}
        self._creds: dict[tuple[str, str], DeviceCredential] = {}
        self._settings: dict[str, str] = {}
        self._tokens: dict[str, TunnelToken] = {}
        self._names: dict[str, TunnelName] = {}

    async def open(self) -> None:
        """Do nothing: there is nothing to connect to."""

    async def close(self) -> None:
        """Do nothing; the data stays until the object is dropped."""

    async def create_app(self, app: AppRecord) -> None:
        """Insert a new application."""
        if app.app_id in self._apps:
            raise AlreadyExists(f"app {app.app_id!r} exists")
        self._apps[app.app_id] = app

    async def get_app(self, app_id: str) -> AppRecord | None:
        """Return one application or None."""
        return self._apps.get(app_id)

    async def list_apps(self) -> list[AppRecord]:
        """Return all applications, oldest first."""
        return sorted(self._apps.values(), key=lambda a: (a.created_at, a.app_id))

    async def update_app(self, app: AppRecord) -> bool:
        """Replace the record with the same ``app_id``; False when there is none."""
        if app.app_id not in self._apps:
            return False
        self._apps[app.app_id] = app
        return True

    async def delete_app(self, app_id: str) -> bool:
        """Delete an application and its credentials; False when there was none."""
        # Credentials go even when the app is missing, so orphans never outlive a delete.
        for key in [k for k in self._creds if k[0] == app_id]:
            del self._creds[key]
        for name in [n for n, r in self._names.items() if r.app_id == app_id]:
            del self._names[name]
        return self._apps.pop(app_id, None) is not None

    async def put_device_credential(self, cred: DeviceCredential) -> None:
        """Insert or replace a device credential."""
        self._creds[(cred.app_id, cred.device_id)] = cred

    async def get_device_credential(self, app_id: str, device_id: str) -> DeviceCredential | None:
        """Return one device credential or None."""
        return self._creds.get((app_id, device_id))

    async def list_device_credentials(self, app_id: str) -> list[DeviceCredential]:
        """Return the credentials of one application, oldest first."""
        creds = [c for c in self._creds.values() if c.app_id == app_id]
        return sorted(creds, key=lambda c: (c.created_at, c.device_id))

    async def delete_device_credential(self, app_id: str, device_id: str) -> bool:
        """Delete one credential; False when there was none."""
        return self._creds.pop((app_id, device_id), None) is not None

    async def get_setting(self, name: str) -> str | None:
        """Return a server setting or None."""
        return self._settings.get(name)

    async def set_setting(self, name: str, value: str) -> None:
        """Store a server setting."""
        self._settings[name] = value

    async def create_tunnel_token(self, token: TunnelToken) -> None:
        """Insert a new tunnel token."""
        if token.token_hash in self._tokens:
            raise AlreadyExists("tunnel token exists")
        self._tokens[token.token_hash] = token

    async def get_tunnel_token(self, token_hash: str) -> TunnelToken | None:
        """Return one tunnel token (expired or not) or None."""
        return self._tokens.get(token_hash)

    async def extend_tunnel_token(self, token_hash: str, expires_at: float) -> bool:
        """Set a token's expiry; False when there is no such token."""
        old = self._tokens.get(token_hash)
        if old is None:
            return False
        self._tokens[token_hash] = TunnelToken(token_hash, old.created_at, expires_at)
        return True

    async def delete_tunnel_token(self, token_hash: str) -> bool:
        """Delete one token; False when there was none."""
        return self._tokens.pop(token_hash, None) is not None

    async def delete_expired_tunnel_tokens(self, now: float) -> int:
        """Delete every token with ``expires_at <= now``; return how many went."""
        gone = [h for h, t in self._tokens.items() if t.expires_at <= now]
        for h in gone:
            del self._tokens[h]
        return len(gone)

    async def claim_tunnel_name(self, record: TunnelName) -> TunnelName:
        """Reserve ``record.name`` unless taken; return whichever record holds it now."""
        return self._names.setdefault(record.name, record)

    async def get_tunnel_name(self, name: str) -> TunnelName | None:
        """Return one reserved name or None."""
        return self._names.get(name)

    async def get_tunnel_name_by_token(self, token_hash: str) -> TunnelName | None:
        """Return the reserved name whose token has this hash, or None."""
        for record in self._names.values():
            if record.token_hash == token_hash:
                return record
        return None

    async def delete_tunnel_name(self, name: str) -> bool:
        """Release a name; False when it was not reserved."""
        return self._names.pop(name, None) is not None
