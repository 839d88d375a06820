"""The flooding client of the ``flood`` benchmark, run as its own process.

    python -m bench.flooder ws://127.0.0.1:PORT/path/ [--cap 5000] [--drain-timeout 30]

It connects, echoes one warm-up frame and prints ``{"ready": true}``. On the line ``go``
(stdin) it sends ``"f0"``, ``"f1"``, ... as fast as it can, without waiting for replies;
a separate reader task takes the echoes and checks that they come back as exactly
``f0, f1, f2, ...``. On ``stop`` (or end of stdin: the harness went away) it stops
sending, waits up to ``--drain-timeout`` s for the outstanding replies and prints one
JSON line with the figures, then exits.

At most ``--cap`` frames are ever unreplied: past that the sender waits for the reader.
That keeps memory on both ends bounded, and since the cap is far above what a server
has in flight when it keeps up, the flooder still sends as fast as the server lets it.

It runs in its own process so that its sending and reading do not queue in front of the
probes' replies in the harness's event loop: probe latencies then measure the server,
not the load generator (see bench/README.md, ``flood``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time

from websockets.asyncio.client import connect

#: The same client options as every other benchmark client (see webbench.CLIENT_OPTIONS);
#: repeated here so this process does not import the harness.
CLIENT_OPTIONS = dict(compression=None, ping_interval=None, max_size=None, open_timeout=20,
                      close_timeout=2)

#: Frames sent between forced yields. ``ws.send`` does not yield while the socket's write
#: buffer has room, so without this the reader could not run until the cap was reached.
YIELD_EVERY = 64

#: The whole process gives up after this long, whatever the harness does.
MAX_LIFETIME = 600.0


class Flooder:
    """Sends numbered frames on one socket as fast as it may; checks the echoes' order."""

    def __init__(self, ws, cap: int) -> None:
        self.ws, self.cap = ws, cap
        self.sent = self.received = 0
        self.max_outstanding = 0
        self.cap_waits = 0  # how often the sender had to wait: the server was the limit
        self.in_order = True
        self.first_disorder = None
        self.reader_error = None
        self._room = asyncio.Event()
        self._stopping = False
        self._all_back = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self._sender = None
        self._go_at = self._stop_at = None
        self._received_at_go = self._received_at_stop = 0
        self._sent_at_stop = 0

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if self.in_order and frame != f"f{self.received}":
                    self.in_order = False
                    self.first_disorder = {"expected": f"f{self.received}", "got": str(frame)[:40]}
                self.received += 1
                if self.sent - self.received < self.cap:
                    self._room.set()
                if self._stopping and self.received >= self.sent:
                    self._all_back.set()
        except Exception as exc:  # a closed or broken socket ends the drain early
            self.reader_error = repr(exc)[:300]
        finally:
            self._all_back.set()

    async def _send(self) -> None:
        while not self._stopping:
            outstanding = self.sent - self.received
            if outstanding >= self.cap:
                self.cap_waits += 1
                self._room.clear()
                # bounded, so a stop request is seen even if no reply ever comes
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._room.wait(), 0.05)
                continue
            self.max_outstanding = max(self.max_outstanding, outstanding + 1)
            await self.ws.send(f"f{self.sent}")
            self.sent += 1
            if self.sent % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    def start(self) -> None:
        self._go_at = time.perf_counter()
        self._received_at_go = self.received
        self._sender = asyncio.create_task(self._send())

    async def stop_and_drain(self, timeout: float) -> dict:
        self._stop_at = time.perf_counter()
        self._stopping = True
        self._sent_at_stop, self._received_at_stop = self.sent, self.received
        if self._sender is not None:
            await asyncio.wait_for(self._sender, 10)  # at most one send in progress
        if self.received >= self.sent:
            self._all_back.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._all_back.wait(), timeout)
        drained_at = time.perf_counter()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        window = (self._stop_at - self._go_at) if self._go_at else 0.0
        return {
            "flood_sent": self.sent,
            "flood_received": self.received,
            "flood_complete": self.received == self.sent,
            "in_order": self.in_order,
            "first_disorder": self.first_disorder,
            "flood_seconds": window,
            "flood_replies_per_s": ((self._received_at_stop - self._received_at_go) / window
                                    if window else 0.0),
            "flood_sent_per_s": self._sent_at_stop / window if window else 0.0,
            "outstanding_at_stop": self._sent_at_stop - self._received_at_stop,
            "max_outstanding": self.max_outstanding,
            "cap": self.cap,
            "cap_waits": self.cap_waits,
            "drain_seconds": drained_at - self._stop_at,
            "reader_error": self.reader_error,
        }


async def _stdin_lines() -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _main(url: str, cap: int, drain_timeout: float) -> None:
    commands = await _stdin_lines()
    async with connect(url, **CLIENT_OPTIONS) as ws:
        await ws.send("warm-up")
        reply = await asyncio.wait_for(ws.recv(), 10)
        if reply != "warm-up":
            raise AssertionError(f"echo returned {reply!r}")
        flooder = Flooder(ws, cap)
        _say({"ready": True})
        if (await commands.readline()).strip() != b"go":
            _say(await flooder.stop_and_drain(0))
            return
        flooder.start()
        _say({"flooding": True})
        await commands.readline()  # "stop", or b"" when the harness closed our stdin
        _say(await flooder.stop_and_drain(drain_timeout))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--cap", type=int, default=5000)
    parser.add_argument("--drain-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if not args.url.startswith("ws://127.0.0.1:"):
        parser.error("the flooder only connects to 127.0.0.1")
    asyncio.run(asyncio.wait_for(_main(args.url, args.cap, args.drain_timeout), MAX_LIFETIME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
