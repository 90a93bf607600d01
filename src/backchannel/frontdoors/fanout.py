"""Fan-out calls: ``POST /v1/applications/{app_id}/fanout`` (docs/api.md, "Fan-out").

One JSON request names the targets (``devices``, ``tag`` or ``topic``) and the message;
the answer holds every device's outcome, in target order, after one shared deadline. The
request is checked completely before any device is called, so a 400 means nothing was sent.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from backchannel.core.fanout import DeviceOutcome, Fanout, Status, TooManyDevices
from backchannel.core.messages import Messages, MessageTooLarge, QueueFull
from backchannel.core.timeouts import parse_timeout
from backchannel.frontdoors.app_api import TIMEOUT_HEADER, AppApi
from backchannel.frontdoors.errors import (
    MAX_BODY,
    ApiError,
    check_broadcast,
    json_response,
    read_json,
)

_TARGETS = ("devices", "tag", "topic")
_MESSAGES = ("message", "message_base64")
_FIELDS = frozenset((*_TARGETS, *_MESSAGES, "method", "timeout", "offline", "ttl"))
MAX_METHOD = 255  # bytes of UTF-8, as for send's ?method=


@dataclass(frozen=True, slots=True)
class FanoutRequest:
    """A checked request body: exactly one target, the message bytes, method and timeout."""

    target: str
    value: str | list[str]
    body: bytes
    method: str
    timeout: float | None
    #: Queue the message for the devices found offline (``"offline": "queue"``).
    queue: bool = False
    ttl: float | None = None


def parse_request(data: dict[str, Any]) -> FanoutRequest:
    """Check a request body field by field.

    Raises:
        ApiError: 400 naming the first problem found.
    """
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ApiError(
            400,
            "invalid_field",
            f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_FIELDS))}",
        )
    targets = [name for name in _TARGETS if name in data]
    if len(targets) != 1:
        raise ApiError(
            400,
            "invalid_target",
            "give exactly one of 'devices', 'tag' or 'topic'"
            + (f" (got {', '.join(targets)})" if targets else ""),
        )
    target = targets[0]
    value = data[target]
    if target == "devices":
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            raise ApiError(400, "invalid_target", "'devices' must be a list of device id strings")
    elif not isinstance(value, str) or not value:
        raise ApiError(400, "invalid_target", f"{target!r} must be a non-empty string")
    offline = data.get("offline", "report")
    if offline not in ("report", "queue"):
        raise ApiError(400, "invalid_offline", "'offline' must be 'report' or 'queue'")
    ttl = _seconds(data, "ttl")
    if ttl is not None and offline != "queue":
        raise ApiError(400, "invalid_ttl", '\'ttl\' goes with "offline": "queue"')
    return FanoutRequest(
        target,
        value,
        _message(data),
        _method(data),
        _seconds(data, "timeout"),
        queue=offline == "queue",
        ttl=ttl,
    )


def _message(data: dict[str, Any]) -> bytes:
    forms = [name for name in _MESSAGES if name in data]
    if len(forms) != 1:
        raise ApiError(
            400, "invalid_message", "give exactly one of 'message' (text) or 'message_base64'"
        )
    value = data[forms[0]]
    if not isinstance(value, str):
        raise ApiError(400, "invalid_message", f"{forms[0]!r} must be a string")
    if forms[0] == "message":
        return value.encode()
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_message", "'message_base64' is not valid base64") from None


def _method(data: dict[str, Any]) -> str:
    method = data.get("method", "")
    if not isinstance(method, str):
        raise ApiError(400, "invalid_method", "'method' must be a string")
    if len(method.encode()) > MAX_METHOD:
        raise ApiError(400, "invalid_method", f"method names are at most {MAX_METHOD} bytes")
    return method


def _seconds(data: dict[str, Any], name: str) -> float | None:
    raw = data.get(name)
    if raw is None:
        return None
    # bool is an int in Python, but `true` is no number of seconds.
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ApiError(400, f"invalid_{name}", f"'{name}' must be a number of seconds")
    try:
        return parse_timeout(str(raw))
    except ValueError as exc:
        raise ApiError(400, f"invalid_{name}", str(exc).replace("timeout", name)) from None


def outcome_json(outcome: DeviceOutcome) -> dict[str, Any]:
    """One device's entry in ``results``."""
    item: dict[str, Any] = {
        "device": outcome.device_id,
        "status": outcome.status.value,
        "ms": round(outcome.ms, 3),
    }
    if outcome.message_id is not None:
        item["message_id"] = outcome.message_id
    elif outcome.reply is not None:
        try:
            item["reply"] = outcome.reply.decode()
        except UnicodeDecodeError:
            item["reply_base64"] = base64.b64encode(outcome.reply).decode("ascii")
    else:
        item["error"] = outcome.error
        item["detail"] = outcome.detail
    return item


