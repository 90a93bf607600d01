"""Where the ``apps``/``devices`` commands act: a running server, or the data directory.

- :class:`RemoteBackend` (``--server URL``) calls the admin REST API under ``/admin/v1``.
  Deleting an app or revoking a device there also closes the live sessions at once.
- :class:`LocalBackend` (no ``--server``) opens the store in ``--data-dir`` and drives the
  same :class:`~backchannel.core.apps.AppService` the server uses, so no logic is repeated.
  It works before the server runs; a running server sees the changes within its app cache
  TTL (about 2 s), but nothing here can reach its live sessions.

Both answer in the admin API's JSON shapes (``app_json``, ``device_json``, plus ``secret`` or
``key`` when one is created), so ``--json`` output is the same in either mode.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import orjson

from backchannel.core.apps import AppService, AppSettings, InvalidInput, NotFound
from backchannel.state.store import StoreError

if TYPE_CHECKING:
    import aiohttp

# aiohttp and the server's modules are imported where they are used, so `--help` and the
# commands that do not need them start quickly.

JSON = dict[str, Any]

DEFAULT_DATA_DIR = Path("backchannel-data")
REQUEST_TIMEOUT = 30.0


class BackendError(Exception):
    """A management operation failed; the message is meant for the user."""

    def __init__(self, message: str, *, status: int | None = None, error: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error = error


@dataclass(frozen=True, slots=True)
class Target:
    """The CLI's choice of backend: ``server`` set means remote, else the data directory."""

    server: str | None = None
    admin_token: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR


class AdminBackend(Protocol):
    """The management operations, answered in the admin API's JSON shapes."""

    async def create_app(self, name: str, settings: AppSettings) -> JSON:
        """Create an application: ``app_json`` plus ``secret``."""

    async def list_apps(self) -> list[JSON]:
        """Every application, as ``app_json``."""

    async def show_app(self, app_id: str) -> JSON:
        """One application, as ``app_json``."""

    async def update_app(self, app_id: str, settings: AppSettings) -> JSON:
        """Change settings (None fields keep their value); the new ``app_json``."""

    async def rotate_secret(self, app_id: str) -> JSON:
        """``{"app_id", "secret"}`` with the new secret."""

    async def delete_app(self, app_id: str) -> JSON:
        """``{"deleted", "sessions_closed"}``."""

    async def provision(self, app_id: str, device_id: str, tags: tuple[str, ...]) -> JSON:
        """Issue a device key: ``device_json`` plus ``key``."""

    async def list_devices(self, app_id: str) -> list[JSON]:
        """Provisioned devices, as ``device_json`` (``online`` is None when unknown)."""

    async def revoke(self, app_id: str, device_id: str) -> JSON:
        """``{"revoked": device_id}``."""


def _settings_body(settings: AppSettings) -> JSON:
    """The admin API body of ``settings``: only the fields that are set."""
    body: JSON = {}
    if settings.webhook_url is not None:
        body["webhook_url"] = settings.webhook_url
    if settings.webhook_kinds is not None:
        body["webhook_kinds"] = list(settings.webhook_kinds)
    if settings.default_timeout is not None:
        body["default_timeout"] = settings.default_timeout
    if settings.allow_open_attach is not None:
        body["allow_open_attach"] = settings.allow_open_attach
    if settings.allowed_devices is not None:
        body["allowed_devices"] = list(settings.allowed_devices)
    return body


def connect_error(exc: aiohttp.ClientConnectorError) -> str:
    """A short reason for a failed connection: refused, unknown host, ..."""
    if isinstance(exc.os_error, ConnectionRefusedError):
        return "connection refused"
    return exc.os_error.strerror or str(exc.os_error) or str(exc)


def _segment(value: str) -> str:
    # Ids are validated by the server; quoting keeps a stray "/" or "?" from changing the route.
    return quote(value, safe=":@")


