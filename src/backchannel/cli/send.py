"""``backchannel send``: call a device from the shell through the app REST API."""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import click
import orjson

from backchannel.cli.admin_backend import connect_error
from backchannel.cli.output import print_json

DEFAULT_SERVER = "http://127.0.0.1:8080"
TIMEOUT_HEADER = "X-Backchannel-Timeout"
# Extra client-side patience over the call timeout, for the trip to and from the server.
CLIENT_GRACE = 15.0


@dataclass(frozen=True, slots=True)
class SendResult:
    """The HTTP outcome of one send."""

    status: int
    body: bytes
    timeout: float | None


def segment(value: str) -> str:
    # Quoting keeps a stray "/" or "?" in an id from changing the route.
    return quote(value, safe=":@")


async def send_call(
    server: str,
    app_id: str,
    device_id: str,
    body: bytes,
    authorization: str,
    *,
    timeout: float | None = None,
    method: str | None = None,
    offline: str = "fail",
    wait: float | None = None,
    ttl: float | None = None,
    idempotency_key: str | None = None,
) -> SendResult:
    """POST ``body`` to the device's ``send`` route and return the status, reply and timeout.

    Raises:
        click.ClickException: the server cannot be reached.
    """
    import aiohttp  # here, not at the top, so the CLI starts quickly

    path = f"/v1/applications/{segment(app_id)}/devices/{segment(device_id)}/send"
    params: dict[str, str] = {}
    if timeout is not None:
        params["timeout"] = f"{timeout:g}"
    if method:
        params["method"] = method
    if offline != "fail":
        params["offline"] = offline
    if wait is not None:
        params["wait"] = f"{wait:g}"
    if ttl is not None:
        params["ttl"] = f"{ttl:g}"
    headers = {"Authorization": authorization, "Content-Type": "application/octet-stream"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    # The server enforces the call timeout; the client only guards against a dead server.
    waited = (wait or timeout or 0.0) if offline == "wait" else 0.0
    client_timeout = aiohttp.ClientTimeout(
        total=timeout + waited + CLIENT_GRACE if timeout is not None else None, sock_connect=10
    )
    return await post_bytes(server, path, body, headers, params, client_timeout)


async def post_bytes(
    server: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    params: dict[str, str] | None = None,
    client_timeout: Any = None,
) -> SendResult:
    """POST ``body`` to ``path`` on the server; return the status, body and echoed timeout.

    Raises:
        click.ClickException: the server cannot be reached.
    """
    import aiohttp

    url = server.rstrip("/") + path
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.post(url, data=body, params=params, headers=headers) as resp,
        ):
            raw = await resp.read()
            echoed = resp.headers.get(TIMEOUT_HEADER)
            return SendResult(resp.status, raw, _float_or_none(echoed))
    except aiohttp.ClientConnectorError as exc:
        raise click.ClickException(
            f"cannot connect to the server at {server} ({connect_error(exc)}); "
            "is `backchannel serve` running there? (--server, BACKCHANNEL_SERVER)"
        ) from None
    except aiohttp.ClientError as exc:
        raise click.ClickException(f"request to {server} failed: {exc}") from None
    except TimeoutError:
        raise click.ClickException(f"no answer from {server} in time") from None


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def error_body(result: SendResult) -> dict[str, Any]:
    """The server's JSON error, or a stand-in when something else (a proxy) answered."""
    try:
        data = orjson.loads(result.body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        return data
    text = result.body[:300].decode("utf-8", "replace").strip()
    return {"msg": f"{result.status}", "error": "http_error", "detail": text}


def _reply_json(result: SendResult) -> dict[str, Any]:
    out: dict[str, Any] = {"status": result.status, "timeout": result.timeout}
    try:
        out["body"] = result.body.decode("utf-8")
    except UnicodeDecodeError:
        # Replies are opaque bytes; JSON can carry binary ones only as base64.
        out["body_base64"] = base64.b64encode(result.body).decode()
    return out


F = TypeVar("F", bound=Callable[..., Any])


def app_credentials(fn: F) -> F:
    """The ``--secret``, ``--admin-token`` and ``--server`` options of the app-side commands."""
    for option in reversed(
        (
            click.option(
                "--secret",
                envvar="BACKCHANNEL_APP_SECRET",
                metavar="S",
                help="The app secret (or BACKCHANNEL_APP_SECRET).",
            ),
            click.option(
                "--admin-token",
                envvar="BACKCHANNEL_ADMIN_TOKEN",
                metavar="TOKEN",
                help="Use the admin token instead of an app secret.",
            ),
            click.option(
                "--server",
                envvar="BACKCHANNEL_SERVER",
                default=DEFAULT_SERVER,
                show_default=True,
                metavar="URL",
                help="The relay (or BACKCHANNEL_SERVER).",
            ),
        )
    ):
        fn = option(fn)
    return fn


def authorization_header(server: str, secret: str | None, admin_token: str | None) -> str:
    """The Authorization value for the app API, after checking the server URL.

    Raises:
        click.BadParameter, click.UsageError: a bad URL, or no credential.
    """
    if not server.startswith(("http://", "https://")):
        raise click.BadParameter("must start with http:// or https://", param_hint="--server")
    if secret:
        return f"OAuth {secret}"
    if admin_token:
        return f"Bearer {admin_token}"
    raise click.UsageError(
        "no credential: pass --secret (or set BACKCHANNEL_APP_SECRET), or --admin-token"
    )


def report_error(ctx: click.Context, result: SendResult, as_json: bool) -> None:
    """Print the server's error (as JSON too when asked) and exit 1."""
    error = error_body(result)
    detail = error.get("detail") or error.get("msg") or f"HTTP {result.status}"
    code = f"{result.status} {error['error']}" if error.get("error") else f"{result.status}"
    if as_json:
        print_json({"status": result.status, **error})
    click.echo(f"Error: {detail} ({code})", err=True)
    ctx.exit(1)


@click.command()
@click.argument("app_id", metavar="APP")
@click.argument("device_id", metavar="DEVICE")
@click.argument("body", required=False)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="Call timeout in seconds (else the app's, else the server's default).",
)
@click.option("--method", "-m", metavar="M", help="Method name the device's handler sees.")
@app_credentials
@click.option(
    "--offline",
    type=click.Choice(["fail", "wait", "queue"]),
    default="fail",
    show_default=True,
    help="When the device is offline: fail at once, wait for it, or queue the message "
    "(prints the message's JSON status; see docs/api.md).",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="With --offline wait: seconds to wait for the device (default: the timeout).",
)
@click.option(
    "--ttl",
    type=click.FloatRange(min=0, min_open=True),
    metavar="S",
    help="With --offline queue: seconds the message may wait in the queue.",
)
@click.option(
    "--idempotency-key",
    metavar="KEY",
    help="Retries with the same key never reach the device twice.",
)
@click.option("--stdin", "from_stdin", is_flag=True, help="Read the body from standard input.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON object (status, timeout, body or error) instead of the raw reply.",
)
@click.pass_context
def send(
    ctx: click.Context,
    app_id: str,
    device_id: str,
    body: str | None,
    timeout: float | None,
    method: str | None,
    secret: str | None,
    admin_token: str | None,
    server: str,
    offline: str,
    wait: float | None,
    ttl: float | None,
    idempotency_key: str | None,
    from_stdin: bool,
    as_json: bool,
) -> None:
    """Send BODY to a device and write its reply bytes to stdout.

    Errors print the server's detail on stderr and exit 1 (for example: the device is
    offline, the call timed out, or the device answered with an error).
    """
    authorization = authorization_header(server, secret, admin_token)
    if from_stdin == (body is not None):
        raise click.UsageError("give the BODY argument or --stdin, one of the two")
    payload = sys.stdin.buffer.read() if from_stdin else (body or "").encode()
    result = asyncio.run(
        send_call(
            server,
            app_id,
            device_id,
            payload,
            authorization,
            timeout=timeout,
            method=method,
            offline=offline,
            wait=wait,
            ttl=ttl,
            idempotency_key=idempotency_key,
        )
    )
    if result.status == 202:
        # Queued: the answer is the message's status object, not a device reply.
        click.echo(result.body.decode("utf-8", "replace"))
        return
    if 200 <= result.status < 300:
        if as_json:
            print_json(_reply_json(result))
        else:
            # Bytes go to the binary stdout unchanged: replies need not be text.
            click.echo(result.body, nl=False)
        return
    report_error(ctx, result, as_json)
