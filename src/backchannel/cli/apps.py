"""``backchannel apps ...`` and ``backchannel devices ...``: manage applications and device keys."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from backchannel.cli.admin_backend import (
    DEFAULT_DATA_DIR,
    JSON,
    AdminBackend,
    BackendError,
    Target,
    open_backend,
)
from backchannel.cli.output import (
    json_option,
    print_fields,
    print_json,
    print_note,
    print_once,
    print_table,
    timestamp,
)
from backchannel.core.apps import WEBHOOK_KINDS, AppSettings
from backchannel.state.store import StoreError

T = TypeVar("T")

BACKENDS_HELP = """
\b
Where the change is made:
  --server URL (or BACKCHANNEL_SERVER): through the admin API of a running server,
    authorized by --admin-token (or BACKCHANNEL_ADMIN_TOKEN).
  otherwise: directly in the store in --data-dir (or BACKCHANNEL_DATA_DIR), which
    works before the server runs. A running server sees such changes within about
    2 s (its cache TTL); closing live sessions on delete/revoke needs --server.
"""


def backend_options(fn: Callable[..., None]) -> Callable[..., None]:
    """Add ``--server``, ``--admin-token`` and ``--data-dir``; pass them on as ``target``."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any, server: str | None, admin_token: str | None, data_dir: Path, **kwargs: Any
    ) -> None:
        if server and not server.startswith(("http://", "https://")):
            raise click.BadParameter("must start with http:// or https://", param_hint="--server")
        if server and not admin_token:
            raise click.UsageError(
                "--server needs the admin token: pass --admin-token or set BACKCHANNEL_ADMIN_TOKEN"
            )
        fn(*args, target=Target(server or None, admin_token or None, data_dir), **kwargs)

    options = [
        click.option(
            "--server",
            envvar="BACKCHANNEL_SERVER",
            metavar="URL",
            help="Manage a running server through its admin API (else the local data dir).",
        ),
        click.option(
            "--admin-token",
            envvar="BACKCHANNEL_ADMIN_TOKEN",
            metavar="TOKEN",
            help="The server's admin token (with --server).",
        ),
        click.option(
            "--data-dir",
            envvar="BACKCHANNEL_DATA_DIR",
            type=click.Path(file_okay=False, path_type=Path),
            default=DEFAULT_DATA_DIR,
            show_default=True,
            help="The server's data directory (without --server).",
        ),
    ]
    decorated: Callable[..., None] = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated


def run_backend(
    target: Target, action: Callable[[AdminBackend], Awaitable[T]], *, create: bool = False
) -> T:
    """Run one management action on the chosen backend; failures exit 1 with the reason."""

    async def main() -> T:
        async with open_backend(target, create=create) as backend:
            return await action(backend)

    try:
        return asyncio.run(main())
    except BackendError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, sqlite3.Error, StoreError) as exc:
        raise click.ClickException(f"the store in {target.data_dir} failed: {exc}") from None


def _local_note(target: Target, consequence: str) -> None:
    if not target.server:
        print_note(
            f"Note: changed directly in {target.data_dir}. A running server picks this up "
            f"within ~2 s, but {consequence}; use --server to do that at once."
        )


def _app_fields(app: JSON) -> list[tuple[str, Any]]:
    return [
        ("app id", app["app_id"]),
        ("name", app["name"]),
        ("webhook", app.get("webhook_url")),
        ("webhook kinds", app.get("webhook_kinds")),
        ("default timeout (s)", app.get("default_timeout")),
        ("open attach", app.get("allow_open_attach")),
        ("allowed devices", app.get("allowed_devices")),
        ("created", timestamp(app.get("created_at"))),
    ]


def _settings(
    webhook: str | None,
    default_timeout: float | None,
    allow_open_attach: bool | None,
    allowed_devices: tuple[str, ...] | None = None,
    webhook_kinds: tuple[str, ...] | None = None,
) -> AppSettings:
    return AppSettings(
        webhook_url=webhook,
        webhook_kinds=webhook_kinds or None,
        default_timeout=default_timeout,
        allow_open_attach=allow_open_attach,
        allowed_devices=allowed_devices,
    )


_timeout_type = click.FloatRange(min=0, min_open=True, max=86400)


# -- apps ------------------------------------------------------------------------------------


@click.group(epilog=BACKENDS_HELP)
def apps() -> None:
    """Create, list, change and delete applications."""


