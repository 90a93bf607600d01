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
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

import _common as c

SEND_PATH = "/v1/applications/{app}/devices/{dev}/send"
P50_TARGET_MS = 1.0  # at concurrency 1
THROUGHPUT_TARGET = 0.5  # of the trivial handler, at concurrency 64
CPU_TARGET_US = 100.0  # server CPU per call, at concurrency 64
NOISE_WARN_PCT = 15.0  # CPU used by other processes, in % of one core


# -- child roles -----------------------------------------------------------------------------


async def _devices_role(ws_url: str, creds_path: Path) -> None:
    creds = c.load_creds(creds_path)
    stats = c.DeviceStats()
    async with c.device_session() as http:
        tasks = [asyncio.create_task(c.run_device(http, ws_url, cr, stats)) for cr in creds]
        while stats.online < len(creds):
            if stats.gave_up:
                print("GAVE_UP", json.dumps(stats.as_dict()), flush=True)
                return
            await asyncio.sleep(0.01)
        print("READY", json.dumps(stats.as_dict()), flush=True)
        await asyncio.gather(*tasks)
        print("DONE", json.dumps(stats.as_dict()), flush=True)


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


async def _loadgen_role(
    urls: list[str],
    auth: str,
    concurrency: int,
    warmup: float,
    duration: float,
    body_size: int,
    pids: list[int],
) -> dict[str, Any]:
    body = (b"0123456789abcdef" * (body_size // 16 + 1))[:body_size]
    headers = {"Authorization": auth, "Content-Type": "application/octet-stream"}
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    completed = 0
    t_begin = time.perf_counter()
    start = t_begin + warmup
    end = start + duration
    perf = time.perf_counter
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

        async def worker(i: int) -> None:
            nonlocal completed
            url = urls[i % len(urls)]
            while True:
                t0 = perf()
                if t0 >= end:
                    return
                status: int | str
                try:
                    async with http.post(url, data=body) as resp:
                        data = await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, OSError) as exc:
                    status, data = type(exc).__name__, b""
                    await asyncio.sleep(0.001)
                t1 = perf()
                if start <= t1 <= end:
                    if status == 200 and data == body:
                        completed += 1
                        if t0 >= start:
                            latencies.append(t1 - t0)
                    else:
                        failures[str(status)] += 1

        async def sampler() -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start - perf()))
            cpu0 = {pid: c.cpu_seconds(pid) for pid in pids}
            own0, w0, m0 = time.process_time(), perf(), c.machine_cpu_seconds()
            await asyncio.sleep(max(0.0, end - perf()))
            cpu1 = {pid: c.cpu_seconds(pid) for pid in pids}
            own1, w1, m1 = time.process_time(), perf(), c.machine_cpu_seconds()
            return {
                "window": w1 - w0,
                "cpu": {str(pid): cpu1[pid] - cpu0[pid] for pid in pids},
                "loadgen_cpu": own1 - own0,
                # The whole machine: shows other work (not ours) competing for the CPUs.
                "machine_busy": m1[0] - m0[0],
                "machine_total": m1[1] - m0[1],
            }

        sampled, *_ = await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
    latencies.sort()
    return {
        "calls": completed,
        "errors": sum(failures.values()),
        "failures": dict(failures),
        "duration": duration,
        "calls_per_s": completed / duration,
        "p50_ms": c.percentile(latencies, 50) * 1000,
        "p90_ms": c.percentile(latencies, 90) * 1000,
        "p99_ms": c.percentile(latencies, 99) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
        **sampled,
    }


# -- the benchmark ---------------------------------------------------------------------------


