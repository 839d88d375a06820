"""Redis burst: channels_mini and Channels 4 on the same channels_redis core layer.

The issue's measurement. 1,000 WebSocket clients, each alone in its own group, on one
server process; 4 more sockets (the senders) each ask their handler, in one frame, to send
one message to 250 of those groups (4 x 250 = 1,000 group sends, every group once); that
is one round, and there are 5: 5,000 messages expected, one per client per round.
channels_redis keeps every socket of a server process in one Redis sorted set (the
process's inbox) and, with its default capacity of 100, skips a group send whose member's
inbox is full, saying so at INFO only. channels_mini gives that inbox a capacity of
100,000 when it builds the layer.

Servers: ``python -m uvicorn bench.apps.redis_mini_app:application`` /
``bench.apps.redis_ch4_app:application`` (``webbench.Server``, settings ``settings_redis``:
``CHANNEL_LAYERS`` = channels_redis's ``RedisChannelLayer``, default CONFIG but ``hosts``),
both on the bench's own ``redis-server`` (``presencebench.redis_server``), a fresh server
process per measurement and an empty Redis (``FLUSHALL``) before each.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

from websockets.asyncio.client import connect

from bench import webbench

#: channels_redis's INFO line when a group send skipped full channels (core.group_send).
_DROP_LINE = re.compile(r"^(\d+) of (\d+) channels over capacity in group (\S+)", re.M)


async def _open(urls: list[str], batch: int) -> list:
    """Open one socket per URL, *batch* handshakes at a time; all or nothing."""
    sockets: list = []
    try:
        for start in range(0, len(urls), batch):
            results = await asyncio.gather(
                *(connect(url, **webbench.CLIENT_OPTIONS) for url in urls[start:start + batch]),
                return_exceptions=True)
            sockets += [r for r in results if not isinstance(r, BaseException)]
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise RuntimeError(f"{len(errors)} of {len(results)} handshakes failed "
                                   f"(batch at {start}); first: {errors[0]!r}")
    except BaseException:
        await webbench.close_sockets(sockets)
        raise
    return sockets


async def _burst(server: webbench.Server, run: str, clients: int, senders: int, rounds: int,
                 batch: int, idle_timeout: float, straggler_timeout: float) -> dict:
    per_sender = clients // senders
    listeners, sender_sockets = [], []
    try:
        open_start = time.perf_counter()
        listeners = await _open([server.url(f"/burst/{run}-{i}/") for i in range(clients)],
                                batch)
        sender_sockets = await _open(
            [server.url(f"/burst/{run}-sender-{k}/") for k in range(senders)], batch)
        open_s = time.perf_counter() - open_start
        await asyncio.sleep(0.5)  # every group was joined before its handshake completed

        counts = [0] * clients
        last_arrival = [0.0]
        wrong: list = []

        async def reader(index, ws):
            async for frame in ws:
                counts[index] += 1
                last_arrival[0] = time.perf_counter()
                if frame != "x" and len(wrong) < 5:
                    wrong.append(frame)

        readers = [asyncio.create_task(reader(i, ws)) for i, ws in enumerate(listeners)]
        orders = [json.dumps([f"burst-{run}-{i}"
                              for i in range(k * per_sender, (k + 1) * per_sender)])
                  for k in range(senders)]
        expected = per_sender * senders * rounds
        acks_at = []
        cpu_start = webbench.server_cpu_seconds(server)
        start = time.perf_counter()
        for _ in range(rounds):
            # the 4 frames at once; the next round once every handler has made its sends
            await asyncio.gather(*(ws.send(order) for ws, order in zip(sender_sockets, orders)))
            replies = await asyncio.wait_for(
                asyncio.gather(*(ws.recv() for ws in sender_sockets)), 60)
            if any(reply != "sent" for reply in replies):
                raise AssertionError(f"a sender answered {replies!r}")
            acks_at.append(time.perf_counter() - start)
        sent_at = time.perf_counter()
        # stragglers: until all arrived, or nothing new for idle_timeout, or straggler_timeout
        while sum(counts) < expected:
            now = time.perf_counter()
            if now - sent_at > straggler_timeout:
                break
            if now - max(last_arrival[0], sent_at) > idle_timeout:
                break
            if any(t.done() for t in readers):
                broken = next(t for t in readers if t.done())
                raise RuntimeError(f"a listener's socket ended: {broken.exception()!r}")
            await asyncio.sleep(0.02)
        received = sum(counts)
        waited = time.perf_counter() - sent_at
        burst_cpu = webbench.server_cpu_seconds(server) - cpu_start
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        stats = None
        if server.app.startswith("mini"):
            await sender_sockets[0].send("stats")
            stats = json.loads(await asyncio.wait_for(sender_sockets[0].recv(), 20))
        return {
            "received": received,
            "expected": expected,
            "complete": received == expected,
            "clients_complete": sum(1 for c in counts if c == rounds),
            "clients_over": sum(1 for c in counts if c > rounds),
            "wrong_frames": wrong,
            "seconds": (last_arrival[0] - start) if received else float("nan"),
            "sends_done_s": acks_at[-1],
            "round_acks_s": acks_at,
            "straggler_wait_s": waited,
            "server_cpu_burst_s": burst_cpu,
            "open_s": open_s,
            "mini_stats": stats,
        }
    finally:
        # in batches too: 1,000 closes at once make Channels 4's group_discard calls raise
        # MaxConnectionsError (redis-py's pool: 100 connections), which is not what is measured
        everything = listeners + sender_sockets
        for start in range(0, len(everything), batch):
            await webbench.close_sockets(everything[start:start + batch])


def burst(server: webbench.Server, run: str, clients: int = 1000, senders: int = 4,
          rounds: int = 5, batch: int = 50, idle_timeout: float = 5.0,
          straggler_timeout: float = 15.0) -> dict:
    """One burst measurement against *server* (a fresh ``mini_redis`` or ``ch4_redis``).

    The clock runs from the first round's frames to the last delivery. After the last
    round, it waits for the stragglers until all have arrived, or nothing new came for
    *idle_timeout* s, or *straggler_timeout* s have passed. ``received`` of ``expected``;
    ``dropped`` is channels_mini's ``stats()["dropped"]`` or, for Channels 4, the sum of
    channels_redis's INFO lines "N of M channels over capacity" in the server's log.
    ``server_cpu_s`` is the server's CPU time for the whole measurement (connects included),
    ``server_cpu_burst_s`` from the first frame to the end of the wait for stragglers.
    """
    server.require_alive()
    cpu_before = webbench.server_cpu_seconds(server)
    result = asyncio.run(asyncio.wait_for(
        _burst(server, run, clients, senders, rounds, batch, idle_timeout, straggler_timeout),
        240))
    result["server_cpu_s"] = webbench.server_cpu_seconds(server) - cpu_before
    server.require_alive()
    log = server.log_tail(10_000_000)
    if result["mini_stats"] and "dropped" in result["mini_stats"]:
        result["dropped"] = result["mini_stats"]["dropped"]
        result["dropped_source"] = "channels_mini stats()['dropped']"
    else:  # Channels 4, or a channels_mini without stats(): channels_redis's own log lines
        result["dropped"] = sum(int(m.group(1)) for m in _DROP_LINE.finditer(log)
                                if m.group(3).startswith(f"burst-{run}-"))
        result["dropped_source"] = "channels_redis INFO lines in the server log"
    result["log_tracebacks"] = log.count("Traceback")
    return result


def flush(port: int) -> None:
    """Empty the bench's Redis, so no group or message of an earlier run is left."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()


def fresh(app: str, port: int, run: str, log_dir: str, **options) -> dict:
    """A fresh server for *app* on the Redis at *port*; one burst; the server stopped."""
    flush(port)
    env = {"BENCH_REDIS_URL": f"redis://127.0.0.1:{port}"}
    with webbench.Server(app, log_dir, env=env) as server:
        return burst(server, run, **options)
