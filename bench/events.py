"""Events benchmark: device events to an SSE consumer, webhook deliveries, and fan-out.

One server (SQLite store in a temporary data directory) and three measurements:

1. **Event stream**: ``--devices`` native devices of one application (raw native protocol
   over aiohttp, one device process) emit ``--events`` EVENT frames in all, without asking
   for EVENT_ACK, while one consumer in this process reads ``GET
   /v1/applications/{app}/events`` (Server-Sent Events). Events/s from the first emit to the
   consumer's receiving the last one, server CPU per event, consumer lag, and a check that
   every event arrived exactly once and in id order. One measurement per ``--emit-rate``
   value: 0 is unpaced (faster than the server stores, so its backlog bound drops events),
   the default second one paces the devices at 40,000 events/s.
2. **Webhooks**: a second application whose ``webhook_url`` is a local aiohttp receiver (a
   child process answering 200 at once); ``--webhook-devices`` devices emit
   ``--webhook-events`` events. Deliveries/s until the receiver has them all, duplicates
   counted separately (delivery is at least once).
3. **Fan-out**: ``POST /v1/applications/{app}/fanout`` to the ``--devices`` devices of the
   first application, which echo every call, ``--fanout-rounds`` times.

    .venv/bin/python bench/events.py [--devices 1000] [--events 200000] [--emit-rate 0,40000]
                                     [--webhook-devices 100] [--webhook-events 20000]
                                     [--fanout-rounds 10]

The last line of output is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

import _common as c
from backchannel.wire.native import NativeConnection

EVENTS_TARGET = 20_000.0  # events/s, first emit to the SSE consumer's last event
FANOUT_TARGET_S = 1.0  # every measured fan-out round to all devices
EVENT_NAME = "bench"
EVENTS_PATH = "/v1/applications/{app}/events"
FANOUT_PATH = "/v1/applications/{app}/fanout"
WEBHOOKS_PATH = "/v1/applications/{app}/webhooks"
SEQ_DIGITS = 8  # an event's data: its per-device sequence number, zero-padded, then padding


def event_data(seq: int, size: int) -> bytes:
    """The data of a device's event number ``seq``: ``00000042`` then dots up to ``size``."""
    return (b"%0*d" % (SEQ_DIGITS, seq)).ljust(size, b".")


def event_seq(data: str | bytes) -> int:
    """The sequence number in :func:`event_data`'s output."""
    return int(data[:SEQ_DIGITS])


def parse_rates(text: str) -> list[float]:
    """``--emit-rate``: comma-separated events/s, 0 for unpaced."""
    return [float(x) for x in text.split(",") if x.strip()] or [0.0]


def rate_label(rate: float) -> str:
    """How a measurement at ``rate`` is named in the tables."""
    return "unpaced" if rate <= 0 else f"paced {rate:,.0f}/s"