def run_loadgen(
    kids: c.Children,
    urls: list[str],
    auth: str,
    concurrency: int,
    args: argparse.Namespace,
    pids: list[int],
) -> dict[str, Any]:
    """Run the load generator in its own process and return its JSON result."""
    cmd = [sys.executable, __file__, "--role", "loadgen", "--urls", json.dumps(urls)]
    cmd += ["--auth", auth, "--concurrency", str(concurrency), "--duration", str(args.duration)]
    cmd += ["--warmup", str(args.warmup), "--body-size", str(args.body_size)]
    cmd += ["--pids", ",".join(map(str, pids))]
    proc = kids.spawn(cmd)
    try:
        out, _ = proc.communicate(timeout=args.warmup + args.duration + 60)
    finally:
        kids.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{out}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


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
            r = run_loadgen(kids, urls, auth, conc, args, pids)
            cpu = r["cpu"]
            calls = max(1, r["calls"])
            row = {
                "target": target,
                "concurrency": conc,
                "calls": r["calls"],
                "errors": r["errors"],
                "calls_per_s": round(r["calls_per_s"], 1),
                "p50_ms": round(r["p50_ms"], 3),
                "p90_ms": round(r["p90_ms"], 3),
                "p99_ms": round(r["p99_ms"], 3),
                "server_cpu_us_per_call": round(cpu[str(pids[0])] / calls * 1e6, 1),
                "server_cpu_pct": round(100 * cpu[str(pids[0])] / r["window"], 1),
                "device_cpu_us_per_call": (
                    round(cpu[str(pids[1])] / calls * 1e6, 1) if len(pids) > 1 else None
                ),
                "loadgen_cpu_pct": round(100 * r["loadgen_cpu"] / r["window"], 1),
                "machine_busy_pct": round(100 * r["machine_busy"] / r["machine_total"], 1),
                # CPU used by anything but the measured processes, in % of one core.
                "other_cpu_pct": round(
                    100 * (r["machine_busy"] - sum(cpu.values()) - r["loadgen_cpu"]) / r["window"],
                    1,
                ),
                "failures": r["failures"],
            }
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
    table = []
    for r in rows:
        trivial = by.get(("trivial", r["concurrency"]))
        pct = (
            f"{100 * r['calls_per_s'] / trivial['calls_per_s']:.0f}%"
            if r["target"] == "relay" and trivial and trivial["calls_per_s"]
            else ""
        )
        dev_cpu = r["device_cpu_us_per_call"]
        table.append(
            [
                r["target"],
                r["concurrency"],
                f"{r['calls_per_s']:.0f}",
                pct,
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['server_cpu_us_per_call']:.0f}",
                f"{r['server_cpu_pct']:.0f}%",
                "" if dev_cpu is None else f"{dev_cpu:.0f}",
                f"{r['loadgen_cpu_pct']:.0f}%",
                f"{r['machine_busy_pct']:.0f}%",
                f"{r['other_cpu_pct']:.0f}%",
                r["errors"],
            ]
        )
    c.print_table(
        [
            "target",
            "conc",
            "calls/s",
            "% trivial",
            "p50 ms",
            "p99 ms",
            "srv µs/call",
            "srv cpu",
            "dev µs/call",
            "loadgen cpu",
            "machine busy",
            "other cpu",
            "errors",
        ],
        table,
    )

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
    noisy = max(r["other_cpu_pct"] for r in rows)
    if noisy > NOISE_WARN_PCT:
        print(
            f"\nwarning: other processes used up to {noisy:.0f}% of a core during the "
            "measurements; the figures are unreliable (see 'other cpu')"
        )
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
    p.add_argument("--urls", help=hidden)
    p.add_argument("--auth", help=hidden)
    p.add_argument("--pids", default="", help=hidden)
    return p.parse_args()


def main() -> int:
    """Entry point: a child role, or the benchmark itself."""
    args = parse_args()
    if args.role == "devices":
        c.run_async(_devices_role(args.ws_url, args.creds))
        return 0
    if args.role == "trivial":
        c.run_async(_trivial_role(args.port))
        return 0
    if args.role == "loadgen":
        pids = [int(x) for x in args.pids.split(",") if x]
        out = c.run_async(
            _loadgen_role(
                json.loads(args.urls),
                args.auth,
                int(args.concurrency),
                args.warmup,
                args.duration,
                args.body_size,
                pids,
            )
        )
        print(json.dumps(out), flush=True)
        return 0

    c.sigterm_raises_keyboard_interrupt()
    try:
        with c.temp_dir() as tmp, c.Children() as kids:
            result = bench(kids, tmp, args)
    except KeyboardInterrupt:
        print("\ninterrupted; child processes stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(json.dumps({"bench": "rpc", "error": str(exc), "pass": False}))
        return 1
    summary = report(result, args)
    print(json.dumps(summary, ensure_ascii=False))
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
