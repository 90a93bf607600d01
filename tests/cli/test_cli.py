"""The management CLI (``apps``, ``devices``), ``send`` and ``device``, in both backends.

LOCAL mode runs against a temporary data directory; REMOTE mode against the in-process
server. ``CliRunner`` calls ``asyncio.run`` inside each command, which cannot nest in the
test's running loop, so remote invocations run in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from click.testing import CliRunner, Result

from backchannel.cli.device_agent import echo, resolve
from backchannel.cli.main import cli
from backchannel.core.apps import AppService
from backchannel.core.clock import SystemClock
from backchannel.state.sqlite import SqliteStore
from backchannel.wire.native.frames import Call
from tests.conftest import ADMIN_TOKEN, RunningServer, free_port
from tests.rawdevice import RawDevice, connect

APP_KEYS = {
    "app_id",
    "name",
    "webhook_url",
    "webhook_kinds",
    "default_timeout",
    "allow_open_attach",
    "allowed_devices",
    "created_at",
}
DEVICE_KEYS = {"app_id", "device_id", "tags", "created_at", "online"}

# Variables the commands read; cleared so the developer's environment cannot leak in.
ENV_CLEAR: dict[str, str | None] = {
    name: None
    for name in (
        "BACKCHANNEL_SERVER",
        "BACKCHANNEL_ADMIN_TOKEN",
        "BACKCHANNEL_DATA_DIR",
        "BACKCHANNEL_APP_SECRET",
        "BACKCHANNEL_DEVICE_KEY",
        "BACKCHANNEL_STORE",
    )
}


def invoke(
    *args: str, input: bytes | str | None = None, env: dict[str, str] | None = None
) -> Result:
    """Run the CLI in-process and return its result."""
    runner = CliRunner()
    return runner.invoke(cli, list(args), input=input, env={**ENV_CLEAR, **(env or {})})


def as_json(result: Result) -> Any:
    """The JSON a successful ``--json`` command printed."""
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


async def ainvoke(*args: str, **kwargs: Any) -> Result:
    """``invoke`` from async tests, in a thread (the command runs its own event loop)."""
    return await asyncio.to_thread(invoke, *args, **kwargs)


async def _authenticates(data_dir: Path, app_id: str, secret: str) -> bool:
    store = SqliteStore(data_dir / "backchannel.db")
    await store.open()
    try:
        return await AppService(store, SystemClock()).authenticate(app_id, secret) is not None
    finally:
        await store.close()


# -- LOCAL mode ------------------------------------------------------------------------------


class Local:
    """Runs commands against one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def __call__(self, *args: str, input: str | None = None) -> Result:
        return invoke(*args, "--data-dir", str(self.data_dir), input=input)

    def create(self, name: str = "demo", *extra: str) -> dict[str, Any]:
        data: dict[str, Any] = as_json(self("apps", "create", name, "--json", *extra))
        return data


@pytest.fixture
def local(tmp_path: Path) -> Local:
    return Local(tmp_path / "data")


