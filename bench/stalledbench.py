"""Stalled readers: server memory when clients stop reading, per ASGI server.

channels_mini (``bench/apps/stalled_app.py``, its default in-memory layer, capacity 100
per channel) under uvicorn, hypercorn and daphne, each a subprocess (``webbench.Server``
with ``kind=``), and daphne once more with short keep-alive pings. 20 clients join the
group ``stalled`` and never read: ``websockets`` clients with ``max_queue=1`` and no
compression, so each stops reading its socket after one frame and the TCP window fills.
A producer socket (not in the group) then asks for 1,500 group sends of 16 KB each
(15 frames ``group 100 16384``), then ``direct 1``, whose answer says the handler's group
sends were all applied. The server's RSS is sampled every 0.25 s throughout; the server's
TCP connections (psutil) say when it closed a stalled client's connection.

What a server does with a reply it cannot write decides the figures: a server whose ASGI
``send`` waits while the socket's buffer is full leaves channels_mini's outbox (100
messages per socket) to take the rest, and drops what does not fit; a server whose
``send`` returns at once keeps everything in its own write buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request

import psutil
from websockets.asyncio.client import connect

from bench import webbench

#: (key, label, server kind, extra command-line arguments)
SERVERS = [
    ("uvicorn", "uvicorn", "uvicorn", []),
    ("hypercorn", "hypercorn", "hypercorn", []),
    ("daphne", "daphne", "daphne", []),
    ("daphne_ping", "daphne --ping-interval 5 --ping-timeout 5", "daphne",
     ["--ping-interval", "5", "--ping-timeout", "5"]),
]

#: The stalled clients: read one frame at most, then leave everything in the socket.
STALLED_OPTIONS = dict(webbench.CLIENT_OPTIONS, max_queue=1)

MIB = 2 ** 20


def _stats(server: webbench.Server) -> dict:
    """The app's ``stats()`` (any HTTP path answers it)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/stats", timeout=10) as reply:
        return json.loads(reply.read())


async def _stats_async(server: webbench.Server) -> dict:
    try:
        return await asyncio.wait_for(asyncio.to_thread(_stats, server), 15)
    except Exception as exc:  # a server too busy to answer: say so, do not fail the run
        return {"error": repr(exc)[:200]}


def _open_from(process: psutil.Process, ports: set[int]) -> set[int]:
    """Which of the client *ports* the server still holds an ESTABLISHED connection from."""
    held = set()
    for conn in process.net_connections(kind="tcp"):
        if conn.raddr and conn.raddr.port in ports and conn.status == psutil.CONN_ESTABLISHED:
            held.add(conn.raddr.port)
    return held


