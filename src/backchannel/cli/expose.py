"""``backchannel expose``: give a local HTTP service a public URL through the relay.

Runs a :class:`backchannel.sdk.tunnel.Tunnel`: prints the public URL(s) once the server
granted the tunnel, then one line per request (time, method, path, status, duration,
size), reconnecting with backoff until Ctrl-C or SIGTERM. URLs and the request log go to
stdout, connection news to stderr.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from backchannel.sdk.tunnel import Tunnel

DEFAULT_SERVER = "http://127.0.0.1:8080"
_LOG_HANDLER = "backchannel-expose"


# -- checks (the SDK's own, imported late so `--help` stays quick) -----------------------------


def _check_target(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    from backchannel.sdk.tunnel import LocalTarget

    try:
        LocalTarget.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _checker(option: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback validating one tunnel option with the SDK's rules."""

    def check(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        from backchannel.sdk.tunnel import tunnel_options

        if isinstance(value, tuple):  # repeatable, each maybe a comma-separated list
            value = tuple(v.strip() for item in value for v in item.split(",") if v.strip())
        if value is None or value == ():
            return value
        try:
            tunnel_options(**{option: value})
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        return value

    return check


# -- output ----------------------------------------------------------------------------------


def human_size(n: int) -> str:
    """A byte count for people: ``512 B``, ``1.5 KB``, ``3.2 MB`` (powers of 1024)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _status_style(status: int) -> str:
    if status >= 500 or status == 499:
        return "red"
    if status >= 400:
        return "yellow"
    if status >= 300:
        return "cyan"
    return "green"


class RequestLog:
    """Prints one line per request: styled on a terminal, plain otherwise."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False)

    def line(
        self, method: str, path: str, status: int, duration: float, size: int
    ) -> tuple[str, Text]:
        """The plain and the styled line."""
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        ms = f"{duration * 1000:.0f} ms"
        plain = f"{stamp} {method} {path} {status} {ms} {human_size(size)}"
        styled = Text.assemble(
            (stamp, "dim"),
            " ",
            (f"{method:<7}", "bold"),
            " ",
            path,  # user input: a Text part, never read as markup
            " ",
            (str(status), _status_style(status)),
            " ",
            (ms, "dim"),
            " ",
            human_size(size),
        )
        return plain, styled

    def __call__(self, method: str, path: str, status: int, duration: float, size: int) -> None:
        plain, styled = self.line(method, path, status, duration, size)
        if self.console.is_terminal:
            self.console.print(styled, soft_wrap=True)
        else:
            click.echo(plain)


class Announcer:
    """Prints the tunnel's URLs when it first comes up, and again if they ever change."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False)
        self.tunnel: Tunnel | None = None
        self._shown: tuple[str | None, str | None] | None = None

    def __call__(self) -> None:
        tunnel = self.tunnel
        if tunnel is None:
            return
        urls = (tunnel.public_url, tunnel.host_url)
        if urls == self._shown:
            click.echo("Tunnel back online (same URL).", err=True)
            return
        if self._shown is not None:
            click.echo("The tunnel's URL changed:", err=True)
        self._shown = urls
        rows = [("Public URL", urls[0]), ("Host URL", urls[1]), ("Forwarding to", tunnel.target)]
        if self.console.is_terminal:
            self.console.print(
                Text.assemble(("Tunnel ", "bold"), (tunnel.name or "", "bold green"))
            )
            for label, value in rows:
                if value:
                    self.console.print(Text.assemble((f"  {label:<14}", "dim"), (value, "bold")))
        else:
            click.echo(f"Tunnel {tunnel.name}")
            for label, value in rows:
                if value:
                    click.echo(f"{label}: {value}")


# -- the command -----------------------------------------------------------------------------


@click.command()
@click.argument("target", metavar="PORT|URL", callback=_check_target)
@click.option(
    "--server",
    envvar="BACKCHANNEL_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    metavar="URL",
    help="The relay (or BACKCHANNEL_SERVER).",
)
@click.option(
    "--app",
    "app_id",
    envvar="BACKCHANNEL_APP",
    required=True,
    metavar="APP",
    help="The application id (or BACKCHANNEL_APP).",
)
@click.option(
    "--device",
    "device_id",
    envvar="BACKCHANNEL_DEVICE",
    required=True,
    metavar="ID",
    help="The device id the tunnel connects as (or BACKCHANNEL_DEVICE).",
)
@click.option(
    "--key",
    envvar=["BACKCHANNEL_KEY", "BACKCHANNEL_DEVICE_KEY"],
    metavar="KEY",
    help="The device key (or BACKCHANNEL_KEY; prefer the variable: arguments show in ps). "
    "Omit it only for apps that allow open attach.",
)
@click.option(
    "--name",
    metavar="NAME",
    callback=_checker("name"),
    help="The tunnel's name, a DNS label (default: derived from the app and device).",
)
@click.option(
    "--auth",
    "basic_auth",
    metavar="USER:PASS",
    callback=_checker("basic_auth"),
    help="Callers must send these HTTP basic-auth credentials.",
)
@click.option(
    "--bearer",
    metavar="TOKEN",
    callback=_checker("bearer"),
    help="Callers must send 'Authorization: Bearer TOKEN' (either this or --auth works).",
)
@click.option(
    "--allow-ip",
    multiple=True,
    metavar="CIDR",
    callback=_checker("allow_ip"),
    help="Only callers from these networks get through (repeatable, or comma-separated).",
)
@click.option(
    "--deny-ip",
    multiple=True,
    metavar="CIDR",
    callback=_checker("deny_ip"),
    help="Callers from these networks are refused (repeatable, or comma-separated).",
)
@click.option(
    "--rate-limit",
    type=float,
    metavar="N",
    callback=_checker("rate_limit"),
    help="At most N requests per second per caller address (bursts of 2N).",
)
@click.option(
    "--rewrite-host",
    is_flag=True,
    help="Send the local host:port as Host instead of the public host.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Do not verify the TLS certificate of an https:// local service.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="How much connection news to print on stderr.",
)
def expose(
    target: str,
    server: str,
    app_id: str,
    device_id: str,
    key: str | None,
    name: str | None,
    basic_auth: str | None,
    bearer: str | None,
    allow_ip: tuple[str, ...],
    deny_ip: tuple[str, ...],
    rate_limit: float | None,
    rewrite_host: bool,
    insecure: bool,
    log_level: str,
) -> None:
    """Give the local HTTP service at PORT or URL a public URL, until interrupted.

    PORT is a port on localhost (3000); URL is http(s)://host:port, optionally with a path
    prefix that every request path is appended to. Requests, WebSockets and streaming
    answers (server-sent events, long polls, large downloads) pass through as the local
    service sends them. A refused tunnel (name taken, bad option) or refused credentials
    end the command with status 1.
    """
    if not server.startswith(("http://", "https://", "ws://", "wss://")):
        raise click.BadParameter("must start with http(s):// or ws(s)://", param_hint="--server")
    try:
        # Imported here so the rest of the CLI works without (or before) the SDK.
        from backchannel.sdk.errors import (
            AuthenticationFailed,
            DeviceConnectionError,
            TunnelRefused,
        )
        from backchannel.sdk.tunnel import Tunnel
    except ImportError as exc:
        raise click.ClickException(f"the device SDK is not available: {exc}") from None
    # Connection news (connected, disconnected, reconnecting in N s) from the SDK's loggers.
    sdk_log = logging.getLogger("backchannel.sdk")
    if not any(h.name == _LOG_HANDLER for h in sdk_log.handlers):
        handler = logging.StreamHandler()
        handler.name = _LOG_HANDLER
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        sdk_log.addHandler(handler)
    sdk_log.setLevel(log_level.upper())
    sdk_log.propagate = False

    announce = Announcer()
    try:
        tunnel = Tunnel(
            server,
            app_id,
            device_id,
            key or None,
            int(target) if target.isdigit() else target,
            name=name,
            basic_auth=basic_auth,
            bearer=bearer,
            allow_ip=allow_ip,
            deny_ip=deny_ip,
            rate_limit=rate_limit,
            rewrite_host=rewrite_host,
            on_request=RequestLog(),
            verify_local_tls=not insecure,
            on_connect=announce,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    announce.tunnel = tunnel
    click.echo(
        f"Exposing {tunnel.target} through {server} as {app_id}/{device_id} (Ctrl-C stops).",
        err=True,
    )
    try:
        tunnel.run()
    except KeyboardInterrupt:
        pass
    except TunnelRefused as exc:
        why = exc.detail.removeprefix("tunnel refused: ")
        raise click.ClickException(f"the server refused the tunnel: {why}") from None
    except AuthenticationFailed as exc:
        raise click.ClickException(f"the server refused the credentials: {exc.detail}") from None
    except DeviceConnectionError as exc:
        # Fatal closes only (revoked, taken over): reconnecting would not help.
        raise click.ClickException(f"the server ended the session for good: {exc}") from None
    click.echo("Stopped.", err=True)
