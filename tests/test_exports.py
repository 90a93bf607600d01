"""The public names: everything in ``__all__`` resolves."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "module",
    ["backchannel", "backchannel.sdk", "backchannel.wire.native", "backchannel.wire.cometa"],
)
def test_all_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__
    for name in mod.__all__:
        assert getattr(mod, name) is not None, name


def test_top_level_api() -> None:
    import backchannel

    assert {"Device", "Client", "AsyncClient", "Tunnel", "__version__"} <= set(backchannel.__all__)
    from backchannel.sdk import Tunnel, TunnelRefused

    assert backchannel.Tunnel is Tunnel
    assert TunnelRefused.close_code == 4006
