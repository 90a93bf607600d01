"""Server configuration: embedded defaults < TOML file < ``BACKCHANNEL_*`` variables < flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from backchannel.core.networks import WEBHOOK_DENY_DEFAULT, parse_networks

MiB = 1024 * 1024


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Config(BaseSettings):
    """Every server setting, with the embedded default. Keys are the same in TOML and env."""

    model_config = SettingsConfigDict(env_prefix="BACKCHANNEL_", extra="forbid")

    host: str = Field("0.0.0.0", description="Address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="Port for everything (0: any free)")
    data_dir: Path = Field(Path("backchannel-data"), description="Where the SQLite file lives")
    store: Literal["sqlite", "memory"] = Field("sqlite", description="Where state lives")
    admin_token: SecretStr | None = Field(None, description="Admin token (else generated once)")
    node_id: str = Field(default_factory=_default_node_id, description="This node's id")
    default_timeout: float = Field(30.0, gt=0, description="Call timeout when none is given (s)")
    max_timeout: float = Field(300.0, gt=0, description="Cap on any call timeout (s)")
    heartbeat_interval: float = Field(25.0, gt=0, description="Native PING interval (s)")
    heartbeat_timeout: float = Field(75.0, gt=0, description="Silence before a device drops (s)")
    max_body_size: int = Field(16 * MiB, ge=1024, description="Largest request/message body")
    max_inflight_per_device: int = Field(10_000, ge=1, description="Calls in flight per device")
    fanout_max_devices: int = Field(10_000, ge=1, description="Devices one fan-out call may target")
    broadcast_max_bytes: int = Field(
        256 * MiB,
        ge=1024,
        description="Largest body x connected targets of one fan-out or topic publish",
    )
    cometa_liveness: float = Field(120.0, gt=0, description="Silence before a Cometa device drops")
    cometa_stale_grace: float = Field(
        5.0, ge=0, description="How long a Cometa queue waits for a timed-out call's late reply"
    )
    token_expire_seconds: float = Field(
        21600.0,
        gt=0,
        # The bare name is also Socket2me's own variable TOKEN_EXPIRE_SECONDS (environment
        # names are case-insensitive), so operators moving over keep their setting.
        validation_alias=AliasChoices("BACKCHANNEL_TOKEN_EXPIRE_SECONDS", "token_expire_seconds"),
        description="Lifetime of a Socket2me token unless refreshed (s)",
    )
    socket2me: Literal["open", "admin", "off"] = Field(
        "open", description="Who may take tokens at GET /new: anyone, admin token only, nobody"
    )
    tunnel_timeout: float = Field(30.0, gt=0, description="Wait for a tunnel client's answer (s)")
    tunnel_max_body_size: int = Field(
        16 * MiB, ge=1024, description="Largest request or response body through a tunnel"
    )
    expose_max_body_size: int = Field(
        0, ge=0, description="Largest body through a native tunnel, streamed (0: no limit)"
    )
    domain: str | None = Field(
        None, description="Base domain for {name}.{domain} tunnel URLs (wildcard DNS)"
    )
    tunnel_rate_limit: float = Field(
        400.0, ge=0, description="Public requests per second per client IP (0: no limit)"
    )
    tunnel_rate_burst: int = Field(800, ge=1, description="Requests a client IP may burst")
    event_retention_count: int = Field(
        10_000, ge=1, description="Stored events kept per application (the newest)"
    )
    event_retention_seconds: float = Field(
        7 * 86400.0, gt=0, description="Age after which a stored event is deleted (s)"
    )
    webhook_max_attempts: int = Field(
        12, ge=1, description="Webhook delivery attempts before a delivery is dead"
    )
    webhook_backoff: float = Field(1.0, gt=0, description="First webhook retry delay (s)")
    webhook_max_backoff: float = Field(300.0, gt=0, description="Cap on webhook retry delays (s)")
    webhook_timeout: float = Field(10.0, gt=0, description="Timeout of one webhook POST (s)")
    webhook_concurrency: int = Field(
        32, ge=1, description="Webhook POSTs in flight at most (one per device at a time)"
    )
    webhook_poll_interval: float = Field(
        1.0, gt=0, description="How often the outbox is checked for due retries (s)"
    )
    webhook_deny_networks: list[str] = Field(
        default_factory=lambda: list(WEBHOOK_DENY_DEFAULT),
        description="Networks webhooks may not reach (IPs or CIDRs; [] allows all)",
    )
    webhook_retention_seconds: float = Field(
        86400.0, gt=0, description="How long delivered outbox rows are kept (s)"
    )
    message_ttl: float = Field(
        86400.0, gt=0, description="Lifetime of a queued message when the call gives no ?ttl= (s)"
    )
    message_max_ttl: float = Field(
        7 * 86400.0, gt=0, description="Longest ?ttl= a queued message may ask for (s)"
    )
    message_retention_seconds: float = Field(
        86400.0,
        gt=0,
        description="How long finished messages and idempotency keys are kept (s)",
    )
    message_max_body_size: int = Field(
        MiB, ge=1, description="Largest body of a queued message (they wait on disk)"
    )
    max_queued_per_device: int = Field(
        1000, ge=1, description="Queued messages a device may have waiting"
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="Proxies (IPs or CIDRs) whose X-Forwarded-For/-Proto are believed",
    )
    shutdown_grace: float = Field(10.0, ge=0, description="Time for calls in flight at shutdown")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = Field(False, description="Log every HTTP request (without query strings)")
    tls_cert: Path | None = Field(None, description="PEM certificate chain for HTTPS/WSS")
    tls_key: Path | None = Field(None, description="PEM private key for HTTPS/WSS")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than heartbeat_interval")
        if self.default_timeout > self.max_timeout:
            raise ValueError("default_timeout must not exceed max_timeout")
        parse_networks(self.trusted_proxies)  # raises ValueError naming a bad entry
        parse_networks(self.webhook_deny_networks)
        if self.message_ttl > self.message_max_ttl:
            raise ValueError("message_ttl must not exceed message_max_ttl")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self


def load_config(config_file: Path | None = None, **overrides: Any) -> Config:
    """Build the configuration; ``overrides`` (the CLI flags) win, None values are ignored."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")

    class _Config(Config):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources = [init_settings, env_settings]
            if config_file is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
            return tuple(sources)

    return _Config(**{k: v for k, v in overrides.items() if v is not None})