def shares(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as possible."""
    return [total // parts + (i < total % parts) for i in range(parts)]


# -- child role: devices that emit on SIGUSR1 ------------------------------------------------


async def _emitter_role(args: argparse.Namespace) -> None:
    """Connect every device of ``--creds`` (echoing calls), print READY; on each SIGUSR1 emit
    ``--events`` events spread over the devices and print ``EMITTED <json>``. Round r is
    paced at ``--emit-rate``'s r-th value (0: unpaced; the last value repeats), and its
    sequence numbers start after those of the previous rounds."""
    creds = c.load_creds(args.creds)
    stats = c.DeviceStats()
    online: dict[str, tuple[aiohttp.ClientWebSocketResponse, NativeConnection]] = {}
    go = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)

    def register(
        device_id: str, ws: aiohttp.ClientWebSocketResponse, conn: NativeConnection
    ) -> None:
        online[device_id] = (ws, conn)

    limit = asyncio.Semaphore(args.connect_concurrency)
    async with c.device_session() as http:
        tasks = [
            asyncio.create_task(
                c.run_device(
                    http,
                    args.ws_url,
                    cr,
                    stats,
                    connect_limit=limit,
                    on_online=functools.partial(register, cr.device_id),
                )
            )
            for cr in creds
        ]
        announcer = asyncio.create_task(c.announce_online(stats, tasks))
        ids = [cr.device_id for cr in creds]
        counts = shares(args.events, len(ids))
        rates = parse_rates(args.emit_rate)
        round_ = 0
        while not announcer.done():
            await go.wait()
            go.clear()
            rate = rates[min(round_, len(rates) - 1)]
            base = round_ * max(counts, default=0)
            result = await _emit(online, ids, counts, base, args.event_size, rate)
            print("EMITTED", json.dumps(result), flush=True)
            round_ += 1
        await announcer


async def _emit(
    online: dict[str, tuple[aiohttp.ClientWebSocketResponse, NativeConnection]],
    ids: Sequence[str],
    counts: Sequence[int],
    base: int,
    size: int,
    rate: float,
) -> dict[str, Any]:
    """Emit ``counts[i]`` events from device ``ids[i]``, round-robin over the devices: event
    ``base`` of every device, then ``base + 1``... No EVENT_ACK is asked for: fire and
    forget. With ``rate`` > 0, paced to that many events/s in all."""
    sent = failed = 0
    cpu0 = time.process_time()
    t_first = t_last = time.monotonic()
    for i in range(max(counts, default=0)):
        data = event_data(base + i, size)
        for device_id, count in zip(ids, counts, strict=True):
            if i >= count:
                continue
            entry = online.get(device_id)
            if entry is None or entry[0].closed:
                failed += 1
                continue
            ws, conn = entry
            try:
                await ws.send_bytes(conn.event(EVENT_NAME, data)[1])
                sent += 1
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                failed += 1
        t_last = time.monotonic()
        # One pass over the devices, then let the loop read (PINGs) and flush.
        if rate > 0:
            await asyncio.sleep(max(0.0, t_first + sent / rate - time.monotonic()))
        else:
            await asyncio.sleep(0)
    return {
        "sent": sent,
        "failed": failed,
        "t_first": t_first,
        "t_last": t_last,
        "cpu": time.process_time() - cpu0,
    }


# -- child role: the webhook receiver --------------------------------------------------------


@dataclass
class _Hooks:
    """What the webhook receiver saw."""

    requests: int = 0
    unique: int = 0
    dup_delivery_id: int = 0
    dup_event: int = 0
    bad: int = 0
    first_at: float | None = None
    last_new_at: float | None = None
    delivery_ids: set[str] = field(default_factory=set)
    events: set[tuple[str, int]] = field(default_factory=set)

    def status(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "unique": self.unique,
            "dup_delivery_id": self.dup_delivery_id,
            "dup_event": self.dup_event,
            "bad": self.bad,
            "first_at": self.first_at,
            "last_new_at": self.last_new_at,
        }


async def _receiver_role(port: int) -> None:
    """Answer every POST /hook with 200 at once; print a JSON status line when it changed."""
    hooks = _Hooks()

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        hooks.requests += 1
        if hooks.first_at is None:
            hooks.first_at = now
        delivery = request.headers.get("X-Backchannel-Delivery", "")
        try:
            key = (request.headers["X-Backchannel-Device"], event_seq(body))
        except (KeyError, ValueError):
            hooks.bad += 1
            return web.Response(status=200)
        if delivery in hooks.delivery_ids:
            hooks.dup_delivery_id += 1
        hooks.delivery_ids.add(delivery)
        if key in hooks.events:
            hooks.dup_event += 1
        else:
            hooks.events.add(key)
            hooks.unique += 1
            hooks.last_new_at = now
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    print("READY", flush=True)
    shown = -1
    while True:
        if hooks.requests != shown:
            shown = hooks.requests
            print(json.dumps(hooks.status()), flush=True)
        await asyncio.sleep(0.05)


# -- helpers of the benchmark process --------------------------------------------------------


def server_metrics(server: c.Server) -> dict[str, float]:
    """The server's event and webhook counters from ``/metrics`` (name{labels} -> value)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("backchannel_event", "backchannel_webhook")) and " " in line:
            name, value = line.rsplit(" ", 1)
            if name.endswith(("_created", "_created}")) or "_created{" in name:
                continue
            out[name] = float(value)
    return out


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters that changed between two :func:`server_metrics` readings."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def start_emitters(
    kids: c.Children,
    server: c.Server,
    creds_path: Path,
    events: int,
    rates: str,
    args: argparse.Namespace,
) -> tuple[subprocess.Popen[str], c.LineReader]:
    """A device process for ``creds_path`` that emits ``events`` on SIGUSR1, each round at
    the next of ``rates``; wait for READY."""
    cmd = [sys.executable, __file__, "--role", "emitters", "--ws-url", server.ws_url]
    cmd += ["--creds", str(creds_path), "--events", str(events)]
    cmd += ["--event-size", str(args.event_size), "--emit-rate", rates]
    proc = kids.spawn(cmd)
    lines = c.LineReader(proc)
    line = lines.wait_for(lambda s: s.startswith(("READY", "GAVE_UP")), 120)
    if not line.startswith("READY"):
        raise RuntimeError(f"devices refused: {line}")
    return proc, lines