class TestLocalApps:
    """``apps ...`` directly on the store in ``--data-dir``."""

    def test_create_json_shape_and_secret_works(self, local: Local) -> None:
        app = local.create(
            "demo", "--webhook", "https://example.com/hook", "--default-timeout", "7.5"
        )
        assert set(app) == APP_KEYS | {"secret"}
        assert app["name"] == "demo"
        assert app["webhook_url"] == "https://example.com/hook"
        assert app["default_timeout"] == 7.5
        assert app["allow_open_attach"] is False
        assert asyncio.run(_authenticates(local.data_dir, app["app_id"], app["secret"]))

    def test_create_human_says_secret_shown_once(self, local: Local) -> None:
        result = local("apps", "create", "My [bold]App", "--allow-open-attach")
        assert result.exit_code == 0, result.output
        assert "Secret: " in result.stdout
        assert "shown only this once" in result.stderr
        assert "My [bold]App" in result.stdout  # user text is not read as rich markup
        secret = result.stdout.split("Secret: ")[1].split()[0]
        assert len(secret) == 40

    def test_allow_device_option(self, local: Local) -> None:
        app = local.create("demo", "--allow-device", "d1", "--allow-device", "d2")
        assert app["allowed_devices"] == ["d1", "d2"]

    def test_list_and_show(self, local: Local) -> None:
        a = local.create("first")
        b = local.create("second")
        listed = as_json(local("apps", "list", "--json"))
        assert [x["app_id"] for x in listed["apps"]] == [a["app_id"], b["app_id"]]
        assert all(set(x) == APP_KEYS for x in listed["apps"])  # never a secret
        shown = as_json(local("apps", "show", a["app_id"], "--json"))
        assert shown == {k: v for k, v in a.items() if k != "secret"}
        human = local("apps", "list")
        assert human.exit_code == 0
        assert a["app_id"] in human.stdout and "second" in human.stdout
        assert a["secret"] not in human.output
        human = local("apps", "show", b["app_id"])
        assert b["app_id"] in human.stdout and b["secret"] not in human.output

    def test_list_empty(self, local: Local) -> None:
        local.data_dir.mkdir()
        assert as_json(local("apps", "list", "--json")) == {"apps": []}
        assert "No applications" in local("apps", "list").output

    def test_update(self, local: Local) -> None:
        app = local.create("demo", "--webhook", "http://a/b")
        app_id = app["app_id"]
        new = as_json(
            local(
                "apps", "update", app_id, "--default-timeout", "3", "--allow-open-attach", "--json"
            )
        )
        assert set(new) == APP_KEYS
        assert new["default_timeout"] == 3.0 and new["allow_open_attach"] is True
        assert new["webhook_url"] == "http://a/b"  # not given: kept
        new = as_json(local("apps", "update", app_id, "--no-allow-open-attach", "--json"))
        assert new["allow_open_attach"] is False and new["default_timeout"] == 3.0
        new = as_json(local("apps", "update", app_id, "--webhook", "", "--json"))
        assert new["webhook_url"] is None
        assert "updated" in local("apps", "update", app_id, "--default-timeout", "4").output

    def test_update_allow_list(self, local: Local) -> None:
        app_id = local.create("demo", "--allow-device", "A1")["app_id"]
        new = as_json(
            local(
                "apps", "update", app_id, "--allow-device", "B2", "--allow-device", "C3", "--json"
            )
        )
        assert new["allowed_devices"] == ["B2", "C3"]
        new = as_json(local("apps", "update", app_id, "--default-timeout", "2", "--json"))
        assert new["allowed_devices"] == ["B2", "C3"]  # not given: kept
        new = as_json(local("apps", "update", app_id, "--clear-allowed-devices", "--json"))
        assert new["allowed_devices"] == []
        both = local("apps", "update", app_id, "--allow-device", "X", "--clear-allowed-devices")
        assert both.exit_code == 2

    def test_webhook_kinds(self, local: Local) -> None:
        app = local.create("demo")
        assert app["webhook_kinds"] == ["event"]
        app = local.create("demo", "--webhook-kind", "call", "--webhook-kind", "presence")
        assert app["webhook_kinds"] == ["presence", "call"]
        new = as_json(local("apps", "update", app["app_id"], "--webhook-kind", "event", "--json"))
        assert new["webhook_kinds"] == ["event"]
        assert local("apps", "create", "x", "--webhook-kind", "bogus").exit_code == 2

    def test_update_needs_a_change(self, local: Local) -> None:
        app = local.create()
        result = local("apps", "update", app["app_id"])
        assert result.exit_code == 2
        assert "nothing to change" in result.output

    def test_invalid_settings(self, local: Local) -> None:
        result = local("apps", "create", "x", "--webhook", "ftp://nope")
        assert result.exit_code == 1
        assert "webhook_url must be" in result.stderr
        result = local("apps", "create", "x", "--default-timeout", "0")
        assert result.exit_code == 2

    def test_rotate_secret(self, local: Local) -> None:
        app = local.create()
        answer = as_json(local("apps", "rotate-secret", app["app_id"], "--json"))
        assert set(answer) == {"app_id", "secret"}
        assert answer["secret"] != app["secret"]
        assert asyncio.run(_authenticates(local.data_dir, app["app_id"], answer["secret"]))
        assert not asyncio.run(_authenticates(local.data_dir, app["app_id"], app["secret"]))
        human = local("apps", "rotate-secret", app["app_id"])
        assert "New secret: " in human.stdout and "shown only this once" in human.stderr

    def test_delete_confirms(self, local: Local) -> None:
        app = local.create("keepme")
        result = local("apps", "delete", app["app_id"], input="n\n")
        assert result.exit_code == 1
        assert "keepme" in result.output  # the prompt names the app
        assert local("apps", "show", app["app_id"]).exit_code == 0
        result = local("apps", "delete", app["app_id"], input="y\n")
        assert result.exit_code == 0, result.output
        assert "Deleted" in result.stdout and "--server" in result.stderr
        assert local("apps", "show", app["app_id"]).exit_code == 1

    def test_delete_yes_json(self, local: Local) -> None:
        app = local.create()
        answer = as_json(local("apps", "delete", app["app_id"], "--yes", "--json"))
        assert answer == {"deleted": app["app_id"], "sessions_closed": 0}

    @pytest.mark.parametrize(
        "args",
        [
            ("apps", "show", "nope"),
            ("apps", "update", "nope", "--default-timeout", "1"),
            ("apps", "rotate-secret", "nope"),
            ("apps", "delete", "nope", "--yes"),
            ("apps", "delete", "nope"),
            ("devices", "list", "nope"),
            ("devices", "provision", "nope", "d1"),
        ],
    )
    def test_unknown_app(self, local: Local, args: tuple[str, ...]) -> None:
        local.data_dir.mkdir()
        result = local(*args)
        assert result.exit_code == 1
        assert "application nope does not exist" in result.stderr

    def test_missing_data_dir(self, local: Local) -> None:
        result = local("apps", "list")
        assert result.exit_code == 1
        assert "does not exist" in result.stderr
        assert not local.data_dir.exists()  # only `apps create` makes it

    def test_data_dir_from_environment(self, tmp_path: Path) -> None:
        env = {"BACKCHANNEL_DATA_DIR": str(tmp_path / "env-data")}
        app = as_json(invoke("apps", "create", "x", "--json", env=env))
        assert (tmp_path / "env-data").is_dir()
        listed = as_json(invoke("apps", "list", "--json", env=env))
        assert [a["app_id"] for a in listed["apps"]] == [app["app_id"]]

    def test_memory_store_is_refused(self, local: Local) -> None:
        result = invoke(
            "apps", "list", "--data-dir", str(local.data_dir), env={"BACKCHANNEL_STORE": "memory"}
        )
        assert result.exit_code == 1
        assert "--server" in result.stderr


