"""Configuration precedence: defaults < TOML file < BACKCHANNEL_* variables < flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from backchannel.config import load_config


def test_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "BACKCHANNEL_PORT",
        "BACKCHANNEL_HOST",
        "BACKCHANNEL_DEFAULT_TIMEOUT",
        "BACKCHANNEL_ADMIN_TOKEN",
        "BACKCHANNEL_DATA_DIR",
        "BACKCHANNEL_STORE",
    ):
        monkeypatch.delenv(name, raising=False)
    config = load_config()
    assert config.port == 8080
    assert config.default_timeout == 30
    assert config.data_dir == Path("backchannel-data")
    assert config.store == "sqlite"
    assert config.max_body_size >= 10 * 1000 * 1000
    assert config.admin_token is None


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "backchannel.toml"
    toml.write_text(
        'port = 7000\nhost = "127.0.0.2"\ndefault_timeout = 12.5\nlog_level = "debug"\n'
    )
    config = load_config(toml)
    assert (config.port, config.host, config.default_timeout) == (7000, "127.0.0.2", 12.5)
    monkeypatch.setenv("BACKCHANNEL_PORT", "7100")
    monkeypatch.setenv("BACKCHANNEL_DEFAULT_TIMEOUT", "3")
    config = load_config(toml)
    assert (config.port, config.host, config.default_timeout) == (7100, "127.0.0.2", 3)
    config = load_config(toml, port=7200, default_timeout=None)
    assert (config.port, config.default_timeout) == (7200, 3)


def test_admin_token_from_env_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKCHANNEL_ADMIN_TOKEN", "s3cr3t-token-value")
    config = load_config()
    assert config.admin_token is not None
    assert config.admin_token.get_secret_value() == "s3cr3t-token-value"
    assert "s3cr3t" not in repr(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"heartbeat_interval": 80}, "heartbeat_timeout must be longer"),
        ({"default_timeout": 500}, "default_timeout must not exceed max_timeout"),
        ({"port": 70000}, "port"),
        ({"default_timeout": 0}, "default_timeout"),
        ({"tls_cert": "x.pem"}, "tls_cert and tls_key go together"),
        ({"message_ttl": 10, "message_max_ttl": 5}, "message_ttl must not exceed message_max_ttl"),
        ({"message_ttl": 0}, "message_ttl"),
        ({"max_queued_per_device": 0}, "max_queued_per_device"),
        ({"webhook_deny_networks": ["10.0.0.0/8", "intranet"]}, "'intranet'"),
        ({"trusted_proxies": ["proxy.example"]}, "'proxy.example'"),
    ],
)
def test_invalid_values(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_config(**overrides)


def test_unknown_toml_key_and_missing_file(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ValidationError, match="prot"):
        load_config(toml)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")


def test_token_expire_seconds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Socket2me's own TOKEN_EXPIRE_SECONDS is honoured; the BACKCHANNEL_ name wins."""
    for name in ("TOKEN_EXPIRE_SECONDS", "BACKCHANNEL_TOKEN_EXPIRE_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    assert load_config().token_expire_seconds == 21600
    monkeypatch.setenv("TOKEN_EXPIRE_SECONDS", "42")
    assert load_config().token_expire_seconds == 42
    monkeypatch.setenv("BACKCHANNEL_TOKEN_EXPIRE_SECONDS", "7.5")
    assert load_config().token_expire_seconds == 7.5
    # Flags still win over the environment, and a file loses to it.
    assert load_config(token_expire_seconds=3).token_expire_seconds == 3
    toml = tmp_path / "c.toml"
    toml.write_text("token_expire_seconds = 99\n")
    assert load_config(toml).token_expire_seconds == 7.5
    monkeypatch.delenv("BACKCHANNEL_TOKEN_EXPIRE_SECONDS")
    monkeypatch.delenv("TOKEN_EXPIRE_SECONDS")
    assert load_config(toml).token_expire_seconds == 99
    monkeypatch.setenv("TOKEN_EXPIRE_SECONDS", "0")
    with pytest.raises(ValidationError, match="greater than 0"):
        load_config()


def test_event_retention(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("BACKCHANNEL_EVENT_RETENTION_COUNT", "BACKCHANNEL_EVENT_RETENTION_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    config = load_config()
    assert (config.event_retention_count, config.event_retention_seconds) == (10_000, 604_800)
    toml = tmp_path / "c.toml"
    toml.write_text("event_retention_count = 50\nevent_retention_seconds = 3600\n")
    monkeypatch.setenv("BACKCHANNEL_EVENT_RETENTION_SECONDS", "60")
    config = load_config(toml, event_retention_count=7)
    assert (config.event_retention_count, config.event_retention_seconds) == (7, 60)
    with pytest.raises(ValidationError, match="event_retention_count"):
        load_config(event_retention_count=0)
    with pytest.raises(ValidationError, match="event_retention_seconds"):
        load_config(event_retention_seconds=0)


def test_fanout_max_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from backchannel.cli.serve import serve

    monkeypatch.delenv("BACKCHANNEL_FANOUT_MAX_DEVICES", raising=False)
    assert load_config().fanout_max_devices == 10_000
    toml = tmp_path / "c.toml"
    toml.write_text("fanout_max_devices = 50\n")
    assert load_config(toml).fanout_max_devices == 50
    monkeypatch.setenv("BACKCHANNEL_FANOUT_MAX_DEVICES", "60")
    assert load_config(toml).fanout_max_devices == 60
    assert load_config(toml, fanout_max_devices=7).fanout_max_devices == 7
    with pytest.raises(ValidationError, match="fanout_max_devices"):
        load_config(fanout_max_devices=0)
    # `backchannel serve` passes its flags to load_config by name.
    assert "fanout_max_devices" in {p.name for p in serve.params}
