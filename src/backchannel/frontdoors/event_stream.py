"""The event stream: ``GET /v1/applications/{app_id}/events`` (docs/api.md, "Event stream").

Server-Sent Events from the :class:`~backchannel.core.events.EventLog`. Each event goes out
as::

    id: 42
    event: temperature
    data: {"id":42,"device_id":"s1","type":"temperature","ts":1795443003.5,"data":"21.5",...}

``data`` is the event's bytes as text when they are valid UTF-8, else null and ``data_b64``
holds them in base64; exactly one of the two is a string, so binary data is never lost.

**Resume.** ``Last-Event-ID`` (or ``?last_event_id=``) replays the stored events after that
id, then continues live. The stream subscribes *before* it reads the store, so an event
stored meanwhile is in both, and ids at or below the last one written are skipped: no gap, no
duplicate. A stream opened without an id starts at the newest event and says so at once
with an ``id:`` line and no data, which sets an EventSource's resume point without
dispatching anything, so even a client that reconnects before its first event misses none.

**Slow readers** are dropped by the event log; the stream then ends (or, if a write is stuck
on the client, the connection is cut) and the client resumes with its last id.

``?format=json`` answers one page instead (``after``, ``limit``), for polling clients.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import orjson
from aiohttp import web

from backchannel.core.events import EventLog
from backchannel.frontdoors.app_api import AppApi
from backchannel.frontdoors.errors import ApiError, json_error, json_response
from backchannel.state.store import StoredEvent

log = logging.getLogger(__name__)

HEARTBEAT = 15.0  # seconds between comment lines on an idle stream (proxies cut silence)
RETRY_MS = 2000  # the reconnection delay the stream asks EventSource clients for
PAGE = 500  # events per store read while replaying, and per write
MAX_FILTERS = 100  # values of ?device= and of ?type=
DEFAULT_LIMIT = 100  # events per JSON page
MAX_LIMIT = 1000
MAX_ID = 2**63 - 1  # SQLite's largest integer
_PING = b": ping\n\n"


def event_object(event: StoredEvent) -> dict[str, Any]:
    """The JSON object of one event, in the stream's ``data:`` line and in JSON pages."""
    try:
        text: str | None = event.data.decode()
        b64: str | None = None
    except UnicodeDecodeError:
        text = None
        b64 = base64.b64encode(event.data).decode("ascii")
    return {
        "id": event.id,
        "device_id": event.device_id,
        "type": event.type,
        "ts": event.ts,
        "data": text,
        "data_b64": b64,
    }


def _field(value: str) -> bytes:
    # A field ends at CR or LF: percent-encode those (and % itself, to stay reversible).
    if "\r" in value or "\n" in value or "%" in value:
        value = value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return value.encode()


def sse_frame(event: StoredEvent) -> bytes:
    """One event in Server-Sent Events framing (orjson escapes newlines inside ``data``)."""
    body = orjson.dumps(event_object(event))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event.id, _field(event.type), body)


def _filters(request: web.Request, name: str) -> list[str] | None:
    values = request.query.getall(name, [])
    if len(values) > MAX_FILTERS:
        raise ApiError(400, "too_many_filters", f"at most {MAX_FILTERS} values of ?{name}=")
    return values or None


def _int(raw: str, what: str, low: int, high: int | None = None) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"invalid_{what}", f"{what} must be an integer {bound}")
    return value


class _Writer:
    """Writes to one stream, and cuts the connection if asked while a write is stuck."""

    __slots__ = ("response", "transport", "writing")

    def __init__(self, response: web.StreamResponse, request: web.Request) -> None:
        self.response = response
        self.transport = request.transport
        self.writing = False

    async def write(self, data: bytes) -> None:
        self.writing = True
        try:
            await self.response.write(data)
        finally:
            self.writing = False

    def interrupt(self) -> None:
        # A write waiting on a client that stopped reading would wait forever.
        if self.writing and self.transport is not None:
            self.transport.abort()

    def gone(self) -> bool:
        return self.transport is None or self.transport.is_closing()


