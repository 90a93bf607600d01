"""Cometa benchmark: calls through raw Cometa devices vs native devices, one server, one run.

One application (``allow_open_attach``) holds two fleets: N native devices (raw native
protocol over aiohttp WebSockets, keys provisioned) in one process, and N Cometa devices (the
raw Cometa protocol over TCP on the same port, no keys) in another; both answer every
message with its body. For each concurrency the same load generator as ``rpc.py`` (C workers
looping ``POST .../send``, round-robin over the N device ids of one kind) measures each fleet,
``--rounds`` times in alternating order.

    .venv/bin/python bench/cometa.py [--duration 5] [--concurrency 64] [--devices 100]
                                     [--rounds 3]

The last line of output is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Any

import _common as c

THROUGHPUT_TARGET = 0.8  # Cometa calls/s as a share of native, at concurrency 64
TARGET_CONCURRENCY = 64
PLATFORM = b"Linux-bench"  # the attach body: the device's platform string
MAX_HEAD = 8192  # a longer response head means the server is not answering an attach


# -- child role: raw Cometa echo devices -----------------------------------------------------


def cometa_ids(count: int) -> list[str]:
    """The Cometa device ids (not provisioned: they attach under open attach)."""
    return [f"cometa-{i}" for i in range(count)]


def native_ids(count: int) -> list[str]:
    """The native device ids (provisioned with keys)."""
    return [f"native-{i}" for i in range(count)]


class CometaEcho(asyncio.Protocol):
    """One raw Cometa device connection: attach, then answer every message with its body.

    Parses the response head, then chunk frames incrementally; the first chunk is the
    server's hello, each later one a message. Sends the 0x06 heartbeat at the interval the
    hello announces, so the server's liveness check never drops an idle device.
    """

    def __init__(self, attach: bytes, stats: c.DeviceStats) -> None:
        self._attach = attach
        self._stats = stats
        self._io: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head_pending = True
        self._heartbeat: asyncio.TimerHandle | None = None
        self._interval = 60.0
        self.attached = False  # the hello arrived; stays True after a drop
        self.refused = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the attach request in one write."""
        io: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's: no subclass
        io.write(self._attach)
        self._io = io

    def data_received(self, data: bytes) -> None:
        """Response head first, then complete chunks; all replies go out in one write."""
        io = self._io
        assert io is not None
        buf = self._buf
        buf += data
        if self._head_pending:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    io.close()
                return
            if not buf.startswith(b"HTTP/1.1 200 "):
                self.refused = True  # e.g. 403: the application does not allow open attach
                io.close()
                return
            del buf[: end + 4]
            self._head_pending = False
        off, end = 0, len(buf)
        replies: list[bytearray] = []
        try:
            while True:
                nl = buf.find(b"\r\n", off)
                if nl < 0:
                    break
                stop = nl + 2 + int(buf[off:nl], 16) + 2
                if stop > end:
                    break
                if self.attached:
                    # The server frames strictly (lowercase hex, CRLF after the payload), so
                    # the echo reply, one chunk holding the same body, is the same bytes.
                    replies.append(buf[off:stop])
                else:
                    self._hello(bytes(buf[nl + 2 : stop - 2]))
                off = stop
        except ValueError:  # a size line that is not hex, or a hello that is not JSON
            io.close()
            return
        if off:
            del buf[:off]
        if replies:
            self._stats.calls += len(replies)
            io.write(replies[0] if len(replies) == 1 else b"".join(replies))

    def _hello(self, payload: bytes) -> None:
        hello = json.loads(payload)
        if hello.get("msg") != "200":
            raise ValueError(f"unexpected first chunk {payload[:60]!r}")
        self._interval = float(hello.get("heartbeat") or 60)
        self.attached = True
        self._stats.online += 1
        self._stats.connects += 1
        self._heartbeat = asyncio.get_running_loop().call_later(self._interval, self._beat)

    def _beat(self) -> None:
        if self._io is not None and not self._io.is_closing():
            self._io.write(b"1\r\n\x06\r\n")
            self._heartbeat = asyncio.get_running_loop().call_later(self._interval, self._beat)

    def connection_lost(self, exc: Exception | None) -> None:
        """Count the drop and wake :func:`run_cometa_device`."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self.attached:
            self._stats.online -= 1
            self._stats.drops += 1
        if not self.closed.done():
            self.closed.set_result(None)


async def run_cometa_device(
    port: int,
    app_id: str,
    device_id: str,
    stats: c.DeviceStats,
    *,
    backoff_initial: float = 0.5,
    backoff_max: float = 5.0,
) -> None:
    """Keep one Cometa echo device attached; reconnect with backoff, give up if refused."""
    loop = asyncio.get_running_loop()
    attach = (
        f"POST /v1/applications/{app_id}/devices/{device_id} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nContent-Length: {len(PLATFORM)}\r\n\r\n"
    ).encode() + PLATFORM
    attempt = 0
    while True:
        try:
            _, proto = await loop.create_connection(
                lambda: CometaEcho(attach, stats), "127.0.0.1", port
            )
        except OSError:
            stats.failed_attempts += 1
        else:
            await proto.closed
            if proto.refused:
                stats.gave_up += 1
                return
            if proto.attached:
                attempt = 0
            else:
                stats.failed_attempts += 1
        delay = random.uniform(0.0, min(backoff_max, backoff_initial * 2 ** min(attempt, 30)))
        attempt += 1
        await asyncio.sleep(delay)


async def _cometa_role(port: int, app_id: str, count: int) -> None:
    stats = c.DeviceStats()
    tasks = [
        asyncio.create_task(run_cometa_device(port, app_id, device_id, stats))
        for device_id in cometa_ids(count)
    ]
    await c.announce_online(stats, tasks)


# -- the benchmark ---------------------------------------------------------------------------


def _start_devices(kids: c.Children, role_args: list[str], what: str) -> int:
    """Start a device process, wait until all its devices are online; return its pid."""
    proc = kids.spawn([sys.executable, __file__, "--role", *role_args])
    line = c.LineReader(proc).wait_for(lambda ln: ln.startswith(("READY", "GAVE_UP")), 30)
    if line.startswith("GAVE_UP"):
        raise RuntimeError(f"{what} devices were refused: {line}")
    return proc.pid


def bench(kids: c.Children, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, measure each concurrency through native and Cometa devices."""
    # Unique, in the given order: rounds, not repeats, are the way to measure a level again.
    concurrencies = list(dict.fromkeys(int(x) for x in args.concurrency.split(",") if x.strip()))
    server = c.Server(kids, tmp / "data")
    server.start()
    app_id, secret = c.create_app(server, "bench-cometa", allow_open_attach=True)
    native = native_ids(args.devices)
    creds = c.run_async(c.provision_devices(server, app_id, native))
    creds_path = tmp / "creds.json"
    c.save_creds(creds_path, creds)

    native_role = ["devices", "--ws-url", server.ws_url, "--creds", str(creds_path)]
    native_pid = _start_devices(kids, native_role, "native")
    cometa_role = ["cometa-devices", "--port", str(server.port), "--app-id", app_id]
    cometa_role += ["--devices", str(args.devices)]
    cometa_pid = _start_devices(kids, cometa_role, "Cometa")
    expected = 2 * args.devices
    if server.sessions() != expected:
        raise RuntimeError(f"expected {expected} sessions, server has {server.sessions()}")

    path = c.SEND_PATH.format(app=app_id, dev="{dev}")
    auth = f"OAuth {secret}"
    kinds = (
        ("native", [server.url + path.format(dev=d) for d in native], native_pid),
        ("cometa", [server.url + path.format(dev=d) for d in cometa_ids(args.devices)], cometa_pid),
    )
    rows: list[dict[str, Any]] = []
    for conc in concurrencies:
        for rnd in range(1, args.rounds + 1):
            # Alternate the order (ABBA...) so that slow drift in the machine's load does not
            # always favour the kind measured first.
            for kind, urls, dev_pid in kinds if rnd % 2 else kinds[::-1]:
                print(
                    f"  {kind:8s} concurrency {conc:4d} round {rnd} ...",
                    end="",
                    flush=True,
                    file=sys.stderr,
                )
                pids = [server.pid, dev_pid]
                r = c.run_loadgen(kids, __file__, urls, auth, conc, args, pids)
                row: dict[str, Any] = {"kind": kind, "concurrency": conc, "round": rnd}
                row.update(c.measurement_row(r, pids))
                rows.append(row)
                print(f" {row['calls_per_s']:.0f} calls/s", file=sys.stderr)
    if server.sessions() != expected:
        print("warning: the device count changed during the run", file=sys.stderr)
    return {"rows": rows, "concurrencies": concurrencies}


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and targets; return the JSON summary."""
    rows = result["rows"]
    by = {(r["kind"], r["concurrency"], r["round"]): r for r in rows}
    print()
    print(
        f"RPC through {args.devices} Cometa vs {args.devices} native devices "
        f"({args.duration:g} s after {args.warmup:g} s warm-up, {args.body_size}-byte body, "
        f"{args.rounds} round(s))"
    )
    shares = []
    for r in rows:
        native = by.get(("native", r["concurrency"], r["round"]))
        if r["kind"] == "cometa" and native and native["calls_per_s"]:
            r["pct_of_native"] = round(100 * r["calls_per_s"] / native["calls_per_s"], 1)
            shares.append(f"{r['pct_of_native']:.0f}%")
        else:
            shares.append("")
    labels = [f"{r['kind']} #{r['round']}" if args.rounds > 1 else r["kind"] for r in rows]
    c.print_measurements(rows, "kind", labels, "% native", shares)

    targets: list[dict[str, Any]] = []
    # Over all rounds at the target concurrency: total Cometa calls / total native calls
    # (every window has the same duration).
    at_target = [r for r in rows if r["concurrency"] == TARGET_CONCURRENCY]
    cometa_calls = sum(r["calls"] for r in at_target if r["kind"] == "cometa")
    native_calls = sum(r["calls"] for r in at_target if r["kind"] == "native")
    if at_target:
        share = cometa_calls / native_calls if native_calls else 0.0
        targets.append(
            {
                "name": f">= 80% of native throughput at concurrency {TARGET_CONCURRENCY}",
                "value": round(100 * share, 1),
                "unit": "%",
                "pass": share >= THROUGHPUT_TARGET,
            }
        )
    errors = sum(r["errors"] for r in rows)
    targets.append({"name": "no failed calls", "value": errors, "unit": "", "pass": not errors})
    noisy = c.warn_if_noisy(rows)
    if not at_target:
        print(f"\nNo throughput target here (it is defined at concurrency {TARGET_CONCURRENCY}).")
    print()
    c.print_targets(targets)
    return {
        "bench": "cometa",
        "duration": args.duration,
        "devices": args.devices,
        "body_size": args.body_size,
        "rounds": args.rounds,
        "results": rows,
        "targets": targets,
        "max_other_cpu_pct": noisy,
        "pass": all(t["pass"] for t in targets),
    }


def parse_args() -> argparse.Namespace:
    """Command line; ``--role`` and the options after it are for the child processes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run [5]")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first [1]")
    p.add_argument("--concurrency", default="64", help="comma-separated list, e.g. 1,64 [64]")
    p.add_argument("--devices", type=int, default=100, help="echo devices of each kind [100]")
    p.add_argument("--body-size", type=int, default=64, help="request body bytes [64]")
    # One pair of 5-s windows is not enough on a small shared VM: the ratio of two single
    # windows swings by +-25%. Three alternating pairs make the aggregate steady.
    p.add_argument("--rounds", type=int, default=3, help="native/Cometa pairs per concurrency [3]")
    hidden = argparse.SUPPRESS
    p.add_argument("--role", choices=["devices", "cometa-devices", "loadgen"], help=hidden)
    p.add_argument("--ws-url", help=hidden)
    p.add_argument("--creds", type=Path, help=hidden)
    p.add_argument("--port", type=int, help=hidden)
    p.add_argument("--app-id", help=hidden)
    c.add_loadgen_args(p)
    return p.parse_args()


def main() -> int:
    """Entry point: a child role, or the benchmark itself."""
    args = parse_args()
    if args.role == "devices":
        c.run_async(c.serve_native_devices(args.ws_url, args.creds))
        return 0
    if args.role == "cometa-devices":
        c.run_async(_cometa_role(args.port, args.app_id, args.devices))
        return 0
    if args.role == "loadgen":
        return c.loadgen_role(args)
    if args.devices < 1 or args.rounds < 1:
        print("--devices and --rounds must be at least 1", file=sys.stderr)
        return 2

    return c.run_benchmark("cometa", bench, report, args)


if __name__ == "__main__":
    sys.exit(main())
