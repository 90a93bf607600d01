"""The application API, in the shape of Cometa's hosted API (COMPAT.md, application side).

Routes under ``/v1/applications/{app_id}``; ``Authorization: OAuth <app secret>`` (Cometa's
scheme) or ``Bearer <app secret | admin token>``.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from backchannel.core.apps import AppService
from backchannel.core.credentials import valid_device_id
from backchannel.core.messages import (
    KeyInProgress,
    KeyReused,
    Messages,
    MessageTooLarge,
    QueueFull,
    message_view,
)
from backchannel.core.outcomes import CallFailed, call_failure
from backchannel.core.relay import Relay
from backchannel.core.timeouts import parse_timeout, resolve_timeout
from backchannel.frontdoors.errors import ApiError, json_error, json_response, outcome_response
from backchannel.state.store import REPLIED, AppRecord, Message

TIMEOUT_HEADER = "X-Backchannel-Timeout"
MESSAGE_HEADER = "X-Backchannel-Message-Id"
REPLAYED_HEADER = "Idempotent-Replayed"
_OK = b'{"msg":"200 OK"}'
_OFFLINE_MODES = ("fail", "wait", "queue")
_KEY_MAX = 255


def _seconds(request: web.Request, name: str, limit: float) -> float | None:
    """A positive number of seconds from the query, at most ``limit``, or None when absent."""
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        value = parse_timeout(raw)
    except ValueError as exc:
        raise ApiError(400, f"invalid_{name}", str(exc).replace("timeout", name)) from None
    if value > limit:
        raise ApiError(400, f"invalid_{name}", f"{name} is at most {limit:g} s, got {raw}")
    return value


def idempotency_key(request: web.Request) -> str | None:
    """The ``Idempotency-Key`` header: 1 to 255 printable ASCII characters.

    Raises:
        ApiError: 400 for an empty, too long or non-printable key.
    """
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 0 < len(key) <= _KEY_MAX or not (key.isascii() and key.isprintable()):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1 to {_KEY_MAX} printable ASCII characters",
        )
    return key


def credential(request: web.Request) -> str:
    """The token of an ``OAuth``/``Bearer`` Authorization header.

    Raises:
        ApiError: 401 when the header is missing or of another scheme.
    """
    header = request.headers.get("Authorization")
    if not header:
        raise ApiError(
            401,
            "unauthorized",
            "missing Authorization header: use 'OAuth <app secret>' or 'Bearer <token>'",
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() not in ("oauth", "bearer") or not token.strip():
        raise ApiError(
            401, "unauthorized", "Authorization must be 'OAuth <secret>' or 'Bearer <token>'"
        )
    return token.strip()


class AppApi:
    """Send, presence, list, detach and app info."""

    def __init__(
        self,
        relay: Relay,
        apps: AppService,
        default_timeout: float,
        max_timeout: float,
        messages: Messages,
    ) -> None:
        self._relay = relay
        self._apps = apps
        self._messages = messages
        self._default_timeout = default_timeout
        self._max_timeout = max_timeout
        #: Open app WebSockets of an application, for ``stats.websockets`` (set at wiring).
        self.websocket_total: Callable[[str], int] | None = None

    def add_routes(self, app: web.Application) -> None:
        """Mount the routes."""
        base = "/v1/applications/{app_id}"
        app.router.add_post(base + "/devices/{device_id}/send", self.send)
        app.router.add_get(base + "/devices/{device_id}", self.presence)
        app.router.add_delete(base + "/devices/{device_id}", self.detach)
        app.router.add_get(base + "/devices", self.devices)
        app.router.add_get(base, self.info)

    async def authorize(self, request: web.Request) -> AppRecord:
        """The application named in the path, if the credential grants access to it.

        A wrong secret and an unknown application look the same (403), so a caller cannot
        probe which application ids exist; the admin token reaches every application.
        """
        app_id = request.match_info["app_id"]
        token = credential(request)
        app = await self._apps.authenticate(app_id, token)
        if app is not None:
            return app
        if self._apps.is_admin(token):
            app = await self._apps.get(app_id)
            if app is not None:
                return app
            raise ApiError(404, "unknown_app", f"application {app_id} does not exist")
        raise ApiError(403, "forbidden", "the credential does not grant access to this application")

    async def send(self, request: web.Request) -> web.Response:
        """Relay the raw body to the device; answer with its raw reply.

        ``?offline=`` chooses what happens when the device is not connected: ``fail`` (418 at
        once, the default), ``wait`` (up to ``?wait=`` seconds for it to connect) or
        ``queue`` (202 and a message id; delivered when it connects, within ``?ttl=``).
        """
        app = await self.authorize(request)
        raw_timeout = request.query.get("timeout")
        try:
            requested = parse_timeout(raw_timeout) if raw_timeout is not None else None
        except ValueError as exc:
            raise ApiError(400, "invalid_timeout", str(exc)) from None
        timeout = self.call_timeout(app, requested)
        headers = {TIMEOUT_HEADER: f"{timeout:g}"}
        method = request.query.get("method", "")
        if len(method.encode()) > 255:
            raise ApiError(400, "invalid_method", "method names are at most 255 bytes")
        offline = request.query.get("offline", "fail")
        if offline not in _OFFLINE_MODES:
            raise ApiError(
                400, "invalid_offline", f"offline must be one of fail, wait, queue; got {offline!r}"
            )
        key = idempotency_key(request)
        device_id = request.match_info["device_id"]
        if (offline == "queue" or key is not None) and not valid_device_id(device_id):
            raise ApiError(400, "invalid_device_id", f"{device_id!r} is not a valid device id")
        if offline == "queue":
            ttl = _seconds(request, "ttl", self._messages.settings.max_ttl)
            if not await self._apps.can_connect(app, device_id):
                # It would wait for nothing, and fill the disk for whoever sends it.
                raise ApiError(
                    404,
                    "unknown_device",
                    f"device {device_id} is not provisioned, and the application does not let "
                    "devices connect without a key: a queued message could never be delivered",
                )
            body = await request.read()
            return await self._enqueue(app, device_id, body, method, timeout, ttl, key)
        if offline == "wait":
            wait = _seconds(request, "wait", self._max_timeout)
            body = await request.read()
            # Not online by then: the call below fails as offline, which is the answer.
            await self._relay.wait_online(app.app_id, device_id, timeout if wait is None else wait)
        else:
            body = await request.read()
        if key is not None:
            return await self._call_once(app, device_id, body, method, timeout, key, headers)
        try:
            reply = await self._relay.call(app.app_id, device_id, body, method, timeout)
        except CallFailed as exc:
            return outcome_response(exc, headers)
        return web.Response(body=reply, content_type="application/octet-stream", headers=headers)

    async def _enqueue(
        self,
        app: AppRecord,
        device_id: str,
        body: bytes,
        method: str,
        timeout: float,
        ttl: float | None,
        key: str | None,
    ) -> web.Response:
        try:
            message, created = await self._messages.enqueue(
                app.app_id, device_id, body, method, timeout, ttl, key
            )
        except QueueFull as exc:
            raise ApiError(429, exc.code, str(exc)) from None
        except KeyReused as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        except MessageTooLarge as exc:
            raise ApiError(413, exc.code, str(exc), limit=exc.limit) from None
        headers = {
            "Location": f"/v1/applications/{app.app_id}/messages/{message.id}",
            MESSAGE_HEADER: message.id,
        }
        if not created:
            headers[REPLAYED_HEADER] = "true"
        return json_response(message_view(message), 202, headers)

    async def _call_once(
        self,
        app: AppRecord,
        device_id: str,
        body: bytes,
        method: str,
        timeout: float,
        key: str,
        headers: dict[str, str],
    ) -> web.Response:
        try:
            message, ran = await self._messages.call_once(
                app.app_id, device_id, body, method, timeout, key
            )
        except CallFailed as exc:
            return outcome_response(exc, headers)
        except KeyReused as exc:
            raise ApiError(422, exc.code, str(exc)) from None
        except KeyInProgress as exc:
            return json_error(409, exc.code, str(exc), {"Retry-After": "1"})
        headers = {**headers, MESSAGE_HEADER: message.id}
        if not ran:
            headers[REPLAYED_HEADER] = "true"
        return recorded_response(message, headers)

    def call_timeout(self, app: AppRecord, requested: float | None = None) -> float:
        """The timeout in force for a call: requested, else the app's, else the server's; capped."""
        return resolve_timeout(
            requested, app.default_timeout, self._default_timeout, self._max_timeout
        )

    async def presence(self, request: web.Request) -> web.Response:
        """The presence object of a connected device, else 418."""
        app = await self.authorize(request)
        device_id = request.match_info["device_id"]
        info = await self._relay.presence(app.app_id, device_id)
        if info is None:
            return _not_attached(device_id)
        return json_response(info)

    async def detach(self, request: web.Request) -> web.Response:
        """Close the device's connection."""
        app = await self.authorize(request)
        device_id = request.match_info["device_id"]
        if not await self._relay.detach(app.app_id, device_id):
            return _not_attached(device_id)
        return web.Response(body=_OK, content_type="application/json")

    async def devices(self, request: web.Request) -> web.Response:
        """The ids of the application's connected devices."""
        app = await self.authorize(request)
        ids = await self._relay.devices(app.app_id)
        return json_response({"num_devices": len(ids), "devices": ids})

    async def info(self, request: web.Request) -> web.Response:
        """Application name and traffic counters."""
        app = await self.authorize(request)
        ids = await self._relay.devices(app.app_id)
        total = self.websocket_total(app.app_id) if self.websocket_total else 0
        stats = self._relay.app_stats(app.app_id).as_cometa(len(ids), total)
        return json_response({"app_id": app.app_id, "app_name": app.name, "stats": stats})


def recorded_response(message: Message, headers: dict[str, str]) -> web.Response:
    """The HTTP answer of a recorded call: its reply, or its error as first answered."""
    if message.state == REPLIED:
        return web.Response(
            body=message.reply or b"", content_type="application/octet-stream", headers=headers
        )
    failure = call_failure(message.error or "", message.detail or "", message.timeout)
    return outcome_response(failure, headers)


def _not_attached(device_id: str) -> web.Response:
    return json_error(418, "device_offline", f"device {device_id} is not connected")
