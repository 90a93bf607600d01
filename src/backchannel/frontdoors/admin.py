"""The admin API under ``/admin/v1``: applications and device credentials.

Authorized by ``Authorization: Bearer <admin token>``. The CLI's ``--server`` mode uses it.
Secrets and keys appear in a response exactly once: when they are created.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from backchannel.core.apps import AppService, AppSettings, InvalidInput, NotFound
from backchannel.core.relay import Relay
from backchannel.core.session import CloseReason
from backchannel.core.tunnel_names import TunnelNames
from backchannel.core.tunnels import TunnelRegistry
from backchannel.frontdoors.app_api import credential
from backchannel.frontdoors.errors import ApiError, json_response, read_json
from backchannel.state.store import AppRecord, DeviceCredential

PREFIX = "/admin/v1"


def app_json(app: AppRecord) -> dict[str, Any]:
    """The public view of an application (never its secret hash)."""
    return {
        "app_id": app.app_id,
        "name": app.name,
        "webhook_url": app.webhook_url,
        "webhook_kinds": list(app.webhook_kinds),
        "default_timeout": app.default_timeout,
        "allow_open_attach": app.allow_open_attach,
        "allowed_devices": list(app.allowed_devices),
        "created_at": app.created_at,
    }


def device_json(cred: DeviceCredential, online: bool) -> dict[str, Any]:
    """The public view of a provisioned device (never its key hash)."""
    return {
        "app_id": cred.app_id,
        "device_id": cred.device_id,
        "tags": list(cred.tags),
        "created_at": cred.created_at,
        "online": online,
    }


def _settings(body: dict[str, Any]) -> AppSettings:
    """Validate the types of the settings fields of a request body."""
    known = {
        "name",
        "webhook_url",
        "webhook_kinds",
        "default_timeout",
        "allow_open_attach",
        "allowed_devices",
    }
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, "invalid_field", f"unknown field(s): {', '.join(unknown)}")
    url = body.get("webhook_url")
    if url is not None and not isinstance(url, str):
        raise ApiError(400, "invalid_field", "webhook_url must be a string")
    timeout = body.get("default_timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
        raise ApiError(400, "invalid_field", "default_timeout must be a number of seconds")
    open_attach = body.get("allow_open_attach")
    if open_attach is not None and not isinstance(open_attach, bool):
        raise ApiError(400, "invalid_field", "allow_open_attach must be true or false")
    allowed = body.get("allowed_devices")
    if allowed is not None and (
        not isinstance(allowed, list) or not all(isinstance(d, str) for d in allowed)
    ):
        raise ApiError(400, "invalid_field", "allowed_devices must be a list of device ids")
    kinds = body.get("webhook_kinds")
    if kinds is not None and (
        not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds)
    ):
        raise ApiError(400, "invalid_field", "webhook_kinds must be a list of kinds")
    # An explicit null resets a field to its default; an absent field keeps its value.
    clear = tuple(
        k
        for k in (
            "webhook_url",
            "webhook_kinds",
            "default_timeout",
            "allowed_devices",
            "allow_open_attach",
        )
        if k in body and body[k] is None
    )
    return AppSettings(
        clear=clear,
        webhook_url=url,
        webhook_kinds=tuple(kinds) if kinds is not None else None,
        default_timeout=float(timeout) if timeout is not None else None,
        allow_open_attach=open_attach,
        allowed_devices=tuple(allowed) if allowed is not None else None,
    )


class AdminApi:
    """Create, inspect, change and delete applications and device credentials."""

    def __init__(
        self,
        relay: Relay,
        apps: AppService,
        tunnels: TunnelRegistry | None = None,
        names: TunnelNames | None = None,
    ) -> None:
        self._relay = relay
        self._apps = apps
        self._tunnels = tunnels
        self._names = names

    def add_routes(self, app: web.Application) -> None:
        """Mount the routes."""
        r = app.router
        r.add_get(PREFIX + "/apps", self.list_apps)
        r.add_post(PREFIX + "/apps", self.create_app)
        r.add_get(PREFIX + "/apps/{app_id}", self.show_app)
        r.add_patch(PREFIX + "/apps/{app_id}", self.update_app)
        r.add_delete(PREFIX + "/apps/{app_id}", self.delete_app)
        r.add_post(PREFIX + "/apps/{app_id}/rotate-secret", self.rotate_secret)
        r.add_get(PREFIX + "/apps/{app_id}/devices", self.list_devices)
        r.add_post(PREFIX + "/apps/{app_id}/devices/{device_id}", self.provision)
        r.add_delete(PREFIX + "/apps/{app_id}/devices/{device_id}", self.revoke)
        r.add_get(PREFIX + "/tunnels", self.list_tunnels)
        r.add_delete(PREFIX + "/tunnels/{name}", self.release_tunnel)

    def _require_admin(self, request: web.Request) -> None:
        if not self._apps.is_admin(credential(request)):
            raise ApiError(403, "forbidden", "the admin API needs the admin token")

    async def list_apps(self, request: web.Request) -> web.Response:
        """All applications."""
        self._require_admin(request)
        return json_response({"apps": [app_json(a) for a in await self._apps.list_apps()]})

    async def create_app(self, request: web.Request) -> web.Response:
        """Create an application; the answer holds its secret, shown only this once."""
        self._require_admin(request)
        body = await read_json(request)
        name = body.get("name")
        if not isinstance(name, str):
            raise ApiError(400, "invalid_field", "name is required and must be a string")
        try:
            app, secret = await self._apps.create(name, _settings(body))
        except InvalidInput as exc:
            raise ApiError(400, "invalid_field", str(exc)) from None
        return json_response({**app_json(app), "secret": secret}, status=201)

    async def show_app(self, request: web.Request) -> web.Response:
        """One application."""
        self._require_admin(request)
        return json_response(app_json(await self._app(request)))

    async def update_app(self, request: web.Request) -> web.Response:
        """Change webhook, default timeout or open-attach settings."""
        self._require_admin(request)
        body = await read_json(request)
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "invalid_field", "name must be a string")
        settings = dataclasses.replace(_settings(body), name=name)
        try:
            app = await self._apps.update(request.match_info["app_id"], settings)
        except NotFound as exc:
            raise ApiError(404, "unknown_app", str(exc)) from None
        except InvalidInput as exc:
            raise ApiError(400, "invalid_field", str(exc)) from None
        return json_response(app_json(app))

    async def delete_app(self, request: web.Request) -> web.Response:
        """Delete an application, its credentials, and close its devices' sessions."""
        self._require_admin(request)
        app_id = request.match_info["app_id"]
        if not await self._apps.delete(app_id):
            raise ApiError(404, "unknown_app", f"application {app_id} does not exist")
        closed = await self._relay.detach_app(app_id, CloseReason.REVOKED)
        return json_response({"deleted": app_id, "sessions_closed": closed})

    async def rotate_secret(self, request: web.Request) -> web.Response:
        """Replace the application's secret; the answer holds the new one."""
        self._require_admin(request)
        app_id = request.match_info["app_id"]
        try:
            secret = await self._apps.rotate_secret(app_id)
        except NotFound as exc:
            raise ApiError(404, "unknown_app", str(exc)) from None
        return json_response({"app_id": app_id, "secret": secret})

    async def list_devices(self, request: web.Request) -> web.Response:
        """Provisioned devices, with whether each is online."""
        self._require_admin(request)
        app_id = request.match_info["app_id"]
        try:
            creds = await self._apps.credentials(app_id)
        except NotFound as exc:
            raise ApiError(404, "unknown_app", str(exc)) from None
        online = set(await self._relay.devices(app_id))
        return json_response({"devices": [device_json(c, c.device_id in online) for c in creds]})

    async def provision(self, request: web.Request) -> web.Response:
        """Issue (or re-issue) a device key; the answer holds the key, shown only this once."""
        self._require_admin(request)
        body = await read_json(request)
        tags = body.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ApiError(400, "invalid_field", "tags must be a list of strings")
        app_id, device_id = request.match_info["app_id"], request.match_info["device_id"]
        try:
            cred, key = await self._apps.provision(app_id, device_id, tuple(tags))
        except NotFound as exc:
            raise ApiError(404, "unknown_app", str(exc)) from None
        except InvalidInput as exc:
            raise ApiError(400, "invalid_device_id", str(exc)) from None
        # A session opened with the old key (or with none, under open attach) must not
        # outlive it: the new key is now the only way in.
        await self._relay.detach(app_id, device_id, CloseReason.REVOKED)
        return json_response({**device_json(cred, False), "key": key}, status=201)

    async def revoke(self, request: web.Request) -> web.Response:
        """Delete a device key and close the device's session."""
        self._require_admin(request)
        app_id, device_id = request.match_info["app_id"], request.match_info["device_id"]
        try:
            revoked = await self._apps.revoke(app_id, device_id)
        except NotFound as exc:
            raise ApiError(404, "unknown_app", str(exc)) from None
        if not revoked:
            raise ApiError(404, "unknown_device", f"device {device_id} is not provisioned")
        await self._relay.detach(app_id, device_id, CloseReason.REVOKED)
        return json_response({"revoked": device_id})

    async def list_tunnels(self, request: web.Request) -> web.Response:
        """The tunnels connected to this node (native and Socket2me)."""
        self._require_admin(request)
        clients = self._tunnels.clients() if self._tunnels is not None else []
        return json_response({"tunnels": [c.describe() for c in clients]})

    async def release_tunnel(self, request: web.Request) -> web.Response:
        """Free a native tunnel name (and close its tunnel) so another device may take it."""
        self._require_admin(request)
        name = request.match_info["name"]
        record = await self._names.by_name(name) if self._names is not None else None
        if record is None or self._names is None:
            raise ApiError(404, "unknown_tunnel", f"no tunnel is named {name!r}")
        if self._tunnels is not None:
            self._tunnels.drop(record.token_hash, "the tunnel's name was released")
        await self._names.release(name)
        return json_response({"released": name})

    async def _app(self, request: web.Request) -> AppRecord:
        try:
            return await self._apps.require(request.match_info["app_id"])
        except NotFound as exc:
            raise ApiError(404, "unknown_app", str(exc)) from None
