"""The native device protocol (``backchannel.v1``): binary frames over one WebSocket."""

from backchannel.wire.native.connection import NativeConnection, Role
from backchannel.wire.native.frames import SUBPROTOCOL, Frame, FrameType, parse_frame

__all__ = ["SUBPROTOCOL", "Frame", "FrameType", "NativeConnection", "Role", "parse_frame"]
