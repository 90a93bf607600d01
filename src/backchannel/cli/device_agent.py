"""``backchannel device``: a ready device agent that answers calls with Python functions.

Handlers are named ``module:function`` (``package.module:Class.method`` works too) and are
registered on :class:`backchannel.sdk.device.Device`, which keeps the connection alive.
``backchannel.cli.device_agent:echo`` answers every call with its body, for trying things.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

Handler = Callable[..., Any]


def echo(body: bytes) -> bytes:
    """Answer a call with its own body."""
    return body


def print_push(topic: str, data: bytes) -> None:
    """Write a published message to stdout: the topic, a tab, the data (UTF-8, escaped)."""
    click.echo(f"{topic}\t{data.decode('utf-8', 'backslashreplace')}")


def resolve(spec: str) -> Handler:
    """Import the callable a ``module:function`` string names.

    Raises:
        click.BadParameter: the string is malformed, or names nothing callable.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise click.BadParameter(f"{spec!r} is not of the form module:function")
    # Like other app runners, find handler modules in the directory the agent starts in,
    # which the console script (unlike `python -m`) does not put on sys.path.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(f"cannot import module {module_name!r}: {exc}") from None
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise click.BadParameter(
                f"module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise click.BadParameter(f"{spec!r} is not callable")
    handler: Handler = target
    return handler


def _resolve_handler(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    return resolve(value) if value is not None else None


def _resolve_methods(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, Handler]]:
    out: list[tuple[str, Handler]] = []
    for item in values:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise click.BadParameter(f"{item!r} is not of the form NAME=module:function")
        out.append((name, resolve(spec)))
    return out


def _resolve_subscriptions(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, Handler]]:
    out: list[tuple[str, Handler]] = []
    for item in values:
        pattern, sep, spec = item.partition("=")
        if not pattern or (sep and not spec):
            raise click.BadParameter(f"{item!r} is not of the form PATTERN[=module:function]")
        out.append((pattern, resolve(spec) if sep else print_push))
    return out


@click.command()
@click.option(
    "--server",
    required=True,
    envvar="BACKCHANNEL_SERVER",
    metavar="URL",
    help="The relay, e.g. http://127.0.0.1:8080 (or BACKCHANNEL_SERVER).",
)
@click.option("--app", "app_id", required=True, metavar="APP", help="The application id.")
@click.option("--id", "device_id", required=True, metavar="DEVICE_ID", help="This device's id.")
@click.option(
    "--key",
    envvar="BACKCHANNEL_DEVICE_KEY",
    metavar="K",
    help="The device key from `devices provision` (or BACKCHANNEL_DEVICE_KEY); "
    "omit it only for apps that allow open attach.",
)
@click.option(
    "--handler",
    callback=_resolve_handler,
    metavar="module:function",
    help="Answers calls of any method without its own handler "
    "(try backchannel.cli.device_agent:echo).",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    callback=_resolve_methods,
    metavar="NAME=module:function",
    help="Answers calls of method NAME (repeatable).",
)
@click.option(
    "--subscribe",
    "subscriptions",
    multiple=True,
    callback=_resolve_subscriptions,
    metavar="PATTERN[=module:function]",
    help="Receive messages published on topics matching PATTERN (MQTT wildcards + and #): "
    "printed as 'topic<TAB>data' lines, or passed to function(topic, data). Repeatable.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="How much to log on stderr.",
)
def device(
    server: str,
    app_id: str,
    device_id: str,
    key: str | None,
    handler: Handler | None,
    methods: list[tuple[str, Handler]],
    subscriptions: list[tuple[str, Handler]],
    log_level: str,
) -> None:
    """Connect as a device and answer calls until interrupted (reconnecting as needed)."""
    if handler is None and not methods and not subscriptions:
        raise click.UsageError("give --handler, at least one --method, or --subscribe")
    if not server.startswith(("http://", "https://", "ws://", "wss://")):
        raise click.BadParameter("must start with http(s):// or ws(s)://", param_hint="--server")
    try:
        # Imported here so the rest of the CLI works without (or before) the SDK.
        from backchannel.sdk.device import Device
        from backchannel.sdk.errors import DeviceConnectionError
    except ImportError as exc:
        raise click.ClickException(f"the device SDK is not available: {exc}") from None
    # The SDK reports connects, disconnects and reconnect delays at INFO; show them.
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    agent = Device(server, app_id, device_id, key=key or None)
    if handler is not None:
        agent.add_handler(handler)
    for name, fn in methods:
        agent.add_handler(fn, method=name)
    for pattern, fn in subscriptions:
        try:
            agent.topic(pattern)(fn)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--subscribe") from None
    click.echo(f"Device {device_id} of {app_id} connecting to {server} (Ctrl-C stops).", err=True)
    try:
        agent.run()
    except KeyboardInterrupt:
        click.echo("Stopped.", err=True)
    except DeviceConnectionError as exc:
        # Fatal closes only (bad key, revoked, taken over): reconnecting would not help.
        raise click.ClickException(f"the server ended the session for good: {exc}") from None