class TestLocalDevices:
    """``devices ...`` directly on the store."""

    def test_provision_list_revoke(self, local: Local) -> None:
        app_id = local.create()["app_id"]
        cred = as_json(
            local("devices", "provision", app_id, "dev-1", "--tag", "a", "--tag", "b", "--json")
        )
        assert set(cred) == DEVICE_KEYS | {"key"}
        assert cred["tags"] == ["a", "b"] and cred["device_id"] == "dev-1"
        human = local("devices", "provision", app_id, "dev-2")
        assert "Key: " in human.stdout and "shown only this once" in human.stderr
        listed = as_json(local("devices", "list", app_id, "--json"))
        assert [d["device_id"] for d in listed["devices"]] == ["dev-1", "dev-2"]
        assert all(set(d) == DEVICE_KEYS for d in listed["devices"])
        assert all(d["online"] is None for d in listed["devices"])  # unknown without a server
        table = local("devices", "list", app_id)
        assert "dev-1" in table.stdout and cred["key"] not in table.output
        assert as_json(local("devices", "revoke", app_id, "dev-1", "--json")) == {
            "revoked": "dev-1"
        }
        result = local("devices", "revoke", app_id, "dev-1")
        assert result.exit_code == 1 and "not provisioned" in result.stderr
        result = local("devices", "revoke", app_id, "dev-2")
        assert result.exit_code == 0 and "Revoked" in result.stdout
        assert "No devices" in local("devices", "list", app_id).output

    def test_invalid_device_id(self, local: Local) -> None:
        app_id = local.create()["app_id"]
        result = local("devices", "provision", app_id, "-bad id")
        assert result.exit_code != 0
        result = local("devices", "provision", app_id, "bad/id")
        assert result.exit_code == 1 and "device id" in result.stderr


