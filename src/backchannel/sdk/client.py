"""The application side: call devices and query presence through the app REST API.

:class:`AsyncClient` is for asyncio code; :class:`Client` offers the same methods to plain
synchronous code by running an :class:`AsyncClient` on a private loop thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import ssl as ssl_module
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload
from urllib.parse import quote

import aiohttp
import orjson

import backchannel
from backchannel.sdk._events import Event, SseParser
from backchannel.sdk._sync import LoopThread
from backchannel.sdk.errors import BackchannelError, ServerUnavailable, error_from_response
from backchannel.sdk.fanout import FanoutResult
from backchannel.sdk.messages import Message

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
        params: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """Send one request; return the body of a 2xx answer, else raise its typed error."""
        url = self._base + path
        try:
            async with self._http().request(
                method,
                url,
                data=data,
                params=params,
                headers={**self._headers, **headers} if headers else self._headers,
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
        return _loads_object(await self._request(method, path), f"{method} {path}")

    @overload
    async def send(
        self,
        device_id: str,
        body: bytes | str,
        *,
        timeout: float | None = None,
        method: str | None = None,
        offline: Literal["fail", "wait"] = "fail",
        wait: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes: ...

    @overload
    async def send(
        self,
        device_id: str,
        body: bytes | str,
        *,
        timeout: float | None = None,
        method: str | None = None,
        offline: Literal["queue"],
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> Message: ...

    async def send(
        self,
        device_id: str,
        body: bytes | str,
        *,
        timeout: float | None = None,
        method: str | None = None,
        offline: Literal["fail", "wait", "queue"] = "fail",
        wait: float | None = None,
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes | Message:
        """Call the device with ``body`` (str is sent as UTF-8) and return its raw reply.

        ``offline`` says what happens when the device is not connected: ``"fail"`` raises
        DeviceOffline at once; ``"wait"`` waits up to ``wait`` seconds (default: the
        timeout) for it to connect; ``"queue"`` returns a :class:`Message` at once, which
        the server delivers when the device connects, within ``ttl`` seconds (read its
        progress with :meth:`message` or :meth:`wait_message`). With ``idempotency_key``,
        a retry of the same request gets the first one's outcome instead of a second call.

        Raises:
            DeviceOffline, CallTimeout (TimedOutBeforeDelivery, NoReply), DeviceError,
            DeviceDisconnected, DeviceBusy, QueueFull, IdempotencyKeyReused, Conflict,
            Unauthorized, NotFound, BodyTooLarge, BadRequest, ServerUnavailable: see
            ``backchannel.sdk.errors``.
        """
        params: dict[str, str] = {}
        if timeout is not None:
            params["timeout"] = repr(float(timeout))
        if method:
            params["method"] = method
        if offline != "fail":
            params["offline"] = offline
        if wait is not None:
            params["wait"] = repr(float(wait))
        if ttl is not None:
            params["ttl"] = repr(float(ttl))
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        waited = (wait if wait is not None else (timeout or 0.0)) if offline == "wait" else 0.0
        http_timeout = aiohttp.ClientTimeout(
            total=None if timeout is None else timeout + waited + _SEND_MARGIN,
            sock_connect=_CONNECT_TIMEOUT,
        )
        path = f"/devices/{quote(device_id, safe='')}/send"
        raw = await self._request(
            "POST",
            path,
            data=_body_bytes(body),
            params=params,
            timeout=http_timeout,
            headers=headers,
        )
        if offline == "queue":
            return Message.from_json(_loads_object(raw, f"POST {path}"))
        return raw

    async def message(self, message_id: str) -> Message:
        """A message's state, and its reply once replied (raises NotFound for an unknown id)."""
        path = f"/messages/{quote(message_id, safe='')}"
        return Message.from_json(await self._json("GET", path))

    async def wait_message(
        self, message_id: str, timeout: float = 60.0, poll: float = 0.25
    ) -> Message:
        """Poll a message until it is final (replied, failed, delivered or expired).

        Raises:
            TimeoutError: it is still queued or sent after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            message = await self.message(message_id)
            if message.final:
                return message
            if loop.time() >= deadline:
                raise TimeoutError(f"message {message_id} is still {message.state}")
            await asyncio.sleep(min(poll, max(0.0, deadline - loop.time())))

    async def messages(
        self, device_id: str | None = None, states: Iterable[str] = (), limit: int | None = None
    ) -> list[Message]:
        """Messages of a device (None: of every device of the app), oldest first.

        ``states`` keeps only those states (``["queued"]``: what still waits); ``limit`` stops
        after that many (None: all of them, read a page of 1,000 at a time).
        """
        base: list[tuple[str, str]] = [("state", s) for s in states]
        path = (
            "/messages" if device_id is None else f"/devices/{quote(device_id, safe='')}/messages"
        )
        out: list[Message] = []
        after = "0"
        while limit is None or len(out) < limit:
            page = 1000 if limit is None else min(1000, limit - len(out))
            params = [*base, ("limit", str(page)), ("after", after)]
            data = _loads_object(await self._request("GET", path, params=params), f"GET {path}")
            out += [Message.from_json(m) for m in data.get("messages", [])]
            cursor = data.get("next")
            if not isinstance(cursor, str):
                break
            after = cursor
        return out

    async def cancel(self, message_id: str) -> Message:
        """Take a queued message out of the queue (raises Conflict once it left the queue)."""
        path = f"/messages/{quote(message_id, safe='')}"
        return Message.from_json(_loads_object(await self._request("DELETE", path), path))

    async def fanout(
        self,
        message: bytes | str,
        *,
        devices: Iterable[str] | None = None,
        tag: str | None = None,
        topic: str | None = None,
        method: str = "",
        timeout: float | None = None,
        offline: Literal["report", "queue"] = "report",
        ttl: float | None = None,
    ) -> FanoutResult:
        """Call many devices with one message at once; every device's outcome, in order.

        With ``offline="queue"``, each device found offline gets the message queued (within
        ``ttl`` seconds) and the status ``queued`` with its ``message_id``.

        Give exactly one of ``devices`` (ids), ``tag`` or ``topic``. A device that is
        offline, times out or fails does not raise: see each result's ``status``.

        Raises:
            ValueError: not exactly one target given.
            BadRequest, Unauthorized, NotFound, BodyTooLarge, ServerUnavailable: the
                request as a whole was refused; no device was called.
        """
        if sum(target is not None for target in (devices, tag, topic)) != 1:
            raise ValueError("give exactly one of devices=, tag= or topic=")
        payload: dict[str, Any] = {}
        if devices is not None:
            # A bare string would be split into characters: take it as one id.
            payload["devices"] = [devices] if isinstance(devices, str) else list(devices)
        elif tag is not None:
            payload["tag"] = tag
        else:
            payload["topic"] = topic
        if isinstance(message, str):
            payload["message"] = message
        else:
            payload["message_base64"] = base64.b64encode(bytes(message)).decode("ascii")
        if method:
            payload["method"] = method
        if timeout is not None:
            payload["timeout"] = float(timeout)
        if offline != "report":
            payload["offline"] = offline
        if ttl is not None:
            payload["ttl"] = float(ttl)
        http_timeout = aiohttp.ClientTimeout(
            total=None if timeout is None else timeout + _SEND_MARGIN,
            sock_connect=_CONNECT_TIMEOUT,
        )
        raw = await self._request(
            "POST",
            "/fanout",
            data=orjson.dumps(payload),
            timeout=http_timeout,
            headers={"Content-Type": "application/json"},
        )
        return FanoutResult.from_object(_loads_object(raw, "POST /fanout"))

    async def publish(self, topic: str, data: bytes | str) -> int:
        """Push ``data`` (str as UTF-8) to the devices subscribed to ``topic``; return how many.

        Only devices connected now receive it: nothing is stored for offline devices.

        Raises:
            ValueError: the topic is empty (there would be no route to post to).
            BadRequest: the server refused the topic (over 255 bytes, or with ``+``/``#``).
            Unauthorized, NotFound, BodyTooLarge, ServerUnavailable: see
                ``backchannel.sdk.errors``.
        """
        if not topic:
            raise ValueError("the topic must not be empty")
        path = f"/topics/{quote(topic, safe='/')}"
        raw = await self._request("POST", path, data=_body_bytes(data))
        devices = _loads_object(raw, f"POST {path}").get("devices")
        if not isinstance(devices, int):
            raise BackchannelError(
                f"the server answered POST {path} without a device count", error="bad_response"
            )
        return devices

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


def _loads_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BackchannelError(
            f"the server answered {what} with non-JSON", error="bad_response"
        ) from exc
    if not isinstance(data, dict):
        raise BackchannelError(
            f"the server answered {what} with a non-object", error="bad_response"
        )
    return data


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

    @overload
    def send(
        self,
        device_id: str,
        body: bytes | str,
        *,
        timeout: float | None = None,
        method: str | None = None,
        offline: Literal["fail", "wait"] = "fail",
        wait: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes: ...

    @overload
    def send(
        self,
        device_id: str,
        body: bytes | str,
        *,
        timeout: float | None = None,
        method: str | None = None,
        offline: Literal["queue"],
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> Message: ...

    def send(
        self,
        device_id: str,
        body: bytes | str,
        *,
        timeout: float | None = None,
        method: str | None = None,
        offline: Literal["fail", "wait", "queue"] = "fail",
        wait: float | None = None,
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> bytes | Message:
        """Call the device and return its raw reply, or queue (see :meth:`AsyncClient.send`)."""
        if offline == "queue":
            return self._runner.run(
                self._client.send(
                    device_id,
                    body,
                    timeout=timeout,
                    method=method,
                    offline="queue",
                    ttl=ttl,
                    idempotency_key=idempotency_key,
                )
            )
        return self._runner.run(
            self._client.send(
                device_id,
                body,
                timeout=timeout,
                method=method,
                offline=offline,
                wait=wait,
                idempotency_key=idempotency_key,
            )
        )

    def message(self, message_id: str) -> Message:
        """A message's state (see :meth:`AsyncClient.message`)."""
        return self._runner.run(self._client.message(message_id))

    def wait_message(self, message_id: str, timeout: float = 60.0, poll: float = 0.25) -> Message:
        """Poll a message until it is final (see :meth:`AsyncClient.wait_message`)."""
        return self._runner.run(self._client.wait_message(message_id, timeout, poll))

    def messages(
        self, device_id: str | None = None, states: Iterable[str] = (), limit: int | None = None
    ) -> list[Message]:
        """Messages of a device or of the app (see :meth:`AsyncClient.messages`)."""
        return self._runner.run(self._client.messages(device_id, states, limit))

    def cancel(self, message_id: str) -> Message:
        """Take a queued message out of the queue (see :meth:`AsyncClient.cancel`)."""
        return self._runner.run(self._client.cancel(message_id))

    def fanout(
        self,
        message: bytes | str,
        *,
        devices: Iterable[str] | None = None,
        tag: str | None = None,
        topic: str | None = None,
        method: str = "",
        timeout: float | None = None,
        offline: Literal["report", "queue"] = "report",
        ttl: float | None = None,
    ) -> FanoutResult:
        """Call many devices with one message at once (see :meth:`AsyncClient.fanout`)."""
        return self._runner.run(
            self._client.fanout(
                message,
                devices=devices,
                tag=tag,
                topic=topic,
                method=method,
                timeout=timeout,
                offline=offline,
                ttl=ttl,
            )
        )

    def publish(self, topic: str, data: bytes | str) -> int:
        """Push ``data`` to the topic's subscribers (see :meth:`AsyncClient.publish`)."""
        return self._runner.run(self._client.publish(topic, data))

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
