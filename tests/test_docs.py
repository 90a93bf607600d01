"""The user docs stay in step with the code: settings, close codes, SDK close handling."""

from __future__ import annotations

import re
from pathlib import Path

from backchannel.config import Config
from backchannel.sdk.device import _FATAL
from backchannel.transports.native_ws import CLOSE_CODES

ROOT = Path(__file__).resolve().parents[1]


def _section(path: str, heading: str) -> str:
    text = (ROOT / path).read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else None]


def test_every_setting_is_in_the_configuration_table() -> None:
    table = _section("docs/deploy.md", "## Configuration")
    missing = [name for name in Config.model_fields if f"| `{name}` |" not in table]
    assert not missing, f"settings missing from docs/deploy.md's table: {missing}"


def test_close_codes_are_documented() -> None:
    table = _section("docs/protocol.md", "## Close codes")
    documented = {int(code) for code in re.findall(r"^\| (\d{4}) \|", table, re.MULTILINE)}
    used = set(CLOSE_CODES.values()) | {1009}  # 1009: aiohttp's own, for an oversized frame
    assert used == documented
    # Every code the SDK treats as final is one the server sends.
    assert set(_FATAL) <= used


def test_every_error_code_of_the_front_doors_is_documented() -> None:
    codes: set[str] = set()
    for path in (ROOT / "src/backchannel/frontdoors").glob("*.py"):
        text = path.read_text()
        for pattern in (
            r'ApiError\(\s*\d{3},\s*"([a-z_]+)"',
            r'json_error\(\s*\d{3},\s*"([a-z_]+)"',
            r'error_response\(\s*request,\s*\d{3},\s*"([a-z_]+)"',
        ):
            codes |= set(re.findall(pattern, text))
    assert len(codes) > 20  # the patterns still find the codes
    docs = "".join(
        (ROOT / "docs" / name).read_text() for name in ("api.md", "tunnels.md", "socket2me.md")
    )
    missing = sorted(c for c in codes if f"`{c}`" not in docs and f'"{c}"' not in docs)
    assert not missing, f"error codes missing from the docs: {missing}"