# -- REMOTE mode -----------------------------------------------------------------------------


def remote(server: RunningServer, token: str = ADMIN_TOKEN) -> Callable[..., Any]:
    """A runner of commands against ``server``'s admin API."""

    async def run(*args: str, **kwargs: Any) -> Result:
        return await ainvoke(*args, "--server", server.url, "--admin-token", token, **kwargs)

    return run


class TestRemote:
    """``apps``/``devices`` through the admin REST API of a running server."""

    async def test_apps_flow(self, server: RunningServer) -> None:
        run = remote(server)
        app = as_json(
            await run(
                "apps",
                "create",
                "remote",
                "--default-timeout",
                "5",
                "--allow-device",
                "x",
                "--json",
            )
        )
        assert set(app) == APP_KEYS | {"secret"}
        app_id = app["app_id"]
        assert await server.apps.authenticate(app_id, app["secret"]) is not None
        assert app["allowed_devices"] == ["x"] and app["default_timeout"] == 5.0

        listed = as_json(await run("apps", "list", "--json"))
        assert [a["app_id"] for a in listed["apps"]] == [app_id]
        shown = as_json(await run("apps", "show", app_id, "--json"))
        assert shown == {k: v for k, v in app.items() if k != "secret"}
        assert app_id in (await run("apps", "list")).stdout

        new = as_json(
            await run(
                "apps",
                "update",
                app_id,
                "--webhook",
                "https://h/x",
                "--allow-open-attach",
                "--json",
            )
        )
        assert new["webhook_url"] == "https://h/x" and new["allow_open_attach"] is True
        assert new["default_timeout"] == 5.0
        new = as_json(await run("apps", "update", app_id, "--webhook", "", "--json"))
        assert new["webhook_url"] is None and new["allow_open_attach"] is True
        new = as_json(await run("apps", "update", app_id, "--allow-device", "D4", "--json"))
        assert new["allowed_devices"] == ["D4"]
        new = as_json(await run("apps", "update", app_id, "--clear-allowed-devices", "--json"))
        assert new["allowed_devices"] == []
        new = as_json(await run("apps", "update", app_id, "--webhook-kind", "presence", "--json"))
        assert new["webhook_kinds"] == ["presence"]

        rotated = as_json(await run("apps", "rotate-secret", app_id, "--json"))
        assert set(rotated) == {"app_id", "secret"}
        assert await server.apps.authenticate(app_id, rotated["secret"]) is not None
        assert await server.apps.authenticate(app_id, app["secret"]) is None

        human = await run("apps", "delete", app_id, "--yes")
        assert human.exit_code == 0 and "0 session(s) closed" in human.stdout
        assert "--server" not in human.stderr  # the local-mode note
        assert await server.apps.get(app_id) is None

    async def test_devices_flow_closes_sessions(
        self, server: RunningServer, http: aiohttp.ClientSession
    ) -> None:
        run = remote(server)
        app_id, _ = await server.create_app()
        cred = as_json(await run("devices", "provision", app_id, "dev1", "--tag", "t", "--json"))
        assert set(cred) == DEVICE_KEYS | {"key"} and cred["tags"] == ["t"]
        dev = (await connect(http, server.ws_url, app_id, "dev1", cred["key"])).serve()
        listed = as_json(await run("devices", "list", app_id, "--json"))
        expected = {k: v for k, v in cred.items() if k != "key"} | {"online": True}
        assert listed == {"devices": [expected]}
        table = await run("devices", "list", app_id)
        assert "dev1" in table.stdout and "yes" in table.stdout

        revoked = as_json(await run("devices", "revoke", app_id, "dev1", "--json"))
        assert revoked == {"revoked": "dev1"}
        assert await dev.wait_closed() == 4005  # revoked: the session closes at once

        key = await server.provision(app_id, "dev2")
        dev2 = (await connect(http, server.ws_url, app_id, "dev2", key)).serve()
        deleted = as_json(await run("apps", "delete", app_id, "--yes", "--json"))
        assert deleted == {"deleted": app_id, "sessions_closed": 1}
        assert await dev2.wait_closed() == 4005

    async def test_shapes_match_local(self, server: RunningServer, tmp_path: Path) -> None:
        run = remote(server)
        remote_app = as_json(await run("apps", "create", "x", "--json"))
        local_app = as_json(
            await ainvoke("apps", "create", "x", "--json", "--data-dir", str(tmp_path / "d"))
        )
        assert set(remote_app) == set(local_app)

    @pytest.mark.parametrize(
        "args",
        [
            ("apps", "show", "nope"),
            ("apps", "update", "nope", "--default-timeout", "1"),
            ("apps", "rotate-secret", "nope"),
            ("apps", "delete", "nope", "--yes"),
            ("devices", "list", "nope"),
            ("devices", "provision", "nope", "d1"),
        ],
    )
    async def test_unknown_app(self, server: RunningServer, args: tuple[str, ...]) -> None:
        result = await remote(server)(*args)
        assert result.exit_code == 1
        assert "application nope does not exist" in result.stderr  # the server's detail

    async def test_server_validation_detail(self, server: RunningServer) -> None:
        result = await remote(server)("apps", "create", "x", "--webhook", "ftp://x")
        assert result.exit_code == 1 and "webhook_url must be" in result.stderr
        app_id, _ = await server.create_app()
        result = await remote(server)("devices", "revoke", app_id, "ghost")
        assert result.exit_code == 1 and "not provisioned" in result.stderr

    async def test_wrong_admin_token(self, server: RunningServer) -> None:
        result = await remote(server, token="wrong")("apps", "list")
        assert result.exit_code == 1
        assert "admin token" in result.stderr
        assert "wrong" not in result.output

    async def test_server_without_token_is_usage_error(self, server: RunningServer) -> None:
        result = await ainvoke("apps", "list", "--server", server.url)
        assert result.exit_code == 2
        assert "admin token" in result.output

    async def test_environment_selects_remote(self, server: RunningServer) -> None:
        env = {"BACKCHANNEL_SERVER": server.url, "BACKCHANNEL_ADMIN_TOKEN": ADMIN_TOKEN}
        app = as_json(await ainvoke("apps", "create", "env", "--json", env=env))
        assert await server.apps.get(app["app_id"]) is not None

    def test_server_url_needs_scheme(self) -> None:
        result = invoke("apps", "list", "--server", "127.0.0.1:8080", "--admin-token", "t")
        assert result.exit_code == 2 and "http://" in result.output
        result = invoke("send", "a", "d", "x", "--secret", "s", "--server", "localhost:1")
        assert result.exit_code == 2 and "http://" in result.output

    def test_connection_refused(self) -> None:
        url = f"http://127.0.0.1:{free_port()}"
        result = invoke("apps", "list", "--server", url, "--admin-token", "t")
        assert result.exit_code == 1
        assert "cannot connect" in result.stderr and "connection refused" in result.stderr


