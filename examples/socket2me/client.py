"""A Socket2me client in Python: take a token, print the public URL, answer every request.

    python examples/socket2me/client.py http://localhost:8080

Needs python-socketio and aiohttp (both come with backchannel). Any Socket.IO v4 client in
any language can do the same; this is the whole protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import aiohttp
import socketio


async def main(server: str) -> None:
    """Take a token, connect to its namespace, answer requests until interrupted."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server}/new") as resp:
            token = await resp.json()  # the token is a JSON string
        print(f"public URL: {server}/go/{token}/", flush=True)

        sio = socketio.AsyncClient()  # reconnects on its own, to the same token

        @sio.on("request", namespace=f"/{token}")
        async def on_request(req: dict[str, object]) -> tuple[object, ...]:
            # req: headers, method, url (absent at the root), query, body, rawBody (bytes)
            path = req.get("url", "")
            print(f"{req['method']} /{path} {req['query']}", flush=True)
            # respond(status, body, headers): the return value is the acknowledgement.
            return 200, f"Hello from behind NAT: {req['method']} /{path}", {"X-Example": "py"}

        await sio.connect(server, namespaces=[f"/{token}"])
        try:
            while True:
                # Tokens expire after 6 hours unless refreshed; refresh well before that.
                await asyncio.sleep(3600)
                async with http.get(f"{server}/refresh/{token}") as resp:
                    resp.raise_for_status()
        finally:
            await sio.disconnect()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "http://localhost:8080"))
