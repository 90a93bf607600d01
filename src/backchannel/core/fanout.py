"""Fan-out: one message to many devices at once, every call under one shared deadline.

The front door resolves the targets (a list, a tag, a topic) with the helpers here, then
:meth:`Fanout.run` starts one :meth:`Relay.call` per device in the same loop turn and waits
for all of them. Each call already ends by its own timeout; the outer wait is a backstop
(``timeout`` plus :data:`GRACE`) so a misbehaving session can never hold the whole answer,
and a call still running then is cancelled and reported as a timeout. One device's failure
is recorded in its own outcome and never touches the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from backchannel.core import metrics
from backchannel.core.apps import AppService
from backchannel.core.credentials import valid_device_id
from backchannel.core.outcomes import CallFailed, CallTimedOut, DeviceOffline
from backchannel.core.relay import Relay

log = logging.getLogger(__name__)

#: Seconds past the timeout after which calls still running are abandoned (a backstop:
#: every call ends by its own timer first, unless a session misbehaves).
GRACE = 0.5
#: The error code of an unexpected failure inside one call (a bug, logged with its trace).
INTERNAL_ERROR = "internal_error"


class Status(StrEnum):
    """How one device's call ended."""

    REPLIED = "replied"
    OFFLINE = "offline"
    #: Offline, and queued for delivery when it connects (the fan-out asked for it).
    QUEUED = "queued"
    TIMEOUT = "timeout"
    ERROR = "error"


class TooManyDevices(ValueError):
    """The fan-out names more devices than the configured limit."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"the fan-out targets {count} devices; the limit is {limit}")
        self.count = count
        self.limit = limit


@dataclass(frozen=True, slots=True)
class DeviceOutcome:
    """One device's result: its reply, or the failure's code and message."""

    device_id: str
    status: Status
    ms: float
    reply: bytes | None = None
    error: str | None = None
    detail: str = ""
    #: The queued message's id (status ``queued``).
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class FanoutReport:
    """Every device's outcome, in target order, and the timeout they shared."""

    timeout: float
    outcomes: list[DeviceOutcome]

    def count(self, status: Status) -> int:
        """How many devices ended with ``status``."""
        return sum(1 for o in self.outcomes if o.status is status)


def unique_devices(device_ids: Iterable[str]) -> list[str]:
    """The ids without repeats, in first-seen order.

    Raises:
        ValueError: an id breaks the device id rules (the message names it).
    """
    seen: dict[str, None] = {}
    for device_id in device_ids:
        if not valid_device_id(device_id):
            raise ValueError(
                f"device id {device_id[:140]!r} is invalid: 1-128 letters, digits or ._:@- "
                "starting alphanumeric"
            )
        seen.setdefault(device_id, None)
    return list(seen)


class Fanout:
    """Resolves fan-out targets and runs fan-outs through the relay, within a size limit."""

    def __init__(
        self, relay: Relay, apps: AppService, max_devices: int, grace: float = GRACE
    ) -> None:
        self._relay = relay
        self._apps = apps
        self.max_devices = max_devices
        self._grace = grace

    def unique_devices(self, device_ids: Iterable[str]) -> list[str]:
        """The listed ids without repeats, in first-seen order (see :func:`unique_devices`)."""
        return unique_devices(device_ids)

    async def tagged_devices(self, app_id: str, tag: str) -> list[str]:
        """The application's provisioned devices carrying ``tag``, in provisioning order.

        Offline devices are included: the fan-out reports them as offline.
        """
        return [c.device_id for c in await self._apps.credentials(app_id) if tag in c.tags]

    def topic_devices(self, app_id: str, topic: str) -> list[str]:
        """The devices subscribed to a pattern matching ``topic``.

        Raises:
            ValueError: the topic name is invalid.
        """
        return self._relay.topic_devices(app_id, topic)

    async def can_connect(self, app_id: str, device_ids: list[str]) -> set[str]:
        """Those of ``device_ids`` that could ever connect (a key, or the app's open door)."""
        app = await self._apps.get(app_id)
        if app is None:
            return set()
        if app.allow_open_attach:
            return set(device_ids)
        keyed = {c.device_id for c in await self._apps.credentials(app_id)}
        return {d for d in device_ids if d in keyed or d in app.allowed_devices}

    def connected(self, app_id: str, device_id: str) -> bool:
        """Whether the device has a session on this node (its call would be sent now)."""
        return self._relay.hub.get(app_id, device_id) is not None

    def check_size(self, count: int) -> None:
        """Refuse a fan-out larger than the limit.

        Raises:
            TooManyDevices: ``count`` is over ``max_devices``.
        """
        if count > self.max_devices:
            raise TooManyDevices(count, self.max_devices)

    async def run(
        self, app_id: str, device_ids: Sequence[str], body: bytes, method: str, timeout: float
    ) -> FanoutReport:
        """Call every device with ``body`` at once; return each outcome in the given order.

        Raises:
            TooManyDevices: more devices than ``max_devices``.
        """
        self.check_size(len(device_ids))
        metrics.FANOUTS.inc()
        if not device_ids:
            return FanoutReport(timeout, [])
        clock = self._relay.clock
        started = clock.monotonic()
        loop = asyncio.get_running_loop()
        # Creating every task before the first await starts all calls in one loop turn.
        tasks = [
            loop.create_task(self._one(app_id, device_id, body, method, timeout, started))
            for device_id in device_ids
        ]
        _, pending = await asyncio.wait(tasks, timeout=timeout + self._grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "fan-out in %s: %d calls outlived their timeout of %g s; abandoned",
                app_id,
                len(pending),
                timeout,
            )
            # Let the cancellations run their cleanup (pending call tables) before answering.
            await asyncio.wait(pending, timeout=self._grace)
        outcomes: list[DeviceOutcome] = []
        for device_id, task in zip(device_ids, tasks, strict=True):
            if task.done() and not task.cancelled():
                outcomes.append(task.result())
            else:
                late = CallTimedOut(timeout)
                ms = (clock.monotonic() - started) * 1000.0
                outcomes.append(
                    DeviceOutcome(device_id, Status.TIMEOUT, ms, None, late.code, str(late))
                )
        return FanoutReport(timeout, outcomes)

    async def _one(
        self,
        app_id: str,
        device_id: str,
        body: bytes,
        method: str,
        timeout: float,
        started: float,
    ) -> DeviceOutcome:
        clock = self._relay.clock
        try:
            reply = await self._relay.call(app_id, device_id, body, method, timeout)
        except DeviceOffline as exc:
            status, code, detail = Status.OFFLINE, exc.code, str(exc)
        except CallTimedOut as exc:
            status, code, detail = Status.TIMEOUT, exc.code, str(exc)
        except CallFailed as exc:
            status, code, detail = Status.ERROR, exc.code, str(exc)
        except Exception:
            # A bug in one session must not fail the other devices' results.
            log.exception("fan-out call to %s/%s failed unexpectedly", app_id, device_id)
            status, code, detail = Status.ERROR, INTERNAL_ERROR, "the server failed; see its log"
        else:
            ms = (clock.monotonic() - started) * 1000.0
            return DeviceOutcome(device_id, Status.REPLIED, ms, reply)
        ms = (clock.monotonic() - started) * 1000.0
        return DeviceOutcome(device_id, status, ms, None, code, detail)