# -- send --------------------------------------------------------------------------------------


class SendSetup:
    """An app, a connected raw device, and a ``send`` runner."""

    def __init__(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.app_id = ""
        self.secret = ""

    async def device(
        self, handler: Callable[[Call], Any] | None = None, device_id: str = "dev1"
    ) -> RawDevice:
        if not self.app_id:
            self.app_id, self.secret = await self.server.create_app()
        key = await self.server.provision(self.app_id, device_id)
        dev = await connect(self.http, self.server.ws_url, self.app_id, device_id, key)
        return dev.serve(handler) if handler else dev.serve()

    async def send(self, *args: str, auth: bool = True, **kwargs: Any) -> Result:
        creds = ("--secret", self.secret) if auth else ()
        return await ainvoke("send", "--server", self.server.url, *creds, *args, **kwargs)


@pytest.fixture
async def sender(server: RunningServer, http: aiohttp.ClientSession) -> SendSetup:
    return SendSetup(server, http)


class TestSend:
    """``backchannel send`` against the app REST API."""

    async def test_echo(self, sender: SendSetup) -> None:
        await sender.device()
        result = await sender.send(sender.app_id, "dev1", "hello")
        assert result.exit_code == 0, result.output
        assert result.stdout_bytes == b"hello"

    async def test_method_and_timeout_reach_the_device(self, sender: SendSetup) -> None:
        seen: list[Call] = []

        async def handler(call: Call) -> bytes:
            seen.append(call)
            return call.method.encode() + b":" + call.body

        await sender.device(handler)
        result = await sender.send(
            sender.app_id, "dev1", "x", "--method", "reboot", "--timeout", "4"
        )
        assert result.stdout_bytes == b"reboot:x"
        assert seen[0].timeout_ms == 4000

    async def test_stdin_binary(self, sender: SendSetup) -> None:
        await sender.device()
        body = bytes(range(256)) * 4
        result = await sender.send(sender.app_id, "dev1", "--stdin", input=body)
        assert result.exit_code == 0
        assert result.stdout_bytes == body

    async def test_json_output(self, sender: SendSetup) -> None:
        await sender.device()
        answer = as_json(await sender.send(sender.app_id, "dev1", "hi", "--json", "--timeout", "9"))
        assert answer == {"status": 200, "timeout": 9.0, "body": "hi"}
        result = await sender.send(sender.app_id, "dev1", "--stdin", "--json", input=b"\xff\x00")
        assert as_json(result)["body_base64"] == "/wA="

    async def test_admin_token_and_env_secret(self, sender: SendSetup) -> None:
        await sender.device()
        result = await sender.send(
            sender.app_id, "dev1", "a", "--admin-token", ADMIN_TOKEN, auth=False
        )
        assert result.stdout_bytes == b"a"
        result = await sender.send(
            sender.app_id, "dev1", "b", auth=False, env={"BACKCHANNEL_APP_SECRET": sender.secret}
        )
        assert result.stdout_bytes == b"b"

    async def test_offline(self, sender: SendSetup) -> None:
        sender.app_id, sender.secret = await sender.server.create_app()
        result = await sender.send(sender.app_id, "ghost", "x")
        assert result.exit_code == 1
        assert result.stdout_bytes == b""
        assert "not connected" in result.stderr and "418" in result.stderr

    async def test_queue_and_idempotency_key(self, sender: SendSetup) -> None:
        sender.app_id, sender.secret = await sender.server.create_app(allow_open_attach=True)
        args = (sender.app_id, "later", "x", "--offline", "queue", "--ttl", "60")
        first = await sender.send(*args, "--idempotency-key", "k1")
        assert first.exit_code == 0, first.output
        message = orjson.loads(first.stdout)
        assert (message["state"], message["device_id"]) == ("queued", "later")
        again = await sender.send(*args, "--idempotency-key", "k1")
        assert orjson.loads(again.stdout)["message_id"] == message["message_id"]

    async def test_wait_for_the_device(self, sender: SendSetup) -> None:
        sender.app_id, sender.secret = await sender.server.create_app()
        result = await sender.send(sender.app_id, "dev1", "x", "--offline", "wait", "--wait", "0.2")
        assert result.exit_code == 1 and "418" in result.stderr

    async def test_no_reply_times_out(self, sender: SendSetup) -> None:
        async def silent(call: Call) -> None:
            return None

        await sender.device(silent)
        result = await sender.send(sender.app_id, "dev1", "x", "--timeout", "0.2")
        assert result.exit_code == 1 and "408" in result.stderr
        result = await sender.send(sender.app_id, "dev1", "x", "--timeout", "0.2", "--json")
        assert result.exit_code == 1
        error = orjson.loads(result.stdout)
        assert error["status"] == 408 and error["error"] and error["timeout"] == 0.2

    async def test_device_error(self, sender: SendSetup) -> None:
        dev: RawDevice | None = None

        async def failing(call: Call) -> None:
            assert dev is not None
            await dev.error_reply(call.call_id, "boom")

        dev = await sender.device(failing)
        result = await sender.send(sender.app_id, "dev1", "x")
        assert result.exit_code == 1 and "502" in result.stderr

    async def test_wrong_secret(self, sender: SendSetup) -> None:
        await sender.device()
        result = await sender.send(sender.app_id, "dev1", "x", "--secret", "nope", auth=False)
        assert result.exit_code == 1 and "403" in result.stderr
        assert "nope" not in result.output

    @pytest.mark.parametrize(
        "args",
        [
            ("app", "dev"),  # no body
            ("app", "dev", "body", "--stdin"),  # both
            ("app", "dev", "body", "--timeout", "0"),
        ],
    )
    def test_usage_errors(self, args: tuple[str, ...]) -> None:
        result = invoke("send", *args, "--secret", "s", "--server", "http://127.0.0.1:1")
        assert result.exit_code == 2

    def test_no_credential(self) -> None:
        result = invoke("send", "app", "dev", "x")
        assert result.exit_code == 2 and "--secret" in result.output

    def test_connection_refused(self) -> None:
        url = f"http://127.0.0.1:{free_port()}"
        result = invoke("send", "a", "d", "x", "--secret", "s", "--server", url)
        assert result.exit_code == 1 and "connection refused" in result.stderr


# -- device agent --------------------------------------------------------------------------------


class TestDeviceAgentOptions:
    """``backchannel device``: handler resolution and usage (no SDK needed)."""

    def test_resolve(self) -> None:
        assert resolve("backchannel.cli.device_agent:echo") is echo
        assert echo(b"x") == b"x"
        assert resolve("os.path:join") is os.path.join

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("nocolon", "module:function"),
            ("no_such_module_xyz:f", "cannot import"),
            ("backchannel.cli.device_agent:missing", "no attribute"),
            ("backchannel:__version__", "not callable"),
        ],
    )
    def test_bad_handler(self, spec: str, message: str) -> None:
        args = ["device", "--server", "http://x", "--app", "a", "--id", "d", "--handler", spec]
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.output

    def test_bad_method(self) -> None:
        args = ["device", "--server", "http://x", "--app", "a", "--id", "d"]
        result = invoke(*args, "--method", "backchannel.cli.device_agent:echo")
        assert result.exit_code == 2 and "NAME=module:function" in result.output

    def test_needs_a_handler(self) -> None:
        result = invoke("device", "--server", "http://x", "--app", "a", "--id", "d")
        assert result.exit_code == 2 and "--handler" in result.output

    @pytest.mark.parametrize(
        ("value", "message"),
        [("=x:y", "PATTERN[=module:function]"), ("a/#/b", "#"), ("t=nocolon", "module:function")],
    )
    def test_bad_subscription(self, value: str, message: str) -> None:
        args = ["device", "--server", "http://127.0.0.1:1", "--app", "a", "--id", "d"]
        result = invoke(*args, "--subscribe", value)
        assert result.exit_code == 2 and message in result.output


