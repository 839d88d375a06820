"""History benchmarks: a group send to a group with history against one without.

    python -m bench.historybench memory [--members 1 100] [--deliveries 20000] [--min-sends 2000]
    python -m bench.historybench redis --port PORT [--sends 1000]
    python -m bench.historybench pubsub --port PORT [--sends 1000]

One flavour per process, run from the repository root: it configures its own Django
settings (``CHANNELS_MINI_HISTORY`` = ``HISTORY`` below, and for the Redis flavours
``CHANNEL_LAYERS`` on the bench's ``redis-server`` at PORT), measures, and prints one JSON
line. ``run.py`` starts one such process per flavour and round (``child()``), so no
settings, layer or module state of one flavour reaches another, nor the harness's.

In each process one layer serves two groups of the same size: ``hist-...``, which matches
``HISTORY``, and ``plain-...``, which does not. Sends go in batches of ``--batch``,
alternating between the two groups (history, plain, plain, history, ...), so drift hits both
alike. Only the ``group_send`` calls are timed; the figure is the median over the batches
of µs per send, which a moment descheduled by other work on 2 cores does not move (the mean
is in the JSON too). After each batch every member receives its messages outside the clock
(so no channel ever fills) and checks them: the text, and for the history group the
position channels_mini stamped on it (one epoch, offsets one apart), for the plain group no
stamp. A lost message, a missing stamp or a stamp where none belongs fails the run.

- ``memory``: ``channels_mini.InMemoryChannelLayer`` (capacity ``--batch`` + 10), built
  directly; its ``group_send`` hook stores each message of a history group in a bounded
  deque and stamps it. Groups of each ``--members`` size; sends until about
  ``--deliveries`` deliveries, at least ``--min-sends`` sends per group.
- ``redis``: ``channels_redis.core.RedisChannelLayer`` from ``channels_mini.get_channel_layer()``
  (default CONFIG but ``hosts``), whose ``layer`` hook wraps ``group_send``: a history group's
  message is first appended to a Redis stream by one Lua script (one round trip), then fanned
  out. One member per group, a process-local ``websocket.send...`` channel, as a socket has.
- ``pubsub``: the same with ``channels_redis.pubsub.RedisPubSubChannelLayer``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Which groups keep history in the measuring process: those named ``hist-*``.
HISTORY = {"hist-*": {"SIZE": 200, "TTL": 300}}

#: What every group send carries: 100 characters of text.
TEXT = "x" * 100

FLAVOURS = ("memory", "redis", "pubsub")

BACKENDS = {
    "redis": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}

#: Hard ceiling for one measuring process (it is killed after this long).
CHILD_TIMEOUT = 180.0

#: A drain that takes longer than this fails the run instead of hanging it.
DRAIN_TIMEOUT = 30.0


# -- the harness's side ------------------------------------------------------------------------

def child(flavour: str, log_path: str, port: int | None = None,
          pycache_dir: str | Path | None = None, **options) -> dict:
    """Measure *flavour* in a fresh ``python -m bench.historybench`` process; its result.

    *options* become its command-line options (``members=[1, 100]`` -> ``--members 1 100``);
    its stderr goes to *log_path*. With *pycache_dir*, it reads and writes its bytecode there
    (as the servers do: ``webbench.PYCACHE_DIR``), so channels_mini is compiled once, not in
    every process. Raises if it fails, or if it imported a channels_mini other than this
    repository's.
    """
    command = [sys.executable, "-m", "bench.historybench", flavour]
    if port is not None:
        command += ["--port", str(port)]
    for name, value in options.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        command += [f"--{name.replace('_', '-')}", *map(str, values)]
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    child_env.pop("DJANGO_SETTINGS_MODULE", None)  # it configures its own settings
    if pycache_dir is not None:
        child_env.pop("PYTHONDONTWRITEBYTECODE", None)
        child_env["PYTHONPYCACHEPREFIX"] = str(pycache_dir)
    with open(log_path, "ab") as log:
        done = subprocess.run(command, cwd=REPO_ROOT, env=child_env, stdout=subprocess.PIPE,
                              stderr=log, stdin=subprocess.DEVNULL, timeout=CHILD_TIMEOUT)
    if done.returncode != 0:
        tail = Path(log_path).read_text(errors="replace")[-1200:]
        raise RuntimeError(f"historybench {flavour} exited with {done.returncode} "
                           f"(log {log_path}): {tail}")
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    expected = str(REPO_ROOT / "channels_mini.py")
    if result["channels_mini"] != expected:
        raise RuntimeError(f"historybench {flavour} imported {result['channels_mini']}, "
                           f"not {expected}")
    return result


# -- the measuring process -----------------------------------------------------------------------

def configure(flavour: str, port: int | None) -> None:
    """Django settings for one flavour: the bench's common ones, the history rule, the layer."""
    import django
    from django.conf import settings

    from bench.apps import settings_common

    values = {name: value for name, value in vars(settings_common).items() if name.isupper()}
    values["CHANNELS_MINI_HISTORY"] = HISTORY
    if flavour in BACKENDS:
        values["CHANNEL_LAYERS"] = {"default": {
            "BACKEND": BACKENDS[flavour],
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{port}"]},
        }}
    settings.configure(**values)
    django.setup()


