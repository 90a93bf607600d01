"""core/timeouts.py: the timeout in force."""

from __future__ import annotations

import pytest

from backchannel.core.timeouts import parse_timeout, resolve_timeout


@pytest.mark.parametrize(
    ("requested", "app", "expected"),
    [
        (None, None, 30.0),
        (None, 10.0, 10.0),
        (5.0, 10.0, 5.0),
        (500.0, None, 300.0),
        (None, 900.0, 300.0),
    ],
)
def test_resolve(requested: float | None, app: float | None, expected: float) -> None:
    assert resolve_timeout(requested, app, 30.0, 300.0) == expected


@pytest.mark.parametrize("raw", ["0", "-2", "nan", "inf", "abc", ""])
def test_parse_rejects(raw: str) -> None:
    with pytest.raises(ValueError, match="timeout"):
        parse_timeout(raw)


def test_parse_accepts_fractions() -> None:
    assert parse_timeout("0.25") == 0.25
