"""The Socket2me relay protocol (nmarus/socket2me v2): the ``request`` event and its answer.

Only the payloads live here; the Socket.IO transport itself (python-socketio) stays outside
the sans-I/O ``wire`` package.
"""

from backchannel.wire.socket2me.request import REQUEST_EVENT, build_request
from backchannel.wire.socket2me.respond import MalformedRespond, Respond, parse_respond

__all__ = ["REQUEST_EVENT", "MalformedRespond", "Respond", "build_request", "parse_respond"]