async def _stalled(server: webbench.Server, clients: int, sends: int, size: int,
                   per_frame: int, hold: float, after: float, interval: float,
                   spread: float) -> dict:
    process = psutil.Process(server.pid)
    rss = lambda: process.memory_info().rss / MIB  # noqa: E731
    stalled, producer = [], None
    try:
        # warm-up: one reading member, 10 group sends, so first-use costs are paid up front
        producer = await connect(server.url("/producer/"), **webbench.CLIENT_OPTIONS)
        warm = await connect(server.url("/flood/"), **webbench.CLIENT_OPTIONS)
        await producer.send(f"group 10 {size}")
        for _ in range(10):
            await asyncio.wait_for(warm.recv(), 10)
        await webbench.close_sockets([warm])

        stalled = await asyncio.gather(*(connect(server.url("/flood/"), **STALLED_OPTIONS)
                                         for _ in range(clients)))
        connected_at = time.perf_counter()
        ports = {ws.transport.get_extra_info("sockname")[1] for ws in stalled}
        await asyncio.sleep(1.0)
        stats_before = await _stats_async(server)
        before = rss()
        if len(_open_from(process, ports)) != clients:
            raise RuntimeError("the server does not hold every stalled client's connection")

        timeline: list[tuple[float, float, int]] = []  # (s since connect, RSS MiB, held)
        closed_at: dict[int, float] = {}
        peak = [before]

        def sample() -> None:
            now = time.perf_counter() - connected_at
            value = rss()
            held = _open_from(process, ports)
            for port in ports - held:
                closed_at.setdefault(port, now)
            peak[0] = max(peak[0], value)
            timeline.append((round(now, 2), round(value, 1), len(held)))

        async def sampler() -> None:
            while True:
                sample()
                await asyncio.sleep(interval)

        sampling = asyncio.create_task(sampler())
        try:
            sends_start = time.perf_counter()
            frames = sends // per_frame
            for number in range(frames):
                if spread:  # the producer's frames evenly over *spread* s
                    await asyncio.sleep(max(0.0, sends_start + number * spread / frames
                                            - time.perf_counter()))
                await producer.send(f"group {per_frame} {size}")
            await producer.send("direct 1")
            reply = await asyncio.wait_for(producer.recv(), 120)
            if reply != "0":
                raise AssertionError(f"the producer got {reply!r}")
            sends_s = time.perf_counter() - sends_start
            await asyncio.sleep(0.5)
            after_sends = rss()
            stats_after = await _stats_async(server)
            # keep the stalled clients (not reading) until hold s after they connected
            await asyncio.sleep(max(2.0, connected_at + hold - time.perf_counter()))
            sample()
            held_at_end = len(_open_from(process, ports))
            end_of_hold = rss()
            stats_hold = await _stats_async(server)
            left_at = time.perf_counter()
            for ws in stalled:  # the stalled clients go away (TCP abort: they cannot close)
                ws.transport.abort()
            await asyncio.sleep(after)
            after_leave = rss()
            stats_left = await _stats_async(server)
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
    finally:
        for ws in stalled:
            with contextlib.suppress(Exception):
                ws.transport.abort()
        if producer is not None:
            await webbench.close_sockets([producer])
    by_server = sorted(closed_at[p] for p in closed_at if closed_at[p] < left_at - connected_at)
    return {
        "rss_before_mib": before,
        "rss_after_sends_mib": after_sends,
        "rss_peak_mib": peak[0],
        "rss_end_of_hold_mib": end_of_hold,
        "rss_after_leave_mib": after_leave,
        "growth_after_sends_mib": after_sends - before,
        "growth_peak_mib": peak[0] - before,
        "growth_after_leave_mib": after_leave - before,
        "offered_mib": clients * sends * size / MIB,
        "sends_s": sends_s,
        "sends_started_s": sends_start - connected_at,
        "hold_s": left_at - connected_at,
        "closed_by_server": len(by_server),
        "closed_by_server_s": [round(t, 2) for t in by_server],
        "held_at_end_of_hold": held_at_end,
        "stats_before": stats_before,
        "stats_after_sends": stats_after,
        "stats_end_of_hold": stats_hold,
        "stats_after_leave": stats_left,
        "timeline": timeline,
    }


def stalled(server: webbench.Server, clients: int = 20, sends: int = 1500, size: int = 16384,
            per_frame: int = 100, hold: float = 15.0, after: float = 5.0,
            interval: float = 0.25, spread: float = 0.0) -> dict:
    """One stalled-readers measurement on a fresh *server* (``mini_stalled``, any kind).

    RSS: ``before`` (stalled clients connected, 1 s settled), ``after sends`` (0.5 s after
    the producer's ``direct 1`` came back), the peak (sampled every *interval* s), at the
    end of the hold (*hold* s after the stalled clients connected) and *after* s after the
    stalled clients went away (TCP abort). ``closed_by_server_s``: when the server dropped
    each stalled connection, in s since they connected (before the hold ended). *spread*
    (not used by run.py) spreads the producer's frames over that many seconds instead of
    sending them at once: a trickle rather than a burst.
    """
    server.require_alive()
    result = asyncio.run(asyncio.wait_for(
        _stalled(server, clients, sends, size, per_frame, hold, after, interval, spread),
        hold + after + spread + 180))
    server.require_alive()
    result["log_tracebacks"] = server.log_tail(10_000_000).count("Traceback")
    return result


def fresh(kind: str, extra_args: list[str], log_dir: str, **options) -> dict:
    with webbench.Server("mini_stalled", log_dir, kind=kind, extra_args=extra_args) as server:
        result = stalled(server, **options)
    result["server"] = " ".join([kind] + extra_args)
    return result


def warm(log_dir: str | None = None) -> dict:
    """Start the app once under each server kind and use it, so the bytecode cache
    (``webbench.PYCACHE_DIR``) holds every module each one imports before RSS is measured."""
    problems = {}

    async def use(server):
        async with connect(server.url("/producer/"), **webbench.CLIENT_OPTIONS) as ws:
            await ws.send("direct 1")
            await asyncio.wait_for(ws.recv(), 20)
        await _stats_async(server)

    for kind in dict.fromkeys(kind for _, _, kind, _ in SERVERS):
        try:
            with webbench.Server("mini_stalled", log_dir, kind=kind) as server:
                asyncio.run(asyncio.wait_for(use(server), 60))
        except Exception as exc:  # the real runs report it; here it only means a cold cache
            problems[kind] = repr(exc)
    return problems
