"""Message status: ``GET .../messages/{id}``, a device's messages, and cancelling one.

Messages are made by ``POST .../devices/{id}/send`` with ``?offline=queue`` or an
``Idempotency-Key`` (frontdoors/app_api.py); this door only reads and cancels them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from backchannel.core.messages import Messages, message_view
from backchannel.frontdoors.errors import ApiError, json_response
from backchannel.state.store import DELIVERED, EXPIRED, FAILED, QUEUED, REPLIED, SENT

if TYPE_CHECKING:
    from backchannel.frontdoors.app_api import AppApi

STATES = (QUEUED, SENT, REPLIED, FAILED, DELIVERED, EXPIRED)
_LIST_MAX = 1000


class MessageApi:
    """Read and cancel messages of an application."""

    def __init__(self, messages: Messages, api: AppApi) -> None:
        self._messages = messages
        self._api = api

    def add_routes(self, app: web.Application) -> None:
        """Mount the routes."""
        base = "/v1/applications/{app_id}"
        app.router.add_get(base + "/messages/{message_id}", self.get)
        app.router.add_delete(base + "/messages/{message_id}", self.cancel)
        app.router.add_get(base + "/devices/{device_id}/messages", self.list)
        app.router.add_get(base + "/messages", self.list)

    async def get(self, request: web.Request) -> web.Response:
        """One message: its state, and its reply once replied."""
        app = await self._api.authorize(request)
        message_id = request.match_info["message_id"]
        message = await self._messages.get(app.app_id, message_id)
        if message is None:
            raise ApiError(404, "unknown_message", f"no message {message_id} in this application")
        return json_response(message_view(message))

    async def cancel(self, request: web.Request) -> web.Response:
        """Take a queued message out of the queue (it ends ``failed`` with ``cancelled``)."""
        app = await self._api.authorize(request)
        message_id = request.match_info["message_id"]
        message = await self._messages.cancel(app.app_id, message_id)
        if message is None:
            raise ApiError(404, "unknown_message", f"no message {message_id} in this application")
        if message.error != "cancelled":
            raise ApiError(
                409,
                "not_queued",
                f"message {message_id} is {message.state}; only queued messages can be cancelled",
                state=message.state,
            )
        return json_response(message_view(message))

    async def list(self, request: web.Request) -> web.Response:
        """Messages of a device, or of the whole app, oldest first, one page at a time.

        ``?state=`` (repeatable), ``?limit=``, and ``?after=`` (the ``next`` of the previous
        page).
        """
        app = await self._api.authorize(request)
        states = request.query.getall("state", [])
        for state in states:
            if state not in STATES:
                raise ApiError(
                    400, "invalid_state", f"state must be one of {', '.join(STATES)}; got {state!r}"
                )
        raw = request.query.get("limit", "100")
        if not raw.isdigit() or not 0 < int(raw) <= _LIST_MAX:
            raise ApiError(400, "invalid_limit", f"limit must be 1 to {_LIST_MAX}, got {raw!r}")
        after = request.query.get("after", "0")
        if not after.isdigit() or len(after) > 18:
            raise ApiError(400, "invalid_after", f"after must be a page cursor, got {after!r}")
        device_id = request.match_info.get("device_id")
        limit = int(raw)
        messages = await self._messages.list(app.app_id, device_id, states, limit, int(after))
        body: dict[str, object] = {
            "messages": [message_view(m) for m in messages],
            # The cursor of the next page; null once this one is the last.
            "next": str(messages[-1].seq) if len(messages) == limit else None,
        }
        if device_id is not None:
            body = {
                "device_id": device_id,
                "queued": self._messages.queued(app.app_id, device_id),
                **body,
            }
        return json_response(body)
