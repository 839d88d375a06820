"""Presence benchmarks: joining, reading and leaving a group of 1,000 tracked members.

Channels has no presence, so there is no Channels 4 side. Each measurement runs the
sync API (``Group.track`` / ``presence`` / ``untrack``) from the harness's main thread,
a plain thread with no running event loop -- the way a view, a script or a sync
consumer's worker thread calls it. It is run twice: against the in-process default
(Django's locmem ``default`` cache) and against a real ``redis-server`` through Django's
``RedisCache`` (``CHANNELS_MINI_PRESENCE["CACHE"]``). The floor does the same work the
cheapest correct way: a plain dict of members (or one Redis hash through redis-py), and
each diff appended to a plain list per member.
"""

from __future__ import annotations

import contextlib
import gc
import json
import socket
import subprocess
import time
from pathlib import Path

#: A meta of the default shape (``presence_meta()``): a name and when it joined.
JOINED_AT = "2025-01-01T00:00:00Z"


def _meta(i: int) -> dict:
    return {"name": f"user{i}", "joined_at": JOINED_AT}


def _channels(run: str, members: int) -> list[str]:
    return [f"bench.presence!{run}-{i}" for i in range(members)]


@contextlib.contextmanager
def _quiet_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


# -- channels_mini ---------------------------------------------------------------------------

def mini_presence(mini, members: int, run: str, capacity: int | None = None) -> dict:
    """Track *members* channels in one group, read its presence once, untrack them all.

    Every join and leave is announced to the group as a ``presence_diff`` frame, through
    the channel layer: here a fresh in-memory layer, big enough (``capacity``) that no
    diff is dropped, so each member receives every diff as a live socket would. As a
    closing socket does, each channel also leaves the group after its untrack (that
    ``discard`` is outside the clock). Only the three calls are timed, one by one.
    """
    layer = mini.InMemoryChannelLayer(capacity=capacity or 2 * members + 10)
    group = mini.Group(f"presence-bench-{run}", channel_layer=layer)
    channels = _channels(run, members)
    metas = [_meta(i) for i in range(members)]
    perf = time.perf_counter
    with _quiet_collector():
        join = 0.0
        for channel, meta in zip(channels, metas):
            start = perf()
            group.track(channel, meta=meta)  # key: its own (an anonymous socket)
            join += perf() - start
        start = perf()
        listed = group.presence()
        read = perf() - start
        leave = 0.0
        for channel in channels:
            start = perf()
            group.untrack(channel)
            leave += perf() - start
            group.discard(channel)
    if len(listed) != members or sorted(m[0]["name"] for m in listed.values()) != sorted(
            m["name"] for m in metas):
        raise AssertionError(f"presence() listed {len(listed)} keys, expected {members}")
    left = group.presence()
    if left:
        raise AssertionError(f"{len(left)} keys still listed after every untrack")
    dropped = getattr(layer, "dropped", 0)
    if dropped:
        raise AssertionError(f"the layer dropped {dropped} presence diffs")
    return _figures(members, join, read, leave)


def _figures(members: int, join: float, read: float, leave: float) -> dict:
    return {
        "members": members,
        "join_ms": join * 1e3, "join_us_per_op": join / members * 1e6,
        "read_ms": read * 1e3,
        "leave_ms": leave * 1e3, "leave_us_per_op": leave / members * 1e6,
    }


# -- the floor -------------------------------------------------------------------------------

class _DictStore:
    """Members in a plain dict: {channel: (key, meta)}."""

    def __init__(self):
        self.members: dict[str, tuple[str, dict]] = {}

    def add(self, channel, key, meta):
        self.members[channel] = (key, meta)

    def remove(self, channel):
        return self.members.pop(channel)

    def entries(self):
        return self.members.values()


class _RedisHashStore:
    """Members in one Redis hash, one round trip per call: HSET, HDEL, HGETALL."""

    def __init__(self, client, name):
        self.client, self.name = client, name

    def add(self, channel, key, meta):
        self.client.hset(self.name, channel, json.dumps([key, meta]))

    def remove(self, channel):
        self.client.hdel(self.name, channel)

    def entries(self):
        return (json.loads(value) for value in self.client.hgetall(self.name).values())


def floor_presence(store, members: int, run: str) -> dict:
    """The same joins, read and leaves, the cheapest correct way: *store* keeps the
    members; each join or leave is one JSON diff appended to a plain list per member."""
    channels = _channels(run, members)
    metas = [_meta(i) for i in range(members)]
    inboxes: dict[str, list] = {}  # the group: channel -> the frames it received
    perf = time.perf_counter
    with _quiet_collector():
        join = 0.0
        for channel, meta in zip(channels, metas):
            start = perf()
            key = f"anonymous.{channel}"
            store.add(channel, key, meta)
            inboxes[channel] = []
            diff = {"text": json.dumps({"type": "presence_diff", "group": run,
                                        "joins": {key: [meta]}, "leaves": {}})}
            for inbox in inboxes.values():
                inbox.append(diff)
            join += perf() - start
        start = perf()
        listed: dict[str, list] = {}
        for key, meta in store.entries():
            listed.setdefault(key, []).append(meta)
        read = perf() - start
        leave = 0.0
        for channel, meta in zip(channels, metas):
            start = perf()
            store.remove(channel)
            del inboxes[channel]
            diff = {"text": json.dumps({"type": "presence_diff", "group": run, "joins": {},
                                        "leaves": {f"anonymous.{channel}": [meta]}})}
            for inbox in inboxes.values():
                inbox.append(diff)
            leave += perf() - start
    if len(listed) != members:
        raise AssertionError(f"the floor listed {len(listed)} keys, expected {members}")
    return _figures(members, join, read, leave)


def floor_dict(members: int, run: str) -> dict:
    return floor_presence(_DictStore(), members, run)


def floor_redis(port: int, members: int, run: str) -> dict:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        return floor_presence(_RedisHashStore(client, f"floor.presence.{run}"), members, run)
    finally:
        client.delete(f"floor.presence.{run}")
        client.close()


# -- backends --------------------------------------------------------------------------------

@contextlib.contextmanager
def redis_cache(port: int):
    """Point channels_mini's presence at a Django RedisCache on *port*, for the block."""
    from django.test import override_settings

    caches = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "presence": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                     "LOCATION": f"redis://127.0.0.1:{port}"},
    }
    with override_settings(CACHES=caches, CHANNELS_MINI_PRESENCE={"CACHE": "presence"}):
        yield


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def redis_server(log_dir: str):
    """A throw-away ``redis-server`` on a free 127.0.0.1 port (no RDB, no AOF); its port.
    Always stopped on the way out."""
    import redis

    port = _free_port()
    log_path = Path(log_dir) / f"redis-{port}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, cwd=log_dir, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited early (see {log_path}): "
                                   f"{log_path.read_text()[-500:]}")
            try:
                client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
                client.ping()
                client.close()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer within 10 s ({log_path})")
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "unavailable"
    return out.split(" v=")[1].split()[0] if " v=" in out else out.strip()


def presence_cache_backend() -> str:
    """The backend class of the cache that CHANNELS_MINI_PRESENCE names now."""
    from django.conf import settings
    from django.core.cache import caches

    alias = getattr(settings, "CHANNELS_MINI_PRESENCE", {}).get("CACHE", "default")
    return type(caches[alias]).__name__
