"""Coverage-guided fuzzing of the Cometa device parsers with atheris.

The invariant (COMPAT.md, Cometa, "Device side"; ``backchannel.wire.errors``): for any bytes,
``ChunkReader.feed``, ``CometaConnection.receive_data``, ``parse_attach`` and ``sniff`` return
or raise ``ProtocolError``; any other exception is a bug. ``sniff`` never raises at all.
Run ``python fuzzing/cometa_chunks.py [corpus_dir] [-max_total_time=60]``.
"""

from __future__ import annotations

import contextlib
import sys

from backchannel.wire.cometa import ChunkReader, CometaConnection, Sniff, parse_attach, sniff
from backchannel.wire.errors import ProtocolError

MAX_CHUNK = 4096


def check(data: bytes) -> None:
    """One fuzz input: run every Cometa parser on it; only ProtocolError may escape."""
    assert sniff(data) in (Sniff.NEED_MORE, Sniff.ATTACH, Sniff.OTHER)
    try:
        request = parse_attach(data, max_body=256)
    except ProtocolError:
        pass
    else:
        assert request is None or 0 < request.consumed <= len(data)
    # The first byte picks a split point, so framing across feeds is fuzzed too.
    cut = data[0] % (len(data) + 1) if data else 0
    reader = ChunkReader(MAX_CHUNK)
    try:
        for piece in (data[:cut], data[cut:]):
            for payload in reader.feed(piece):
                assert len(payload) <= MAX_CHUNK
    except ProtocolError:
        pass
    conn = CometaConnection(max_chunk=MAX_CHUNK, now=0.0)
    with contextlib.suppress(ProtocolError):
        conn.receive_data(data, 1.0)


def main() -> int:
    """Run atheris when it is installed; otherwise explain how to get it."""
    try:
        import atheris  # type: ignore[import-untyped]
    except ImportError:
        print(
            "atheris is not installed; to fuzz the Cometa parsers run:\n"
            "    .venv/bin/pip install atheris\n"
            "    .venv/bin/python fuzzing/cometa_chunks.py -max_total_time=60\n"
            "(see fuzzing/README.md)"
        )
        return 0
    atheris.instrument_all()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
