"""Messaging beyond one call, in one script: a thermostat and the app server that drives it.

    python examples/messaging/walkthrough.py SERVER APP_ID APP_SECRET DEVICE_KEY

The device key is for device ``thermostat-1`` of the application, provisioned with the tag
``upstairs``:

    backchannel devices provision APP_ID thermostat-1 --tag upstairs

What it shows, step by step (each step prints one line):

1. the app queues a command while the thermostat is offline (202 and a message id);
2. the thermostat connects, gets the command, replies; the app reads the reply;
3. the thermostat subscribes to ``home/+/mode``, the app publishes on ``home/upstairs/mode``;
4. the app calls every device tagged ``upstairs`` at once (a fan-out);
5. the thermostat emits a reading, and the app sees it on the event stream.
"""

from __future__ import annotations

import asyncio
import sys

from backchannel import AsyncClient, Device


async def main(server: str, app_id: str, secret: str, key: str) -> None:
    """Run the walkthrough against a backchannel server."""
    setpoint = {"value": b"20"}
    modes: list[str] = []
    device = Device(server, app_id, "thermostat-1", key, backoff_initial=0.1, backoff_max=1.0)

    @device.handler("set")
    def set_point(body: bytes) -> bytes:
        setpoint["value"] = body
        return b"set to " + body

    @device.handler("get")
    def get_point(body: bytes) -> bytes:
        return setpoint["value"]

    @device.topic("home/+/mode")
    def on_mode(topic: str, data: bytes) -> None:
        modes.append(data.decode())

    async with AsyncClient(server, app_id, secret) as app:
        # 1. The device is offline: queue the command instead of failing.
        queued = await app.send(
            "thermostat-1", b"22", method="set", offline="queue", ttl=600, idempotency_key="sp-22"
        )
        print(f"1. queued {queued.id} ({queued.state})", flush=True)

        # 2. The device connects and gets it; the app reads the outcome.
        serving = asyncio.create_task(device.serve())
        await device.wait_connected(10)
        done = await app.wait_message(queued.id, timeout=10, poll=0.05)
        print(f"2. {done.state}: {done.reply!r}", flush=True)

        # 3. Topics: one-way messages to every subscribed device that is connected.
        reached = await app.publish("home/upstairs/mode", b"eco")
        for _ in range(100):
            if modes:
                break
            await asyncio.sleep(0.05)
        print(f"3. published to {reached} device(s); the thermostat got {modes}", flush=True)

        # 4. Fan-out: one call to a group, every device's outcome within one deadline.
        result = await app.fanout(b"", tag="upstairs", method="get", timeout=5)
        print(f"4. fan-out: {result.replied} replied: {result.replies}", flush=True)

        # 5. Events: the device reports, the app follows the stream (resuming by itself).
        stream = app.events(after=0, types=["temperature"])
        await device.emit("temperature", b"21.5", ack=True)
        event = await asyncio.wait_for(stream.__anext__(), 10)
        await stream.aclose()
        print(f"5. event {event.type} from {event.device_id}: {event.data!r}", flush=True)

        await device.stop()
        await serving


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    asyncio.run(main(*sys.argv[1:5]))
