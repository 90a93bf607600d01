"""core/apps.py: credentials, authentication and the app cache (memory store, fake clock)."""

from __future__ import annotations

import pytest

from backchannel.core.apps import AppService, AppSettings, DeviceAuth, InvalidInput, NotFound
from backchannel.core.credentials import hash_secret
from backchannel.state.memory import MemoryStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now


@pytest.fixture
async def service() -> AppService:
    store = MemoryStore()
    await store.open()
    return AppService(store, FakeClock())


async def test_secrets_are_hashed_and_long(service: AppService) -> None:
    app, secret = await service.create("x")
    assert len(app.app_id) == 20
    assert len(secret) * 4 >= 128
    assert app.secret_hash == hash_secret(secret)
    assert secret not in repr(app)
    assert await service.authenticate(app.app_id, secret) == app
    assert await service.authenticate(app.app_id, secret + "x") is None
    assert await service.authenticate("missing", secret) is None


async def test_device_auth_outcomes(service: AppService) -> None:
    app, _ = await service.create("x")
    _, key = await service.provision(app.app_id, "d1")
    assert await service.authenticate_device(app.app_id, "d1", key) is DeviceAuth.OK
    assert await service.authenticate_device(app.app_id, "d1", "wrong") is DeviceAuth.BAD_KEY
    assert await service.authenticate_device(app.app_id, "d1", None) is DeviceAuth.MISSING_KEY
    assert await service.authenticate_device("nope", "d1", key) is DeviceAuth.UNKNOWN_APP
    assert await service.authenticate_device(app.app_id, "a b", key) is DeviceAuth.BAD_DEVICE_ID
    await service.update(app.app_id, AppSettings(allow_open_attach=True))
    assert await service.authenticate_device(app.app_id, "z", None) is DeviceAuth.OPEN_ATTACH
    # A key that is present is always checked, even with open attach.
    assert await service.authenticate_device(app.app_id, "z", "bad") is DeviceAuth.BAD_KEY


async def test_admin_token(service: AppService) -> None:
    generated = await service.init_admin_token(None)
    assert generated is not None and len(generated) >= 43
    assert service.is_admin(generated)
    assert await service.init_admin_token(None) is None  # already stored
    assert service.is_admin(generated)
    assert await service.init_admin_token("given-token") is None
    assert service.is_admin("given-token")
    assert not service.is_admin(generated)


async def test_validation(service: AppService) -> None:
    with pytest.raises(InvalidInput):
        await service.create("")
    with pytest.raises(InvalidInput):
        await service.create("x", AppSettings(webhook_url="file:///etc/passwd"))
    with pytest.raises(NotFound):
        await service.provision("missing", "d")
    app, _ = await service.create("x")
    with pytest.raises(InvalidInput):
        await service.provision(app.app_id, "-starts-with-dash")
    with pytest.raises(InvalidInput):
        await service.update(app.app_id, AppSettings(clear=("name",)))
