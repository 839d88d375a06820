"""In-process channel-layer benchmarks.

Each function takes a zero-argument factory that builds a fresh layer and returns one
figure for one run; ``run.py`` calls them interleaved (channels_mini, Channels 4, floor,
then the same again next round) so ratios come from back-to-back runs in one process.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import time

#: Hard ceiling for any single layer measurement; a stuck receive fails the run instead
#: of hanging the harness.
RUN_TIMEOUT = 120.0


class BareLayer:
    """The floor: the same five calls over plain asyncio.Queues.

    No name validation, no copying, no expiry, no capacity, no thread safety. Whatever a
    real layer costs above this is the price of those features (and of its design).
    """

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}
        self.groups: dict[str, set[str]] = {}
        self._ids = itertools.count()

    def _queue(self, channel: str) -> asyncio.Queue:
        queue = self.queues.get(channel)
        if queue is None:
            queue = self.queues[channel] = asyncio.Queue()
        return queue

    async def send(self, channel: str, message: dict) -> None:
        self._queue(channel).put_nowait(message)

    async def receive(self, channel: str) -> dict:
        return await self._queue(channel).get()

    async def new_channel(self, prefix: str = "specific.") -> str:
        return f"{prefix}bare!{next(self._ids)}"

    async def group_add(self, group: str, channel: str) -> None:
        self.groups.setdefault(group, set()).add(channel)

    async def group_send(self, group: str, message: dict) -> None:
        for channel in self.groups.get(group, ()):
            self._queue(channel).put_nowait(message)


def _run(coro_factory):
    """Run one measurement in a fresh event loop, with the collector quiet."""
    gc.collect()
    gc.disable()
    try:
        return asyncio.run(asyncio.wait_for(coro_factory(), RUN_TIMEOUT))
    finally:
        gc.enable()


# -- 1. send + receive round trip on one channel --------------------------------------

def roundtrip(factory, n: int) -> float:
    """Microseconds per ``send`` + ``receive`` on one channel (one message in flight)."""

    async def main():
        layer = factory()
        channel = "bench.roundtrip"
        message = {"type": "bench.message", "text": "hello"}
        for _ in range(200):  # warm-up: first-use allocations, caches
            await layer.send(channel, message)
            await layer.receive(channel)
        start = time.perf_counter()
        for _ in range(n):
            await layer.send(channel, message)
            received = await layer.receive(channel)
        elapsed = time.perf_counter() - start
        if received.get("text") != "hello":
            raise AssertionError(f"round trip returned {received!r}")
        return elapsed / n * 1e6

    return _run(main)


# -- 2. group_send to M members, each member then receiving --------------------------

def group_send_members(factory, members: int, deliveries: int) -> float:
    """Microseconds per delivery: ``group_send`` to M members, then M ``receive`` calls.

    Repeats until about ``deliveries`` deliveries (at least 3 sends). Each member holds at
    most one message between drains, so no capacity is ever reached; every receive is
    checked, so a dropped message would stop the run with an error, not a fast figure.
    """

    async def main():
        layer = factory()
        channels = [await layer.new_channel() for _ in range(members)]
        for channel in channels:
            await layer.group_add("bench", channel)
        repeats = max(3, deliveries // members)

        async def one_round(i):
            await layer.group_send("bench", {"type": "bench.message", "i": i})
            for channel in channels:
                received = await layer.receive(channel)
                if received["i"] != i:
                    raise AssertionError(f"{channel} got {received!r}, expected i={i}")

        await one_round(-1)  # warm-up
        start = time.perf_counter()
        for i in range(repeats):
            await one_round(i)
        elapsed = time.perf_counter() - start
        return elapsed / (repeats * members) * 1e6

    return _run(main)


# -- 3. one group_send to receivers already waiting -----------------------------------

def fanout_waiting(factory, members: int, repeats: int, until: str = "received") -> float:
    """Milliseconds from one ``group_send`` until all M waiting receivers have returned
    (``until="received"``), or until the ``group_send`` call itself returns (``"call"``:
    the sender's own cost, which is what a handler doing the broadcast pays).

    M tasks sit in ``await layer.receive(channel)`` before the clock starts; the figure is
    the median over ``repeats`` sends (fresh waiting tasks each time, same channels).
    """

    async def main():
        layer = factory()
        channels = [await layer.new_channel() for _ in range(members)]
        for channel in channels:
            await layer.group_add("fanout", channel)
        times = []
        for i in range(repeats + 1):  # first one is a warm-up
            tasks = [asyncio.create_task(layer.receive(c)) for c in channels]
            for _ in range(3):
                await asyncio.sleep(0)
            await asyncio.sleep(0.02)  # let every receiver park, even thread-backed ones
            start = time.perf_counter()
            await layer.group_send("fanout", {"type": "bench.message", "i": i})
            called = time.perf_counter() - start
            results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            elapsed = time.perf_counter() - start if until == "received" else called
            if len(results) != members or any(r["i"] != i for r in results):
                raise AssertionError("fan-out lost or mixed messages")
            if i:
                times.append(elapsed * 1e3)
        times.sort()
        return times[len(times) // 2]

    return _run(main)
