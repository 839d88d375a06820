"""WebSocket benchmarks against uvicorn servers running in subprocesses.

The bench process is the load generator (``websockets`` asyncio client); each server is
``python -m uvicorn bench.apps.<module>:application`` on 127.0.0.1 and a free port, started
with ``Server`` and always stopped in ``finally``. Every wait is bounded. ``Server`` also
starts hypercorn and daphne (``kind=``), for the stalled-readers rows (``stalledbench.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
    # the redis burst rows (redisbench.py): both on channels_redis, BENCH_REDIS_URL in env
    "mini_redis": ("bench.apps.redis_mini_app:application", "bench.apps.settings_redis"),
    "ch4_redis": ("bench.apps.redis_ch4_app:application", "bench.apps.settings_redis"),
    # the stalled-readers rows (stalledbench.py): channels_mini, its default in-memory layer
    "mini_stalled": ("bench.apps.stalled_app:application", "bench.apps.settings_mini"),
}

#: ASGI servers a ``Server`` can start (all on 127.0.0.1, a free port, their defaults).
SERVER_KINDS = ("uvicorn", "hypercorn", "daphne")


def server_command(kind: str, module: str, port: int) -> list[str]:
    """The command line that serves *module* with the ASGI server *kind*."""
    if kind == "uvicorn":
        return [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port",
                str(port), "--log-level", "warning", "--no-access-log", "--lifespan", "auto"]
    if kind == "hypercorn":
        return [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", module]
    if kind == "daphne":
        return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), module]
    raise ValueError(f"unknown server {kind!r}; one of {SERVER_KINDS}")

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
    """One server subprocess (uvicorn unless *kind* says otherwise); use as a context manager
    so it is always stopped. *extra_args* go at the end of its command line, *env* on top of
    this process's environment."""

    def __init__(self, app: str, log_dir: str | None = None, kind: str = "uvicorn",
                 extra_args: list[str] | None = None, env: dict | None = None) -> None:
        self.app, self.kind = app, kind
        self.module, self.settings = APPS[app]
        self.extra_args, self.extra_env = list(extra_args or ()), dict(env or {})
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        name = app if kind == "uvicorn" else f"{app}-{kind}"
        self.log_path = Path(log_dir or tempfile.gettempdir()) / f"bench-{name}-{self.port}.log"
        self._log = None

    def start(self, timeout: float = 30.0) -> "Server":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["DJANGO_SETTINGS_MODULE"] = self.settings
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(PYCACHE_DIR)
        env.update(self.extra_env)
        command = server_command(self.kind, self.module, self.port) + self.extra_args
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
        """The pid to measure: the process that serves (the innermost python, if wrapped;
        hypercorn's worker, which its own process spawns, even with one worker)."""
        proc = psutil.Process(self.proc.pid)
        if self.kind == "hypercorn":
            deadline = time.monotonic() + 20
            while True:
                for child in proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if "spawn_main" in " ".join(child.cmdline()):
                            return child.pid
                if time.monotonic() > deadline:
                    raise RuntimeError("hypercorn's worker process did not appear")
                time.sleep(0.05)
        if os.environ.get("BENCH_SERVER_PREFIX"):
            for child in proc.children(recursive=True):
                if self.kind in " ".join(child.cmdline()):
                    return child.pid
        return proc.pid

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def require_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.app} server ({self.kind}) died:\n" + self.log_tail())

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


# -- 4. flood: probe latency while one client floods -----------------------------------

class Probes:
    """Sockets that each send one ping per ``interval`` and time each echo.

    Open loop: a ping goes out on its schedule even while earlier ones are unanswered,
    so a stalled server shows up as long latencies instead of as fewer pings (a closed
    loop would wait out the stall and hide it). Pings are ``"p<probe>-<window>-<n>"``,
    and a reader per socket matches each reply to its send time.
    """

    def __init__(self, sockets, interval: float) -> None:
        self.sockets, self.interval = sockets, interval
        self.outstanding = [{} for _ in sockets]  # per socket: payload -> send time
        self.latencies: list[float] = []
        self.stale = 0  # replies to pings of an earlier window that gave up on them
        self.readers = [asyncio.create_task(self._read(i, ws)) for i, ws in enumerate(sockets)]

    async def _read(self, index, ws) -> None:
        async for frame in ws:
            sent_at = self.outstanding[index].pop(frame, None)
            if sent_at is None:
                self.stale += 1
            else:
                self.latencies.append(time.perf_counter() - sent_at)

    async def _ping(self, index, ws, window: str, start: float, duration: float) -> None:
        # spread the probes over the interval so they do not all ping in the same instant
        offset = index * self.interval / len(self.sockets)
        n = 0
        while True:
            due = start + offset + n * self.interval
            if due >= start + duration:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            payload = f"p{index}-{window}-{n}"
            self.outstanding[index][payload] = time.perf_counter()
            await ws.send(payload)
            n += 1

    async def send_for(self, window: str, duration: float) -> None:
        """Ping on schedule for ``duration`` s; the replies are collected by ``drain``."""
        self.latencies = []
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(
            *(self._ping(i, ws, window, start, duration) for i, ws in enumerate(self.sockets))),
            duration + 10)

    async def drain(self, timeout: float) -> dict:
        """Wait (at most ``timeout`` s) for the window's replies; summarise its latencies."""
        deadline = time.perf_counter() + timeout
        while any(self.outstanding) and time.perf_counter() < deadline:
            for task in self.readers:
                if task.done():  # a socket closed or broke: its pings will never return
                    raise RuntimeError(f"probe reader ended: {task.exception()!r}")
            await asyncio.sleep(0.01)
        unanswered = sum(len(o) for o in self.outstanding)
        for pending in self.outstanding:
            pending.clear()
        # an unanswered ping counts as infinitely late, so it can only raise the figures
        latencies = sorted(self.latencies) + [float("inf")] * unanswered
        return {
            "pings": len(latencies),
            "unanswered": unanswered,
            "p50_ms": percentile(latencies, 0.50) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3,
            "max_ms": (latencies[-1] if latencies else float("nan")) * 1e3,
        }

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


