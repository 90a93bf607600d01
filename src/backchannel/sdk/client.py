"""The application side: call devices and query presence through the app REST API.

:class:`AsyncClient` is for asyncio code; :class:`Client` offers the same methods to plain
synchronous code by running an :class:`AsyncClient` on a private loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl as ssl_module
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

import backchannel
from backchannel.sdk._events import Event, SseParser
from backchannel.sdk._sync import LoopThread
from backchannel.sdk.errors import BackchannelError, ServerUnavailable, error_from_response

SSLArg = ssl_module.SSLContext | bool | None

# A call may legitimately take as long as its timeout; the HTTP layer only adds a margin
# on top, so the server (which knows the timeout in force) is the one that reports it.
_SEND_MARGIN = 30.0
_CONNECT_TIMEOUT = 10.0
_DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=30.0, sock_connect=_CONNECT_TIMEOUT)
# The server writes at least a comment every 15 s: three missed ones mean a dead connection.
_STREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT, sock_read=45.0)
_STREAM_BACKOFF = 0.5  # first wait after a failed attempt; doubles up to the cap
_STREAM_MAX_BACKOFF = 15.0
# Refusals that another attempt cannot cure: bad filters, credentials, an unknown app.
_FINAL_STATUSES = frozenset({400, 401, 403, 404})


def _body_bytes(body: bytes | bytearray | memoryview | str) -> bytes:
    return body.encode() if isinstance(body, str) else bytes(body)


class AsyncClient:
    """The app REST API from asyncio: ``send`` calls a device and returns its raw reply."""

    def __init__(
        self,
        server: str,
        app_id: str,
        secret: str,
        *,
        session: aiohttp.ClientSession | None = None,
        ssl: SSLArg = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.app_id = app_id
        self._base = f"{self.server}/v1/applications/{quote(app_id, safe='')}"
        self._headers = {
            "Authorization": f"OAuth {secret}",
            "User-Agent": f"backchannel-python/{backchannel.__version__}",
        }
        self._session = session
        self._own_session = session is None
        self._ssl: bool | ssl_module.SSLContext = True if ssl is None else ssl

    def _http(self) -> aiohttp.ClientSession:
        # Created lazily so it binds to the loop that uses it (Client runs us on its own).
        if self._session is None or (self._own_session and self._session.closed):
            self._session = aiohttp.ClientSession(timeout=_DEFAULT_TIMEOUT)
            self._own_session = True
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> bytes:
        """Send one request; return the body of a 2xx answer, else raise its typed error."""
        url = self._base + path
        try:
            async with self._http().request(
                method,
                url,
                data=data,
                params=params,
                headers=self._headers,
                timeout=timeout or _DEFAULT_TIMEOUT,
                ssl=self._ssl,
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise error_from_response(resp.status, body)
                return body
        except aiohttp.ClientError as exc:
            raise ServerUnavailable(
                f"cannot reach {self.server}: {exc}", status=0, error="unreachable"
            ) from exc
        except TimeoutError as exc:
            raise ServerUnavailable(
                f"no answer from {self.server} in time", status=0, error="client_timeout"
            ) from exc

    async def _json(self, method: str, path: str) -> dict[str, Any]:
        raw = await self._request(method, path)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BackchannelError(
                f"the server answered {method} {path} with non-JSON", error="bad_response"
            ) from exc
        if not isinstance(data, dict):
            raise BackchannelError(
                f"the server answered {method} {path} with a non-object", error="bad_response"
            )
        return data

    async def send(
        self,
        device_id: str,
        body: bytes | str,
        *,
        timeout: float | None = None,
        method: str | None = None,
    ) -> bytes:
        """Call the device with ``body`` (str is sent as UTF-8) and return its raw reply.

        Raises:
            DeviceOffline, CallTimeout (TimedOutBeforeDelivery, NoReply), DeviceError,
            DeviceDisconnected, DeviceBusy, Unauthorized, NotFound, BodyTooLarge,
            ServerUnavailable: see ``backchannel.sdk.errors``.
        """
        params: dict[str, str] = {}
        if timeout is not None:
            params["timeout"] = repr(float(timeout))
        if method:
            params["method"] = method
        http_timeout = aiohttp.ClientTimeout(
            total=None if timeout is None else timeout + _SEND_MARGIN,
            sock_connect=_CONNECT_TIMEOUT,
        )
        return await self._request(
            "POST",
            f"/devices/{quote(device_id, safe='')}/send",
            data=_body_bytes(body),
            params=params,
            timeout=http_timeout,
        )

    async def devices(self) -> list[str]:
        """The ids of the application's connected devices."""
        data = await self._json("GET", "/devices")
        return [str(d) for d in data.get("devices", [])]

    async def device(self, device_id: str) -> dict[str, Any]:
        """The presence object of a connected device (raises DeviceOffline when it is not)."""
        return await self._json("GET", f"/devices/{quote(device_id, safe='')}")

    async def detach(self, device_id: str) -> None:
        """Close the device's connection (raises DeviceOffline when it is not connected)."""
        await self._request("DELETE", f"/devices/{quote(device_id, safe='')}")

    async def info(self) -> dict[str, Any]:
        """The application's name and traffic counters."""
        return await self._json("GET", "")

    async def events(
        self,
        after: int | None = None,
        devices: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        *,
        reconnect: bool = True,
    ) -> AsyncGenerator[Event, None]:
        """The application's events, live, as an endless async iterator.

        Args:
            after: replay the stored events after this id first; None starts with the
                events that arrive from now on.
            devices: only these devices' events (presence changes included).
            types: only these types (``presence`` for presence changes, ``message`` for
                unnamed events such as Cometa devices').
            reconnect: when the connection drops or the server restarts, reconnect and
                resume after the last event seen (``Last-Event-ID``), with backoff, so no
                event is missed or repeated. With False, the iterator ends instead.

        Raises:
            Unauthorized, NotFound, BadRequest: refusals that reconnecting cannot cure.
            ServerUnavailable: only without ``reconnect``.
        """
        params = [("device", d) for d in devices or ()] + [("type", t) for t in types or ()]
        last = after
        failures = 0
        while True:
            headers = {**self._headers, "Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            delivered = False
            try:
                async with self._http().get(
                    self._base + "/events",
                    params=params,
                    headers=headers,
                    timeout=_STREAM_TIMEOUT,
                    ssl=self._ssl,
                ) as resp:
                    if resp.status >= 400:
                        error = error_from_response(resp.status, await resp.read())
                        if not reconnect or resp.status in _FINAL_STATUSES:
                            raise error
                    else:
                        parser = SseParser()
                        async for chunk in resp.content.iter_any():
                            for message in parser.feed(chunk):
                                event = Event.from_object(_loads(message.data))
                                last = event.id
                                delivered = True
                                yield event
                            if parser.last_id.isdigit():
                                last = int(parser.last_id)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not reconnect:
                    raise ServerUnavailable(
                        f"event stream from {self.server} broke: {exc!r}",
                        status=0,
                        error="unreachable",
                    ) from exc
            if not reconnect:
                return
            # A stream that was delivering resumes at once; failures back off, with jitter.
            failures = 0 if delivered else failures + 1
            if failures:
                delay = min(_STREAM_BACKOFF * 2 ** (failures - 1), _STREAM_MAX_BACKOFF)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def close(self) -> None:
        """Close the HTTP session if this client created it."""
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BackchannelError(
            "the server sent an event that is not JSON", error="bad_response"
        ) from exc


class Client:
    """The app REST API from synchronous code; same methods as :class:`AsyncClient`.

    Thread-safe: calls from several threads share one private event loop and its pooled
    connections. Do not call it from inside a running event loop's thread with blocking
    intent; from asyncio code use :class:`AsyncClient` (or ``asyncio.to_thread``).
    """

    def __init__(self, server: str, app_id: str, secret: str, *, ssl: SSLArg = None) -> None:
        self._runner = LoopThread("backchannel-client")
        self._client = AsyncClient(server, app_id, secret, ssl=ssl)

    def send(
        self,
        device_id: str,
        body: bytes | str,
        *,
        timeout: float | None = None,
        method: str | None = None,
    ) -> bytes:
        """Call the device and return its raw reply (see :meth:`AsyncClient.send`)."""
        return self._runner.run(self._client.send(device_id, body, timeout=timeout, method=method))

    def devices(self) -> list[str]:
        """The ids of the application's connected devices."""
        return self._runner.run(self._client.devices())

    def device(self, device_id: str) -> dict[str, Any]:
        """The presence object of a connected device."""
        return self._runner.run(self._client.device(device_id))

    def detach(self, device_id: str) -> None:
        """Close the device's connection."""
        self._runner.run(self._client.detach(device_id))

    def info(self) -> dict[str, Any]:
        """The application's name and traffic counters."""
        return self._runner.run(self._client.info())

    def events(
        self,
        after: int | None = None,
        devices: Iterable[str] | None = None,
        types: Iterable[str] | None = None,
        *,
        reconnect: bool = True,
    ) -> Iterator[Event]:
        """The application's events as a blocking iterator (see :meth:`AsyncClient.events`).

        Leave the loop (``break``) or close the iterator to end the stream.
        """
        stream = self._client.events(after, devices, types, reconnect=reconnect)

        async def step() -> Event:
            return await anext(stream)

        try:
            while True:
                try:
                    yield self._runner.run(step())
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(RuntimeError):  # the client was closed first
                self._runner.run(stream.aclose())

    def close(self) -> None:
        """Close the HTTP session and stop the background loop."""
        with contextlib.suppress(RuntimeError):  # already closed
            self._runner.run(self._client.close())
        self._runner.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