def wait_emitted(lines: c.LineReader, timeout: float = 120) -> dict[str, Any]:
    """The ``EMITTED`` result of a device process."""
    line = lines.wait_for(lambda s: s.startswith("EMITTED"), timeout)
    result: dict[str, Any] = json.loads(line.split(" ", 1)[1])
    return result


def lag_figures(lags: list[float]) -> dict[str, float]:
    """p50/p99/max of lags in seconds, as milliseconds."""
    lags.sort()
    return {
        "lag_p50_ms": round(c.percentile(lags, 50) * 1000, 1),
        "lag_p99_ms": round(c.percentile(lags, 99) * 1000, 1),
        "lag_max_ms": round((lags[-1] if lags else float("nan")) * 1000, 1),
    }


def cpu_figures(sampled: dict[str, Any], pids: dict[str, int], per: int) -> dict[str, Any]:
    """CPU per item (µs) and in % of a core of each process over the window."""
    window = sampled["window"]
    out: dict[str, Any] = {}
    total = 0.0
    for name, pid in pids.items():
        cpu = sampled["cpu"][str(pid)]
        total += cpu
        out[f"{name}_cpu_us_per_item"] = round(cpu / max(1, per) * 1e6, 1)
        out[f"{name}_cpu_pct"] = round(100 * cpu / window, 1)
    out["bench_cpu_pct"] = round(100 * sampled["loadgen_cpu"] / window, 1)
    out["machine_busy_pct"] = round(100 * sampled["machine_busy"] / sampled["machine_total"], 1)
    other = sampled["machine_busy"] - total - sampled["loadgen_cpu"]
    out["other_cpu_pct"] = round(100 * other / window, 1)
    return out


# -- 1. the event stream ---------------------------------------------------------------------


@dataclass
class _Consumer:
    """The SSE consumer's view: what arrived, in what order, how late."""

    expected: int
    received: int = 0  # bench events, duplicates included
    unique: int = 0
    duplicates: int = 0
    out_of_order: int = 0  # an id not above the previous one
    id_gaps: int = 0  # an id more than one above the previous one
    ids_skipped: int = 0  # the ids those gaps skipped
    other: Counter[str] = field(default_factory=Counter)  # records of other types
    last_id: int | None = None
    reconnects: int = 0
    seen: set[tuple[str, int]] = field(default_factory=set)
    lags: list[float] = field(default_factory=list)
    ts_first: float | None = None
    ts_last: float | None = None
    first_at: float | None = None
    last_at: float | None = None  # when the last new event arrived
    done_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def feed(self, line: bytes, wall: float) -> None:
        """One ``data:`` line (without the prefix)."""
        obj = orjson.loads(line)
        event_id = obj["id"]
        last = self.last_id
        if last is not None:
            if event_id <= last:
                self.out_of_order += 1
            elif event_id != last + 1:
                self.id_gaps += 1
                self.ids_skipped += event_id - last - 1
        self.last_id = event_id if last is None else max(last, event_id)
        if obj["type"] != EVENT_NAME:
            self.other[obj["type"]] += 1
            return
        self.received += 1
        key = (obj["device_id"], event_seq(obj["data"]))
        if key in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(key)
            self.unique += 1
            self.last_at = time.monotonic()
        ts = obj["ts"]
        self.lags.append(wall - ts)
        if self.ts_first is None:
            self.ts_first = ts
            self.first_at = time.monotonic()
        self.ts_last = ts
        if self.unique >= self.expected and self.done_at is None:
            self.done_at = time.monotonic()
            self.done.set()


