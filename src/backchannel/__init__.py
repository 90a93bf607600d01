"""backchannel: a self-hosted edge relay for devices and services behind NAT."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "Device",
    "FanoutReply",
    "FanoutResult",
    "Tunnel",
    "__version__",
]

if TYPE_CHECKING:
    from backchannel.sdk import AsyncClient, Client, Device, FanoutReply, FanoutResult, Tunnel


def __getattr__(name: str) -> Any:
    # Lazy, so `import backchannel` (the CLI, the server) does not pay for the SDK's imports.
    if name in ("AsyncClient", "Client", "Device", "FanoutReply", "FanoutResult", "Tunnel"):
        from backchannel import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'backchannel' has no attribute {name!r}")