class Checker:
    """Checks what one member received: the text, and the stamp (or its absence)."""

    def __init__(self, stamp_key: str, group: str, stamped: bool) -> None:
        self.stamp_key, self.group, self.stamped = stamp_key, group, stamped
        self.epoch = None
        self.offset = None
        self.received = 0

    def __call__(self, message: dict) -> None:
        self.received += 1
        if message.get("text") != TEXT:
            raise AssertionError(f"{self.group}: got {message!r:.200}")
        stamp = message.get(self.stamp_key)
        if not self.stamped:
            if stamp is not None:
                raise AssertionError(f"{self.group} has no history but its message was "
                                     f"stamped {stamp!r}")
            return
        if not (isinstance(stamp, list) and len(stamp) == 3 and stamp[0] == self.group):
            raise AssertionError(f"{self.group}: expected a history stamp, got {message!r:.200}")
        _, epoch, offset = stamp
        if self.epoch is not None and (epoch != self.epoch or offset != self.offset + 1):
            raise AssertionError(f"{self.group}: position {epoch}/{offset} after "
                                 f"{self.epoch}/{self.offset}")
        self.epoch, self.offset = epoch, offset


async def compare(layer, mini, members: int, sends: int, batch: int, tag: str,
                  prefix: str = "specific.") -> dict:
    """``sends`` group sends to a history group and as many to a plain one, both of
    *members* members, in alternating batches; µs per send for each, and what was checked."""
    groups = {"history": f"hist-{tag}", "plain": f"plain-{tag}"}
    channels, checkers = {}, {}
    for kind, group in groups.items():
        channels[kind] = [await layer.new_channel(prefix) for _ in range(members)]
        for channel in channels[kind]:
            await layer.group_add(group, channel)
        checkers[kind] = [Checker(mini._STAMP, group, kind == "history")
                          for _ in channels[kind]]
    message = {"text": TEXT}
    perf = time.perf_counter

    async def drain(kind: str, count: int) -> None:
        for channel, check in zip(channels[kind], checkers[kind]):
            for _ in range(count):
                check(await layer.receive(channel))

    async def one_batch(kind: str, count: int) -> float:
        group = groups[kind]
        start = perf()
        for _ in range(count):
            await layer.group_send(group, message)
        elapsed = perf() - start
        await asyncio.wait_for(drain(kind, count), DRAIN_TIMEOUT)
        return elapsed

    for kind in groups:  # warm-up: first-use costs (the log or stream, the script, the pools)
        await one_batch(kind, min(batch, 10))
    per_send = {kind: [] for kind in groups}  # seconds per send, one figure per batch
    seconds = {kind: 0.0 for kind in groups}
    done = {kind: 0 for kind in groups}
    index = 0
    while done["history"] < sends:
        count = min(batch, sends - done["history"])
        for kind in (("history", "plain") if index % 2 == 0 else ("plain", "history")):
            elapsed = await one_batch(kind, count)
            per_send[kind].append(elapsed / count)
            seconds[kind] += elapsed
            done[kind] += count
        index += 1
    result = {"members": members, "sends": sends, "batch": batch}
    for kind in groups:
        received = sum(check.received for check in checkers[kind])
        expected = (sends + min(batch, 10)) * members
        if received != expected:
            raise AssertionError(f"{groups[kind]}: {received} received, {expected} expected")
        result[f"{kind}_us_per_send"] = statistics.median(per_send[kind]) * 1e6
        result[f"{kind}_mean_us_per_send"] = seconds[kind] / sends * 1e6
    result["last_offset"] = checkers["history"][0].offset
    return result


async def measure_memory(mini, members: list[int], deliveries: int, min_sends: int,
                         batch: int) -> dict:
    layer = mini.InMemoryChannelLayer(capacity=batch + 10)
    cases = {}
    for m in members:
        sends = max(min_sends, deliveries // m)
        cases[str(m)] = await compare(layer, mini, m, sends, batch, f"m{m}")
    if layer.dropped:
        raise AssertionError(f"the layer dropped {layer.dropped} messages")
    return {"layer": f"{type(layer).__module__}.{type(layer).__qualname__}", "cases": cases}


async def measure_redis(mini, flavour: str, sends: int, batch: int) -> dict:
    layer = mini.get_channel_layer()
    name = f"{type(layer).__module__}.{type(layer).__qualname__}"
    if name != BACKENDS[flavour]:
        raise AssertionError(f"get_channel_layer() built {name}, not {BACKENDS[flavour]}")
    if not getattr(layer.group_send, "stores_history", False):
        raise AssertionError("get_channel_layer() did not wrap group_send with history")
    try:
        # a socket's own channel: channels_mini sockets' prefix (one Redis inbox per process)
        case = await compare(layer, mini, 1, sends, batch, "r1", prefix="websocket.send")
    finally:
        if flavour == "redis":
            await layer.close_pools()
        else:
            await layer.flush()
    return {"layer": name, "cases": {"1": case}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("flavour", choices=FLAVOURS)
    parser.add_argument("--port", type=int, help="the redis-server (redis and pubsub)")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 100],
                        help="group sizes (memory)")
    parser.add_argument("--deliveries", type=int, default=20_000,
                        help="deliveries per group and size (memory)")
    parser.add_argument("--min-sends", type=int, default=2_000,
                        help="at least this many sends per group (memory)")
    parser.add_argument("--sends", type=int, default=1_000, help="sends per group (Redis)")
    parser.add_argument("--batch", type=int, default=50, help="sends between drains")
    args = parser.parse_args(argv)
    if args.flavour in BACKENDS and args.port is None:
        parser.error(f"{args.flavour} needs --port")
    sys.path.insert(0, str(REPO_ROOT))
    configure(args.flavour, args.port)
    import channels_mini as mini

    if args.flavour == "memory":
        work = measure_memory(mini, args.members, args.deliveries, args.min_sends, args.batch)
    else:
        work = measure_redis(mini, args.flavour, args.sends, args.batch)
    gc.collect()
    gc.disable()
    try:
        result = asyncio.run(asyncio.wait_for(work, CHILD_TIMEOUT - 30))
    finally:
        gc.enable()
    result.update(flavour=args.flavour, channels_mini=mini.__file__, history=HISTORY)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
