"""This node's live sessions, indexed by application and device, and session takeover."""

from __future__ import annotations

from collections.abc import Iterator

from backchannel.core.session import Session


class Hub:
    """The sessions held by this process. Not thread-safe; lives on the event loop."""

    def __init__(self) -> None:
        self._apps: dict[str, dict[str, Session]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Session]:
        for devices in list(self._apps.values()):
            yield from list(devices.values())

    def get(self, app_id: str, device_id: str) -> Session | None:
        """The live session of a device on this node, if any."""
        devices = self._apps.get(app_id)
        return devices.get(device_id) if devices is not None else None

    def attach(self, session: Session) -> Session | None:
        """Make ``session`` the device's session; return the one it replaces, if any."""
        devices = self._apps.setdefault(session.app_id, {})
        previous = devices.get(session.device_id)
        devices[session.device_id] = session
        if previous is None:
            self._count += 1
        return previous

    def detach(self, session: Session) -> bool:
        """Remove ``session`` if it is still the device's session (never its successor)."""
        devices = self._apps.get(session.app_id)
        if devices is None or devices.get(session.device_id) is not session:
            return False
        del devices[session.device_id]
        if not devices:
            del self._apps[session.app_id]
        self._count -= 1
        return True

    def of_app(self, app_id: str) -> list[Session]:
        """The application's sessions on this node."""
        return list(self._apps.get(app_id, {}).values())

    def app_count(self, app_id: str) -> int:
        """How many of the application's devices are on this node."""
        return len(self._apps.get(app_id, ()))
