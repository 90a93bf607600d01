"""Coverage-guided fuzzing of the native frame parser with atheris.

The invariant (``docs/protocol.md`` § Frame types, ``backchannel.wire.errors``): for any
bytes, ``parse_frame`` returns a frame or raises ``ProtocolError``; any other exception is a
bug. Run ``python fuzzing/native_frames.py [corpus_dir] [-max_total_time=60]``.
"""

from __future__ import annotations

import sys

from backchannel.wire.errors import ProtocolError
from backchannel.wire.native.frames import parse_frame

MAX_SIZE = 64 * 1024


def check(data: bytes) -> None:
    """One fuzz input: parse it, with and without a size limit; only ProtocolError may escape."""
    for max_size in (0, MAX_SIZE):
        try:
            frame = parse_frame(data, max_size)
        except ProtocolError:
            continue
        assert frame.type is not None


def main() -> int:
    """Run atheris when it is installed; otherwise explain how to get it."""
    try:
        import atheris  # type: ignore[import-untyped]
    except ImportError:
        print(
            "atheris is not installed; to fuzz the native frame parser run:\n"
            "    .venv/bin/pip install atheris\n"
            "    .venv/bin/python fuzzing/native_frames.py -max_total_time=60\n"
            "(see fuzzing/README.md)"
        )
        return 0
    atheris.instrument_all()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