# -- end to end ----------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m backchannel ...`` as a real subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_CLEAR} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "backchannel", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
        check=False,
    )


class TestEndToEnd:
    """The installed CLI against a real ``backchannel serve`` process."""

    async def test_create_provision_connect(
        self, server_process: Any, http: aiohttp.ClientSession
    ) -> None:
        sp = server_process()
        sp.start()
        remote_args = ("--server", sp.url, "--admin-token", ADMIN_TOKEN)
        try:
            done = await asyncio.to_thread(run_cli, "apps", "create", "e2e", *remote_args)
            assert done.returncode == 0, done.stderr
            assert "Secret: " in done.stdout and "shown only this once" in done.stderr
            secret = done.stdout.split("Secret: ")[1].split()[0]
            app_id = done.stdout.split("app id")[1].split()[1]
            done = await asyncio.to_thread(
                run_cli, "devices", "provision", app_id, "e2e-dev", "--json", *remote_args
            )
            assert done.returncode == 0, done.stderr
            key = orjson.loads(done.stdout)["key"]

            # A second app made in LOCAL mode while the server runs: same store, seen at once.
            done = await asyncio.to_thread(
                run_cli, "apps", "list", "--json", "--data-dir", str(sp.data_dir)
            )
            assert [a["app_id"] for a in orjson.loads(done.stdout)["apps"]] == [app_id]

            dev = (await connect(http, sp.url + "/v1/connect", app_id, "e2e-dev", key)).serve()
            send_args = ("send", app_id, "e2e-dev", "ping", "--server", sp.url)
            env = {"BACKCHANNEL_APP_SECRET": secret}
            done = await asyncio.to_thread(run_cli, *send_args, env=env)
            assert done.returncode == 0, done.stderr
            assert done.stdout == "ping"
            await dev.close()
        finally:
            sp.stop()


