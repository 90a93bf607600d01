"""The single-process broker: a directory in a dict and no other nodes to forward to."""

from __future__ import annotations

from typing import Any

from backchannel.core.outcomes import DeviceOffline


class MemoryBroker:
    """Embedded routing for one server process (the default)."""

    def __init__(self, node_id: str = "local") -> None:
        self.node_id = node_id
        self._owners: dict[str, dict[str, str]] = {}

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to release."""

    async def claim(self, app_id: str, device_id: str, session_id: str) -> None:
        """Record the owning session."""
        self._owners.setdefault(app_id, {})[device_id] = session_id

    async def release(self, app_id: str, device_id: str, session_id: str) -> None:
        """Forget the device only if ``session_id`` still owns it."""
        devices = self._owners.get(app_id)
        if devices is not None and devices.get(device_id) == session_id:
            del devices[device_id]
            if not devices:
                del self._owners[app_id]

    async def owner(self, app_id: str, device_id: str) -> str | None:
        """This node, when the device is known."""
        return self.node_id if device_id in self._owners.get(app_id, {}) else None

    async def list_devices(self, app_id: str) -> list[str]:
        """The application's devices, sorted."""
        return sorted(self._owners.get(app_id, {}))

    async def forward_call(
        self, node_id: str, app_id: str, device_id: str, body: bytes, method: str, timeout: float
    ) -> bytes:
        """There are no other nodes."""
        raise DeviceOffline(f"device {device_id} is not connected")

    async def forward_detach(self, node_id: str, app_id: str, device_id: str) -> bool:
        """There are no other nodes."""
        return False

    async def forward_presence(
        self, node_id: str, app_id: str, device_id: str
    ) -> dict[str, Any] | None:
        """There are no other nodes."""
        return None
