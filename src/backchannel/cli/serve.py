"""``backchannel serve``: run the relay with embedded defaults."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic import ValidationError

from backchannel.config import load_config


@click.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML file.")
@click.option("--host", help="Address to listen on [0.0.0.0].")
@click.option("--port", type=int, help="Port for devices, apps and admin [8080].")
@click.option("--data-dir", type=click.Path(path_type=Path), help="State directory.")
@click.option("--store", type=click.Choice(["sqlite", "memory"]), help="State backend [sqlite].")
@click.option("--admin-token", envvar=None, help="Admin token (else generated at first start).")
@click.option("--node-id", help="This node's id in a cluster.")
@click.option("--default-timeout", type=float, help="Call timeout when none is given [30].")
@click.option("--max-timeout", type=float, help="Cap on any call timeout [300].")
@click.option("--heartbeat-interval", type=float, help="Native PING interval [25].")
@click.option("--heartbeat-timeout", type=float, help="Silence before a device drops [75].")
@click.option("--max-body-size", type=int, help="Largest body in bytes [16 MiB].")
@click.option("--max-inflight-per-device", type=int, help="Calls in flight per device [10000].")
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    help="A reverse proxy (IP or CIDR) whose X-Forwarded-For/-Proto to believe; repeatable.",
)
@click.option(
    "--webhook-deny",
    "webhook_deny_networks",
    multiple=True,
    help="A network (IP or CIDR) webhooks may not reach; repeatable; replaces the default list.",
)
@click.option("--message-ttl", type=float, help="Queued message lifetime without ?ttl= [86400].")
@click.option("--message-max-ttl", type=float, help="Longest ?ttl= for queued messages [604800].")
@click.option(
    "--message-retention-seconds",
    type=float,
    help="Keep finished messages and idempotency keys (s) [86400].",
)
@click.option("--message-max-body-size", type=int, help="Largest queued message body [1 MiB].")
@click.option("--max-queued-per-device", type=int, help="Queued messages per device [1000].")
@click.option(
    "--broadcast-max-bytes",
    type=int,
    help="Largest body x connected targets of a fan-out or publish [256 MiB].",
)
@click.option("--fanout-max-devices", type=int, help="Devices one fan-out may target [10000].")
@click.option("--cometa-liveness", type=float, help="Silence before a Cometa device drops [120].")
@click.option("--cometa-stale-grace", type=float, help="Wait for a late Cometa reply [5].")
@click.option("--token-expire-seconds", type=float, help="Socket2me token lifetime [21600].")
@click.option(
    "--socket2me",
    type=click.Choice(["open", "admin", "off"]),
    help="Who may take Socket2me tokens at GET /new [open].",
)
@click.option("--tunnel-timeout", type=float, help="Wait for a tunnel client's answer [30].")
@click.option("--tunnel-max-body-size", type=int, help="Largest tunnel body in bytes [16 MiB].")
@click.option("--expose-max-body-size", type=int, help="Native tunnel body limit, 0 = none [0].")
@click.option("--domain", help="Base domain: tunnels answer at NAME.DOMAIN (wildcard DNS).")
@click.option("--tunnel-rate-limit", type=float, help="Requests/s per client IP, 0 = off [400].")
@click.option("--tunnel-rate-burst", type=int, help="Burst per client IP [800].")
@click.option("--event-retention-count", type=int, help="Events kept per application [10000].")
@click.option(
    "--event-retention-seconds", type=float, help="Age at which events are deleted [604800]."
)
@click.option("--webhook-max-attempts", type=int, help="Webhook attempts before dead [12].")
@click.option("--webhook-backoff", type=float, help="First webhook retry delay (s) [1].")
@click.option("--webhook-max-backoff", type=float, help="Cap on webhook retry delays (s) [300].")
@click.option("--webhook-timeout", type=float, help="Timeout of one webhook POST (s) [10].")
@click.option("--webhook-concurrency", type=int, help="Webhook POSTs in flight at most [32].")
@click.option(
    "--webhook-retention-seconds", type=float, help="Keep delivered outbox rows (s) [86400]."
)
@click.option("--shutdown-grace", type=float, help="Seconds for calls in flight at exit [10].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--access-log/--no-access-log", default=None, help="Log each request.")
@click.option("--tls-cert", type=click.Path(path_type=Path), help="PEM certificate chain.")
@click.option("--tls-key", type=click.Path(path_type=Path), help="PEM private key.")
def serve(config_file: Path | None, **flags: object) -> None:
    """Run the relay server (flags > BACKCHANNEL_* variables > --config file > defaults)."""
    from backchannel.app import run

    # A repeatable flag given no value is (), which must not hide the variable or the file.
    for name in ("trusted_proxies", "webhook_deny_networks"):
        flags[name] = list(flags[name]) or None  # type: ignore[call-overload]
    try:
        config = load_config(config_file, **flags)
    except (ValidationError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(f"invalid configuration: {exc}") from None
    run(config)