class TestDeviceAgent:
    """``backchannel device`` as a subprocess with the echo handler, called via ``send``."""

    async def test_echo_agent(self, server: RunningServer, tmp_path: Path) -> None:
        app_id, secret = await server.create_app()
        key = await server.provision(app_id, "agent")
        env = {k: v for k, v in os.environ.items() if k not in ENV_CLEAR}
        env["BACKCHANNEL_DEVICE_KEY"] = key  # the key never appears on a command line
        args = ["device", "--server", server.url, "--app", app_id, "--id", "agent"]
        args += ["--handler", "backchannel.cli.device_agent:echo"]
        log_path = tmp_path / "agent.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "backchannel", *args, env=env, stdout=log, stderr=log
            )
        try:
            online: list[str] = []

            async def poll() -> None:
                while "agent" not in online:
                    online[:] = await server.relay.devices(app_id)
                    await asyncio.sleep(0.05)

            try:
                await asyncio.wait_for(poll(), 15)
            except TimeoutError:
                pytest.fail(f"the agent did not connect: {log_path.read_text()}")
            result = await ainvoke(
                "send", app_id, "agent", "round trip", "--server", server.url, "--secret", secret
            )
            assert result.exit_code == 0, result.output
            assert result.stdout_bytes == b"round trip"
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)

    async def test_subscribe_prints_and_publish_counts(
        self, server: RunningServer, tmp_path: Path
    ) -> None:
        app_id, secret = await server.create_app()
        key = await server.provision(app_id, "agent")
        env = {k: v for k, v in os.environ.items() if k not in ENV_CLEAR}
        env["BACKCHANNEL_DEVICE_KEY"] = key
        args = ["device", "--server", server.url, "--app", app_id, "--id", "agent"]
        args += ["--subscribe", "lights/+", "--log-level", "warning"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "backchannel", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            publish = ("publish", app_id, "lights/kitchen", "off", "--server", server.url)
            deadline = asyncio.get_running_loop().time() + 15
            while True:  # until the agent is connected and subscribed
                result = await ainvoke(*publish, "--secret", secret)
                assert result.exit_code == 0, result.output
                if result.stdout.startswith("1 device"):
                    break
                assert asyncio.get_running_loop().time() < deadline, "the agent never subscribed"
                await asyncio.sleep(0.1)
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert line == b"lights/kitchen\toff\n"
            result = await ainvoke(*publish[:2], "bad/#", "x", "--server", server.url,
                                   "--secret", secret)  # fmt: skip
            assert result.exit_code == 1 and "invalid_topic" in result.stderr
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)

    async def test_bad_key_exits(self, server: RunningServer) -> None:
        app_id, _ = await server.create_app()
        await server.provision(app_id, "agent")
        env = {k: v for k, v in os.environ.items() if k not in ENV_CLEAR}
        args = ["device", "--server", server.url, "--app", app_id, "--id", "agent"]
        args += ["--key", "not-the-key-q7z", "--handler", "backchannel.cli.device_agent:echo"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "backchannel", *args, env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 15)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 1
        assert b"ended the session" in err and b"not-the-key-q7z" not in err
