"""The broker interface: the cluster-wide directory of live devices and cross-node delivery.

A node asks the broker only when a device is *not* in its own hub, so the embedded
single-node case never pays for it. Implementations: ``memory.py`` (one process, the
default) and, for cluster mode, a Redis implementation beside it. One contract suite in
``tests/contract/test_broker.py`` runs against each.
"""

from __future__ import annotations

from typing import Any, Protocol


class Broker(Protocol):
    """Directory and node-addressed delivery.

    Contracts:
      - ``claim`` makes this node the owner of the device; a later ``claim`` from any node
        wins (session takeover), and the previous owner is told to drop its session.
      - ``release`` removes ownership only when ``session_id`` still owns the device, so a
        late disconnect of a replaced session never unregisters its successor.
      - ``owner`` returns the owning node id or None.
      - ``forward_*`` deliver one operation to the node holding the device and return its
        result; they raise ``DeviceOffline`` when that node no longer holds it.
    """

    node_id: str

    async def start(self) -> None:
        """Connect and start listening for node-addressed requests."""

    async def stop(self) -> None:
        """Stop listening; idempotent."""

    async def claim(self, app_id: str, device_id: str, session_id: str) -> None:
        """Record that this node's session ``session_id`` now holds the device."""

    async def release(self, app_id: str, device_id: str, session_id: str) -> None:
        """Forget the device if ``session_id`` still holds it."""

    async def owner(self, app_id: str, device_id: str) -> str | None:
        """Return the id of the node holding the device, or None."""

    async def list_devices(self, app_id: str) -> list[str]:
        """Return the ids of the application's live devices, across all nodes, sorted."""

    async def forward_call(
        self, node_id: str, app_id: str, device_id: str, body: bytes, method: str, timeout: float
    ) -> bytes:
        """Run a call on another node and return the reply."""

    async def forward_detach(self, node_id: str, app_id: str, device_id: str) -> bool:
        """Ask another node to close the device's session."""

    async def forward_presence(
        self, node_id: str, app_id: str, device_id: str
    ) -> dict[str, Any] | None:
        """Ask another node for the device's presence object."""
