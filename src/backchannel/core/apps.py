"""Applications, device credentials and the admin token: management and authentication.

Authentication runs on every API request, so app records are cached for a short time
(``cache_ttl``). In cluster mode a change made on another node is therefore seen here
within ``cache_ttl`` seconds; changes made through this node are seen at once.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from enum import Enum

from backchannel.core.clock import Clock
from backchannel.core.credentials import (
    check_secret,
    hash_secret,
    new_app_id,
    new_key,
    new_secret,
    valid_device_id,
)
from backchannel.state.store import AlreadyExists, AppRecord, DeviceCredential, Store

log = logging.getLogger(__name__)

ADMIN_TOKEN_SETTING = "admin_token_hash"


class InvalidInput(ValueError):
    """A management request with a bad field; the message names it."""


class NotFound(LookupError):
    """The application or device credential does not exist."""


class DeviceAuth(Enum):
    """Result of a device's authentication attempt."""

    OK = "ok"
    OPEN_ATTACH = "open_attach"
    UNKNOWN_APP = "unknown_app"
    BAD_DEVICE_ID = "bad_device_id"
    MISSING_KEY = "missing_key"
    BAD_KEY = "bad_key"

    @property
    def accepted(self) -> bool:
        """True when the device may connect."""
        return self in (DeviceAuth.OK, DeviceAuth.OPEN_ATTACH)


@dataclass(frozen=True, slots=True)
class AppSettings:
    """The changeable settings of an application (None in an update means: keep).

    ``clear`` names fields an update resets to their default (no webhook, the server's
    timeout, no open attach, no allow-list).
    """

    webhook_url: str | None = None
    default_timeout: float | None = None
    allow_open_attach: bool | None = None
    allowed_devices: tuple[str, ...] | None = None
    name: str | None = None
    #: What the webhook receives: any of ``event``, ``presence``, ``call``.
    webhook_kinds: tuple[str, ...] | None = None
    clear: tuple[str, ...] = ()


_CLEARED: dict[str, object] = {
    "webhook_url": None,
    "default_timeout": None,
    "allow_open_attach": False,
    "allowed_devices": (),
    "webhook_kinds": ("event",),
}
#: The kinds of webhook an application can take.
WEBHOOK_KINDS = ("event", "presence", "call", "message")


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidInput("name must be 1 to 200 characters")
    return name


def _check_settings(settings: AppSettings) -> None:
    if settings.name is not None:
        _check_name(settings.name)
    url = settings.webhook_url
    if url and not (url.startswith("http://") or url.startswith("https://")):
        raise InvalidInput("webhook_url must be an http:// or https:// URL")
    t = settings.default_timeout
    if t is not None and not (0 < t <= 86400):
        raise InvalidInput("default_timeout must be between 0 and 86400 seconds")
    kinds = settings.webhook_kinds
    if kinds is not None:
        bad = sorted(set(kinds) - set(WEBHOOK_KINDS))
        if bad:
            raise InvalidInput(f"webhook_kinds: unknown kind(s) {', '.join(bad)}")
    for device_id in settings.allowed_devices or ():
        if not valid_device_id(device_id):
            raise InvalidInput(f"allowed_devices: {device_id!r} is not a valid device id")


def _kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """Deduplicated, in the canonical order."""
    return tuple(k for k in WEBHOOK_KINDS if k in kinds)


