"""Liveness and metrics: ``GET /healthz`` and ``GET /metrics``."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backchannel import __version__
from backchannel.core.relay import Relay
from backchannel.frontdoors.errors import json_response


class Health:
    """Health and metrics endpoints for load balancers and Prometheus."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def add_routes(self, app: web.Application) -> None:
        """Mount the routes."""
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)

    async def healthz(self, request: web.Request) -> web.Response:
        """200 while serving, 503 while shutting down (so balancers drain the node)."""
        body = {
            "status": "shutting_down" if self._relay.closing else "ok",
            "version": __version__,
            "node": self._relay.node_id,
            "sessions": len(self._relay.hub),
        }
        return json_response(body, status=503 if self._relay.closing else 200)

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format."""
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