@apps.command("create", epilog=BACKENDS_HELP)
@click.argument("name")
@click.option(
    "--webhook",
    metavar="URL",
    help="URL that receives the app's device events, signed (see docs/cometa.md#webhooks).",
)
@click.option(
    "--webhook-kind",
    "webhook_kinds",
    multiple=True,
    type=click.Choice(WEBHOOK_KINDS),
    help="What the webhook receives (repeatable; default: event). See docs/api.md#webhooks.",
)
@click.option(
    "--default-timeout", type=_timeout_type, metavar="S", help="Call timeout for this app."
)
@click.option("--allow-open-attach", is_flag=True, help="Let any device id connect without a key.")
@click.option(
    "--allow-device",
    "allowed_devices",
    multiple=True,
    metavar="ID",
    help="A device id that may connect without a key (repeatable).",
)
@json_option
@backend_options
def create_app(
    name: str,
    webhook: str | None,
    webhook_kinds: tuple[str, ...],
    default_timeout: float | None,
    allow_open_attach: bool,
    allowed_devices: tuple[str, ...],
    as_json: bool,
    target: Target,
) -> None:
    """Create an application and print its id and secret (the secret is shown only once)."""
    settings = _settings(
        webhook, default_timeout, allow_open_attach, allowed_devices, webhook_kinds
    )
    app = run_backend(target, lambda b: b.create_app(name, settings), create=True)
    if as_json:
        print_json(app)
        return
    print_fields(_app_fields(app), title="Application created")
    print_once("Secret", app["secret"], "secret")


@apps.command("list", epilog=BACKENDS_HELP)
@json_option
@backend_options
def list_apps(as_json: bool, target: Target) -> None:
    """List every application."""
    items = run_backend(target, lambda b: b.list_apps())
    if as_json:
        print_json({"apps": items})
        return
    if not items:
        print_note("No applications yet: create one with `backchannel apps create NAME`.")
        return
    rows = [
        (
            a["app_id"],
            timestamp(a.get("created_at"), "minutes"),
            a["name"],
            a.get("default_timeout"),
            a.get("allow_open_attach"),
            a.get("webhook_url"),
        )
        for a in items
    ]
    print_table(("APP ID", "CREATED", "NAME", "TIMEOUT", "OPEN", "WEBHOOK"), rows, no_wrap=(0, 1))


@apps.command("show", epilog=BACKENDS_HELP)
@click.argument("app_id", metavar="APP")
@json_option
@backend_options
def show_app(app_id: str, as_json: bool, target: Target) -> None:
    """Show one application's settings."""
    app = run_backend(target, lambda b: b.show_app(app_id))
    if as_json:
        print_json(app)
        return
    print_fields(_app_fields(app))


@apps.command("update", epilog=BACKENDS_HELP)
@click.argument("app_id", metavar="APP")
@click.option("--webhook", metavar="URL", help="New webhook URL ('' removes it).")
@click.option(
    "--webhook-kind",
    "webhook_kinds",
    multiple=True,
    type=click.Choice(WEBHOOK_KINDS),
    help="What the webhook receives (repeatable; replaces the list). See docs/api.md#webhooks.",
)
@click.option("--default-timeout", type=_timeout_type, metavar="S", help="New call timeout.")
@click.option(
    "--allow-open-attach/--no-allow-open-attach",
    default=None,
    help="Let any device id connect without a key, or stop that.",
)
@click.option(
    "--allow-device",
    "allowed_devices",
    multiple=True,
    metavar="ID",
    help="Replace the allow-list with these device ids (repeatable).",
)
@click.option("--clear-allowed-devices", is_flag=True, help="Empty the allow-list.")
@json_option
@backend_options
def update_app(
    app_id: str,
    webhook: str | None,
    webhook_kinds: tuple[str, ...],
    default_timeout: float | None,
    allow_open_attach: bool | None,
    allowed_devices: tuple[str, ...],
    clear_allowed_devices: bool,
    as_json: bool,
    target: Target,
) -> None:
    """Change an application's settings; options not given keep their value."""
    if allowed_devices and clear_allowed_devices:
        raise click.UsageError("give --allow-device or --clear-allowed-devices, not both")
    new_list = () if clear_allowed_devices else (allowed_devices or None)
    if (
        webhook is None
        and not webhook_kinds
        and default_timeout is None
        and allow_open_attach is None
        and new_list is None
    ):
        raise click.UsageError(
            "nothing to change: give --webhook, --webhook-kind, --default-timeout, "
            "--[no-]allow-open-attach, --allow-device or --clear-allowed-devices"
        )
    settings = _settings(webhook, default_timeout, allow_open_attach, new_list, webhook_kinds)
    app = run_backend(target, lambda b: b.update_app(app_id, settings))
    if as_json:
        print_json(app)
        return
    print_fields(_app_fields(app), title="Application updated")


