"""Tunnel benchmark: native HTTP tunnels (``backchannel expose``) vs the local service direct.

Four kinds of process: the server (``python -m backchannel serve``), a local aiohttp service
(a 64-byte GET, a streamed download of N bytes, an upload that hashes and counts), an agent
holding a :class:`backchannel.sdk.Tunnel` to it, and, per measurement, a client process:
``rpc.py``'s load generator shape (C workers on a keep-alive connector of C connections,
each looping ``GET /small``) for small requests, and one streamed 1 GiB download and upload
for throughput. Everything is measured through the tunnel's public URL and straight against
the local service.

    .venv/bin/python bench/tunnel.py [--duration 5] [--concurrency 1,64] [--size 1073741824]

The last line of output is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

import _common as c

MiB = 1024 * 1024
GiB = 1024 * MiB
SMALL_SIZE = 64  # bytes of the small GET's answer
BLOCK = MiB  # downloads and uploads repeat one random block of this size
CHUNK = 256 * 1024  # write and read size of the transfers
BLOCK_SEED = 20240611
THROUGHPUT_TARGET = 0.3  # tunnel small requests/s as a share of direct, at concurrency 64
TARGET_CONCURRENCY = 64
MIB_S_TARGET = 100.0  # 1 GiB download and upload through the tunnel
RSS_TARGET_MIB = 64.0  # server RSS growth during a 1 GiB transfer
RSS_SAMPLE_S = 0.01
SMALL_BODY = (b"0123456789abcdef" * (SMALL_SIZE // 16 + 1))[:SMALL_SIZE]


def _block() -> bytes:
    return random.Random(BLOCK_SEED).randbytes(BLOCK)


def _chunks() -> list[bytes]:
    """The block cut into CHUNK-sized pieces (BLOCK is a multiple of CHUNK)."""
    block = _block()
    return [block[i : i + CHUNK] for i in range(0, BLOCK, CHUNK)]


def payload_sha256(size: int) -> str:
    """SHA-256 of ``size`` bytes of the repeated block (what an upload sends)."""
    block = _block()
    h = hashlib.sha256()
    for _ in range(size // BLOCK):
        h.update(block)
    h.update(block[: size % BLOCK])
    return h.hexdigest()


# -- child role: the local service -----------------------------------------------------------


async def _local_role(port: int) -> None:
    chunks = _chunks()
    block = _block()

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=SMALL_BODY, content_type="application/octet-stream")

    async def download(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        resp.content_length = n
        await resp.prepare(request)
        sent = 0
        while n - sent >= CHUNK:
            await resp.write(chunks[(sent % BLOCK) // CHUNK])
            sent += CHUNK
        if sent < n:
            await resp.write(block[sent % BLOCK : sent % BLOCK + n - sent])
        await resp.write_eof()
        return resp

    async def upload(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        length = 0
        async for part in request.content.iter_chunked(CHUNK):
            h.update(part)
            length += len(part)
        return web.json_response({"length": length, "sha256": h.hexdigest()})

    app = web.Application(client_max_size=0)
    app.router.add_get("/small", small)
    app.router.add_get("/bytes/{n}", download)
    app.router.add_post("/upload", upload)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("READY", flush=True)
    await asyncio.Event().wait()


# -- child role: the agent -------------------------------------------------------------------


async def _agent_role(server: str, creds_path: Path, target: str) -> None:
    from backchannel.sdk import Tunnel

    (cred,) = c.load_creds(creds_path)
    tunnel = Tunnel(server, cred.app_id, cred.device_id, cred.key, target, name="bench")
    task = asyncio.create_task(tunnel.serve())
    url = await tunnel.wait_ready(30)
    print("READY", url, flush=True)
    await task


# -- child role: small-request load generator ------------------------------------------------


def _loadgen_role(args: argparse.Namespace) -> int:
    pids = [int(x) for x in args.pids.split(",") if x]
    # The rpc load generator, looping GET of the 64-byte answer instead of POST .../send.
    out = c.run_async(
        c.loadgen(
            json.loads(args.urls),
            "",
            int(args.concurrency),
            args.warmup,
            args.duration,
            0,
            pids,
            expect=SMALL_BODY,
        )
    )
    print(json.dumps(out), flush=True)
    return 0


# -- child role: one big transfer ------------------------------------------------------------


async def _download(url: str, size: int) -> dict[str, Any]:
    """GET ``url``; check every byte against the repeated block (cheap compares, no hash)."""
    block = memoryview(_block())
    received = 0
    mismatch = False
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as http:
        t0 = time.perf_counter()
        async with http.get(url) as resp:
            status = resp.status
            async for part in resp.content.iter_chunked(CHUNK):
                view = memoryview(part)
                while view and not mismatch:
                    at = received % BLOCK
                    n = min(len(view), BLOCK - at)
                    mismatch = view[:n] != block[at : at + n]
                    received += n
                    view = view[n:]
        seconds = time.perf_counter() - t0
    ok = status == 200 and received == size and not mismatch
    return {"status": status, "bytes": received, "seconds": seconds, "ok": ok}


async def _upload(url: str, size: int, sha256: str) -> dict[str, Any]:
    """POST ``size`` bytes of the repeated block (chunked); the service hashes and counts."""
    chunks = _chunks()
    block = _block()

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        while size - sent >= CHUNK:
            yield chunks[(sent % BLOCK) // CHUNK]
            sent += CHUNK
        if sent < size:
            yield block[: size - sent]

    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        t0 = time.perf_counter()
        async with http.post(url, data=body()) as resp:
            status = resp.status
            answer = await resp.json() if status == 200 else {}
        seconds = time.perf_counter() - t0
    ok = status == 200 and answer.get("length") == size and answer.get("sha256") == sha256
    return {"status": status, "bytes": answer.get("length", 0), "seconds": seconds, "ok": ok}


def _transfer_role(args: argparse.Namespace) -> int:
    try:
        if args.kind == "download":
            out = c.run_async(_download(args.url, args.size))
        else:
            out = c.run_async(_upload(args.url, args.size, args.sha256))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        out = {"status": type(exc).__name__, "bytes": 0, "seconds": 0.0, "ok": False}
    print(json.dumps(out), flush=True)
    return 0


def run_transfer(
    kids: c.Children,
    kind: str,
    url: str,
    size: int,
    sha256: str,
    watch: dict[str, int],
) -> dict[str, Any]:
    """One transfer in its own process; samples the RSS of ``watch`` pids while it runs."""
    cmd = [sys.executable, __file__, "--role", "transfer", "--kind", kind, "--url", url]
    cmd += ["--size", str(size), "--sha256", sha256]
    base = {name: c.rss_kb(pid) for name, pid in watch.items()}
    peak = dict(base)
    cpu0 = {name: c.cpu_seconds(pid) for name, pid in watch.items()}
    proc = kids.spawn(cmd)
    reader = c.LineReader(proc)
    deadline = time.monotonic() + 60 + size / MiB  # ≥ 1 MiB/s, or give up
    try:
        while proc.poll() is None:
            for name, pid in watch.items():
                peak[name] = max(peak[name], c.rss_kb(pid))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} of {url} did not finish in time")
            time.sleep(RSS_SAMPLE_S)
    finally:
        kids.stop(proc)
    cpu = {name: c.cpu_seconds(pid) - cpu0[name] for name, pid in watch.items()}
    line = reader.wait_for(lambda s: s.startswith("{"), 5)
    out: dict[str, Any] = json.loads(line)
    seconds = out["seconds"] or float("nan")
    return {
        **out,
        "mib_per_s": round(size / MiB / seconds, 1) if out["ok"] else 0.0,
        "rss_growth_mib": {k: round((peak[k] - base[k]) / 1024, 1) for k in watch},
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "seconds": round(out["seconds"], 2),
    }


# -- the benchmark ---------------------------------------------------------------------------


def bench(kids: c.Children, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start everything; small requests, then the big transfers, tunnel and direct."""
    concurrencies = [int(x) for x in args.concurrency.split(",") if x.strip()]
    # The per-IP tunnel rate limit (400/s by default) would cap a loopback load generator.
    server = c.Server(kids, tmp / "data", extra=["--tunnel-rate-limit", "0"])
    server.start()
    app_id, _ = c.create_app(server, "bench-tunnel")
    creds = c.run_async(c.provision_devices(server, app_id, ["agent"]))
    creds_path = tmp / "creds.json"
    c.save_creds(creds_path, creds)

    local_port = c.free_port()
    local = kids.spawn([sys.executable, __file__, "--role", "local", "--port", str(local_port)])
    c.LineReader(local).wait_for(lambda line: line == "READY", 20)
    direct = f"http://127.0.0.1:{local_port}/"

    agent = kids.spawn(
        [
            sys.executable,
            __file__,
            "--role",
            "agent",
            "--server",
            server.url,
            "--creds",
            str(creds_path),
            "--target",
            direct.rstrip("/"),
        ]
    )
    line = c.LineReader(agent).wait_for(lambda s: s.startswith("READY"), 30)
    public = line.split(maxsplit=1)[1]
    if not public.endswith("/"):
        public += "/"
    bases = {"tunnel": public, "direct": direct}
    pids = [server.pid, agent.pid, local.pid]

    rows: list[dict[str, Any]] = []
    for conc in concurrencies:
        for target in ("tunnel", "direct"):
            print(f"  {target:6s} concurrency {conc:4d} ...", end="", flush=True, file=sys.stderr)
            r = c.run_loadgen(kids, __file__, [bases[target] + "small"], "", conc, args, pids)
            row = {"target": target, "concurrency": conc, **c.measurement_row(r, pids)}
            calls = max(1, r["calls"])
            row["local_cpu_us_per_req"] = round(r["cpu"][str(local.pid)] / calls * 1e6, 1)
            rows.append(row)
            print(f" {row['calls_per_s']:.0f} req/s", file=sys.stderr)

    print("  hashing the upload payload ...", file=sys.stderr)
    sha = payload_sha256(args.size)
    watch = {"server": server.pid, "agent": agent.pid}
    transfers: list[dict[str, Any]] = []
    for kind, path in (("download", f"bytes/{args.size}"), ("upload", "upload")):
        for target in ("tunnel", "direct"):
            print(f"  {target:6s} {kind:8s} ...", end="", flush=True, file=sys.stderr)
            t = run_transfer(kids, kind, bases[target] + path, args.size, sha, watch)
            transfers.append({"target": target, "kind": kind, **t})
            print(f" {t['mib_per_s']:.0f} MiB/s", file=sys.stderr)
    return {"rows": rows, "transfers": transfers, "concurrencies": concurrencies}


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the tables and targets; return the JSON summary."""
    rows = result["rows"]
    transfers = result["transfers"]
    by = {(r["target"], r["concurrency"]): r for r in rows}
    print()
    print(
        f"Small requests (GET, {SMALL_SIZE}-byte answer) through a native tunnel vs direct to "
        f"the local service ({args.duration:g} s after {args.warmup:g} s warm-up)"
    )
    table = []
    for r in rows:
        direct = by.get(("direct", r["concurrency"]))
        share = (
            f"{100 * r['calls_per_s'] / direct['calls_per_s']:.0f}%"
            if r["target"] == "tunnel" and direct and direct["calls_per_s"]
            else ""
        )
        table.append(
            [
                r["target"],
                r["concurrency"],
                f"{r['calls_per_s']:.0f}",
                share,
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['server_cpu_us_per_call']:.0f}",
                f"{r['server_cpu_pct']:.0f}%",
                f"{r['device_cpu_us_per_call']:.0f}",
                f"{r['local_cpu_us_per_req']:.0f}",
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
            "req/s",
            "% direct",
            "p50 ms",
            "p99 ms",
            "srv µs/req",
            "srv cpu",
            "agent µs/req",
            "local µs/req",
            "loadgen cpu",
            "machine busy",
            "other cpu",
            "errors",
        ],
        table,
    )

    print()
    print(f"One {args.size / MiB:g} MiB transfer each, streamed, through the tunnel vs direct")
    tby = {(t["target"], t["kind"]): t for t in transfers}
    ttable = []
    for t in transfers:
        direct = tby.get(("direct", t["kind"]))
        share = (
            f"{100 * t['mib_per_s'] / direct['mib_per_s']:.0f}%"
            if t["target"] == "tunnel" and direct and direct["mib_per_s"]
            else ""
        )
        ttable.append(
            [
                t["target"],
                t["kind"],
                f"{t['mib_per_s']:.0f}",
                share,
                f"{t['seconds']:.2f}",
                f"{t['rss_growth_mib']['server']:.1f}",
                f"{t['rss_growth_mib']['agent']:.1f}",
                f"{t['cpu_s']['server']:.2f}",
                f"{t['cpu_s']['agent']:.2f}",
                "ok" if t["ok"] else f"FAILED ({t['status']})",
            ]
        )
    c.print_table(
        [
            "target",
            "transfer",
            "MiB/s",
            "% direct",
            "seconds",
            "srv RSS +MiB",
            "agent RSS +MiB",
            "srv cpu s",
            "agent cpu s",
            "result",
        ],
        ttable,
    )

    targets: list[dict[str, Any]] = []
    r64, d64 = by.get(("tunnel", TARGET_CONCURRENCY)), by.get(("direct", TARGET_CONCURRENCY))
    if r64 and d64:
        ratio: float = r64["calls_per_s"] / d64["calls_per_s"] if d64["calls_per_s"] else 0.0
        targets.append(
            {
                "name": ">= 30% of direct requests/s at concurrency 64",
                "value": round(100 * ratio, 1),
                "unit": "%",
                "pass": ratio >= THROUGHPUT_TARGET,
            }
        )
    for kind in ("download", "upload"):
        t = tby[("tunnel", kind)]
        targets.append(
            {
                "name": f"{kind} >= 100 MiB/s through the tunnel",
                "value": t["mib_per_s"],
                "unit": "MiB/s",
                "pass": t["mib_per_s"] >= MIB_S_TARGET,
            }
        )
    growth = max(t["rss_growth_mib"]["server"] for t in transfers if t["target"] == "tunnel")
    targets.append(
        {
            "name": "server RSS growth < 64 MiB during the transfers",
            "value": growth,
            "unit": "MiB",
            "pass": growth < RSS_TARGET_MIB,
        }
    )
    noisy = c.warn_if_noisy(rows)
    errors = sum(r["errors"] for r in rows) + sum(not t["ok"] for t in transfers)
    targets.append({"name": "no errors", "value": errors, "unit": "", "pass": errors == 0})
    print()
    c.print_targets(targets)
    return {
        "bench": "tunnel",
        "duration": args.duration,
        "size": args.size,
        "results": rows,
        "transfers": transfers,
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
    p.add_argument("--size", type=int, default=GiB, help="bytes per big transfer [1 GiB]")
    hidden = argparse.SUPPRESS
    p.add_argument("--role", choices=["local", "agent", "loadgen", "transfer"], help=hidden)
    p.add_argument("--port", type=int, help=hidden)
    p.add_argument("--server", help=hidden)
    p.add_argument("--creds", type=Path, help=hidden)
    p.add_argument("--target", help=hidden)
    p.add_argument("--kind", choices=["download", "upload"], help=hidden)
    p.add_argument("--url", help=hidden)
    p.add_argument("--sha256", help=hidden)
    p.add_argument("--body-size", type=int, default=SMALL_SIZE, help=hidden)
    c.add_loadgen_args(p)
    return p.parse_args()


def main() -> int:
    """Entry point: a child role, or the benchmark itself."""
    args = parse_args()
    if args.role == "local":
        c.run_async(_local_role(args.port))
        return 0
    if args.role == "agent":
        c.run_async(_agent_role(args.server, args.creds, args.target))
        return 0
    if args.role == "loadgen":
        return _loadgen_role(args)
    if args.role == "transfer":
        return _transfer_role(args)

    if args.size < 1:
        print("--size must be positive", file=sys.stderr)
        return 2
    return c.run_benchmark("tunnel", bench, report, args)


if __name__ == "__main__":
    sys.exit(main())
