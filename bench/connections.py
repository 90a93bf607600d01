"""Idle connections benchmark: server memory per idle device, and reconnection after a restart.

Starts the server, provisions N device keys through the admin API, spreads N idle native
connections over ``--procs`` client processes, and measures the server's RSS before and after
they are all online. Then restarts the server (SIGTERM, start again on the same port and data
directory) and measures how long the devices, reconnecting on their own with exponential
backoff and full jitter, take to be all back, and whether any gave up.

    .venv/bin/python bench/connections.py [--devices 10000] [--procs 4]

The last line of output is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _common as c

KB_PER_CONN_TARGET = 25.0
RECONNECT_TARGET_S = 30.0
FD_MARGIN = 200  # listening socket, sqlite, pipes, the interpreter's own files


# -- child role: a share of the idle devices -------------------------------------------------


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _idle_role(args: argparse.Namespace) -> None:
    creds = c.load_creds(args.creds)[args.start : args.start + args.count]
    stats = c.DeviceStats()
    limit = asyncio.Semaphore(args.connect_concurrency)
    pid = os.getpid()
    async with c.device_session() as http:
        tasks = [
            asyncio.create_task(
                c.run_device(
                    http,
                    args.ws_url,
                    cred,
                    stats,
                    connect_limit=limit,
                    backoff_initial=args.backoff_initial,
                    backoff_max=args.backoff_max,
                )
            )
            for cred in creds
        ]
        while True:
            status = {**stats.as_dict(), "devices": len(creds), "rss_kb": c.rss_kb(pid)}
            print(json.dumps(status), flush=True)
            if all(t.done() for t in tasks):
                return
            await asyncio.sleep(args.report_interval)


# -- the benchmark ---------------------------------------------------------------------------


class Fleet:
    """The client processes and their latest status lines."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self._status: dict[int, dict[str, int]] = {}
        self._lock = threading.Lock()

    def add(self, proc: subprocess.Popen[str]) -> None:
        """Track a client process and read its status lines."""
        self.procs.append(proc)

        def on_line(line: str) -> None:
            try:
                status = json.loads(line)
            except ValueError:
                return
            with self._lock:
                self._status[proc.pid] = status

        c.LineReader(proc, on_line)

    def total(self) -> dict[str, int]:
        """Counters summed over the client processes."""
        with self._lock:
            statuses = list(self._status.values())
        keys = ("online", "connects", "failed_attempts", "drops", "gave_up", "rss_kb", "devices")
        return {k: sum(int(s.get(k, 0)) for s in statuses) for k in keys}

    def check_alive(self) -> None:
        """Raise when a client process died."""
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"client process {p.pid} exited with {p.returncode}")


def wait_all_online(
    server: c.Server, fleet: Fleet, n: int, timeout: float, label: str
) -> float | None:
    """Poll /healthz until ``n`` sessions; return the monotonic time, or None on timeout."""
    deadline = time.monotonic() + timeout
    next_progress = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        fleet.check_alive()
        try:
            sessions = server.sessions(timeout=5.0)
        except OSError:
            sessions = -1
        now = time.monotonic()
        if sessions >= n:
            return now
        total = fleet.total()
        if total["gave_up"] and sessions >= 0 and sessions + total["gave_up"] >= n:
            # Everyone who still tries is online; the rest will never come back.
            print(f"  {label}: {total['gave_up']} device(s) gave up", file=sys.stderr)
            return None
        if now >= next_progress:
            next_progress = now + 2.0
            print(
                f"  {label}: {sessions} sessions on the server, clients report "
                f"{total['online']} online, {total['failed_attempts']} failed attempts, "
                f"{total['gave_up']} gave up",
                file=sys.stderr,
            )
        time.sleep(0.1)
    return None