class EventStream:
    """The SSE route and its JSON page variant."""

    def __init__(self, events: EventLog, api: AppApi, *, heartbeat: float = HEARTBEAT) -> None:
        self._events = events
        self._api = api
        self.heartbeat = heartbeat

    def add_routes(self, app: web.Application) -> None:
        """Mount the route."""
        app.router.add_get("/v1/applications/{app_id}/events", self.events)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The stream (or, with ``?format=json``, one page)."""
        app = await self._api.authorize(request)
        devices = _filters(request, "device")
        types = _filters(request, "type")
        fmt = request.query.get("format", "sse")
        if fmt == "json":
            return await self._page(request, app.app_id, devices, types)
        if fmt != "sse":
            raise ApiError(400, "invalid_format", "format must be 'sse' (the default) or 'json'")
        raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        after = _int(raw, "last_event_id", 0, MAX_ID) if raw else None
        if not self._events.accepting:
            return json_error(
                503, "shutting_down", "server shutting down", headers={"Retry-After": "1"}
            )
        return await self._stream(request, app.app_id, after, devices, types)

    async def _page(
        self,
        request: web.Request,
        app_id: str,
        devices: list[str] | None,
        types: list[str] | None,
    ) -> web.Response:
        after = _int(request.query.get("after", "0"), "after", 0, MAX_ID)
        limit = _int(request.query.get("limit", str(DEFAULT_LIMIT)), "limit", 1, MAX_LIMIT)
        found = await self._events.read(app_id, after, limit + 1, devices, types)
        more = len(found) > limit
        found = found[:limit]
        return json_response(
            {
                "events": [event_object(e) for e in found],
                "last_id": found[-1].id if found else after,
                "more": more,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def _stream(
        self,
        request: web.Request,
        app_id: str,
        after: int | None,
        devices: list[str] | None,
        types: list[str] | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx: pass each event on at once
            }
        )
        writer = _Writer(response, request)
        # Subscribed first: whatever is stored from here on reaches us live, so the replay
        # below cannot leave a gap; overlaps are dropped by id.
        sub = self._events.subscribe(app_id, devices, types)
        sub.on_close = writer.interrupt
        try:
            await response.prepare(request)
            if after is None:
                after = self._events.last_id
                await writer.write(b"retry: %d\nid: %d\n\n" % (RETRY_MS, after))
            else:
                await writer.write(b"retry: %d\n\n" % RETRY_MS)
            last = after
            while True:
                page = await self._events.read(app_id, last, PAGE, devices, types)
                if page:
                    await writer.write(b"".join(map(sse_frame, page)))
                    last = page[-1].id
                if len(page) < PAGE:
                    break
            loop = asyncio.get_running_loop()
            check_at = loop.time() + self.heartbeat
            while True:
                batch = await sub.get(self.heartbeat)
                if batch and batch[0].id <= last:
                    batch = [e for e in batch if e.id > last]  # already replayed
                if batch:
                    for start in range(0, len(batch), PAGE):
                        await writer.write(b"".join(map(sse_frame, batch[start : start + PAGE])))
                    last = batch[-1].id
                elif sub.closed or writer.gone():
                    break
                elif loop.time() < check_at:
                    continue  # (only a replayed duplicate came)
                else:
                    await writer.write(_PING)
                # Busy or idle, the credential is checked again once per heartbeat.
                if loop.time() >= check_at:
                    if not await self._still_allowed(request):
                        break
                    check_at = loop.time() + self.heartbeat
        except ConnectionError:
            pass  # the client went away (or was cut for reading too slowly)
        finally:
            sub.on_close = None
            self._events.unsubscribe(sub)
        return response

    async def _still_allowed(self, request: web.Request) -> bool:
        # A rotated secret or a deleted application ends the streams opened with it.
        try:
            await self._api.authorize(request)
        except ApiError:
            return False
        return True
