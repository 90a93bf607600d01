"""Protocol errors shared by every wire parser.

Every parser either returns a value or raises a :class:`ProtocolError` subclass: nothing
else escapes (the fuzz invariant). Each error carries the WebSocket close code and the HTTP
status a transport or front door should use, so nobody has to guess the mapping.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: the byte stream broke the protocol."""

    close_code: int = 4000
    status_hint: int = 400
    error_code: str = "protocol_error"


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class UnknownFrameType(RemoteProtocolError):
    """The peer sent a frame type this protocol version does not define."""

    error_code = "unknown_frame_type"


class MalformedFrame(RemoteProtocolError):
    """The peer sent a frame that is too short or inconsistent."""

    error_code = "malformed_frame"


class FrameTooLarge(RemoteProtocolError):
    """The peer sent a frame above the negotiated maximum size."""

    close_code = 1009
    status_hint = 413
    error_code = "frame_too_large"


class FlowControlError(RemoteProtocolError):
    """The peer sent stream data beyond the credit it was granted."""

    error_code = "flow_control_violation"