_NEVER = "not provisioned, and the application lets no device connect without a key: not queued"


def _count(outcomes: list[DeviceOutcome], status: Status) -> int:
    return sum(1 for o in outcomes if o.status is status)


class FanoutApi:
    """The fan-out route, authorized like every app route."""

    def __init__(
        self, fanout: Fanout, api: AppApi, messages: Messages, max_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self._fanout = fanout
        self._api = api
        self._messages = messages
        self._max_bytes = max_bytes

    def add_routes(self, app: web.Application) -> None:
        """Mount the route."""
        app.router.add_post("/v1/applications/{app_id}/fanout", self.fanout)

    async def fanout(self, request: web.Request) -> web.Response:
        """Call every target device with the message; answer with each outcome."""
        app = await self._api.authorize(request)
        parsed = parse_request(await read_json(request, request.app[MAX_BODY]))
        device_ids = await self._targets(app.app_id, parsed)
        try:
            self._fanout.check_size(len(device_ids))
        except TooManyDevices as exc:
            raise ApiError(400, "too_many_devices", str(exc), limit=exc.limit) from None
        # Each connected target gets its own copy of the frame, in memory until it is sent.
        connected = sum(1 for d in device_ids if self._fanout.connected(app.app_id, d))
        check_broadcast(len(parsed.body), connected, self._max_bytes)
        timeout = self._api.call_timeout(app, parsed.timeout)
        limit = self._messages.settings.max_ttl
        if parsed.queue and parsed.ttl is not None and parsed.ttl > limit:
            raise ApiError(400, "invalid_ttl", f"ttl is at most {limit:g} s")
        if parsed.queue:
            try:
                self._messages.check_body(len(parsed.body))
            except MessageTooLarge as exc:
                raise ApiError(413, exc.code, str(exc), limit=exc.limit) from None
        report = await self._fanout.run(app.app_id, device_ids, parsed.body, parsed.method, timeout)
        outcomes = report.outcomes
        if parsed.queue:
            outcomes = await self._queue_offline(app.app_id, outcomes, parsed, timeout)
        body = {
            "timeout": timeout,
            "total": len(outcomes),
            "replied": _count(outcomes, Status.REPLIED),
            "offline": _count(outcomes, Status.OFFLINE),
            "queued": _count(outcomes, Status.QUEUED),
            "timed_out": _count(outcomes, Status.TIMEOUT),
            "failed": _count(outcomes, Status.ERROR),
            "results": [outcome_json(o) for o in outcomes],
        }
        return json_response(body, headers={TIMEOUT_HEADER: f"{timeout:g}"})

    async def _queue_offline(
        self,
        app_id: str,
        outcomes: list[DeviceOutcome],
        parsed: FanoutRequest,
        timeout: float,
    ) -> list[DeviceOutcome]:
        """Offline devices' outcomes become queued messages (or the reason they cannot)."""
        offline = [o.device_id for o in outcomes if o.status is Status.OFFLINE]
        if not offline:
            return outcomes
        # Only devices that can ever connect get a message; one query covers them all.
        reachable = await self._fanout.can_connect(app_id, offline)
        offline = [d for d in offline if d in reachable]
        # One store write for all of them: a fleet-wide command can find thousands offline.
        queued = await self._messages.enqueue_many(
            app_id, offline, parsed.body, parsed.method, timeout, parsed.ttl
        )
        result: list[DeviceOutcome] = []
        for o in outcomes:
            done = queued.get(o.device_id) if o.status is Status.OFFLINE else None
            if o.status is Status.OFFLINE and o.device_id not in reachable:
                o = replace(o, status=Status.ERROR, error="unknown_device", detail=_NEVER)
            elif isinstance(done, QueueFull):
                o = replace(o, status=Status.ERROR, error=done.code, detail=str(done))
            elif done is not None:
                o = replace(o, status=Status.QUEUED, error=None, detail="", message_id=done.id)
            result.append(o)
        return result

    async def _targets(self, app_id: str, parsed: FanoutRequest) -> list[str]:
        if isinstance(parsed.value, list):
            try:
                return self._fanout.unique_devices(parsed.value)
            except ValueError as exc:
                raise ApiError(400, "invalid_device_id", str(exc)) from None
        if parsed.target == "tag":
            return await self._fanout.tagged_devices(app_id, parsed.value)
        try:
            return self._fanout.topic_devices(app_id, parsed.value)
        except ValueError as exc:
            raise ApiError(400, "invalid_topic", str(exc)) from None
