"""The admin REST API under /admin/v1."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import RunningServer
from tests.rawdevice import connect


class Admin:
    def __init__(self, server: RunningServer, http: aiohttp.ClientSession) -> None:
        self.server = server
        self.http = http
        self.headers = {"Authorization": f"Bearer {server.admin_token}"}

    async def call(
        self, method: str, path: str, json: Any = None, data: bytes | None = None, **kw: Any
    ) -> tuple[int, Any]:
        headers = kw.pop("headers", self.headers)
        async with self.http.request(
            method, self.server.url + "/admin/v1" + path, json=json, data=data, headers=headers
        ) as r:
            assert r.content_type == "application/json"
            return r.status, await r.json()


@pytest.fixture
def admin(server: RunningServer, http: aiohttp.ClientSession) -> Admin:
    return Admin(server, http)


class TestApps:
    async def test_lifecycle(self, admin: Admin) -> None:
        status, app = await admin.call(
            "POST", "/apps", {"name": "fleet", "webhook_url": "https://example.test/hook"}
        )
        assert status == 201
        app_id, secret = app["app_id"], app["secret"]
        assert len(app_id) == 20 and int(app_id, 16) >= 0
        assert len(secret) >= 32
        assert app["webhook_url"] == "https://example.test/hook"
        assert app["allow_open_attach"] is False

        status, listed = await admin.call("GET", "/apps")
        assert status == 200
        assert [a["app_id"] for a in listed["apps"]] == [app_id]
        assert "secret" not in listed["apps"][0]
        assert "secret_hash" not in listed["apps"][0]

        status, shown = await admin.call("GET", f"/apps/{app_id}")
        assert (status, shown["name"]) == (200, "fleet")

        status, changed = await admin.call(
            "PATCH", f"/apps/{app_id}", {"default_timeout": 5, "allow_open_attach": True}
        )
        assert status == 200
        assert changed["default_timeout"] == 5.0
        assert changed["allow_open_attach"] is True

        # The secret works, then rotation replaces it at once.
        info_url = f"{admin.server.url}/v1/applications/{app_id}"
        async with admin.http.get(info_url, headers={"Authorization": f"OAuth {secret}"}) as r:
            assert r.status == 200
        status, rotated = await admin.call("POST", f"/apps/{app_id}/rotate-secret")
        assert status == 200 and rotated["secret"] != secret
        async with admin.http.get(info_url, headers={"Authorization": f"OAuth {secret}"}) as r:
            assert r.status == 403
        new = {"Authorization": f"OAuth {rotated['secret']}"}
        async with admin.http.get(info_url, headers=new) as r:
            assert r.status == 200

        status, deleted = await admin.call("DELETE", f"/apps/{app_id}")
        assert status == 200 and deleted["deleted"] == app_id
        assert (await admin.call("GET", f"/apps/{app_id}"))[0] == 404
        assert (await admin.call("DELETE", f"/apps/{app_id}"))[0] == 404

    async def test_rename_and_clear_open_attach(self, admin: Admin) -> None:
        _, app = await admin.call("POST", "/apps", {"name": "a", "allow_open_attach": True})
        status, changed = await admin.call(
            "PATCH", f"/apps/{app['app_id']}", {"name": "renamed", "allow_open_attach": None}
        )
        assert status == 200
        assert changed["name"] == "renamed"
        assert changed["allow_open_attach"] is False
        status, data = await admin.call("PATCH", f"/apps/{app['app_id']}", {"name": ""})
        assert (status, data["error"]) == (400, "invalid_field")

    async def test_clear_default_timeout(self, admin: Admin) -> None:
        _, app = await admin.call("POST", "/apps", {"name": "a", "default_timeout": 5})
        status, changed = await admin.call(
            "PATCH", f"/apps/{app['app_id']}", {"default_timeout": None}
        )
        assert status == 200
        assert changed["default_timeout"] is None

    @pytest.mark.parametrize(
        ("body", "error"),
        [
            (b"{not json", "invalid_json"),
            (b"[1, 2]", "invalid_json"),
            (b'{"name": 5}', "invalid_field"),
            (b'{"name": ""}', "invalid_field"),
            (b'{"name": "x", "webhook_url": "ftp://x"}', "invalid_field"),
            (b'{"name": "x", "default_timeout": "soon"}', "invalid_field"),
            (b'{"name": "x", "default_timeout": -1}', "invalid_field"),
            (b'{"name": "x", "allow_open_attach": "yes"}', "invalid_field"),
            (b'{"name": "x", "allowed_devices": ["bad id!"]}', "invalid_field"),
            (b'{"name": "x", "colour": "red"}', "invalid_field"),
        ],
    )
    async def test_bad_create_bodies(self, admin: Admin, body: bytes, error: str) -> None:
        status, data = await admin.call(
            "POST",
            "/apps",
            data=body,
            headers={**admin.headers, "Content-Type": "application/json"},
        )
        assert status == 400
        assert data["error"] == error
        assert data["detail"]

    async def test_oversized_body(self, admin: Admin) -> None:
        status, data = await admin.call("POST", "/apps", data=b'{"name":"' + b"x" * 70000 + b'"}')
        assert status == 413
        assert data["error"] == "body_too_large"

    @pytest.mark.parametrize(
        ("headers", "status"),
        [({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": "Basic x"}, 401)],
    )
    async def test_needs_admin_token(
        self, admin: Admin, headers: dict[str, str], status: int
    ) -> None:
        code, data = await admin.call("GET", "/apps", headers=headers)
        assert code == status
        assert data["error"] in ("unauthorized", "forbidden")

    async def test_app_secret_is_not_admin(self, admin: Admin) -> None:
        _, app = await admin.call("POST", "/apps", {"name": "a"})
        code, _ = await admin.call(
            "GET", "/apps", headers={"Authorization": f"Bearer {app['secret']}"}
        )
        assert code == 403


class TestDevices:
    async def test_provision_list_revoke(self, admin: Admin) -> None:
        _, app = await admin.call("POST", "/apps", {"name": "a"})
        app_id = app["app_id"]
        status, cred = await admin.call(
            "POST", f"/apps/{app_id}/devices/AABBCCDDEEFF", {"tags": ["lab", "v2"]}
        )
        assert status == 201
        assert cred["tags"] == ["lab", "v2"]
        key = cred["key"]
        assert len(key) >= 22  # at least 128 bits in URL-safe base64

        dev = (await connect(admin.http, admin.server.ws_url, app_id, "AABBCCDDEEFF", key)).serve()
        status, listed = await admin.call("GET", f"/apps/{app_id}/devices")
        assert status == 200
        assert listed["devices"][0]["device_id"] == "AABBCCDDEEFF"
        assert listed["devices"][0]["online"] is True
        assert "key" not in listed["devices"][0]

        status, _ = await admin.call("DELETE", f"/apps/{app_id}/devices/AABBCCDDEEFF")
        assert status == 200
        assert await dev.wait_closed() == 4005
        with pytest.raises(ConnectionError, match="4001"):
            await connect(admin.http, admin.server.ws_url, app_id, "AABBCCDDEEFF", key)
        assert (await admin.call("DELETE", f"/apps/{app_id}/devices/AABBCCDDEEFF"))[0] == 404

    async def test_reprovision_rotates_key(self, admin: Admin) -> None:
        _, app = await admin.call("POST", "/apps", {"name": "a"})
        _, first = await admin.call("POST", f"/apps/{app['app_id']}/devices/d")
        _, second = await admin.call("POST", f"/apps/{app['app_id']}/devices/d")
        assert first["key"] != second["key"]
        with pytest.raises(ConnectionError, match="bad_key"):
            await connect(admin.http, admin.server.ws_url, app["app_id"], "d", first["key"])
        await connect(admin.http, admin.server.ws_url, app["app_id"], "d", second["key"])

    async def test_reprovision_closes_the_session_of_the_old_key(self, admin: Admin) -> None:
        _, app = await admin.call("POST", "/apps", {"name": "a"})
        _, first = await admin.call("POST", f"/apps/{app['app_id']}/devices/d")
        old = (
            await connect(admin.http, admin.server.ws_url, app["app_id"], "d", first["key"])
        ).serve()
        status, second = await admin.call("POST", f"/apps/{app['app_id']}/devices/d")
        assert (status, second["online"]) == (201, False)
        assert await old.wait_closed() == 4005
        await connect(admin.http, admin.server.ws_url, app["app_id"], "d", second["key"])

    async def test_delete_app_closes_sessions(self, admin: Admin) -> None:
        _, app = await admin.call("POST", "/apps", {"name": "a"})
        _, cred = await admin.call("POST", f"/apps/{app['app_id']}/devices/d")
        dev = (
            await connect(admin.http, admin.server.ws_url, app["app_id"], "d", cred["key"])
        ).serve()
        status, deleted = await admin.call("DELETE", f"/apps/{app['app_id']}")
        assert (status, deleted["sessions_closed"]) == (200, 1)
        assert await dev.wait_closed() == 4005

    async def test_bad_device_id_and_unknown_app(self, admin: Admin) -> None:
        _, app = await admin.call("POST", "/apps", {"name": "a"})
        status, data = await admin.call("POST", f"/apps/{app['app_id']}/devices/-bad")
        assert (status, data["error"]) == (400, "invalid_device_id")
        status, data = await admin.call("POST", "/apps/nope/devices/d")
        assert (status, data["error"]) == (404, "unknown_app")
        status, data = await admin.call("DELETE", "/apps/nope/devices/d")
        assert (status, data["error"]) == (404, "unknown_app")
        status, data = await admin.call("POST", f"/apps/{app['app_id']}/devices/d", {"tags": "x"})
        assert (status, data["error"]) == (400, "invalid_field")
