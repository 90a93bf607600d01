"""The Cometa device protocol (v1, 2015-2017): an HTTP-looking attach, then raw chunks."""

from backchannel.wire.cometa.chunks import (
    MAX_SIZE_LINE,
    ChunkReader,
    ChunkTooLarge,
    MalformedChunk,
    encode_chunk,
)
from backchannel.wire.cometa.connection import (
    CometaConnection,
    CometaEvent,
    Heartbeat,
    Reply,
    Upstream,
)
from backchannel.wire.cometa.handshake import (
    ATTACH_PATH,
    MAX_ATTACH_HEAD,
    MAX_REQUEST_LINE,
    AttachRequest,
    MalformedAttach,
    Sniff,
    accept_head,
    parse_attach,
    reject,
    sniff,
)

__all__ = [
    "ATTACH_PATH",
    "MAX_ATTACH_HEAD",
    "MAX_REQUEST_LINE",
    "MAX_SIZE_LINE",
    "AttachRequest",
    "ChunkReader",
    "ChunkTooLarge",
    "CometaConnection",
    "CometaEvent",
    "Heartbeat",
    "MalformedAttach",
    "MalformedChunk",
    "Reply",
    "Sniff",
    "Upstream",
    "accept_head",
    "encode_chunk",
    "parse_attach",
    "reject",
    "sniff",
]