class AppService:
    """Create, change and authenticate applications and their devices."""

    def __init__(self, store: Store, clock: Clock, *, cache_ttl: float = 2.0) -> None:
        self._store = store
        self._clock = clock
        self._ttl = cache_ttl
        self._cache: dict[str, tuple[float, AppRecord | None]] = {}
        self._admin_hash: str | None = None

    # -- admin token ---------------------------------------------------------------------

    async def init_admin_token(self, given: str | None) -> str | None:
        """Install ``given`` as the admin token, or create one at first start.

        Returns:
            The plaintext of a newly generated token (to print once), else None.
        """
        if given:
            self._admin_hash = hash_secret(given)
            await self._store.set_setting(ADMIN_TOKEN_SETTING, self._admin_hash)
            return None
        self._admin_hash = await self._store.get_setting(ADMIN_TOKEN_SETTING)
        if self._admin_hash is not None:
            return None
        token = new_key()
        self._admin_hash = hash_secret(token)
        await self._store.set_setting(ADMIN_TOKEN_SETTING, self._admin_hash)
        return token

    def is_admin(self, token: str) -> bool:
        """True when ``token`` is the admin token (constant-time)."""
        return self._admin_hash is not None and check_secret(token, self._admin_hash)

    # -- applications ----------------------------------------------------------------------

    async def create(
        self, name: str, settings: AppSettings = AppSettings()
    ) -> tuple[AppRecord, str]:
        """Create an application; return it and its secret (shown once)."""
        name = _check_name(name)
        _check_settings(settings)
        secret = new_secret()
        for _ in range(5):
            app = AppRecord(
                app_id=new_app_id(),
                name=name,
                secret_hash=hash_secret(secret),
                created_at=self._clock.time(),
                webhook_url=settings.webhook_url or None,
                default_timeout=settings.default_timeout,
                allow_open_attach=bool(settings.allow_open_attach),
                allowed_devices=settings.allowed_devices or (),
                webhook_kinds=_kinds(settings.webhook_kinds or ("event",)),
            )
            try:
                await self._store.create_app(app)
            except AlreadyExists:
                continue
            self._cache[app.app_id] = (self._clock.monotonic() + self._ttl, app)
            log.info("application created: %s (%s)", app.app_id, name)
            return app, secret
        raise RuntimeError("could not find a free application id")

    async def get(self, app_id: str) -> AppRecord | None:
        """Return an application, from the cache when fresh."""
        hit = self._cache.get(app_id)
        now = self._clock.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        app = await self._store.get_app(app_id)
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[app_id] = (now + self._ttl, app)
        return app

    async def require(self, app_id: str) -> AppRecord:
        """Return an application or raise :class:`NotFound`."""
        app = await self.get(app_id)
        if app is None:
            raise NotFound(f"application {app_id} does not exist")
        return app

    async def list_apps(self) -> list[AppRecord]:
        """Return every application."""
        return await self._store.list_apps()

    async def update(self, app_id: str, settings: AppSettings) -> AppRecord:
        """Change an application's settings; fields left None keep their value."""
        _check_settings(settings)
        app = await self._store.get_app(app_id)
        if app is None:
            raise NotFound(f"application {app_id} does not exist")
        changes = {
            k: v for k, v in dataclasses.asdict(settings).items() if v is not None and k != "clear"
        }
        if "webhook_kinds" in changes:
            changes["webhook_kinds"] = _kinds(changes["webhook_kinds"])
        if "name" in changes:
            changes["name"] = _check_name(changes["name"])
        if changes.get("webhook_url") == "":
            changes["webhook_url"] = None
        for name in settings.clear:
            if name not in _CLEARED:
                raise InvalidInput(f"{name} cannot be cleared")
            changes[name] = _CLEARED[name]
        app = dataclasses.replace(app, **changes)
        await self._store.update_app(app)
        self._cache.pop(app_id, None)
        return app

    async def rotate_secret(self, app_id: str) -> str:
        """Give an application a new secret; the old one stops working at once here."""
        app = await self._store.get_app(app_id)
        if app is None:
            raise NotFound(f"application {app_id} does not exist")
        secret = new_secret()
        await self._store.update_app(dataclasses.replace(app, secret_hash=hash_secret(secret)))
        self._cache.pop(app_id, None)
        log.info("application secret rotated: %s", app_id)
        return secret

    async def delete(self, app_id: str) -> bool:
        """Delete an application and its device credentials."""
        self._cache.pop(app_id, None)
        deleted = await self._store.delete_app(app_id)
        self._cache.pop(app_id, None)
        if deleted:
            log.info("application deleted: %s", app_id)
        return deleted

    async def authenticate(self, app_id: str, secret: str) -> AppRecord | None:
        """Return the application when ``secret`` is its secret, else None."""
        app = await self.get(app_id)
        if app is None or not check_secret(secret, app.secret_hash):
            return None
        return app

    # -- devices -------------------------------------------------------------------------

    async def provision(
        self, app_id: str, device_id: str, tags: tuple[str, ...] = ()
    ) -> tuple[DeviceCredential, str]:
        """Issue a key for a device (replacing any earlier key); return it once."""
        await self.require(app_id)
        if not valid_device_id(device_id):
            raise InvalidInput(
                "device id must be 1-128 letters, digits or ._:@- and start alphanumeric"
            )
        key = new_key()
        cred = DeviceCredential(app_id, device_id, hash_secret(key), self._clock.time(), tags)
        await self._store.put_device_credential(cred)
        log.info("device provisioned: %s/%s", app_id, device_id)
        return cred, key

    async def credentials(self, app_id: str) -> list[DeviceCredential]:
        """Return the provisioned devices of an application."""
        await self.require(app_id)
        return await self._store.list_device_credentials(app_id)

    async def revoke(self, app_id: str, device_id: str) -> bool:
        """Delete a device's key."""
        await self.require(app_id)
        return await self._store.delete_device_credential(app_id, device_id)

    async def can_connect(self, app: AppRecord, device_id: str) -> bool:
        """Whether the device could ever connect: it has a key, or the app lets it in without."""
        if app.allow_open_attach or device_id in app.allowed_devices:
            return True
        return await self._store.get_device_credential(app.app_id, device_id) is not None

    async def authenticate_device(self, app_id: str, device_id: str, key: str | None) -> DeviceAuth:
        """Decide whether a device may connect, with or without a key."""
        app = await self.get(app_id)
        if app is None:
            return DeviceAuth.UNKNOWN_APP
        if not valid_device_id(device_id):
            return DeviceAuth.BAD_DEVICE_ID
        if key:
            cred = await self._store.get_device_credential(app_id, device_id)
            if cred is not None and check_secret(key, cred.key_hash):
                return DeviceAuth.OK
            return DeviceAuth.BAD_KEY
        if app.allow_open_attach or device_id in app.allowed_devices:
            # A provisioned device keeps its key even in an open app, or anyone could take
            # over its id without one.
            if await self._store.get_device_credential(app_id, device_id) is not None:
                return DeviceAuth.MISSING_KEY
            return DeviceAuth.OPEN_ATTACH
        return DeviceAuth.MISSING_KEY