def bench(kids: c.Children, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Provision, connect, measure memory, restart, measure reconnection."""
    n, procs = args.devices, args.procs
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_proc = -(-n // procs)
    if n + FD_MARGIN > hard or per_proc + FD_MARGIN > hard:
        raise RuntimeError(f"{n} devices need more than the open-files hard limit of {hard}")

    server = c.Server(kids, tmp / "data")
    server.start()
    app_id, _secret = c.create_app(server, "bench-connections")
    print(f"  provisioning {n} device keys ...", file=sys.stderr)
    t = time.monotonic()
    creds = c.run_async(
        c.provision_devices(
            server, app_id, (f"dev-{i:05d}" for i in range(n)), args.provision_concurrency
        )
    )
    provision_s = time.monotonic() - t
    creds_path = tmp / "creds.json"
    c.save_creds(creds_path, creds)

    time.sleep(1.0)
    rss_before = c.rss_kb(server.pid)
    cpu_before = c.cpu_seconds(server.pid)

    fleet = Fleet()
    t_connect = time.monotonic()
    for i in range(procs):
        start = i * per_proc
        count = max(0, min(per_proc, n - start))
        cmd = [sys.executable, __file__, "--role", "idle", "--ws-url", server.ws_url]
        cmd += ["--creds", str(creds_path), "--start", str(start), "--count", str(count)]
        cmd += ["--connect-concurrency", str(args.connect_concurrency)]
        cmd += ["--backoff-initial", str(args.backoff_initial)]
        cmd += ["--backoff-max", str(args.backoff_max)]
        fleet.add(kids.spawn(cmd))
    print(f"  connecting {n} devices from {procs} processes ...", file=sys.stderr)
    online_at = wait_all_online(server, fleet, n, args.connect_timeout, "connect")
    if online_at is None:
        raise RuntimeError(
            f"only {server.sessions()} of {n} devices connected in {args.connect_timeout} s"
        )
    connect_s = online_at - t_connect
    connect_cpu = c.cpu_seconds(server.pid) - cpu_before
    time.sleep(args.settle)
    rss_after = c.rss_kb(server.pid)
    sessions_after = server.sessions()
    clients = fleet.total()
    kb_per_conn = (rss_after - rss_before) / n

    print("  restarting the server (SIGTERM) ...", file=sys.stderr)
    before_restart = fleet.total()
    t_term = time.monotonic()
    exit_code = server.stop(timeout=60)
    shutdown_s = time.monotonic() - t_term
    listening_at = server.start()
    down_s = listening_at - t_term
    cpu_restart = c.cpu_seconds(server.pid)
    back_at = wait_all_online(server, fleet, n, args.reconnect_timeout, "reconnect")
    back_s = (back_at - listening_at) if back_at is not None else None
    reconnect_cpu = c.cpu_seconds(server.pid) - cpu_restart
    after_restart = fleet.total()
    rss_restarted = c.rss_kb(server.pid)
    sessions_restarted = server.sessions()
    server.stop()

    return {
        "devices": n,
        "procs": procs,
        "provision_s": round(provision_s, 2),
        "provision_per_s": round(n / provision_s, 0),
        "connect_s": round(connect_s, 2),
        "connect_per_s": round(n / connect_s, 0),
        "server_cpu_us_per_connect": round(connect_cpu / n * 1e6, 0),
        "server_rss_before_kb": rss_before,
        "server_rss_after_kb": rss_after,
        "sessions_after": sessions_after,
        "kb_per_idle_connection": round(kb_per_conn, 2),
        "client_rss_kb_per_connection": round(clients["rss_kb"] / n, 2),
        "shutdown_s": round(shutdown_s, 2),
        "server_exit_code": exit_code,
        "down_s": round(down_s, 2),
        "reconnect_s": None if back_s is None else round(back_s, 2),
        "server_cpu_us_per_reconnect": round(reconnect_cpu / n * 1e6, 0),
        "sessions_after_restart": sessions_restarted,
        "server_rss_after_restart_kb": rss_restarted,
        "gave_up": after_restart["gave_up"],
        "failed_attempts_initial": before_restart["failed_attempts"],
        "failed_attempts_reconnect": after_restart["failed_attempts"]
        - before_restart["failed_attempts"],
        "drops_before_restart": before_restart["drops"],
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the tables; return the JSON summary."""
    n = r["devices"]
    print()
    print(f"Idle connections: {n} devices from {r['procs']} client processes")
    c.print_table(
        ["measure", "value"],
        [
            ["provisioning (admin API)", f"{r['provision_s']} s ({r['provision_per_s']:.0f}/s)"],
            ["all online after", f"{r['connect_s']} s ({r['connect_per_s']:.0f} connects/s)"],
            ["server CPU per connect", f"{r['server_cpu_us_per_connect']:.0f} µs"],
            ["server RSS before", f"{r['server_rss_before_kb'] / 1024:.1f} MiB"],
            [
                f"server RSS with {r['sessions_after']} idle",
                f"{r['server_rss_after_kb'] / 1024:.1f} MiB",
            ],
            ["server KB per idle connection", f"{r['kb_per_idle_connection']:.2f} KB"],
            [
                "client RSS per connection (incl. interpreter)",
                f"{r['client_rss_kb_per_connection']:.2f} KB",
            ],
            ["failed attempts (initial)", r["failed_attempts_initial"]],
            ["drops before the restart", r["drops_before_restart"]],
            ["shutdown (SIGTERM to exit)", f"{r['shutdown_s']} s (exit {r['server_exit_code']})"],
            ["SIGTERM to new server listening", f"{r['down_s']} s"],
            [
                "listening to all back",
                "timeout" if r["reconnect_s"] is None else f"{r['reconnect_s']} s",
            ],
            ["server CPU per reconnect", f"{r['server_cpu_us_per_reconnect']:.0f} µs"],
            ["failed attempts (reconnect)", r["failed_attempts_reconnect"]],
            ["devices that gave up", r["gave_up"]],
            [
                f"server RSS after restart ({r['sessions_after_restart']})",
                f"{r['server_rss_after_restart_kb'] / 1024:.1f} MiB",
            ],
        ],
    )
    back = r["reconnect_s"]
    targets = [
        {
            "name": "< 25 KB per idle connection",
            "value": r["kb_per_idle_connection"],
            "unit": "KB",
            "pass": r["kb_per_idle_connection"] < KB_PER_CONN_TARGET,
        },
        {
            "name": "all back within 30 s of listening",
            "value": back,
            "unit": "s",
            "pass": back is not None and back < RECONNECT_TARGET_S,
        },
        {"name": "no device gave up", "value": r["gave_up"], "unit": "", "pass": r["gave_up"] == 0},
    ]
    print()
    c.print_targets(targets)
    return {
        "bench": "connections",
        **r,
        "targets": targets,
        "pass": all(t["pass"] for t in targets),
    }


def parse_args() -> argparse.Namespace:
    """Command line; ``--role`` and the options after it are for the client processes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=10_000, help="idle devices [10000]")
    p.add_argument("--procs", type=int, default=4, help="client processes [4]")
    p.add_argument(
        "--connect-concurrency", type=int, default=200, help="handshakes in flight per process"
    )
    p.add_argument("--provision-concurrency", type=int, default=64, help="admin API requests")
    p.add_argument("--backoff-initial", type=float, default=0.5, help="first backoff cap [0.5]")
    p.add_argument("--backoff-max", type=float, default=5.0, help="largest backoff cap [5]")
    p.add_argument("--connect-timeout", type=float, default=120.0, help="initial ramp limit")
    p.add_argument("--reconnect-timeout", type=float, default=60.0, help="reconnect limit")
    p.add_argument("--settle", type=float, default=3.0, help="wait before reading RSS [3]")
    hidden = argparse.SUPPRESS
    p.add_argument("--role", choices=["idle"], help=hidden)
    p.add_argument("--ws-url", help=hidden)
    p.add_argument("--creds", type=Path, help=hidden)
    p.add_argument("--start", type=int, default=0, help=hidden)
    p.add_argument("--count", type=int, default=0, help=hidden)
    p.add_argument("--report-interval", type=float, default=0.5, help=hidden)
    return p.parse_args()


def main() -> int:
    """Entry point: the client role, or the benchmark itself."""
    args = parse_args()
    if args.role == "idle":
        _raise_fd_limit()
        c.run_async(_idle_role(args))
        return 0

    return c.run_benchmark("connections", bench, report, args)


if __name__ == "__main__":
    sys.exit(main())
