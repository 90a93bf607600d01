"""backchannel: a self-hosted edge relay for devices and services behind NAT."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