@apps.command("rotate-secret", epilog=BACKENDS_HELP)
@click.argument("app_id", metavar="APP")
@json_option
@backend_options
def rotate_secret(app_id: str, as_json: bool, target: Target) -> None:
    """Give an application a new secret (shown only once); the old one stops working."""
    answer = run_backend(target, lambda b: b.rotate_secret(app_id))
    if as_json:
        print_json(answer)
        return
    click.echo(f"App id: {answer['app_id']}")
    print_once("New secret", answer["secret"], "secret")
    if not target.server:
        print_note("Note: a running server may accept the old secret for ~2 s more.")


@apps.command("delete", epilog=BACKENDS_HELP)
@click.argument("app_id", metavar="APP")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@backend_options
def delete_app(app_id: str, yes: bool, as_json: bool, target: Target) -> None:
    """Delete an application and all its device keys."""
    if not yes:
        app = run_backend(target, lambda b: b.show_app(app_id))
        click.confirm(
            f"Delete application {app['name']!r} ({app_id}) and all its device keys?",
            abort=True,
            err=True,
        )
    answer = run_backend(target, lambda b: b.delete_app(app_id))
    if as_json:
        print_json(answer)
        return
    if target.server:
        closed = answer.get("sessions_closed", 0)
        click.echo(f"Deleted application {answer['deleted']} ({closed} session(s) closed).")
    else:
        click.echo(f"Deleted application {answer['deleted']}.")
    _local_note(target, "its connected devices stay connected until they reconnect")


# -- devices ---------------------------------------------------------------------------------


@click.group(epilog=BACKENDS_HELP)
def devices() -> None:
    """Provision, list and revoke device keys."""


@devices.command("provision", epilog=BACKENDS_HELP)
@click.argument("app_id", metavar="APP")
@click.argument("device_id")
@click.option("--tag", "tags", multiple=True, metavar="T", help="A tag to record (repeatable).")
@json_option
@backend_options
def provision(
    app_id: str, device_id: str, tags: tuple[str, ...], as_json: bool, target: Target
) -> None:
    """Issue a key for a device (replacing any earlier key); the key is shown only once."""
    cred = run_backend(target, lambda b: b.provision(app_id, device_id, tags))
    if as_json:
        print_json(cred)
        return
    click.echo(f"Device {cred['device_id']} provisioned in application {cred['app_id']}.")
    print_once("Key", cred["key"], "device key")


@devices.command("list", epilog=BACKENDS_HELP)
@click.argument("app_id", metavar="APP")
@json_option
@backend_options
def list_devices(app_id: str, as_json: bool, target: Target) -> None:
    """List an application's provisioned devices (online status needs --server)."""
    items = run_backend(target, lambda b: b.list_devices(app_id))
    if as_json:
        print_json({"devices": items})
        return
    if not items:
        print_note(f"No devices provisioned in {app_id} yet.")
        return
    rows = [
        (
            d["device_id"],
            d.get("online") if d.get("online") is not None else "?",
            d.get("tags"),
            timestamp(d.get("created_at"), "minutes"),
        )
        for d in items
    ]
    print_table(("DEVICE ID", "ONLINE", "TAGS", "PROVISIONED"), rows, no_wrap=(0, 3))


@devices.command("revoke", epilog=BACKENDS_HELP)
@click.argument("app_id", metavar="APP")
@click.argument("device_id")
@json_option
@backend_options
def revoke(app_id: str, device_id: str, as_json: bool, target: Target) -> None:
    """Delete a device's key (with --server, also disconnect it at once)."""
    answer = run_backend(target, lambda b: b.revoke(app_id, device_id))
    if as_json:
        print_json(answer)
        return
    click.echo(f"Revoked device {answer['revoked']}.")
    _local_note(target, "a connected device stays connected until it reconnects")
