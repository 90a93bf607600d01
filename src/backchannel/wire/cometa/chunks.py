"""HTTP chunk syntax as the Cometa devices speak it, in both directions.

After the attach (``handshake.py``) the socket carries nothing but chunks (COMPAT.md, Cometa,
"Device side" points 3 and 4). The server writes strict ``<hex>\\r\\n<payload>\\r\\n`` chunks;
the devices write something looser, so :class:`ChunkReader` is deliberately tolerant where the
original clients differ and strict everywhere else:

- the size line is hex with an optional ``;ext`` (ignored), surrounding spaces and tabs are
  tolerated, and it may end in LF or CRLF;
- exactly the declared number of bytes is read, then an *optional* CRLF or LF. The reader gets
  this by skipping blank lines before each size line, so the CRLF is never required and a size
  line that follows the data directly is never eaten;
- an empty reply is ``0\\r\\n\\r\\n`` from the Python client and ``2\\r\\n\\r\\n`` from the C
  client (it declares two bytes and sends only the CRLF): both come out as ``b""``.
"""

from __future__ import annotations

import re

from backchannel.wire.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

# A size line longer than this is garbage, not a chunk size: 32 bytes hold 16 hex digits plus a
# short extension and padding, far beyond any sane chunk (COMPAT.md, Cometa, "Device side" 4).
MAX_SIZE_LINE = 32

# Compact the buffer once this many consumed bytes sit in front of it (and they are at least
# half of it), so the copying stays linear in the bytes fed.
_COMPACT_AT = 4096

_HEX = re.compile(rb"[0-9A-Fa-f]+")
_BLANKS = b" \t\r"
# The C client's empty reply: it declares 2 bytes and sends only the CRLF (COMPAT.md, point 4).
_C_EMPTY_REPLY = b"\r\n"


class MalformedChunk(RemoteProtocolError):
    """The device broke the chunk framing: a size line that is not hex, or is too long."""

    error_code = "malformed_chunk"


class ChunkTooLarge(MalformedChunk, FrameTooLarge):
    """The device declared a chunk above the reader's ``max_chunk``."""

    close_code = 1009
    status_hint = 413
    error_code = "frame_too_large"


def encode_chunk(payload: bytes) -> bytes:
    """Frame ``payload`` as one chunk, ``<lowercase hex length>\\r\\n<payload>\\r\\n``.

    The result is one bytes value because the clients read 1024 bytes at a time and deliver
    each read as a message, so a message must go out in one write (COMPAT.md, point 3).

    Raises:
        LocalProtocolError: ``payload`` is empty; a zero-length chunk ends a chunked body, and
            the device would take it as the end of the response.
    """
    if not payload:
        raise LocalProtocolError("a Cometa message cannot be empty (a 0 chunk ends the stream)")
    return b"%x\r\n%b\r\n" % (len(payload), payload)


class ChunkReader:
    """Incremental reader of device chunks; see the module docstring for the tolerance rules."""

    __slots__ = ("_buf", "_failed", "_need", "_off", "max_chunk")

    def __init__(self, max_chunk: int) -> None:
        if max_chunk < len(_C_EMPTY_REPLY):
            # The C client's empty reply declares 2 bytes: a smaller limit would refuse it.
            raise ValueError(f"max_chunk must be at least 2, not {max_chunk}")
        self.max_chunk = max_chunk
        self._buf = bytearray()
        self._off = 0  # bytes of _buf already consumed
        self._need = -1  # payload bytes still expected, or -1 while reading a size line
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a payload (at most ``max_chunk`` + a feed)."""
        return len(self._buf) - self._off

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the payloads of the chunks they complete, in order.

        Raises:
            MalformedChunk: a size line is not hex or is longer than ``MAX_SIZE_LINE`` bytes;
                the reader is then unusable and every later call raises too.
            ChunkTooLarge: a chunk declares more than ``max_chunk`` bytes.
        """
        if self._failed:
            raise MalformedChunk("the chunk stream broke earlier")
        buf = self._buf
        buf += data
        out: list[bytes] = []
        try:
            self._parse(buf, out)
        except MalformedChunk:
            self._failed = True
            buf.clear()
            self._off = 0
            raise
        off = self._off
        if off == len(buf):
            buf.clear()
            self._off = 0
        elif off >= _COMPACT_AT and off * 2 >= len(buf):
            # Amortised O(1) per byte: what is moved is never more than what was consumed.
            del buf[:off]
            self._off = 0
        return out

    def _parse(self, buf: bytearray, out: list[bytes]) -> None:
        off = self._off
        end = len(buf)
        need = self._need
        view = memoryview(buf)  # payload slices copy once, not twice
        try:
            while True:
                if need < 0:
                    # Look for the size line's LF within the line limit only: O(1) per line.
                    nl = buf.find(b"\n", off, off + MAX_SIZE_LINE + 1)
                    if nl < 0:
                        if end - off > MAX_SIZE_LINE:
                            raise MalformedChunk("chunk size line too long")
                        return
                    line = bytes(buf[off:nl]).strip(_BLANKS)
                    off = nl + 1
                    if not line:
                        # A blank line: the optional CRLF after a payload, or a stray one.
                        continue
                    size_text = line.split(b";", 1)[0].strip(_BLANKS)
                    if not _HEX.fullmatch(size_text):
                        raise MalformedChunk(f"chunk size line is not hex: {line[:16]!r}")
                    need = int(size_text, 16)
                    if need > self.max_chunk:
                        raise ChunkTooLarge(
                            f"chunk of {need} bytes exceeds the limit of {self.max_chunk}"
                        )
                if end - off < need:
                    return
                payload = bytes(view[off : off + need])
                off += need
                need = -1
                out.append(b"" if payload == _C_EMPTY_REPLY else payload)
        finally:
            view.release()  # the buffer must be resizable again before the next feed
            self._off = off
            self._need = need
