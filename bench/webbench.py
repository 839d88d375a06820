"""WebSocket benchmarks against uvicorn servers running in subprocesses.

The bench process is the load generator (``websockets`` asyncio client); each server is
``python -m uvicorn bench.apps.<module>:application`` on 127.0.0.1 and a free port, started
with ``Server`` and always stopped in ``finally``. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from websockets.asyncio.client import connect

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Server modules and the settings each one needs.
APPS = {
    "mini": ("bench.apps.mini_app:application", "bench.apps.settings_mini"),
    "ch4": ("bench.apps.ch4_app:application", "bench.apps.settings_ch4"),
    "bare": ("bench.apps.bare_app:application", "bench.apps.settings_common"),
}

#: Bytecode cache for the servers, outside the repository. Without it (this machine sets
#: PYTHONDONTWRITEBYTECODE=1, and channels_mini.py has no __pycache__), every server start
#: compiles channels_mini.py from source, which leaves ~7 MB of freed compiler memory in
#: the process; the first sockets then fit into it, hiding their cost. Deployed code runs
#: from .pyc files, so the servers do too. ``warm_bytecode_cache()`` fills it up front.
PYCACHE_DIR = Path(tempfile.gettempdir()) / f"channels-mini-bench-pycache-{os.getuid()}"

#: Client options used everywhere: no permessage-deflate (it would dominate CPU and
#: memory and is the same uvicorn code for every app), no keep-alive pings, no size cap.
CLIENT_OPTIONS = dict(compression=None, ping_interval=None, max_size=None, open_timeout=20,
                      close_timeout=2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One uvicorn subprocess; use as a context manager so it is always stopped."""

    def __init__(self, app: str, log_dir: str | None = None) -> None:
        self.app = app
        self.module, self.settings = APPS[app]
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(log_dir or tempfile.gettempdir()) / f"bench-{app}-{self.port}.log"
        self._log = None

    def start(self, timeout: float = 30.0) -> "Server":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["DJANGO_SETTINGS_MODULE"] = self.settings
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE_DIR)
        command = [sys.executable, "-m", "uvicorn", self.module,
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "warning", "--no-access-log", "--lifespan", "auto"]
        prefix = os.environ.get("BENCH_SERVER_PREFIX")  # e.g. "py-spy record -o x.svg --"
        if prefix and self.app in os.environ.get("BENCH_SERVER_PREFIX_APPS", "mini").split(","):
            command = prefix.split() + command
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.app} server exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.app} server did not listen within {timeout}s:\n"
                           + self.log_tail())

    @property
    def pid(self) -> int:
        """The pid to measure: uvicorn itself (the innermost python, if wrapped)."""
        proc = psutil.Process(self.proc.pid)
        if os.environ.get("BENCH_SERVER_PREFIX"):
            for child in proc.children(recursive=True):
                if "uvicorn" in " ".join(child.cmdline()):
                    return child.pid
        return proc.pid

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def require_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.app} server died:\n" + self.log_tail())

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: uvicorn shuts down gracefully (lifespan)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def servers(apps, log_dir=None):
    """Start several servers side by side; stop all of them on the way out.

    Yields ``{app: Server or the exception that stopped it from starting}``, so one app
    that cannot start does not stop the others from being measured.
    """
    running: dict[str, Server | Exception] = {}
    try:
        for app in apps:
            try:
                running[app] = Server(app, log_dir).start()
            except Exception as exc:  # reported per measurement by the caller
                running[app] = exc
        yield running
    finally:
        for server in running.values():
            if isinstance(server, Server):
                server.stop()


def warm_bytecode_cache(apps, paths=("/sync/",)) -> dict:
    """Start each server once and echo one message, so every module it uses is cached."""
    problems = {}
    for app in apps:
        try:
            with Server(app) as server:
                for path in paths:
                    echo(server, path, 1, 0.05)
        except Exception as exc:  # the real runs report it; here it only means a cold cache
            problems[app] = repr(exc)
    return problems


