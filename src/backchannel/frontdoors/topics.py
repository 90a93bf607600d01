"""Publish to a topic: ``POST /v1/applications/{app_id}/topics/{topic}`` (docs/api.md, "Topics").

The raw body goes as a PUSH to every device of the application connected now with a
subscription matching the topic; nothing is stored, so a device that is offline misses it.
"""

from __future__ import annotations

from aiohttp import web

from backchannel.core.relay import Relay
from backchannel.core.topics import validate_topic
from backchannel.frontdoors.app_api import AppApi
from backchannel.frontdoors.errors import ApiError, check_broadcast, json_response


class TopicsApi:
    """The publish route."""

    def __init__(self, relay: Relay, api: AppApi, max_bytes: int = 256 * 1024 * 1024) -> None:
        self._relay = relay
        self._api = api
        self._max_bytes = max_bytes

    def add_routes(self, app: web.Application) -> None:
        """Mount the route."""
        # ``.+``: topics have levels separated by '/', so the rest of the path is the topic.
        app.router.add_post("/v1/applications/{app_id}/topics/{topic:.+}", self.publish)

    async def publish(self, request: web.Request) -> web.Response:
        """Push the body to the topic's subscribers; answer how many devices got it."""
        app = await self._api.authorize(request)
        topic = request.match_info["topic"]
        try:
            # Checked before the body is read: a bad topic costs no upload.
            validate_topic(topic)
        except ValueError as exc:
            raise ApiError(400, "invalid_topic", str(exc)) from None
        body = await request.read()

        def admit(subscribers: int) -> None:
            # Every subscriber gets its own copy of the frame, in memory until it is sent.
            check_broadcast(len(body), subscribers, self._max_bytes)

        delivered = self._relay.publish(app.app_id, topic, body, admit)
        return json_response({"topic": topic, "devices": delivered})