async def _consume_sse(
    http: aiohttp.ClientSession, url: str, consumer: _Consumer, ready: asyncio.Event
) -> None:
    """Read the stream until ``consumer`` is done; resume with Last-Event-ID if it ends."""
    while not consumer.done.is_set():
        headers = {}
        if consumer.last_id is not None:
            headers["Last-Event-ID"] = str(consumer.last_id)
        async with http.get(url, headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {url}: {resp.status} {(await resp.read())[:300]!r}")
            buf = b""
            while not consumer.done.is_set():
                chunk = await resp.content.readany()
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                wall = time.time()
                for line in lines:
                    if line.startswith(b"data: "):
                        consumer.feed(line[6:], wall)
                    elif line.startswith(b"id: ") and consumer.last_id is None:
                        # The first block of a fresh stream: "id: <newest>" with no data.
                        consumer.last_id = int(line[4:])
                        ready.set()
                    elif line.startswith(b"retry:"):
                        ready.set()
        if not consumer.done.is_set():
            consumer.reconnects += 1
            print(
                f"  !! the event stream ended after id {consumer.last_id}; resuming",
                file=sys.stderr,
            )


async def _measure_stream(
    server: c.Server,
    app_id: str,
    secret: str,
    emitters: subprocess.Popen[str],
    emitter_lines: c.LineReader,
    rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One round of the emitters against a fresh SSE consumer."""
    consumer = _Consumer(expected=args.events)
    ready = asyncio.Event()
    url = server.url + EVENTS_PATH.format(app=app_id)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    headers = {"Authorization": f"OAuth {secret}"}
    async with aiohttp.ClientSession(
        timeout=timeout, headers=headers, read_bufsize=1 << 20
    ) as http:
        reader = asyncio.create_task(_consume_sse(http, url, consumer, ready))
        await asyncio.wait_for(ready.wait(), 10)
        pids = {"server": server.pid, "devices": emitters.pid}
        before = c.cpu_snapshot(list(pids.values()))
        os.kill(emitters.pid, signal.SIGUSR1)
        stalled, sampled = await wait_progress(
            lambda: consumer.unique, args.events, list(pids.values()), before, args
        )
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    emitted = await asyncio.to_thread(wait_emitted, emitter_lines)
    return {"rate": rate, **_stream_result(consumer, emitted, sampled, pids, stalled, args)}


async def wait_progress(
    count: Callable[[], int],
    expected: int,
    pids: Sequence[int],
    before: c.CpuSnapshot,
    args: argparse.Namespace,
) -> tuple[bool, dict[str, Any]]:
    """Poll ``count()`` until it reaches ``expected``; give up after ``--stall-timeout`` s
    without progress or ``--timeout`` s in all. Returns (gave up, CPU from ``before`` to the
    last progress seen), so that a stall's idle wait does not dilute the CPU figures."""
    t0 = time.monotonic()
    last, last_change = -1, t0
    at_progress = c.cpu_snapshot(pids)
    while True:
        n = count()
        now = time.monotonic()
        if n != last:
            last, last_change = n, now
            at_progress = c.cpu_snapshot(pids)
        if n >= expected:
            return False, c.cpu_since(before, at_progress)
        if now - last_change > args.stall_timeout or now - t0 > args.timeout:
            return True, c.cpu_since(before, at_progress)
        await asyncio.sleep(0.01)


def _stream_result(
    consumer: _Consumer,
    emitted: dict[str, Any],
    sampled: dict[str, Any],
    pids: dict[str, int],
    stalled: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:
    t_first = emitted["t_first"]
    end = consumer.last_at
    elapsed = (end - t_first) if end is not None else None
    missing = args.events - consumer.unique
    result: dict[str, Any] = {
        "devices": args.devices,
        "events": args.events,
        "event_size": args.event_size,
        "sent": emitted["sent"],
        "send_failed": emitted["failed"],
        "received": consumer.received,
        "unique": consumer.unique,
        "missing": missing,
        "duplicates": consumer.duplicates,
        "out_of_order": consumer.out_of_order,
        "id_gaps": consumer.id_gaps,
        "ids_skipped": consumer.ids_skipped,
        "other_records": dict(consumer.other),
        "stream_reconnects": consumer.reconnects,
        "stalled": stalled,
        "emit_s": round(emitted["t_last"] - t_first, 3),
        "emit_per_s": round(emitted["sent"] / max(1e-9, emitted["t_last"] - t_first), 0),
        "device_cpu_us_per_event_emitted": round(emitted["cpu"] / max(1, emitted["sent"]) * 1e6, 1),
        "elapsed_s": None if elapsed is None else round(elapsed, 3),
        # The events that arrived over the time until the last of them arrived (all of
        # them, unless some were lost).
        "events_per_s": None if elapsed is None else round(consumer.unique / elapsed, 0),
        "drain_after_last_emit_s": (None if end is None else round(end - emitted["t_last"], 3)),
        "first_event_after_s": (
            None if consumer.first_at is None else round(consumer.first_at - t_first, 3)
        ),
        # Server receive times (the records' ts) of the first and last event.
        "server_ingest_s": (
            None
            if consumer.ts_first is None or consumer.ts_last is None
            else round(consumer.ts_last - consumer.ts_first, 3)
        ),
        **lag_figures(consumer.lags),
        **cpu_figures(sampled, pids, consumer.unique),
    }
    return result


def _stream_rows(r: dict[str, Any]) -> list[object]:
    rate = r["events_per_s"]
    dropped = r["server_metrics"].get('backchannel_events_dropped_total{reason="backlog"}', 0)
    return [
        "n/a" if rate is None else f"{rate:,.0f}",
        f"{r['elapsed_s']} s",
        f"{r['emit_s']} s ({r['emit_per_s']:,.0f}/s)",
        f"{r['server_ingest_s']} s",
        f"{r['first_event_after_s']} s",
        f"{r['drain_after_last_emit_s']} s",
        f"{r['lag_p50_ms']} / {r['lag_p99_ms']} / {r['lag_max_ms']} ms",
        f"{r['server_cpu_us_per_item']} µs ({r['server_cpu_pct']}%)",
        f"{r['devices_cpu_us_per_item']} µs ({r['devices_cpu_pct']}%)",
        f"{r['bench_cpu_pct']}%",
        f"{r['machine_busy_pct']}% / {r['other_cpu_pct']}%",
        f"{r['sent']} / {r['send_failed']}",
        f"{r['received']} / {r['unique']} / {r['missing']}",
        f"{dropped:.0f}",
        f"{r['duplicates']} / {r['out_of_order']}",
        f"{r['id_gaps']} ({r['ids_skipped']})",
        ", ".join(f"{k}: {v}" for k, v in r["other_records"].items()) or "none",
        r["stream_reconnects"],
    ]


_STREAM_MEASURES = [
    "events/s, first emit to last received",
    "elapsed",
    "devices emitted in",
    "server received over (ts of first..last)",
    "first event at the consumer after",
    "last event at the consumer after the last emit",
    "consumer lag (receive - server ts) p50/p99/max",
    "server CPU per event received",
    "device process CPU per event",
    "consumer (this process) CPU",
    "machine busy / other cpu",
    "sent / send failures at the devices",
    "received / unique / missing",
    "dropped by the server (store backlog)",
    "duplicates / out of order",
    "id gaps (ids skipped)",
    "other records in the stream",
    "stream reconnects",
]


def report_stream(results: Sequence[dict[str, Any]]) -> None:
    """Print the event stream table: one column per measurement."""
    r0 = results[0]
    print()
    print(
        f"1. Event stream: {r0['devices']} devices emit {r0['events']:,} events "
        f"({r0['event_size']} bytes of data, no EVENT_ACK) to one SSE consumer"
    )
    columns = [_stream_rows(r) for r in results]
    rows = [[m, *(col[i] for col in columns)] for i, m in enumerate(_STREAM_MEASURES)]
    c.print_table(["measure", *(rate_label(r["rate"]) for r in results)], rows)
    for r in results:
        if r["missing"] or r["duplicates"] or r["out_of_order"] or r["send_failed"]:
            print(
                f"!! EVENT LOSS OR DISORDER ({rate_label(r['rate'])}): {r['missing']:,} of "
                f"{r['events']:,} missing, {r['duplicates']} duplicated, {r['out_of_order']} out "
                f"of order, {r['send_failed']} not sent"
            )


# -- 2. webhooks -----------------------------------------------------------------------------


class _ReceiverStatus:
    """The latest status line of the webhook receiver."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        self._lock = threading.Lock()

    def on_line(self, line: str) -> None:
        if line.startswith("{"):
            with self._lock:
                self.latest = json.loads(line)

    def get(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.latest)


def measure_webhooks(
    kids: c.Children, server: c.Server, tmp: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Receiver, application with its webhook, devices; emit; wait for every delivery."""
    port = c.free_port()
    receiver = kids.spawn([sys.executable, __file__, "--role", "receiver", "--port", str(port)])
    status = _ReceiverStatus()
    c.LineReader(receiver, status.on_line).wait_for(lambda s: s == "READY", 20)
    app_id, secret = c.create_app(
        server, "bench-webhooks", webhook_url=f"http://127.0.0.1:{port}/hook"
    )
    ids = [f"hook-{i:04d}" for i in range(args.webhook_devices)]
    creds = c.run_async(c.provision_devices(server, app_id, ids))
    creds_path = tmp / "webhook-creds.json"
    c.save_creds(creds_path, creds)
    emitters, lines = start_emitters(kids, server, creds_path, args.webhook_events, "0", args)

    pids = {"server": server.pid, "devices": emitters.pid, "receiver": receiver.pid}
    metrics0 = server_metrics(server)
    expected = args.webhook_events
    before = c.cpu_snapshot(list(pids.values()))
    os.kill(emitters.pid, signal.SIGUSR1)
    stalled, sampled = c.run_async(
        wait_progress(
            lambda: int(status.get().get("unique", 0)), expected, list(pids.values()), before, args
        )
    )
    emitted = wait_emitted(lines)
    time.sleep(0.5)  # late duplicates, if any
    s = status.get()
    metrics = metrics_delta(metrics0, server_metrics(server))
    outbox = c.http_json(
        "GET", server.url + WEBHOOKS_PATH.format(app=app_id), token=secret, scheme="OAuth"
    )
    t_first = emitted["t_first"]
    last_new = s.get("last_new_at")
    unique = int(s.get("unique", 0))
    elapsed = (last_new - t_first) if last_new is not None else None
    first = s.get("first_at")
    return {
        "devices": args.webhook_devices,
        "events": expected,
        "sent": emitted["sent"],
        "send_failed": emitted["failed"],
        "requests": s.get("requests", 0),
        "unique": s.get("unique", 0),
        "missing": expected - int(s.get("unique", 0)),
        "dup_delivery_id": s.get("dup_delivery_id", 0),
        "dup_event": s.get("dup_event", 0),
        "bad_requests": s.get("bad", 0),
        "stalled": stalled,
        "elapsed_s": None if elapsed is None else round(elapsed, 3),
        "deliveries_per_s": None if elapsed is None else round(unique / elapsed, 0),
        "first_delivery_after_s": None if first is None else round(first - t_first, 3),
        "outbox": {k: outbox.get(k) for k in ("pending", "delivered", "dead")},
        "server_metrics": metrics,
        **cpu_figures(sampled, pids, int(s.get("unique", 0))),
    }


def report_webhooks(r: dict[str, Any]) -> None:
    """Print the webhook table."""
    print()
    print(
        f"2. Webhooks: {r['devices']} devices emit {r['events']:,} events; one local receiver "
        "answering 200 at once (no target given: figure only)"
    )
    rate = r["deliveries_per_s"]
    rows: list[list[object]] = [
        [
            "deliveries/s, first emit to last new delivery",
            "n/a" if rate is None else f"{rate:,.0f}",
        ],
        ["elapsed", f"{r['elapsed_s']} s"],
        ["first delivery after", f"{r['first_delivery_after_s']} s"],
        ["server CPU per delivery", f"{r['server_cpu_us_per_item']} µs ({r['server_cpu_pct']}%)"],
        [
            "receiver CPU per delivery",
            f"{r['receiver_cpu_us_per_item']} µs ({r['receiver_cpu_pct']}%)",
        ],
        ["machine busy / other cpu", f"{r['machine_busy_pct']}% / {r['other_cpu_pct']}%"],
        ["requests / unique events / missing", f"{r['requests']} / {r['unique']} / {r['missing']}"],
        [
            "duplicates (same delivery id / same event)",
            f"{r['dup_delivery_id']} / {r['dup_event']}",
        ],
        ["outbox pending / delivered / dead", " / ".join(str(v) for v in r["outbox"].values())],
        ["send failures at the devices", r["send_failed"]],
    ]
    c.print_table(["measure", "value"], rows)
    if r["missing"] or r["bad_requests"]:
        print(f"!! WEBHOOK LOSS: {r['missing']} events never delivered, {r['bad_requests']} bad")


# -- 3. fan-out ------------------------------------------------------------------------------


async def measure_fanout(
    server: c.Server, app_id: str, secret: str, device_ids: Sequence[str], args: argparse.Namespace
) -> dict[str, Any]:
    """One unmeasured round (which also tells whether the route exists), then the rounds."""
    url = server.url + FANOUT_PATH.format(app=app_id)
    body = {"devices": list(device_ids), "message": "ping", "timeout": args.fanout_timeout}
    headers = {"Authorization": f"OAuth {secret}"}
    rounds: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(headers=headers) as http:
        for i in range(args.fanout_rounds + 1):
            t0 = time.perf_counter()
            async with http.post(url, json=body) as resp:
                raw = await resp.read()
                status = resp.status
            latency = time.perf_counter() - t0
            if status == 404 and i == 0:
                return {"available": False, "status": status, "body": raw[:200].decode("replace")}
            out: dict[str, Any] = {}
            if status == 200:
                out = json.loads(raw)
            rounds.append(
                {
                    "latency_s": latency,
                    "status": status,
                    "total": out.get("total"),
                    "replied": out.get("replied"),
                    "error": None if status == 200 else raw[:200].decode("replace"),
                }
            )
    warmup, measured = rounds[0], rounds[1:]
    lat = sorted(r["latency_s"] for r in measured)
    n = len(device_ids)
    bad = [r for r in measured if r["status"] != 200 or r["replied"] != n or r["total"] != n]
    return {
        "available": True,
        "devices": n,
        "rounds": len(measured),
        "warmup_s": round(warmup["latency_s"], 3),
        "min_s": round(lat[0], 3) if lat else None,
        "median_s": round(statistics.median(lat), 3) if lat else None,
        "max_s": round(lat[-1], 3) if lat else None,
        "incomplete_rounds": len(bad),
        "replied": [r["replied"] for r in measured],
        "errors": [r["error"] for r in measured if r["error"]][:3],
    }


def report_fanout(r: dict[str, Any]) -> None:
    """Print the fan-out table."""
    print()
    if not r.get("available"):
        print(f"3. fan-out: route not available (POST answered {r.get('status')})")
        return
    print(
        f"3. Fan-out: POST {FANOUT_PATH} to {r['devices']} echo devices, "
        f"{r['rounds']} rounds after one unmeasured"
    )
    c.print_table(
        ["measure", "value"],
        [
            ["latency min / median / max", f"{r['min_s']} / {r['median_s']} / {r['max_s']} s"],
            ["warm-up round", f"{r['warmup_s']} s"],
            ["replied per round", ", ".join(str(x) for x in r["replied"])],
            ["incomplete rounds (not 200, or not every device replied)", r["incomplete_rounds"]],
        ],
    )
    for err in r["errors"]:
        print(f"!! fan-out error: {err}")


# -- the benchmark ---------------------------------------------------------------------------


def server_log_problems(server: c.Server) -> list[str]:
    """Lines of the server log (run at --log-level warning): every one is a warning or worse."""
    try:
        text = server.log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()]


def bench(kids: c.Children, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start the server and run the three measurements."""
    server = c.Server(kids, tmp / "data")
    server.start()
    app_id, secret = c.create_app(server, "bench-events")
    device_ids = [f"dev-{i:05d}" for i in range(args.devices)]
    print(f"  provisioning and connecting {args.devices} devices ...", file=sys.stderr)
    creds = c.run_async(c.provision_devices(server, app_id, device_ids))
    creds_path = tmp / "creds.json"
    c.save_creds(creds_path, creds)
    emitters, emitter_lines = start_emitters(
        kids, server, creds_path, args.events, args.emit_rate, args
    )
    if server.sessions() != args.devices:
        raise RuntimeError(f"expected {args.devices} sessions, server has {server.sessions()}")
    out: dict[str, Any] = {}

    if "stream" in args.phases:
        out["stream"] = []
        for rate in parse_rates(args.emit_rate):
            print(
                f"  1. {args.events:,} events to the SSE consumer, {rate_label(rate)} ...",
                file=sys.stderr,
            )
            metrics0 = server_metrics(server)
            stream = c.run_async(
                _measure_stream(server, app_id, secret, emitters, emitter_lines, rate, args)
            )
            stream["server_metrics"] = metrics_delta(metrics0, server_metrics(server))
            out["stream"].append(stream)
            print(f"     {stream['events_per_s']} events/s", file=sys.stderr)
            time.sleep(1.0)  # let the store settle between rounds

    if "webhooks" in args.phases:
        print(f"  2. {args.webhook_events:,} events to a webhook ...", file=sys.stderr)
        out["webhooks"] = measure_webhooks(kids, server, tmp, args)
        print(f"     {out['webhooks']['deliveries_per_s']} deliveries/s", file=sys.stderr)

    if "fanout" in args.phases:
        print(f"  3. fan-out to {args.devices} devices ...", file=sys.stderr)
        out["fanout"] = c.run_async(measure_fanout(server, app_id, secret, device_ids, args))
    out["sessions_at_end"] = server.sessions()
    out["server_log"] = server_log_problems(server)
    return out


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print the tables and targets; return the JSON summary."""
    targets: list[dict[str, Any]] = []
    streams = result.get("stream") or []
    if streams:
        report_stream(streams)
    for stream in streams:
        label = rate_label(stream["rate"])
        rate = stream["events_per_s"] or 0.0
        targets.append(
            {
                "name": f"event stream ({label}) >= {EVENTS_TARGET:,.0f} events/s end to end",
                "value": rate,
                # A lossy run's rate counts only the events that arrived.
                "unit": "events/s" + (" (of those delivered)" if stream["missing"] else ""),
                "pass": rate >= EVENTS_TARGET,
            }
        )
        lost = stream["missing"] + stream["duplicates"] + stream["out_of_order"]
        targets.append(
            {
                "name": f"event stream ({label}): every event once, in id order",
                "value": f"{stream['missing']} missing, {stream['duplicates']} dup, "
                f"{stream['out_of_order']} disordered",
                "unit": "",
                "pass": lost == 0,
            }
        )
    hooks = result.get("webhooks")
    if hooks:
        report_webhooks(hooks)
        targets.append(
            {
                "name": "webhooks: every event delivered (duplicates allowed)",
                "value": f"{hooks['missing']} missing",
                "unit": "",
                "pass": hooks["missing"] == 0 and not hooks["bad_requests"],
            }
        )
    fanout = result.get("fanout")
    if fanout:
        report_fanout(fanout)
        if fanout.get("available"):
            ok = fanout["max_s"] is not None and fanout["max_s"] < FANOUT_TARGET_S
            targets.append(
                {
                    "name": f"fan-out to {fanout['devices']}: every round < 1 s (max)",
                    "value": fanout["max_s"],
                    "unit": "s",
                    "pass": ok and fanout["incomplete_rounds"] == 0,
                }
            )
    problems = result["server_log"]
    print()
    print(f"server log: {len(problems)} warning/error line(s)")
    for line in problems[:10]:
        print(f"  {line[:200]}")
    noisy = max((r["other_cpu_pct"] for r in [*streams, hooks] if r), default=0.0)
    if noisy > c.NOISE_WARN_PCT:
        print(
            f"\nwarning: other processes used up to {noisy:.0f}% of a core during the "
            "measurements; the figures are unreliable (see 'other cpu')"
        )
    print()
    c.print_targets(targets)
    return {
        "bench": "events",
        **{k: v for k, v in result.items() if k != "server_log"},
        "server_log_lines": len(problems),
        "server_log_head": problems[:10],
        "targets": targets,
        "max_other_cpu_pct": noisy,
        "pass": all(t["pass"] for t in targets),
    }


def parse_args() -> argparse.Namespace:
    """Command line; ``--role`` and the options after it are for the child processes."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--devices", type=int, default=1000, help="devices of the stream [1000]")
    p.add_argument("--events", type=int, default=200_000, help="events to the stream [200000]")
    p.add_argument("--event-size", type=int, default=32, help="bytes of data per event [32]")
    p.add_argument(
        "--emit-rate",
        default="0,40000",
        help="one stream measurement per value: the devices' pace in events/s, 0 for\n"
        "unpaced (as fast as they can send) [0,40000]",
    )
    p.add_argument("--webhook-devices", type=int, default=100, help="devices emitting [100]")
    p.add_argument("--webhook-events", type=int, default=20_000, help="webhook events [20000]")
    p.add_argument("--fanout-rounds", type=int, default=10, help="measured fan-outs [10]")
    p.add_argument("--fanout-timeout", type=float, default=5.0, help="fan-out timeout, s [5]")
    p.add_argument(
        "--phases",
        default="stream,webhooks,fanout",
        help="which measurements, comma-separated [stream,webhooks,fanout]",
    )
    p.add_argument(
        "--stall-timeout", type=float, default=5.0, help="give up after no progress, s [5]"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="limit per measurement, s [120]")
    hidden = argparse.SUPPRESS
    p.add_argument("--role", choices=["emitters", "receiver"], help=hidden)
    p.add_argument("--ws-url", help=hidden)
    p.add_argument("--creds", type=Path, help=hidden)
    p.add_argument("--port", type=int, help=hidden)
    p.add_argument("--connect-concurrency", type=int, default=200, help=hidden)
    args = p.parse_args()
    if args.event_size < SEQ_DIGITS:
        p.error(f"--event-size must be at least {SEQ_DIGITS}")
    args.phases = {x.strip() for x in args.phases.split(",") if x.strip()}
    return args


def main() -> int:
    """Entry point: a child role, or the benchmark itself."""
    args = parse_args()
    if args.role == "emitters":
        c.run_async(_emitter_role(args))
        return 0
    if args.role == "receiver":
        c.run_async(_receiver_role(args.port))
        return 0

    return c.run_benchmark("events", bench, report, args)


if __name__ == "__main__":
    sys.exit(main())
