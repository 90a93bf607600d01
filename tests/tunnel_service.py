"""A small local HTTP service for tunnel tests: what ``backchannel expose`` forwards to.

Start it with ``async with tunnel_service() as svc`` (or the ``local_service`` fixture) and
use ``svc.url``. Endpoints:

- ``/echo`` (any method, any sub-path ``/echo/...``): JSON with the method, the raw path,
  the raw query string, the headers as received (``[[name, value], ...]``), and the body's
  length and SHA-256 (read streamed);
- ``/bytes/{n}``: ``n`` deterministic pseudo-random bytes in 64 KiB chunks, ``X-SHA256``
  computed up front (``?chunked=1``: no Content-Length); see :func:`expected_bytes`;
- ``/upload``: reads the body streamed (``?delay=`` seconds per chunk: a slow consumer),
  answers its length and SHA-256;
- ``/sse?n=&delay=``: ``n`` server-sent events, ``delay`` seconds apart, each flushed;
- ``/slow?delay=``: answers after ``delay`` seconds; a cancelled wait (the caller went away)
  is recorded in ``svc.cancelled``;
- ``/ws``: WebSocket echo; subprotocols ``chat`` and ``superchat`` are accepted; the text
  ``close:<code>:<reason>`` makes the service close with that code; the code the caller
  closed with lands in ``svc.ws_closes``;
- ``/status/{code}``: that status, JSON body (none for 204/304);
- ``/headers``: two ``Set-Cookie`` and two ``X-Multi`` headers;
- ``/redirect``: 302 to ``/echo`` (a tunnel must not follow it);
- ``/gzip``: a gzip-encoded body with ``Content-Encoding: gzip`` (a tunnel must not
  decompress it).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

CHUNK = 64 * 1024
BLOCK = 1024 * 1024  # /bytes/{n} repeats one random block of this size
SSE_DEFAULT_EVENTS = 5
WS_PROTOCOLS = ("chat", "superchat")
GZIP_TEXT = b"hello, compressed world\n" * 100

_hashes: dict[int, str] = {}


def _block(n: int) -> bytes:
    return random.Random(n).randbytes(BLOCK)


def iter_bytes(n: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """The ``n`` bytes of ``/bytes/{n}``, in chunks, without holding them all."""
    block = _block(n)
    sent = 0
    while sent < n:
        start = sent % BLOCK
        size = min(chunk, n - sent, BLOCK - start)
        yield block[start : start + size]
        sent += size


def expected_bytes(n: int) -> bytes:
    """All of ``/bytes/{n}`` (for small ``n`` in tests)."""
    return b"".join(iter_bytes(n))


def bytes_sha256(n: int) -> str:
    """SHA-256 of ``/bytes/{n}``, computed in chunks and cached."""
    digest = _hashes.get(n)
    if digest is None:
        h = hashlib.sha256()
        for part in iter_bytes(n, BLOCK):
            h.update(part)
        digest = _hashes[n] = h.hexdigest()
    return digest


@dataclass
class LocalService:
    """The running service."""

    url: str
    port: int
    cancelled: list[str] = field(default_factory=list)
    ws_closes: list[int | None] = field(default_factory=list)
    requests: int = 0
    bytes_out: int = 0  # body bytes /bytes/{n} has written so far


def _header_pairs(request: web.BaseRequest) -> list[list[str]]:
    return [[k.decode(), v.decode()] for k, v in request.raw_headers]


def build_app(svc: LocalService) -> web.Application:
    """The service's routes, recording into ``svc``."""
    routes = web.RouteTableDef()

    @web.middleware
    async def count(request: web.Request, handler: web.Handler) -> web.StreamResponse:
        svc.requests += 1
        return await handler(request)

    async def echo(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            length += len(chunk)
        path, _, query = request.raw_path.partition("?")
        return web.json_response(
            {
                "method": request.method,
                "path": path,
                "query": query,
                "headers": _header_pairs(request),
                "length": length,
                "sha256": h.hexdigest(),
            }
        )

    routes.route("*", "/echo")(echo)
    routes.route("*", "/echo/{tail:.*}")(echo)

    @routes.get("/bytes/{n}")
    async def some_bytes(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"X-SHA256": bytes_sha256(n)})
        resp.content_type = "application/octet-stream"
        if request.query.get("chunked"):
            resp.enable_chunked_encoding()
        else:
            resp.content_length = n
        await resp.prepare(request)
        if request.method != "HEAD":
            for part in iter_bytes(n):
                await resp.write(part)
                svc.bytes_out += len(part)
        await resp.write_eof()
        return resp

    @routes.route("*", "/upload")
    async def upload(request: web.Request) -> web.Response:
        delay = float(request.query.get("delay", "0"))
        h = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            h.update(chunk)
            length += len(chunk)
            if delay:
                await asyncio.sleep(delay)
        return web.json_response({"length": length, "sha256": h.hexdigest()})

    @routes.get("/sse")
    async def sse(request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", str(SSE_DEFAULT_EVENTS)))
        delay = float(request.query.get("delay", "0.1"))
        resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        for i in range(n):
            if i:
                await asyncio.sleep(delay)
            await resp.write(f"id: {i}\ndata: event {i}\n\n".encode())
        await resp.write_eof()
        return resp

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        delay = float(request.query.get("delay", "1"))
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            svc.cancelled.append(request.path_qs)
            raise
        return web.json_response({"slept": delay})

    @routes.get("/ws")
    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(protocols=WS_PROTOCOLS, max_msg_size=0)
        await sock.prepare(request)
        async for msg in sock:
            if msg.type is WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    _, code, reason = msg.data.split(":", 2)
                    await sock.close(code=int(code), message=reason.encode())
                    break
                await sock.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        svc.ws_closes.append(sock.close_code)
        return sock

    @routes.route("*", "/status/{code}")
    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code)
        return web.json_response({"status": code}, status=code)

    @routes.get("/headers")
    async def headers(request: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
        resp.headers.add("X-Multi", "one")
        resp.headers.add("X-Multi", "two")
        return resp

    @routes.get("/redirect")
    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/echo"})

    @routes.get("/gzip")
    async def gzipped(request: web.Request) -> web.Response:
        body = gzip.compress(GZIP_TEXT)
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"}
        )

    app = web.Application(middlewares=[count])
    app.add_routes(routes)
    return app


@contextlib.asynccontextmanager
async def tunnel_service(host: str = "127.0.0.1") -> AsyncIterator[LocalService]:
    """Run the service on a free port of ``host`` until the block ends."""
    svc = LocalService("", 0)
    # handler_cancellation: a caller that goes away cancels its handler (see /slow).
    runner = web.AppRunner(
        build_app(svc), handle_signals=False, access_log=None, handler_cancellation=True
    )
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    svc.port = int(runner.addresses[0][1])
    svc.url = f"http://{host}:{svc.port}"
    try:
        yield svc
    finally:
        await runner.cleanup()