# -- client helpers --------------------------------------------------------------------

async def open_sockets(url: str, count: int, concurrency: int = 50) -> list:
    """Open ``count`` client sockets, at most ``concurrency`` handshakes at a time."""
    limit = asyncio.Semaphore(concurrency)

    async def one():
        async with limit:
            return await connect(url, **CLIENT_OPTIONS)

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    sockets = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_sockets(sockets)
        raise RuntimeError(f"{len(errors)} of {count} handshakes to {url} failed; "
                           f"first: {errors[0]!r}")
    return sockets


async def close_sockets(sockets, timeout: float = 15.0) -> None:
    async def one(ws):
        with contextlib.suppress(Exception):
            await ws.close()

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(one(ws) for ws in sockets)), timeout)
    for ws in sockets:  # anything still open after the timeout: drop the TCP connection
        with contextlib.suppress(Exception):
            ws.transport.abort()


def percentile(sorted_values, fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


# -- 1. echo ---------------------------------------------------------------------------

async def _echo(url: str, clients: int, duration: float, max_messages: int) -> dict:
    sockets = await open_sockets(url, clients)
    try:
        for ws in sockets:  # warm-up: one exchange per socket, checked
            await ws.send("warm-up")
            reply = await asyncio.wait_for(ws.recv(), 10)
            if reply != "warm-up":
                raise AssertionError(f"echo returned {reply!r}")
        latencies: list[float] = []
        sent = 0
        stop_at = time.perf_counter() + duration

        async def client(ws, number):
            nonlocal sent
            local = []
            i = 0
            while time.perf_counter() < stop_at and sent < max_messages:
                payload = f"c{number}-m{i}-payload-for-echo"
                i += 1
                sent += 1
                t = time.perf_counter()
                await ws.send(payload)
                reply = await ws.recv()
                local.append(time.perf_counter() - t)
                if reply != payload:
                    raise AssertionError(f"echo returned {reply!r}, sent {payload!r}")
            latencies.extend(local)

        start = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(client(ws, n) for n, ws in enumerate(sockets))), duration + 30)
        elapsed = time.perf_counter() - start
    finally:
        await close_sockets(sockets)
    latencies.sort()
    return {
        "messages": len(latencies),
        "seconds": elapsed,
        "msgs_per_s": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


def server_cpu_seconds(server: Server) -> float:
    times = psutil.Process(server.pid).cpu_times()
    return times.user + times.system


def echo(server: Server, path: str, clients: int, duration: float,
         max_messages: int = 1_000_000) -> dict:
    """Closed-loop echo: each client sends, waits for its reply, repeats until time is up.

    Also reports the server's CPU time per message (connect and warm-up included), which
    other load on the machine disturbs far less than the wall-clock figures.
    """
    server.require_alive()
    cpu_before = server_cpu_seconds(server)
    result = asyncio.run(_echo(server.url(path), clients, duration, max_messages))
    result["server_cpu_s"] = server_cpu_seconds(server) - cpu_before
    result["server_cpu_us_per_msg"] = result["server_cpu_s"] / max(1, result["messages"]) * 1e6
    server.require_alive()
    return result


# -- 2. broadcast ----------------------------------------------------------------------

async def _broadcast(url: str, clients: int, sends: int, idle_timeout: float,
                     hard_timeout: float) -> dict:
    sockets = await open_sockets(url, clients)
    try:
        await asyncio.sleep(0.3)  # every consumer has joined its group by now
        counts = [0] * clients
        out_of_order = [0]
        last_arrival = [0.0]
        expected = clients * sends

        async def reader(index, ws):
            previous = -1
            while counts[index] < sends:
                frame = await ws.recv()
                counts[index] += 1
                last_arrival[0] = time.perf_counter()
                number = int(frame)
                if number <= previous:
                    out_of_order[0] += 1
                previous = number

        readers = [asyncio.create_task(reader(i, ws)) for i, ws in enumerate(sockets)]
        start = time.perf_counter()
        await sockets[0].send("go")
        seen, seen_at = 0, start
        while True:
            await asyncio.sleep(0.02)
            now = time.perf_counter()
            total = sum(counts)
            if total >= expected:
                break
            if total != seen:
                seen, seen_at = total, now
            elif now - seen_at > idle_timeout or now - start > hard_timeout:
                break
            if any(t.done() and t.exception() for t in readers):
                break
        for task in readers:
            task.cancel()
        outcomes = await asyncio.gather(*readers, return_exceptions=True)
        failures = [o for o in outcomes
                    if isinstance(o, BaseException) and not isinstance(o, asyncio.CancelledError)]
        total = sum(counts)
        return {
            "received": total,
            "expected": expected,
            "complete": total >= expected,
            "out_of_order": out_of_order[0],
            "reader_errors": [repr(f)[:200] for f in failures[:3]],
            "seconds": (last_arrival[0] - start) if total else float("nan"),
            "idle_timeout": idle_timeout,
        }
    finally:
        await close_sockets(sockets)


def broadcast(server: Server, path: str, clients: int = 200, sends: int = 200,
              idle_timeout: float = 3.0, hard_timeout: float = 60.0) -> dict:
    """All sockets in one group; one "go" makes the server send ``sends`` messages to all.

    The clock runs from sending "go" to the last frame received. A run ends when every
    frame has arrived, or nothing new arrived for ``idle_timeout`` s, or after
    ``hard_timeout`` s; ``received`` says how many of ``clients * sends`` arrived.
    """
    server.require_alive()
    cpu_before = server_cpu_seconds(server)
    result = asyncio.run(_broadcast(server.url(path), clients, sends, idle_timeout,
                                    hard_timeout))
    result["server_cpu_s"] = server_cpu_seconds(server) - cpu_before
    server.require_alive()
    return result


# -- 3. memory per idle socket ---------------------------------------------------------

async def _memory(server: Server, path: str, sockets_wanted: int, settle: float) -> dict:
    process = psutil.Process(server.pid)
    url = server.url(path)
    warm = await open_sockets(url, 20)  # warm-up: imports, first-use caches, pools
    for ws in warm:
        await ws.send("warm-up")
        await asyncio.wait_for(ws.recv(), 10)
    await close_sockets(warm)
    await asyncio.sleep(settle)
    before = process.memory_info().rss
    first, second = [], []
    try:
        first = await open_sockets(url, sockets_wanted)
        await asyncio.sleep(settle)
        after_first = process.memory_info().rss
        second = await open_sockets(url, sockets_wanted)
        await asyncio.sleep(settle)
        after_second = process.memory_info().rss
        alive = sum(1 for ws in first + second if ws.state.name == "OPEN")
    finally:
        await close_sockets(first + second)
    return {
        "rss_before_mib": before / 2**20,
        "rss_after_first_mib": after_first / 2**20,
        "rss_after_second_mib": after_second / 2**20,
        "sockets_per_batch": sockets_wanted,
        "open_at_measurement": alive,
        "kib_per_socket": (after_first - before) / sockets_wanted / 1024,
        "kib_per_socket_marginal": (after_second - after_first) / sockets_wanted / 1024,
    }


def memory(server: Server, path: str, sockets: int = 1000, settle: float = 1.0) -> dict:
    """RSS of the server after opening N idle sockets minus RSS before, per socket.

    ``kib_per_socket`` is that figure. The first batch can partly fit in memory the
    process had already freed (start-up garbage), which hides part of its cost, so a
    second batch of N is opened on top: ``kib_per_socket_marginal`` is its RSS growth
    per socket, the steadier figure for "what does one more socket cost".
    """
    server.require_alive()
    result = asyncio.run(asyncio.wait_for(_memory(server, path, sockets, settle), 180))
    server.require_alive()
    return result