class RemoteBackend:
    """The admin REST API of a running server."""

    def __init__(self, session: aiohttp.ClientSession, server: str, admin_token: str) -> None:
        from backchannel.frontdoors.admin import PREFIX

        self._session = session
        self._base = server.rstrip("/") + PREFIX
        self._server = server
        self._auth = {"Authorization": f"Bearer {admin_token}"}

    async def _request(self, method: str, path: str, body: JSON | None = None) -> JSON:
        import aiohttp

        url = self._base + path
        data = orjson.dumps(body) if body is not None else None
        headers = dict(self._auth)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(method, url, data=data, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            raise BackendError(
                f"cannot connect to the server at {self._server} ({connect_error(exc)}); "
                "is `backchannel serve` running there?"
            ) from None
        except aiohttp.ClientError as exc:
            raise BackendError(f"request to {self._server} failed: {exc}") from None
        except TimeoutError:
            raise BackendError(
                f"the server at {self._server} did not answer within {REQUEST_TIMEOUT:g} s"
            ) from None
        try:
            answer = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise BackendError(
                f"unexpected answer from {self._server} (HTTP {status}): "
                "is it a backchannel server?",
                status=status,
            )
        if status >= 400:
            detail = answer.get("detail") or answer.get("msg") or f"HTTP {status}"
            raise BackendError(str(detail), status=status, error=str(answer.get("error", "")))
        return answer

    async def create_app(self, name: str, settings: AppSettings) -> JSON:
        """Create an application: ``app_json`` plus ``secret``."""
        return await self._request("POST", "/apps", {"name": name, **_settings_body(settings)})

    async def list_apps(self) -> list[JSON]:
        """Every application, as ``app_json``."""
        return list((await self._request("GET", "/apps"))["apps"])

    async def show_app(self, app_id: str) -> JSON:
        """One application, as ``app_json``."""
        return await self._request("GET", f"/apps/{_segment(app_id)}")

    async def update_app(self, app_id: str, settings: AppSettings) -> JSON:
        """Change settings (None fields keep their value); the new ``app_json``."""
        return await self._request("PATCH", f"/apps/{_segment(app_id)}", _settings_body(settings))

    async def rotate_secret(self, app_id: str) -> JSON:
        """``{"app_id", "secret"}`` with the new secret."""
        return await self._request("POST", f"/apps/{_segment(app_id)}/rotate-secret")

    async def delete_app(self, app_id: str) -> JSON:
        """``{"deleted", "sessions_closed"}``."""
        return await self._request("DELETE", f"/apps/{_segment(app_id)}")

    async def provision(self, app_id: str, device_id: str, tags: tuple[str, ...]) -> JSON:
        """Issue a device key: ``device_json`` plus ``key``."""
        path = f"/apps/{_segment(app_id)}/devices/{_segment(device_id)}"
        return await self._request("POST", path, {"tags": list(tags)})

    async def list_devices(self, app_id: str) -> list[JSON]:
        """Provisioned devices, as ``device_json``."""
        return list((await self._request("GET", f"/apps/{_segment(app_id)}/devices"))["devices"])

    async def revoke(self, app_id: str, device_id: str) -> JSON:
        """``{"revoked": device_id}``; the server also closes the device's session."""
        path = f"/apps/{_segment(app_id)}/devices/{_segment(device_id)}"
        return await self._request("DELETE", path)


class LocalBackend:
    """The store in a data directory, through the server's own :class:`AppService`."""

    def __init__(self, apps: AppService) -> None:
        from backchannel.frontdoors.admin import app_json, device_json

        self._apps = apps
        self._app_json = app_json
        self._device_json = device_json

    async def create_app(self, name: str, settings: AppSettings) -> JSON:
        """Create an application: ``app_json`` plus ``secret``."""
        try:
            app, secret = await self._apps.create(name, settings)
        except InvalidInput as exc:
            raise BackendError(str(exc), error="invalid_field") from None
        return {**self._app_json(app), "secret": secret}

    async def list_apps(self) -> list[JSON]:
        """Every application, as ``app_json``."""
        return [self._app_json(a) for a in await self._apps.list_apps()]

    async def show_app(self, app_id: str) -> JSON:
        """One application, as ``app_json``."""
        try:
            return self._app_json(await self._apps.require(app_id))
        except NotFound as exc:
            raise BackendError(str(exc), error="unknown_app") from None

    async def update_app(self, app_id: str, settings: AppSettings) -> JSON:
        """Change settings (None fields keep their value); the new ``app_json``."""
        try:
            return self._app_json(await self._apps.update(app_id, settings))
        except NotFound as exc:
            raise BackendError(str(exc), error="unknown_app") from None
        except InvalidInput as exc:
            raise BackendError(str(exc), error="invalid_field") from None

    async def rotate_secret(self, app_id: str) -> JSON:
        """``{"app_id", "secret"}`` with the new secret."""
        try:
            secret = await self._apps.rotate_secret(app_id)
        except NotFound as exc:
            raise BackendError(str(exc), error="unknown_app") from None
        return {"app_id": app_id, "secret": secret}

    async def delete_app(self, app_id: str) -> JSON:
        """``{"deleted", "sessions_closed": 0}``: a local change cannot reach live sessions."""
        if not await self._apps.delete(app_id):
            raise BackendError(f"application {app_id} does not exist", error="unknown_app")
        return {"deleted": app_id, "sessions_closed": 0}

    async def provision(self, app_id: str, device_id: str, tags: tuple[str, ...]) -> JSON:
        """Issue a device key: ``device_json`` plus ``key``."""
        try:
            cred, key = await self._apps.provision(app_id, device_id, tags)
        except NotFound as exc:
            raise BackendError(str(exc), error="unknown_app") from None
        except InvalidInput as exc:
            raise BackendError(str(exc), error="invalid_device_id") from None
        return {**self._device_json(cred, False), "key": key}

    async def list_devices(self, app_id: str) -> list[JSON]:
        """Provisioned devices, as ``device_json`` with ``online`` None (unknown offline)."""
        try:
            creds = await self._apps.credentials(app_id)
        except NotFound as exc:
            raise BackendError(str(exc), error="unknown_app") from None
        # Presence lives in the running server, not in the store.
        return [{**self._device_json(c, False), "online": None} for c in creds]

    async def revoke(self, app_id: str, device_id: str) -> JSON:
        """``{"revoked": device_id}``; a connected device stays connected until it reconnects."""
        if not await self._apps.revoke(app_id, device_id):
            raise BackendError(f"device {device_id} is not provisioned", error="unknown_device")
        return {"revoked": device_id}


@asynccontextmanager
async def open_backend(target: Target, *, create: bool = False) -> AsyncIterator[AdminBackend]:
    """Open the backend ``target`` names, and close it afterwards.

    Args:
        target: the ``--server``/``--admin-token``/``--data-dir`` choice.
        create: whether a missing data directory may be created (only ``apps create``), so a
            mistyped ``--data-dir`` does not silently show an empty, new database.

    Raises:
        BackendError: the backend cannot be opened.
    """
    if target.server:
        if not target.admin_token:
            raise BackendError(
                "--server needs the admin token: pass --admin-token or set BACKCHANNEL_ADMIN_TOKEN"
            )
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            yield RemoteBackend(session, target.server, target.admin_token)
        return

    if not create and not target.data_dir.is_dir():
        raise BackendError(
            f"data directory {target.data_dir} does not exist: pass --data-dir (or "
            "BACKCHANNEL_DATA_DIR), or --server to manage a running server"
        )
    from pydantic import ValidationError

    from backchannel.app import make_store
    from backchannel.config import load_config
    from backchannel.core.clock import SystemClock

    try:
        config = load_config(data_dir=target.data_dir)
    except ValidationError as exc:
        raise BackendError(f"invalid configuration in BACKCHANNEL_* variables: {exc}") from None
    if config.store == "memory":
        raise BackendError(
            "the memory store keeps nothing on disk; manage that server with --server"
        )
    store = make_store(config)
    try:
        await store.open()
    except (OSError, sqlite3.Error, StoreError) as exc:
        raise BackendError(f"cannot open the store in {target.data_dir}: {exc}") from None
    try:
        yield LocalBackend(AppService(store, SystemClock()))
    finally:
        await store.close()
