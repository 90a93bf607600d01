"""RPC benchmark: throughput, latency and server CPU of ``POST .../send`` through the relay.

Three processes per measurement: the server (``python -m backchannel serve``), a device
process answering every CALL with its body, and a load generator (aiohttp client, C workers
on a keep-alive connector of C connections, each looping POST of a 64-byte body). The same
load generator is then pointed at a trivial aiohttp handler (one POST route returning the
body) to show what the HTTP layer alone costs on this machine.

    .venv/bin/python bench/rpc.py [--duration 5] [--concurrency 1,64] [--devices 1]

The last line of output is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

import _common as c

SEND_PATH = c.SEND_PATH
P50_TARGET_MS = 1.0  # at concurrency 1
THROUGHPUT_TARGET = 0.5  # of the trivial handler, at concurrency 64
CPU_TARGET_US = 100.0  # server CPU per call, at concurrency 64


# -- child roles -----------------------------------------------------------------------------


async def _trivial_role(port: int) -> None:
    async def send(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/octet-stream")

    app = web.Application()
    app.router.add_post(SEND_PATH.format(app="{app_id}", dev="{device_id}"), send)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("READY", flush=True)
    await asyncio.Event().wait()


# -- the benchmark ---------------------------------------------------------------------------


def bench(kids: c.Children, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, measure each concurrency against the relay and the trivial handler."""
    concurrencies = [int(x) for x in args.concurrency.split(",") if x.strip()]
    server = c.Server(kids, tmp / "data")
    server.start()
    app_id, secret = c.create_app(server, "bench-rpc")
    device_ids = [f"echo-{i}" for i in range(args.devices)]
    creds = c.run_async(c.provision_devices(server, app_id, device_ids))
    creds_path = tmp / "creds.json"
    c.save_creds(creds_path, creds)

    dev = kids.spawn(
        [
            sys.executable,
            __file__,
            "--role",
            "devices",
            "--ws-url",
            server.ws_url,
            "--creds",
            str(creds_path),
        ]
    )
    c.LineReader(dev).wait_for(lambda line: line.startswith(("READY", "GAVE_UP")), 30)
    if server.sessions() != args.devices:
        raise RuntimeError(f"expected {args.devices} sessions, server has {server.sessions()}")

    trivial_port = c.free_port()
    trivial = kids.spawn(
        [sys.executable, __file__, "--role", "trivial", "--port", str(trivial_port)]
    )
    c.LineReader(trivial).wait_for(lambda line: line == "READY", 20)

    path = SEND_PATH.format(app=app_id, dev="{dev}")
    relay_urls = [server.url + path.format(dev=d) for d in device_ids]
    trivial_urls = [f"http://127.0.0.1:{trivial_port}" + path.format(dev=d) for d in device_ids]
    auth = f"OAuth {secret}"

    rows: list[dict[str, Any]] = []
    for conc in concurrencies:
        for target, urls, pids in (
            ("relay", relay_urls, [server.pid, dev.pid]),
            ("trivial", trivial_urls, [trivial.pid]),
        ):
            print(f"  {target:8s} concurrency {conc:4d} ...", end="", flush=True, file=sys.stderr)
            r = c.run_loadgen(kids, __file__, urls, auth, conc, args, pids)
            row = {"target": target, "concurrency": conc, **c.measurement_row(r, pids)}
            rows.append(row)
            print(f" {row['calls_per_s']:.0f} calls/s", file=sys.stderr)
    if server.sessions() != args.devices:
        print("warning: the device count changed during the run", file=sys.stderr)
    return {"rows": rows, "concurrencies": concurrencies}


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and targets; return the JSON summary."""
    rows = result["rows"]
    by = {(r["target"], r["concurrency"]): r for r in rows}
    print()
    print(
        f"RPC through the relay vs a trivial aiohttp handler "
        f"({args.duration:g} s after {args.warmup:g} s warm-up, {args.body_size}-byte body, "
        f"{args.devices} device(s))"
    )
    shares = []
    for r in rows:
        trivial = by.get(("trivial", r["concurrency"]))
        shares.append(
            f"{100 * r['calls_per_s'] / trivial['calls_per_s']:.0f}%"
            if r["target"] == "relay" and trivial and trivial["calls_per_s"]
            else ""
        )
    c.print_measurements(rows, "target", [r["target"] for r in rows], "% trivial", shares)

    targets: list[dict[str, Any]] = []
    r1 = by.get(("relay", 1))
    if r1:
        targets.append(
            {
                "name": "p50 < 1 ms at concurrency 1",
                "value": r1["p50_ms"],
                "unit": "ms",
                "pass": r1["p50_ms"] < P50_TARGET_MS,
            }
        )
    r64, t64 = by.get(("relay", 64)), by.get(("trivial", 64))
    if r64 and t64:
        share = r64["calls_per_s"] / t64["calls_per_s"] if t64["calls_per_s"] else 0.0
        targets.append(
            {
                "name": ">= 50% of trivial throughput at concurrency 64",
                "value": round(100 * share, 1),
                "unit": "%",
                "pass": share >= THROUGHPUT_TARGET,
            }
        )
        targets.append(
            {
                "name": "server CPU < 100 µs/call at concurrency 64",
                "value": r64["server_cpu_us_per_call"],
                "unit": "µs",
                "pass": r64["server_cpu_us_per_call"] < CPU_TARGET_US,
            }
        )
    noisy = c.warn_if_noisy(rows)
    errors = sum(r["errors"] for r in rows)
    if errors:
        targets.append({"name": "no failed calls", "value": errors, "unit": "", "pass": False})
    print()
    if targets:
        c.print_targets(targets)
    else:
        print("No targets at these concurrencies (they are defined at 1 and 64).")
    return {
        "bench": "rpc",
        "duration": args.duration,
        "devices": args.devices,
        "body_size": args.body_size,
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
    p.add_argument("--concurrency", default="1,64", help="comma-separated list [1,64]")
    p.add_argument("--devices", type=int, default=1, help="echo devices, round-robin [1]")
    p.add_argument("--body-size", type=int, default=64, help="request body bytes [64]")
    hidden = argparse.SUPPRESS
    p.add_argument("--role", choices=["devices", "trivial", "loadgen"], help=hidden)
    p.add_argument("--ws-url", help=hidden)
    p.add_argument("--creds", type=Path, help=hidden)
    p.add_argument("--port", type=int, help=hidden)
    c.add_loadgen_args(p)
    return p.parse_args()


def main() -> int:
    """Entry point: a child role, or the benchmark itself."""
    args = parse_args()
    if args.role == "devices":
        c.run_async(c.serve_native_devices(args.ws_url, args.creds))
        return 0
    if args.role == "trivial":
        c.run_async(_trivial_role(args.port))
        return 0
    if args.role == "loadgen":
        return c.loadgen_role(args)

    return c.run_benchmark("rpc", bench, report, args)


if __name__ == "__main__":
    sys.exit(main())