class FlooderProcess:
    """``bench/flooder.py`` in a subprocess, driven over its stdin and stdout."""

    def __init__(self, url: str, cap: int, drain_timeout: float, log_path: Path) -> None:
        self.url, self.cap, self.drain_timeout = url, cap, drain_timeout
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.flooder", self.url, "--cap", str(self.cap),
                "--drain-timeout", str(self.drain_timeout), cwd=REPO_ROOT, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        await self._expect("ready", timeout)

    async def _expect(self, key: str, timeout: float) -> dict:
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            await asyncio.wait_for(self.proc.wait(), 5)
            raise RuntimeError(f"flooder exited ({self.proc.returncode}) before {key!r}: "
                               f"see {self.log_path}")
        message = json.loads(line)
        if key not in message:
            raise RuntimeError(f"flooder said {message!r}, expected {key!r}")
        return message

    async def _command(self, word: str) -> None:
        self.proc.stdin.write(word.encode() + b"\n")
        await asyncio.wait_for(self.proc.stdin.drain(), 5)

    async def go(self) -> None:
        """Start the flood; returns once the flooder has begun sending."""
        await self._command("go")
        await self._expect("flooding", 10)

    async def stop(self) -> None:
        await self._command("stop")

    async def result(self) -> dict:
        return await self._expect("flood_sent", self.drain_timeout + 20)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)


async def _flood(server: Server, path: str, probes: int, interval: float, before: float,
                 during: float, ramp: float, cap: int, drain_timeout: float) -> dict:
    url = server.url(path)
    flooder = FlooderProcess(url, cap, drain_timeout,
                             server.log_path.with_suffix(".flooder.log"))
    sockets, probe_set = [], None
    try:
        await flooder.start()
        sockets = await open_sockets(url, probes)
        for ws in sockets:  # warm-up: one exchange per socket, checked
            await ws.send("warm-up")
            reply = await asyncio.wait_for(ws.recv(), 10)
            if reply != "warm-up":
                raise AssertionError(f"echo returned {reply!r}")
        probe_set = Probes(sockets, interval)
        await probe_set.send_for("b", before)
        baseline = await probe_set.drain(drain_timeout)
        cpu_before = server_cpu_seconds(server)
        await flooder.go()
        await asyncio.sleep(ramp)  # the flood's queues fill; then the window opens
        await probe_set.send_for("d", during)
        await flooder.stop()  # the flooder drains its replies while the probes drain theirs
        under = await probe_set.drain(drain_timeout)
        flood_result = await flooder.result()
        server_cpu = server_cpu_seconds(server) - cpu_before
    finally:
        if probe_set is not None:
            await probe_set.close()
        await close_sockets(sockets)
        await flooder.kill()
    return {
        "before": baseline,
        "during": under,
        "p50_before_ms": baseline["p50_ms"],
        "p99_before_ms": baseline["p99_ms"],
        "p50_during_ms": under["p50_ms"],
        "p99_during_ms": under["p99_ms"],
        "stale_probe_replies": probe_set.stale,
        "server_cpu_s_flood": server_cpu,
        **flood_result,
    }


def flood(server: Server, path: str, probes: int = 20, interval: float = 0.05,
          before: float = 2.0, during: float = 3.0, ramp: float = 0.25, cap: int = 5000,
          drain_timeout: float = 30.0) -> dict:
    """Probe latency on an idle server, then while one other client floods it.

    ``probes`` sockets each ping every ``interval`` s for ``before`` s (baseline); then the
    flooder (``bench/flooder.py``, its own process) starts, and after ``ramp`` s the
    probes ping for another ``during`` s. The flooder stops with the window and reports
    whether every one of its frames came back, in order.
    """
    server.require_alive()
    limit = before + ramp + during + 2 * drain_timeout + 120
    result = asyncio.run(asyncio.wait_for(
        _flood(server, path, probes, interval, before, during, ramp, cap, drain_timeout),
        limit))
    server.require_alive()
    return result
