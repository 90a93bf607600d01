"""Shared helpers of the benchmarks: subprocesses, the admin API, /proc readings, raw native
devices, and the load generator of the call benchmarks.

Not a test module. Every benchmark in this directory is a standalone script that imports this
file (``python bench/rpc.py`` puts ``bench/`` on ``sys.path``). Everything here is loopback
only and Linux-specific where it reads ``/proc``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import aiohttp

from backchannel.wire.errors import ProtocolError
from backchannel.wire.native import SUBPROTOCOL, NativeConnection, Role
from backchannel.wire.native.frames import Call, Hello

T = TypeVar("T")

ADMIN_TOKEN = "bench-admin-token-0123456789abcdef0123"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Runs first in every child: die with the parent (PR_SET_PDEATHSIG), then exec the real
# command in place, so the pid we hold is the pid of the real process. If the parent is
# already gone when the prctl lands, give up instead of living on as an orphan.
_PRELUDE = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


# -- subprocesses ----------------------------------------------------------------------------


class Children:
    """Every subprocess a benchmark starts; all are stopped on exit, Ctrl-C or error.

    Children run in their own session, so a Ctrl-C in the terminal reaches only the
    benchmark, which then stops them itself (SIGTERM, then SIGKILL after a grace period).
    They also receive SIGTERM from the kernel if the benchmark dies without cleaning up.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[str]] = []

    def spawn(
        self,
        args: Sequence[str],
        *,
        stdout: int | Any = subprocess.PIPE,
        stderr: int | Any = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        """Start ``args`` (args[0] is the executable) as a child of this process."""
        full = [sys.executable, "-c", _PRELUDE, str(os.getpid()), *args]
        proc = subprocess.Popen(
            full,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[str], timeout: float = 10.0) -> int:
        """SIGTERM one child, SIGKILL it after ``timeout``; return its exit code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        return proc.returncode

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every child still running (SIGTERM to all first, then wait)."""
        running = [p for p in self._procs if p.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in running:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def sigterm_raises_keyboard_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C so ``finally`` blocks (child cleanup) run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_benchmark(
    name: str,
    bench: Callable[[Children, Path, argparse.Namespace], T],
    report: Callable[[T, argparse.Namespace], dict[str, Any]],
    args: argparse.Namespace,
) -> int:
    """Run ``bench`` with its child processes and a temp dir, print ``report``'s JSON summary.

    Returns the exit status: 0 when every target passed, 1 on a miss or a failure, 130 when
    interrupted (child processes are stopped in every case).
    """
    sigterm_raises_keyboard_interrupt()
    try:
        with temp_dir() as tmp, Children() as kids:
            result = bench(kids, tmp, args)
    except KeyboardInterrupt:
        print("\ninterrupted; child processes stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(json.dumps({"bench": name, "error": str(exc), "pass": False}))
        return 1
    summary = report(result, args)
    print(json.dumps(summary, ensure_ascii=False))
    return 0 if summary["pass"] else 1


class LineReader:
    """Reads a child's stdout on a thread; lines land in a queue, the last one is kept."""

    def __init__(self, proc: subprocess.Popen[str], on_line: Callable[[str], None] | None = None):
        self.lines: queue.Queue[str] = queue.Queue()
        self.last: str | None = None
        self._on_line = on_line
        assert proc.stdout is not None
        self._stream = proc.stdout
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for raw in self._stream:
            line = raw.rstrip("\n")
            self.last = line
            if self._on_line is not None:
                self._on_line(line)
            self.lines.put(line)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str:
        """Block until a line matching ``predicate`` arrives; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no matching line from the child in time")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the child closed its stdout") from None
                continue
            if predicate(line):
                return line


def free_port() -> int:
    """A currently free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[str] | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.01)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@contextlib.contextmanager
def temp_dir(prefix: str = "backchannel-bench-") -> Iterator[Path]:
    """A temporary directory, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Server:
    """``python -m backchannel serve`` as a subprocess, its output in a log file."""

    def __init__(
        self,
        children: Children,
        data_dir: Path,
        *,
        port: int | None = None,
        admin_token: str = ADMIN_TOKEN,
        extra: Sequence[str] = (),
    ) -> None:
        self.children = children
        self.data_dir = data_dir
        self.port = port or free_port()
        self.admin_token = admin_token
        self.extra = list(extra)
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"
        self._log: Any = None

    @property
    def url(self) -> str:
        """Base HTTP URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        """The native device endpoint."""
        return f"ws://127.0.0.1:{self.port}/v1/connect"

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> float:
        """Start the server and wait for /healthz; return the monotonic time it answered."""
        args = [sys.executable, "-m", "backchannel", "serve", "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--data-dir", str(self.data_dir)]
        args += ["--admin-token", self.admin_token, "--log-level", "warning", *self.extra]
        self._log = self.log_path.open("a")
        self.proc = self.children.spawn(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                health = http_json("GET", self.url + "/healthz", timeout=1.0)
            except OSError:
                time.sleep(0.01)
                continue
            if health.get("status") == "ok":
                return time.monotonic()
        raise TimeoutError(f"server did not answer /healthz in {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown), SIGKILL after ``timeout``; return the exit code."""
        if self.proc is None:
            return 0
        code = self.children.stop(self.proc, timeout)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def sessions(self, timeout: float = 5.0) -> int:
        """Live device sessions, from /healthz."""
        return int(http_json("GET", self.url + "/healthz", timeout=timeout)["sessions"])

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- HTTP and the admin API ------------------------------------------------------------------


def http_json(
    method: str,
    url: str,
    *,
    token: str | None = None,
    scheme: str = "Bearer",
    body: Any = None,
    timeout: float = 10.0,
) -> Any:
    """A blocking JSON request (urllib); HTTP errors raise with the body in the message."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"{scheme} {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{method} {url}: {exc.code} {exc.read()[:300]!r}") from None


def create_app(server: Server, name: str, **settings: Any) -> tuple[str, str]:
    """Create an application through the admin API; return (app_id, secret)."""
    out = http_json(
        "POST",
        server.url + "/admin/v1/apps",
        token=server.admin_token,
        body={"name": name, **settings},
    )
    return str(out["app_id"]), str(out["secret"])


@dataclass(frozen=True, slots=True)
class DeviceCred:
    """What a device needs to connect."""

    app_id: str
    device_id: str
    key: str


async def provision_devices(
    server: Server, app_id: str, device_ids: Iterable[str], concurrency: int = 64
) -> list[DeviceCred]:
    """Issue a key per device through the admin API, ``concurrency`` requests at a time."""
    ids = list(device_ids)
    creds: dict[str, DeviceCred] = {}
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        todo = iter(ids)

        async def worker() -> None:
            for device_id in todo:
                url = f"{server.url}/admin/v1/apps/{app_id}/devices/{device_id}"
                async with http.post(url, json={}) as resp:
                    if resp.status != 201:
                        raise RuntimeError(f"provision {device_id}: {resp.status}")
                    body = await resp.json()
                creds[device_id] = DeviceCred(app_id, device_id, str(body["key"]))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [creds[d] for d in ids]


def save_creds(path: Path, creds: Sequence[DeviceCred]) -> None:
    """Write credentials for child processes (a JSON list)."""
    path.write_text(json.dumps([asdict(c) for c in creds]))


def load_creds(path: Path) -> list[DeviceCred]:
    """Read credentials written by :func:`save_creds`."""
    return [DeviceCred(**c) for c in json.loads(path.read_text())]


# -- /proc readings and statistics -----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process used so far."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may contain spaces; the fields after its closing ')' do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, summed over all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already part of user time
    return (total - idle) / CLK_TCK, total / CLK_TCK


def rss_kb(pid: int) -> int:
    """Resident set size in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(p / 100.0 * len(sorted_values))))
    return sorted_values[rank - 1]


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain aligned table."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


def print_targets(targets: Sequence[dict[str, Any]]) -> None:
    """Print targets (dicts with name, value, unit, pass) with PASS/FAIL."""
    print("Targets")
    print_table(
        ["target", "measured", "result"],
        [[t["name"], f"{t['value']} {t['unit']}".strip(), verdict(t["pass"])] for t in targets],
    )


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is installed, else on the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


# -- a raw native device ---------------------------------------------------------------------

#: Close codes after which a device stops reconnecting (as the SDK does): bad credentials,
#: a takeover by another connection with the same id, a revoked key.
FATAL_CLOSE_CODES = frozenset({4001, 4002, 4005})


@dataclass(slots=True)
class DeviceStats:
    """Counters shared by every device loop of one process."""

    online: int = 0
    connects: int = 0
    failed_attempts: int = 0
    drops: int = 0
    gave_up: int = 0
    calls: int = 0

    def as_dict(self) -> dict[str, int]:
        """Counters as a dict."""
        return asdict(self)


#: Called with a device's WebSocket and connection state once it is online (see run_device).
OnOnline = Callable[[aiohttp.ClientWebSocketResponse, NativeConnection], None]


def device_session(connector_limit: int = 0) -> aiohttp.ClientSession:
    """A client session suitable for many device WebSockets."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connector_limit))


async def run_device(
    http: aiohttp.ClientSession,
    ws_url: str,
    cred: DeviceCred,
    stats: DeviceStats,
    *,
    connect_limit: asyncio.Semaphore | None = None,
    backoff_initial: float = 0.5,
    backoff_max: float = 5.0,
    handshake_timeout: float = 10.0,
    on_online: OnOnline | None = None,
) -> None:
    """Keep one device connected, answering every CALL with its body (echo).

    Reconnects after any drop with exponential backoff and full jitter: before attempt n
    wait uniform(0, min(backoff_max, backoff_initial * 2**n)); n resets once a session
    lasted longer than the HELLO timeout (docs/protocol.md, "Reconnecting"). Returns only
    after a fatal close code (counted in ``stats.gave_up``) or when cancelled.

    ``on_online(ws, conn)`` is called after each HELLO, before serving: a benchmark that
    also sends from the device (EVENT frames) keeps ``ws`` and ``conn`` from there, while
    this loop goes on reading (PINGs, CALLs).
    """
    headers = {
        "X-Backchannel-App": cred.app_id,
        "X-Backchannel-Device": cred.device_id,
        "Authorization": f"Bearer {cred.key}",
    }
    attempt = 0
    while True:
        code, lasted = await _device_session_once(
            http, ws_url, headers, stats, connect_limit, handshake_timeout, on_online
        )
        if code in FATAL_CLOSE_CODES:
            stats.gave_up += 1
            return
        if lasted:
            attempt = 0
        delay = random.uniform(0.0, min(backoff_max, backoff_initial * 2 ** min(attempt, 30)))
        attempt += 1
        await asyncio.sleep(delay)


async def _device_session_once(
    http: aiohttp.ClientSession,
    ws_url: str,
    headers: dict[str, str],
    stats: DeviceStats,
    connect_limit: asyncio.Semaphore | None,
    handshake_timeout: float,
    on_online: OnOnline | None = None,
) -> tuple[int | None, bool]:
    """Connect, wait for HELLO, serve until the connection ends: (close code, lasted)."""
    ws: aiohttp.ClientWebSocketResponse | None = None
    limit = connect_limit if connect_limit is not None else contextlib.nullcontext()
    async with limit:
        try:
            async with asyncio.timeout(handshake_timeout):
                ws = await http.ws_connect(
                    ws_url,
                    protocols=(SUBPROTOCOL,),
                    headers=headers,
                    compress=0,
                    autoping=True,
                    heartbeat=None,
                    max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
                )
                msg = await ws.receive()
        except (aiohttp.ClientError, OSError, TimeoutError):
            stats.failed_attempts += 1
            if ws is not None:
                await _close_quietly(ws)
            return None, False
    if msg.type is not aiohttp.WSMsgType.BINARY:
        # Closed before HELLO: the server's way to refuse (e.g. 4001 bad credentials).
        stats.failed_attempts += 1
        await _close_quietly(ws)
        return ws.close_code, False
    now = time.monotonic()
    conn = NativeConnection(Role.CLIENT, now=now)
    try:
        hello = conn.receive_message(msg.data, now)
    except ProtocolError:
        hello = None
    if not isinstance(hello, Hello):
        stats.failed_attempts += 1
        await _close_quietly(ws, 4000)
        return ws.close_code, False
    stats.online += 1
    stats.connects += 1
    if on_online is not None:
        on_online(ws, conn)
    try:
        await _serve_echo(ws, conn, stats)
    finally:
        stats.online -= 1
        stats.drops += 1
    return ws.close_code, time.monotonic() - now > conn.timeout


async def _serve_echo(
    ws: aiohttp.ClientWebSocketResponse, conn: NativeConnection, stats: DeviceStats
) -> None:
    binary = aiohttp.WSMsgType.BINARY
    monotonic = time.monotonic
    while True:
        msg = await ws.receive()
        if msg.type is not binary:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await _close_quietly(ws, 4000)
            return
        try:
            frame = conn.receive_message(msg.data, monotonic())
        except ProtocolError as exc:
            await _close_quietly(ws, exc.close_code)
            return
        if type(frame) is Call:
            stats.calls += 1
            try:
                await ws.send_bytes(conn.reply(frame.call_id, frame.body))
            except (ConnectionError, RuntimeError):
                return
        else:
            for out in conn.data_to_send():  # PONG for the server's PING
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_bytes(out)


async def _close_quietly(ws: aiohttp.ClientWebSocketResponse, code: int = 1000) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(code=code), 2.0)


async def serve_native_devices(ws_url: str, creds_path: Path) -> None:
    """A device-process role: echo devices for every credential in ``creds_path``.

    Prints ``READY <stats>`` once all are online (``GAVE_UP <stats>`` if one is refused),
    then serves until killed.
    """
    creds = load_creds(creds_path)
    stats = DeviceStats()
    async with device_session() as http:
        tasks = [asyncio.create_task(run_device(http, ws_url, cr, stats)) for cr in creds]
        await announce_online(stats, tasks)


async def announce_online(stats: DeviceStats, tasks: Sequence[asyncio.Task[None]]) -> None:
    """Print ``READY <stats>`` once every device task is online, then wait for them all.

    Prints ``GAVE_UP <stats>`` and returns as soon as one device gave up (was refused), and
    ``DONE <stats>`` if every task ends. The parent waits for a READY or GAVE_UP line.
    """
    while stats.online < len(tasks):
        if stats.gave_up:
            print("GAVE_UP", json.dumps(stats.as_dict()), flush=True)
            return
        await asyncio.sleep(0.01)
    print("READY", json.dumps(stats.as_dict()), flush=True)
    await asyncio.gather(*tasks)
    print("DONE", json.dumps(stats.as_dict()), flush=True)


# -- the load generator of the call benchmarks -----------------------------------------------

#: Where the load generator sends its calls (``POST``, ``Authorization: OAuth <secret>``).
SEND_PATH = "/v1/applications/{app}/devices/{dev}/send"

#: CPU used by processes other than the measured ones, in % of one core, above which the
#: figures are flagged as unreliable.
NOISE_WARN_PCT = 15.0


def add_loadgen_args(p: argparse.ArgumentParser) -> None:
    """The hidden options :func:`run_loadgen` passes to ``--role loadgen``.

    The script must also have ``--concurrency``, ``--duration``, ``--warmup`` and
    ``--body-size`` (public options there).
    """
    hidden = argparse.SUPPRESS
    p.add_argument("--urls", help=hidden)
    p.add_argument("--auth", help=hidden)
    p.add_argument("--pids", default="", help=hidden)


def loadgen_role(args: argparse.Namespace) -> int:
    """The ``--role loadgen`` child: run :func:`loadgen`, print its JSON result as one line."""
    pids = [int(x) for x in args.pids.split(",") if x]
    out = run_async(
        loadgen(
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


def run_loadgen(
    kids: Children,
    script: str,
    urls: Sequence[str],
    auth: str,
    concurrency: int,
    args: argparse.Namespace,
    pids: Sequence[int],
) -> dict[str, Any]:
    """Run ``script --role loadgen`` in its own process and return its JSON result.

    ``args`` supplies ``duration``, ``warmup`` and ``body_size``; the CPU time of ``pids``
    is sampled over the measured window.
    """
    cmd = [sys.executable, script, "--role", "loadgen", "--urls", json.dumps(list(urls))]
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


async def loadgen(
    urls: list[str],
    auth: str,
    concurrency: int,
    warmup: float,
    duration: float,
    body_size: int,
    pids: list[int],
    expect: bytes | None = None,
) -> dict[str, Any]:
    """C workers on a keep-alive connector of C connections, each looping POST of the body.

    Worker i uses ``urls[i % len(urls)]``. Counts 200 answers equal to the body in the window
    ``[warmup, warmup + duration)``, latencies of calls started and finished in it, and the
    CPU time of ``pids``, of this process and of the whole machine over it. With ``expect``,
    each worker loops ``GET`` instead and counts answers equal to ``expect``.
    """
    body = (b"0123456789abcdef" * (body_size // 16 + 1))[:body_size]
    method, wanted = ("GET", expect) if expect is not None else ("POST", body)
    headers = {"Authorization": auth, "Content-Type": "application/octet-stream"} if auth else {}
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
                    async with http.request(method, url, data=body or None) as resp:
                        data = await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, OSError) as exc:
                    status, data = type(exc).__name__, b""
                    await asyncio.sleep(0.001)
                t1 = perf()
                if start <= t1 <= end:
                    if status == 200 and data == wanted:
                        completed += 1
                        if t0 >= start:
                            latencies.append(t1 - t0)
                    else:
                        failures[str(status)] += 1

        workers = (worker(i) for i in range(concurrency))
        sampled, *_ = await asyncio.gather(sample_cpu(pids, start, end), *workers)
    return loadgen_result(completed, failures, latencies, duration, sampled)


async def sample_cpu(pids: Sequence[int], start: float, end: float) -> dict[str, Any]:
    """CPU of ``pids``, of this process and of the machine between perf_counter ``start`` and
    ``end`` (the measured window of a load generator)."""
    perf = time.perf_counter
    await asyncio.sleep(max(0.0, start - perf()))
    before = cpu_snapshot(pids)
    await asyncio.sleep(max(0.0, end - perf()))
    return cpu_since(before)


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU counters at one moment: see :func:`cpu_snapshot` and :func:`cpu_since`."""

    wall: float
    cpu: dict[int, float]
    own: float
    machine: tuple[float, float]


def cpu_snapshot(pids: Sequence[int]) -> CpuSnapshot:
    """CPU used so far by ``pids``, by this process and by the machine (for a window whose end
    is not known in advance; :func:`sample_cpu` is the fixed-window form)."""
    return CpuSnapshot(
        time.perf_counter(),
        {pid: cpu_seconds(pid) for pid in pids},
        time.process_time(),
        machine_cpu_seconds(),
    )


def cpu_since(before: CpuSnapshot, after: CpuSnapshot | None = None) -> dict[str, Any]:
    """CPU used from ``before`` to ``after`` (default: now): the dict :func:`sample_cpu`
    returns."""
    if after is None:
        after = cpu_snapshot(list(before.cpu))
    return {
        "window": after.wall - before.wall,
        "cpu": {str(pid): after.cpu[pid] - before.cpu[pid] for pid in before.cpu},
        "loadgen_cpu": after.own - before.own,
        # The whole machine: shows other work (not ours) competing for the CPUs.
        "machine_busy": after.machine[0] - before.machine[0],
        "machine_total": after.machine[1] - before.machine[1],
    }


def loadgen_result(
    completed: int,
    failures: Counter[str],
    latencies: list[float],
    duration: float,
    sampled: dict[str, Any],
) -> dict[str, Any]:
    """The JSON result of a load generator, the shape :func:`measurement_row` reads."""
    latencies.sort()
    return {
        "calls": completed,
        "errors": sum(failures.values()),
        "failures": dict(failures),
        "duration": duration,
        "calls_per_s": completed / duration,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": (latencies[-1] * 1000) if latencies else float("nan"),
        **sampled,
    }


def measurement_row(result: dict[str, Any], pids: Sequence[int]) -> dict[str, Any]:
    """The reported figures of one :func:`loadgen` result; ``pids`` = (server, device?)."""
    cpu = result["cpu"]
    calls = max(1, result["calls"])
    window = result["window"]
    return {
        "calls": result["calls"],
        "errors": result["errors"],
        "calls_per_s": round(result["calls_per_s"], 1),
        "p50_ms": round(result["p50_ms"], 3),
        "p90_ms": round(result["p90_ms"], 3),
        "p99_ms": round(result["p99_ms"], 3),
        "server_cpu_us_per_call": round(cpu[str(pids[0])] / calls * 1e6, 1),
        "server_cpu_pct": round(100 * cpu[str(pids[0])] / window, 1),
        "device_cpu_us_per_call": (
            round(cpu[str(pids[1])] / calls * 1e6, 1) if len(pids) > 1 else None
        ),
        "loadgen_cpu_pct": round(100 * result["loadgen_cpu"] / window, 1),
        "machine_busy_pct": round(100 * result["machine_busy"] / result["machine_total"], 1),
        # CPU used by anything but the measured processes, in % of one core.
        "other_cpu_pct": round(
            100 * (result["machine_busy"] - sum(cpu.values()) - result["loadgen_cpu"]) / window,
            1,
        ),
        "failures": result["failures"],
    }


def print_measurements(
    rows: Sequence[dict[str, Any]],
    label_header: str,
    labels: Sequence[str],
    share_header: str,
    shares: Sequence[str],
) -> None:
    """Print :func:`measurement_row` rows, each led by its label, then concurrency and share."""
    table = []
    for r, label, share in zip(rows, labels, shares, strict=True):
        dev_cpu = r["device_cpu_us_per_call"]
        table.append(
            [
                label,
                r["concurrency"],
                f"{r['calls_per_s']:.0f}",
                share,
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
    print_table(
        [
            label_header,
            "conc",
            "calls/s",
            share_header,
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


def warn_if_noisy(rows: Sequence[dict[str, Any]]) -> float:
    """Warn when other processes used much CPU during a measurement; return the maximum."""
    noisy: float = max(r["other_cpu_pct"] for r in rows)
    if noisy > NOISE_WARN_PCT:
        print(
            f"\nwarning: other processes used up to {noisy:.0f}% of a core during the "
            "measurements; the figures are unreliable (see 'other cpu')"
        )
    return noisy
