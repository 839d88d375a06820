r"""Channels 1.x for today's ASGI servers, in one file.

channels_mini brings the Django Channels 0.17/1.x programming model -- channels, groups, routes
with filters, class-based consumers and data binding -- to ASGI 3 servers (uvicorn, daphne,
hypercorn). It needs only Django and asgiref. It keeps one process's messages in memory; for
several processes or machines it plugs into Channels' own layers (``channels_redis``).

Read Part I first, top to bottom: the core, in the order a message travels, up to the
``# === Part II`` banner (``grep -n '^# ===' channels_mini.py`` prints the sections):

1. Channel layer  -- in-process queues, groups, capacity and expiry.
2. Messages       -- ``Message``, ``Channel``, ``Group``, deferred sends, running handlers.
3. Routing        -- ``route()``, ``route_class()``, ``include()``, filters.
4. Consumers      -- functions, ``BaseConsumer``, ``WebsocketConsumer``.
5. Binding        -- model signals to groups.
6. Connection     -- one socket: frames in as messages, one outbox out.
7. ASGI app       -- ``Application``: scopes to connections, the rest of HTTP to Django.
8. Test helpers   -- ``WebsocketCommunicator``, ``reset_channel_layers()``.
9. Command line   -- ``python -m channels_mini runworker``.

Part II holds the extensions; each plugs into the core through the named hooks of ``_Hooks``:

10. JSON, streams and writes from clients -- ``JsonWebsocketConsumer``, the demultiplexer,
    ``Binding.consumer`` (permission-checked writes).
11. Sessions and logins -- channel sessions, ``http_user``, the 1.x decorators; a connection
    ends with the login it was opened with.
12. HTTP consumers and event streams -- ``http.request``, long-polling, server-sent events.
13. Presence -- who is in a group, in every process.
14. Several processes -- a shared layer (Redis): listeners, the layer thread, restarts.
15. History and resume -- group messages kept with positions; a socket resumes where it left.

Two paths to follow, each a chain of calls to find with grep. A frame from the browser reaches
your ``receive()`` in 10 hops; incoming frames go straight to the router, never the layer:

1. ``Application.__call__`` -> ``Application._websocket``: the origin is checked.
2. ``_Connection.serve``: a reply channel and its outbox; the writer task starts.
3. ``_WebsocketConnection._run``: one ASGI event at a time (a turn for other sockets after
   each); the size limit; ``_receive_message`` builds the message.
4. ``_WebsocketConnection._handle``: a failure closes the socket with 1011.
5. ``_handle_message``: ``Router._find`` picks the route; sends wait for the handler's end.
6. ``BaseConsumer.dispatch``: the hooks load what the message carries (sessions, the user);
   ``method_mapping`` names the method.
7. ``_run_handler`` -> ``WebsocketConsumer.raw_receive`` -> ``_run_handler`` -> ``receive()``.
   An ``async def`` is awaited on the event loop; a plain ``def`` runs in a worker thread (a
   pool of 32), Django's stale database connections closed before and after, as for a request.

A model save reaches the browser in 10 hops; replies and group messages go through the
channel layer, into each socket's outbox:

1. ``post_save`` -> ``_after_save``: the groups before (read by ``_before_save`` on
   ``pre_save``: one SELECT of the stored row) and after the save.
2. ``Binding._announce``: delete/update/create per group, queued for the commit.
3. ``transaction.on_commit`` -> ``Binding._send_to_groups`` -> ``Group.send``.
4. ``_layer_operation`` -> ``InMemoryChannelLayer.group_send_now``: into each member's
   reply channel, its outbox (with Redis: through Redis and section 14's listener).
5. ``_Connection._write`` -> ``_WebsocketConnection._deliver`` -> ``_Connection._emit``:
   the server's ``send``.

A complete chat server::

    # chat/consumers.py
    from channels_mini import WebsocketConsumer

    class Chat(WebsocketConsumer):
        def connection_groups(self, room, **kwargs):
            return [f"chat-{room}"]          # joined on connect, left on disconnect

        def receive(self, text=None, bytes=None, room=None, **kwargs):
            self.group_send(f"chat-{room}", text=text)

    # mysite/asgi.py
    import os
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    import django
    django.setup()
    from channels_mini import Application
    from chat.consumers import Chat

    application = Application([Chat.as_route(path=r"^/chat/(?P<room>\w+)/$")])

    # shell:  uvicorn mysite.asgi:application
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import fnmatch
import functools
import hashlib
import hmac
import importlib
import inspect
import json
import logging
import re
import secrets
import threading
import time
from collections import UserDict, deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import unquote, urlsplit

from asgiref.sync import async_to_sync, sync_to_async
from django.core.exceptions import ImproperlyConfigured

__all__ = [  # by section; each section of Part II adds its own names
    "ChannelFull", "DenyConnection", "ChannelSocketException", "WebsocketCloseException",  # errors
    "InMemoryChannelLayer", "get_channel_layer",  # 1. channel layer
    "Message", "Channel", "Group", "consumer_context",  # 2. messages
    "route", "route_class", "include", "Route", "RouteClass", "Include", "Router",  # 3. routing
    "BaseConsumer", "WebsocketConsumer",  # 4. consumers
    "Binding", "WebsocketBinding",  # 5. binding (6. connection: nothing public)
    "Application", "application",  # 7. ASGI app
    "WebsocketCommunicator", "reset_channel_layers",  # 8. test helpers
    "main",  # 9. command line
]

logger = logging.getLogger("channels_mini")

# ASGI types, named once (as Starlette's types.py does).
Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ChannelFull(Exception):
    """A channel holds as many messages as its capacity allows; nothing was queued."""


class DenyConnection(Exception):
    """Raise while handling ``websocket.connect`` to reject the socket (HTTP 403)."""


class ChannelSocketException(Exception):
    """Raise in a consumer to run an action on its socket instead of failing (Channels 1.x)."""

    def run(self, message: Any) -> None:
        """The action, given the message being handled."""
        raise NotImplementedError(f"{type(self).__name__} must define run(message).")


class WebsocketCloseException(ChannelSocketException):
    """Raise in a consumer to close its websocket with *code* (1000, or 3000-4999)."""

    def __init__(self, code: int | None = None):
        if code is not None and (not isinstance(code, int) or not (code == 1000 or 3000 <= code <= 4999)):
            raise ValueError(f"Invalid close code {code!r}: use 1000 or one from 3000 to 4999.")
        super().__init__(code)
        self.code = code

    def run(self, message: Any) -> None:
        if message.reply_channel is None or not message.reply_channel.name.startswith("websocket."):
            raise ValueError(f"WebsocketCloseException raised while handling {message.channel_name!r},"
                             f" which has no websocket to close.")
        message.reply_channel.send({"close": self.code or True})


# -- module state and hooks --

_state_resets: list[Callable[[], None]] = []  # one per registered holder of module state


def _module_state(holder: Any) -> Any:
    """Register a module-level dict, set or list whose contents `reset_channel_layers()`
    (section 8) clears, and return it: the one registry of what the module keeps between calls."""
    _state_resets.append(holder.clear)
    return holder


class _Hooks:
    """Where Part II plugs into the core: the core calls each list, in order, at one point of
    its work, and an extension appends to it when the module is imported. Those that run for
    every message or reply return None when they have nothing to do, so that costs no coroutine."""

    def __init__(self) -> None:
        #: ``hook(consumer)`` before a consumer class's method runs: what its message carries.
        self.message: list[Callable[[Any], Awaitable[None] | None]] = []
        #: ``await hook(consumer, kwargs)`` after a websocket consumer's ``connect()``: a socket opened.
        self.connected: list[Callable[[Any, dict], Awaitable[None]]] = []
        #: ``hook(message)`` after a handler, before the sends it deferred leave.
        self.handled: list[Callable[[Any], Awaitable[None] | None]] = []
        #: ``await hook(connection)`` once a connection has closed and left its groups.
        self.closed: list[Callable[[Any], Awaitable[None]]] = []
        #: ``hook(app)`` returns a coroutine to run while *app* serves (or None).
        self.serving: list[Callable[[Any], Awaitable[None] | None]] = []
        #: ``hook(layer, group)`` when an in-memory group send found no member.
        self.unheard: list[Callable[[Any, str], None]] = []
        #: ``hook(connection)`` as a connection opens (it may move the outbox): a task beside it, or None.
        self.opened: list[Callable[[Any], asyncio.Task | None]] = []
        #: ``hook(function, args)`` applies a sync-form call of a shared layer (its coroutine function).
        self.layer_call: list[Callable[[Callable[..., Awaitable], tuple], None]] = []
        #: ``hook(app, scope, send)`` returns a connection to serve an HTTP scope (or None: Django).
        self.http: list[Callable[[Any, Scope, Send], Any]] = []
        #: ``hook(layer)`` may tune a layer built from settings or served by an app (maybe twice).
        self.layer: list[Callable[[Any], None]] = []
        #: ``hook(layer, group, message)`` returns the message an in-memory group send fans out.
        self.group_send: list[Callable[[Any, str, dict], dict]] = []
        #: ``hook(connection, reply)`` returns an awaitable that delivers *reply* itself, or None.
        self.reply: list[Callable[[Any, dict], Awaitable[None] | None]] = []


_hooks = _Hooks()


# === 1. Channel layer ===
# A channel layer moves messages (dicts) between the parts of a program: a queue per
# channel name, plus groups -- named sets of channels to broadcast to. This one lives
# in one process, like Channels' InMemoryChannelLayer, but it is safe to call from any
# thread and any event loop, and a group send costs O(members). It speaks the ASGI
# channel-layer interface, so Channels' Redis layers can take its place for several
# processes. `get_channel_layer()` picks the configured layer from settings.

_CHANNEL_NAME = re.compile(r"[A-Za-z0-9_.-]+(![A-Za-z0-9_.-]*)?")  # matched whole (fullmatch)
_GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_MAX_NAME_LENGTH = 100


def _require_name(kind: str, name: Any, pattern: re.Pattern) -> None:
    """Raise ``TypeError``/``ValueError`` naming *name* if it is not a valid channel/group name."""
    if not isinstance(name, str):
        raise TypeError(f"{kind} name must be a str (got {type(name).__name__} {name!r}).")
    if not _is_valid_name(name, pattern):
        extra = ", and at most one '!' (process-local channels)" if kind == "Channel" else ""
        raise _InvalidName(
            f"{kind} name {name!r:.300} is invalid: use fewer than {_MAX_NAME_LENGTH} ASCII "
            f"letters, digits, '-', '_' or '.'{extra}. If the name comes from a URL, "
            f"clean it first, e.g. re.sub(r'[^A-Za-z0-9_.-]', '_', name).")


@functools.lru_cache(maxsize=4096)  # the same names come back on every message
def _is_valid_name(name: str, pattern: re.Pattern) -> bool:
    return len(name) < _MAX_NAME_LENGTH and pattern.fullmatch(name) is not None


def _require_dict(message: Any, what: str = "Message") -> None:
    if not isinstance(message, dict):
        raise TypeError(f"{what} must be a dict (got {type(message).__name__} {message!r:.80}). "
                        f'Wrap the value, e.g. {{"text": ...}}.')


class _Throttle:
    """Lets a repeated report out at most *burst* times per *interval* seconds, counting the rest."""

    def __init__(self, interval: float, burst: int = 1):
        self.interval, self.burst = interval, burst
        self._started = -interval  # the current interval's start
        self._sent = 0  # reports let out in the current interval
        self._held = 0
        self._lock = threading.Lock()

    def ready(self, count: int = 1) -> int | None:
        """Count *count* events; return how many since the last report if one may go out now."""
        with self._lock:
            self._held += count
            now = time.monotonic()
            if now - self._started >= self.interval:
                self._started, self._sent = now, 0
            if self._sent >= self.burst:
                return None
            self._sent += 1
            held, self._held = self._held, 0
            return held


_log_throttles: dict[str, _Throttle] = _module_state({})  # kind of report -> its throttle


def _log_limited(level: int, text: str, *args: Any, key: str | None = None, every: float = 1.0,
                 burst: int = 10, count: int = 1, traceback: bool = False) -> None:
    """Log ``text % args``, at most *burst* lines per *every* seconds for each kind of report
    (*key*, default: *text*), each saying how many like it were left out (*count*: events this
    call stands for) -- or, where *text* holds ``{held}``, how many events the line stands for.
    A client repeats a mistake as fast as it sends, an outage fails every retry, a flood drops
    thousands of messages: the log must not grow with them. The default suits a client's
    mistake; `_OUTAGE` a failure of ours. Cut values short in *text* (``%.200r``)."""
    throttle = _log_throttles.get(key or text) or _log_throttles.setdefault(
        key or text, _Throttle(every, burst))
    held = throttle.ready(count)
    if held is not None:
        if "{held}" in text:
            text = text.replace("{held}", str(held))
        elif held > count:
            text += f" ({held - count} more like it since the last report)"
        logger.log(level, text, *args, exc_info=traceback)


#: An outage or a failure of ours: one line with its traceback every 10 s, for all of them.
_OUTAGE = {"key": "outage", "every": 10.0, "burst": 1, "traceback": True}


class _InvalidName(ValueError):
    """A channel or group name breaks the naming rule (often a name built from client input)."""


def _error_kind(error: BaseException) -> str:
    """The name users know an error by: a private subclass shows as its public base."""
    return next(kind.__name__ for kind in type(error).__mro__ if not kind.__name__.startswith("_"))


@dataclasses.dataclass(slots=True, eq=False)
class _Queue:
    """One channel's messages, as (expires_at, message), and the receivers waiting on it."""

    capacity: int
    messages: deque[tuple[float, dict]] = dataclasses.field(default_factory=deque)
    waiters: deque[tuple[Any, asyncio.Future]] = dataclasses.field(default_factory=deque)  # (loop, future)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


_GONE_REMEMBERED = 10_000  # closed reply channels a layer remembers, to drop late sends


class InMemoryChannelLayer:
    """Keeps channels and groups in this process's memory.

    Use it for development, tests and single-process servers (the default when
    ``CHANNEL_LAYERS`` is not set). For several processes, configure
    ``channels_redis.core.RedisChannelLayer`` instead: nothing here crosses a process.

    Any thread may call it: state sits behind one lock, and a receiver waiting on one
    event loop is woken with ``call_soon_threadsafe`` when a message arrives from
    another thread or loop. The queue, not the wake-up, holds the message, so a
    cancelled receiver loses nothing.
    """

    extensions = ["groups", "flush"]

    def __init__(self, expiry: float = 60, group_expiry: float = 86400, capacity: int = 100,
                 channel_capacity: dict | None = None):
        self.expiry = expiry
        self.group_expiry = group_expiry
        self.capacity = capacity
        self.channel_capacity = [  # (regex, capacity): glob patterns are compiled
            (pattern if isinstance(pattern, re.Pattern) else re.compile(fnmatch.translate(pattern)), size)
            for pattern, size in (channel_capacity or {}).items()]
        #: Group messages skipped because a member was full, since the layer was made.
        self.dropped = 0
        #: Messages sent to a connection's reply channel after it closed, dropped quietly.
        self.late = 0
        self._gone: dict[str, None] = {}  # closed process-local channels, oldest first
        self._lock = threading.Lock()
        self._queues: dict[str, _Queue] = {}
        self._groups: dict[str, dict[str, float]] = {}  # group -> {channel: joined_at}
        self._memberships: dict[str, set[str]] = {}  # channel -> groups, for cleanup
        self._next_sweep = 0.0

    def __repr__(self) -> str:
        return (f"<InMemoryChannelLayer channels={len(self._queues)} "
                f"groups={len(self._groups)} capacity={self.capacity}>")

    # -- channels --

    async def send(self, channel: str, message: dict) -> None:
        """Queue *message* on *channel*; raise ``ChannelFull`` if the channel is at capacity."""
        self.send_now(channel, message)

    def send_now(self, channel: str, message: dict) -> None:
        """The same as ``send``, for synchronous code: it never waits."""
        if type(channel) is not str or channel not in self._queues:  # queued names were checked
            _require_name("Channel", channel, _CHANNEL_NAME)
            if channel in self._gone:  # its connection has closed (a gone channel has no queue)
                with self._lock:
                    self.late += 1
                return
        if not isinstance(message, dict):
            _require_dict(message)
        with self._lock:
            if not self._put(channel, dict(message)):
                raise ChannelFull(
                    f"Channel {channel!r} holds {self._queues[channel].capacity} messages, its "
                    f"capacity. Its receiver is slow or gone; raise 'capacity' or "
                    f"'channel_capacity' if bursts are expected.")

    async def receive(self, channel: str) -> dict:
        """Wait for and return the next unexpired message on *channel*."""
        if type(channel) is not str or channel not in self._queues:
            _require_name("Channel", channel, _CHANNEL_NAME)
        while True:
            with self._lock:
                queue = self._queues.get(channel) or self._queue(channel)
                message = self._take(queue)
                if message is not None:
                    return message  # the queue stays for the next receive; sweeps free idle ones
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                queue.waiters.append((loop, future))
            try:
                await future
            except asyncio.CancelledError:
                self._forget_waiter(channel, future)
                raise

    async def new_channel(self, prefix: str = "specific.") -> str:
        """Return a fresh, unique, process-local channel name starting with *prefix*."""
        name = f"{prefix.rstrip('.!')}.inmemory!{secrets.token_hex(8)}"
        _require_name("Channel", name, _CHANNEL_NAME)
        return name

    # -- groups --

    async def group_add(self, group: str, channel: str) -> None:
        """Add *channel* to *group* (again: refreshes its ``group_expiry``)."""
        self.group_add_now(group, channel)

    def group_add_now(self, group: str, channel: str) -> None:
        """The same as ``group_add``, for synchronous code."""
        _require_name("Group", group, _GROUP_NAME)
        _require_name("Channel", channel, _CHANNEL_NAME)
        with self._lock:
            self._groups.setdefault(group, {})[channel] = time.monotonic()
            self._memberships.setdefault(channel, set()).add(group)

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove *channel* from *group*; nothing happens if it was not a member."""
        self.group_discard_now(group, channel)

    def group_discard_now(self, group: str, channel: str) -> None:
        """The same as ``group_discard``, for synchronous code."""
        _require_name("Group", group, _GROUP_NAME)
        _require_name("Channel", channel, _CHANNEL_NAME)
        with self._lock:
            self._leave(group, channel)

    async def group_send(self, group: str, message: dict) -> None:
        """Queue *message* on every member of *group*; a member at capacity is skipped."""
        self.group_send_now(group, message)

    def group_send_now(self, group: str, message: dict) -> None:
        """The same as ``group_send``, for synchronous code."""
        _require_name("Group", group, _GROUP_NAME)
        _require_dict(message)
        for hook in _hooks.group_send:  # e.g. history stores it first and stamps its position (Part II)
            message = hook(self, group, message)
        skipped = []
        with self._lock:
            members = self._groups.get(group)
            if members:
                stale_before = time.monotonic() - self.group_expiry
                for channel, joined_at in list(members.items()):
                    if joined_at < stale_before:
                        self._leave(group, channel)
                    elif not self._put(channel, dict(message)):
                        skipped.append(channel)
        if not members:
            for hook in _hooks.unheard:  # e.g. a warning that a shared layer is needed (Part II)
                hook(self, group)
        if skipped:
            self._report_drops(f"Group {group!r}", skipped)

    # -- whole layer --

    async def flush(self) -> None:
        """Drop every message, channel and group."""
        with self._lock:
            for queue in self._queues.values():
                queue.messages.clear()
            self._groups.clear()
            self._memberships.clear()
            for channel in list(self._queues):
                self._prune(channel)

    async def close(self) -> None:
        """Release resources: nothing to do for memory; present for the interface."""

    def pending(self, channel: str) -> int:
        """How many messages wait on *channel* (expired ones included until swept)."""
        queue = self._queues.get(channel)
        return len(queue.messages) if queue is not None else 0

    def discard_channel(self, channel: str, gone: bool = False) -> None:
        """Remove *channel* from every group and drop its queued messages. With *gone* (its
        connection closed), that process-local channel is never read again: later sends to it (a
        late long-poll answer, say) are dropped quietly and counted in ``late``."""
        with self._lock:
            for group in list(self._memberships.get(channel, ())):
                self._leave(group, channel)
            queue = self._queues.get(channel)
            if queue is not None:
                queue.messages.clear()
                self._prune(channel)
            if gone and "!" in channel:
                self._gone[channel] = None
                if len(self._gone) > _GONE_REMEMBERED:
                    del self._gone[next(iter(self._gone))]  # the oldest

    def stats(self) -> dict[str, int]:
        """Counts a test or a status page can read: channels, groups, members, messages, dropped."""
        with self._lock:
            self._sweep(time.monotonic(), force=True)
            return {"channels": len(self._queues), "groups": len(self._groups),
                    "members": sum(len(members) for members in self._groups.values()),
                    "messages": sum(len(queue.messages) for queue in self._queues.values()),
                    "dropped": self.dropped}

    # -- internals; the caller holds self._lock --

    def _queue(self, channel: str) -> _Queue:
        queue = self._queues.get(channel)
        if queue is None:
            capacity = next((size for pattern, size in self.channel_capacity if pattern.match(channel)),
                            self.capacity)
            queue = self._queues[channel] = _Queue(capacity)
        return queue

    # _put and _take run for every message: they test before calling, to save calls.

    def _put(self, channel: str, message: dict) -> bool:
        """Queue *message* and wake one receiver; False when the channel is full."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        queue = self._queues.get(channel) or self._queue(channel)
        messages = queue.messages
        if len(messages) >= queue.capacity:
            self._drop_expired(queue, now)
            if len(messages) >= queue.capacity:
                return False
        messages.append((now + self.expiry, message))
        if queue.waiters:
            self._wake_one(queue)
        return True

    def _take(self, queue: _Queue) -> dict | None:
        messages = queue.messages
        if not messages:
            return None
        if messages[0][0] <= time.monotonic():
            self._drop_expired(queue, time.monotonic())
            if not messages:
                return None
        message = messages.popleft()[1]
        if messages and queue.waiters:  # more for the next receiver, who may be asleep
            self._wake_one(queue)
        return message

    def _sweep(self, now: float, force: bool = False) -> None:
        """Now and then, drop expired messages and free idle queues: some are never read again."""
        if now < self._next_sweep and not force:
            return
        self._next_sweep = now + min(self.expiry, 1.0)
        for channel, queue in list(self._queues.items()):
            self._drop_expired(queue, now)
            self._prune(channel)

    @staticmethod
    def _drop_expired(queue: _Queue, now: float) -> None:
        messages = queue.messages
        while messages and messages[0][0] <= now:
            messages.popleft()

    @staticmethod
    def _wake_one(queue: _Queue) -> None:
        while queue.waiters:
            loop, future = queue.waiters.popleft()
            if future.done():
                continue
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                future.set_result(None)
                return
            try:
                loop.call_soon_threadsafe(_wake, future)
                return
            except RuntimeError:  # that loop is closed; wake someone else
                continue

    def _forget_waiter(self, channel: str, future: asyncio.Future) -> None:
        """A receiver was cancelled: pass its wake-up on if it had one, then tidy up."""
        with self._lock:
            queue = self._queues.get(channel)
            if queue is None:
                return
            queue.waiters = deque(w for w in queue.waiters if w[1] is not future)
            if queue.messages:
                self._wake_one(queue)
            self._prune(channel)

    def _prune(self, channel: str) -> None:
        queue = self._queues.get(channel)
        if queue is not None and not queue.messages and not queue.waiters:
            del self._queues[channel]

    def _leave(self, group: str, channel: str) -> None:
        members = self._groups.get(group)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self._groups[group]
        groups = self._memberships.get(channel)
        if groups is not None:
            groups.discard(group)
            if not groups:
                del self._memberships[channel]

    def _report_drops(self, source: str, channels: list[str]) -> None:
        """Count skipped deliveries and warn at most once a second, so a flood stays readable."""
        with self._lock:
            self.dropped += len(channels)
        _log_limited(logging.WARNING, "%s: {held} message(s) dropped since the last report because "
                     "receivers were at capacity (e.g. %r). A receiver is slow or gone; raise "
                     "'capacity' if bursts are expected. Total dropped: %d.", source, channels[0],
                     self.dropped, key=f"drops {id(self)}", burst=1, count=len(channels))


_layers: dict[str, Any] = _module_state({})
_layers_lock = threading.Lock()


def get_channel_layer(alias: str = "default") -> Any:
    """Return the channel layer configured as ``settings.CHANNEL_LAYERS[alias]``.

    The setting is the one Channels uses::

        CHANNEL_LAYERS = {"default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [("127.0.0.1", 6379)]},
        }}

    Without the setting, ``"default"`` is one process-wide ``InMemoryChannelLayer``.
    Layers are built once per alias and shared; the ``layer`` hooks may tune them (Redis).
    """
    layer = _layers.get(alias)
    if layer is None:
        with _layers_lock:  # built once, however many threads ask at the same time
            layer = _layers.get(alias) or _layers.setdefault(alias, _build_layer(alias))
            for hook in _hooks.layer:
                hook(layer)
    return layer


def _build_layer(alias: str) -> Any:
    from django.conf import settings

    configs = getattr(settings, "CHANNEL_LAYERS", None) if _settings_ready() else None
    if not configs:
        if alias == "default":
            return InMemoryChannelLayer()
        raise ImproperlyConfigured(
            f"Channel layer alias {alias!r} is not configured: settings.CHANNEL_LAYERS is "
            f"empty. Add CHANNEL_LAYERS = {{{alias!r}: {{'BACKEND': ...}}}}.")
    if alias not in configs:
        raise ImproperlyConfigured(
            f"Channel layer alias {alias!r} is not in settings.CHANNEL_LAYERS (it has "
            f"{sorted(configs)!r}). Add it, or use one of those aliases.")
    config = configs[alias]
    backend = config.get("BACKEND") if isinstance(config, dict) else None
    if not isinstance(backend, str):
        raise ImproperlyConfigured(
            f"settings.CHANNEL_LAYERS[{alias!r}] needs a 'BACKEND' dotted path string "
            f"(got {config!r}).")
    if backend in ("channels.layers.InMemoryChannelLayer", "InMemoryChannelLayer",
                   "asgiref.inmemory.ChannelLayer"):
        layer_class: Any = InMemoryChannelLayer  # Channels' names (4.x, 1.x) for the same thing
    else:
        layer_class = _import_by_path(backend, f"CHANNEL_LAYERS[{alias!r}]['BACKEND']")
    try:
        return layer_class(**config.get("CONFIG", {}))
    except Exception as error:
        raise ImproperlyConfigured(
            f"Channel layer {alias!r} ({backend}) could not be built with CONFIG "
            f"{config.get('CONFIG', {})!r}: {error}") from error


def _settings_ready() -> bool:
    """Are Django settings available? ``settings.configured`` stays False until something
    reads them, even with DJANGO_SETTINGS_MODULE set, so look at both."""
    import os

    from django.conf import ENVIRONMENT_VARIABLE, settings

    return settings.configured or bool(os.environ.get(ENVIRONMENT_VARIABLE))


def _import_by_path(path: str, what: str) -> Any:
    """Import ``"package.module.name"``; ``ImproperlyConfigured`` naming *what* if it fails."""
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ImproperlyConfigured(
            f"{what}: cannot import {path!r} ({error}). Check the dotted path and that "
            f"its module imports.") from error


# === 2. Messages ===
# A message is a dict on a channel. `Message` wraps one for a consumer, with its reply
# channel. `Channel` and `Group` are the names users send to, exactly as in Channels 1.x:
# inside a consumer (`consumer_context`) their sync sends are deferred until the handler
# returns (so a handler's replies leave together, in call order, even when it raises);
# elsewhere they act at once. `_run_handler` runs every handler: awaited, or in a thread.

_FULL_CHANNEL_PATIENCE = 2.0  # seconds a deferred direct send waits for room
_OPERATIONS_PER_TURN = 16  # deferred operations between two turns for the sockets to drain

#: The connections this process serves (section 6), by reply channel. A send to one of them
#: stays in the process, through its ``outbox``, whatever layer the app uses; the ``groups``
#: they join are left when they close, and joined again if a shared layer forgets them.
_local_sockets: dict[str, Any] = _module_state({})


_consumer_state: contextvars.ContextVar[consumer_context | None] = contextvars.ContextVar(
    "channels_mini_consumer_state", default=None)


class consumer_context:
    """Runs a block as a consumer handler runs: sends inside it are deferred until it ends.

    The connection wraps every handler in one; use it directly to run consumer code
    outside the server, e.g. from a test or a script::

        async with consumer_context(layer):
            Group("news").send({"text": "hi"})   # queued
        # ... sent here, also if the block raised

    Inside, ``Channel``/``Group`` made without ``alias``/``channel_layer`` use *channel_layer*
    (default: ``get_channel_layer()``).
    """

    def __init__(self, channel_layer: Any = None):
        self.channel_layer = channel_layer
        self.deferred: list[tuple[str, Any, tuple]] = []  # (operation, layer, args)

    async def __aenter__(self) -> consumer_context:
        self.channel_layer = self.channel_layer or get_channel_layer()
        self._token = _consumer_state.set(self)  # what the Channel/Group calls inside find
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        _consumer_state.reset(self._token)
        operations, self.deferred = self.deferred, []
        for index, (operation, layer, args) in enumerate(operations):  # in call order
            if index and not index % _OPERATIONS_PER_TURN:
                # A turn for the sockets to drain their outboxes, so that a burst (200 group
                # sends in one handler) does not fill a member's -- unless its client stopped reading.
                await asyncio.sleep(0)
            if operation == "send":
                await _send_patiently(layer, *args)
            else:
                await getattr(layer, operation)(*args)


async def _send_patiently(layer: Any, channel: str, message: dict) -> None:
    """Send, waiting up to two seconds for room in a full channel (SPEC: deferred sends)."""
    deadline = time.monotonic() + _FULL_CHANNEL_PATIENCE
    pause = 0.001
    while True:
        try:
            return await layer.send(channel, message)
        except ChannelFull:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.05)


def _layer_operation(operation: str, layer: Any, args: tuple, immediately: bool) -> None:
    """Defer a sync-form operation inside a consumer; otherwise do it now, never blocking a loop."""
    state = _consumer_state.get()
    if state is not None and not immediately:
        if operation in ("send", "group_send"):  # the caller may change its dict before we send
            args = (args[0], dict(args[1]))
        state.deferred.append((operation, layer, args))
    elif isinstance(layer, InMemoryChannelLayer):
        getattr(layer, operation + "_now")(*args)  # a lock and a deque: safe anywhere
    else:  # a shared layer's coroutine, run where it blocks no event loop (Part II)
        for hook in _hooks.layer_call:
            return hook(getattr(layer, operation), args)
        async_to_sync(getattr(layer, operation))(*args)


def _resolve_layer(alias: str, channel_layer: Any) -> Any:
    if channel_layer is not None:
        return channel_layer
    if alias == "default":
        state = _consumer_state.get()
        if state is not None:
            return state.channel_layer
    return get_channel_layer(alias)


def _channel_name(channel: Any) -> str:
    return channel.name if isinstance(channel, Channel) else channel


class Channel:
    """A named channel to send messages to.

    ``Channel("email.send").send({"to": "a@example.com"})`` -- deferred inside a consumer
    until its handler returns, immediate elsewhere; ``immediately=True`` skips the wait.
    """

    def __init__(self, name: str, alias: str = "default", channel_layer: Any = None):
        _require_name("Channel", name, _CHANNEL_NAME)
        self.name = name
        self.alias = alias
        self._channel_layer = channel_layer

    @property
    def channel_layer(self) -> Any:
        # A socket served by this process is reached through its outbox, never across Redis.
        local = _local_sockets.get(self.name)
        return local.outbox if local is not None else _resolve_layer(self.alias, self._channel_layer)

    def send(self, content: dict, immediately: bool = False) -> None:
        """Send *content* (a dict) to this channel."""
        _require_dict(content, "Content")
        _layer_operation("send", self.channel_layer, (self.name, content), immediately)

    async def asend(self, content: dict) -> None:
        """Send *content* now, from async code."""
        _require_dict(content, "Content")
        await self.channel_layer.send(self.name, content)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Channel) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Channel({self.name!r})"


class Group:
    """A named set of channels; a message sent to it reaches every member.

    ``Group("chat").add(message.reply_channel)`` then ``Group("chat").send({"text": "hi"})``.
    """

    def __init__(self, name: str, alias: str = "default", channel_layer: Any = None):
        _require_name("Group", name, _GROUP_NAME)
        self.name = name
        self.alias = alias
        self._channel_layer = channel_layer

    @property
    def channel_layer(self) -> Any:
        return _resolve_layer(self.alias, self._channel_layer)

    def add(self, channel: Channel | str, immediately: bool = False) -> None:
        """Make *channel* a member of this group (left by itself when its socket closes)."""
        _layer_operation("group_add", self.channel_layer, self._member(channel, True), immediately)

    def discard(self, channel: Channel | str, immediately: bool = False) -> None:
        """Remove *channel* from this group."""
        _layer_operation("group_discard", self.channel_layer, self._member(channel, False), immediately)

    def send(self, content: dict, immediately: bool = False) -> None:
        """Send *content* (a dict) to every member."""
        _require_dict(content, "Content")
        _layer_operation("group_send", self.channel_layer, (self.name, content), immediately)

    async def aadd(self, channel: Channel | str) -> None:
        """Add *channel* now, from async code."""
        await self.channel_layer.group_add(*self._member(channel, True))

    async def adiscard(self, channel: Channel | str) -> None:
        """Remove *channel* now, from async code."""
        await self.channel_layer.group_discard(*self._member(channel, False))

    async def asend(self, content: dict) -> None:
        """Send *content* to every member now, from async code."""
        _require_dict(content, "Content")
        await self.channel_layer.group_send(self.name, content)

    def _member(self, channel: Channel | str, joined: bool) -> tuple[str, str]:
        """The layer's arguments for a change of membership, noted first for a socket this
        process serves (which leaves its groups when it closes)."""
        name = _channel_name(channel)
        connection = _local_sockets.get(name)
        if connection is not None and joined:
            connection.groups.add(self.name)
        elif connection is not None:
            connection.groups.discard(self.name)
        return self.name, name

    def __repr__(self) -> str:
        return f"Group({self.name!r})"


class Message(UserDict):
    """A message as a consumer sees it: dict-like over ``content``, plus where it came from.

    WebSocket messages also carry ``scope`` (the ASGI scope). Section 11 adds what Channels
    1.x gave them: ``channel_session``, and ``user`` and ``http_session`` from the handshake's
    Django session cookie (None here until something loads them).
    """

    def __init__(self, content: dict, channel_name: str, channel_layer: Any):
        self.data = content  # UserDict's dict: the message's own, not a copy
        self.channel_name = channel_name
        self.channel_layer = channel_layer
        self.scope: Scope | None = None
        self.user: Any = None
        self.http_session: Any = None
        self._socket_state: dict | None = None  # what every message of one connection shares
        self._reply_channel: Channel | None = None

    @property
    def content(self) -> dict:
        return self.data

    @property
    def channel(self) -> Channel:
        return Channel(self.channel_name, channel_layer=self.channel_layer)

    @property
    def reply_channel(self) -> Channel | None:
        if self._reply_channel is None and self.content.get("reply_channel"):
            self._reply_channel = Channel(self.content["reply_channel"],
                                          channel_layer=self.channel_layer)
        return self._reply_channel

    def copy(self, **changes: Any) -> Message:
        """An independent (deep) copy of the content, with *changes*; the rest (scope, user,
        sessions) is shared."""
        clone = Message({**copy.deepcopy(self.content), **changes}, self.channel_name,
                        self.channel_layer)
        clone.__dict__.update({name: value for name, value in vars(self).items()
                               if name not in ("data", "_reply_channel")})
        return clone

    def __repr__(self) -> str:
        return f"<Message channel={self.channel_name!r} content={self.content!r:.120}>"


# -- running handlers --
# One function runs every handler: `async def` code is awaited on the loop; anything else runs
# in a worker thread (a pool of 32), with Django's database connections tidied before and
# after, as around a request -- so a slow sync handler holds up only its own socket.

_bridges: dict[str, Callable[..., Awaitable]] = {}  # asgiref's bridge to each thread pool
#: True while a test case runs consumers inside its own transaction (the 1.x test client): sync
#: code runs in the test's thread, and bound changes leave at once (that transaction never commits).
_inside_test_transaction = contextvars.ContextVar("channels_mini_inside_test_transaction", default=False)
_THREAD_POOL_SIZE = 32  # sync handlers running at once; a blocked one holds only its own socket


def _is_async(handler: Any) -> bool:
    """Is *handler* ``async def`` (or an object with an ``async def __call__``)? The only such
    check; its answer for each function is kept, as a handler runs on every message."""
    function = getattr(handler, "__func__", handler)  # a bound method: its function
    try:
        return _is_async_function(function)
    except TypeError:  # an unhashable callable: ask each time
        return _is_async_function.__wrapped__(function)


@functools.lru_cache(maxsize=4096)
def _is_async_function(function: Any) -> bool:
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
        getattr(function, "__call__", None))


async def _run_handler(handler: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Run a consumer or a consumer's method: awaited if ``async def``, else in a worker thread."""
    if _is_async(handler):
        return await handler(*args, **kwargs)
    return await _bridge("consumer", _THREAD_POOL_SIZE)(handler, *args, **kwargs)


def _bridge(pool_name: str, size: int) -> Callable[..., Awaitable]:
    """asgiref's bridge to a thread pool of its own, so async_to_sync in there finds this loop."""
    if _inside_test_transaction.get():  # the test's thread: its connection, inside its transaction
        return sync_to_async(_with_fresh_db_connections, thread_sensitive=True)
    bridge = _bridges.get(pool_name)
    if bridge is None:
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(size, thread_name_prefix=pool_name)
        bridge = _bridges[pool_name] = sync_to_async(
            _with_fresh_db_connections, thread_sensitive=False, executor=pool)
    return bridge


def _with_fresh_db_connections(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """What Django does around each request: drop database connections broken or too old."""
    from django.apps import apps
    from django.db import close_old_connections

    if not apps.ready or _inside_test_transaction.get():  # none to tidy, or the test's own
        return function(*args, **kwargs)
    close_old_connections()
    try:
        return function(*args, **kwargs)
    finally:
        close_old_connections()


# === 3. Routing ===
# Routing picks the consumer for a message: a list of routes, each naming channels and
# regex filters over message keys (`path=r"^/chat/(?P<room>\w+)/$"`). The first route
# whose channel and filters all match wins; its named groups become the consumer's
# keyword arguments. `include()` nests a routing under prefixes, as Channels 1.x did.

#: The keys of the messages the module makes, by channel (section 12 adds HTTP's). A filter on
#: a key none of a route's messages has could never match: it is a typo, and an error.
_MESSAGE_KEYS: dict[str, set[str]] = {
    "websocket.connect": {"reply_channel", "path", "query_string", "headers", "client", "server",
                          "subprotocols", "order"},
    "websocket.receive": {"reply_channel", "path", "order", "text", "bytes"},
    "websocket.disconnect": {"reply_channel", "path", "order", "code"},
}


def _require_known_keys(channels: set[str], filters: dict[str, Any], where: str) -> None:
    """Refuse a filter on a key that no message of *channels* carries (``pth=`` for ``path=``).
    Channels of your own may carry any key."""
    if not filters or not all(channel in _MESSAGE_KEYS for channel in channels):
        return
    keys = set().union(*(_MESSAGE_KEYS[channel] for channel in channels))
    unknown = sorted(set(filters) - keys)
    if unknown:
        raise ValueError(f"Filter {unknown[0]!r} for {where} can never match: messages on "
                         f"{sorted(channels)!r} carry {sorted(keys)!r}. Check its spelling "
                         f"(e.g. path=r\"^/chat/$\").")


def _compile_filters(filters: dict[str, Any], where: str) -> dict[str, re.Pattern]:
    compiled = {}
    for key, pattern in filters.items():
        if isinstance(pattern, bytes):  # Channels 1.x took bytes patterns, read as ASCII
            try:
                pattern = pattern.decode("ascii")
            except UnicodeDecodeError:
                raise ValueError(f"Filter {key!r} for {where} is a bytes pattern that is not "
                                 f"ASCII (got {pattern!r:.200}). Write it as a str.") from None
        if isinstance(pattern, re.Pattern):
            regex = pattern
        elif isinstance(pattern, str):
            try:
                regex = re.compile(pattern)
            except re.error as error:
                raise ValueError(f"Filter {key!r} for {where} is not a valid regex ({error}; "
                                 f"got {pattern!r}).") from None
        else:
            raise TypeError(f"Filter {key!r} for {where} must be a regex string "
                            f"(got {type(pattern).__name__} {pattern!r}).")
        if regex.groups > len(regex.groupindex):
            raise ValueError(
                f"Filter {key!r} for {where} uses an unnamed group (got {regex.pattern!r}). "
                f"Name it, e.g. (?P<room_id>\\d+), or make it non-capturing with (?:...).")
        compiled[key] = regex
    return compiled


def _match_filters(filters: dict[str, re.Pattern], content: Any,
                   partial: bool = False) -> tuple[dict, dict] | None:
    """Match every filter; return (kwargs, matched parts by key), or None if one fails.
    *partial* skips filters on keys the content lacks: "could this route match?"."""
    kwargs: dict[str, Any] = {}
    matched: dict[str, re.Match] = {}
    for key, regex in filters.items():
        if partial and key not in content:
            continue
        value = content.get(key)
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                return None
        elif not isinstance(value, str):
            return None  # a missing key, or a value no regex can read
        found = regex.match(value)
        if found is None:
            return None
        kwargs.update(found.groupdict())
        matched[key] = found
    return kwargs, matched


def _consumer_label(consumer: Any) -> str:
    return f"{getattr(consumer, '__module__', '?')}.{getattr(consumer, '__qualname__', consumer)}"


def _filters_repr(filters: dict[str, re.Pattern]) -> str:
    return "".join(f", {key}={regex.pattern!r}" for key, regex in filters.items())


class _Matcher:
    """What every routing entry (and a whole ``Router``) answers: which route takes a message."""

    def match(self, message: Message) -> tuple[Any, dict] | None:
        """``(consumer, kwargs)`` for *message*, or None if nothing here takes it."""
        found = self._find(message.channel_name, message.content)
        return None if found is None else (found[0].consumer, found[1])

    def _find(self, channel: str, content: Any, partial: bool = False) -> tuple[Route, dict] | None:
        """The matched route and its kwargs; *partial* skips filters on keys *content* lacks."""
        raise NotImplementedError


class Route(_Matcher):
    r"""Sends messages on *channels* that pass every filter to *consumer*.

    ``route("websocket.receive", chat, path=r"^/chat/(?P<room>\w+)/$")`` calls
    ``chat(message, room="lobby")`` for a frame on ``/chat/lobby/``.
    """

    def __init__(self, channels: str | list[str], consumer: Any, **filters: Any):
        names = [channels] if isinstance(channels, str) else list(channels)
        if not names or not all(isinstance(name, str) for name in names):
            raise TypeError(f"A route needs a channel name or a list of them (got {channels!r}).")
        self.channels = set(names)
        self.consumer = _resolve_consumer(consumer, f"route({channels!r})")
        _require_known_keys(self.channels, filters, f"route({channels!r})")
        self.filters = _compile_filters(filters, f"route {channels!r}")

    def _find(self, channel: str, content: Any, partial: bool = False) -> tuple[Route, dict] | None:
        if channel not in self.channels:
            return None
        result = _match_filters(self.filters, content, partial)
        return None if result is None else (self, result[0])

    def __repr__(self) -> str:
        names = sorted(self.channels)
        shown = names[0] if len(names) == 1 else names
        return f"route({shown!r}, {_consumer_label(self.consumer)}{_filters_repr(self.filters)})"


class RouteClass(Route):
    """Routes every channel a consumer class lists in ``channel_names()`` to that class."""

    def __init__(self, consumer: Any, **filters: Any):
        consumer = _resolve_consumer(consumer, "route_class()")
        names_of = getattr(consumer, "channel_names", None)
        if names_of is None:
            raise ValueError(f"route_class() needs a class with a channel_names() method "
                             f"(got {consumer!r}). Subclass BaseConsumer.")
        channels = sorted(names_of())
        if not channels:
            raise ValueError(f"{_consumer_label(consumer)}.channel_names() lists no channel; "
                             f"fill its method_mapping.")
        super().__init__(channels, consumer, **filters)

    def __repr__(self) -> str:
        return f"route_class({_consumer_label(self.consumer)}{_filters_repr(self.filters)})"


class Include(_Matcher):
    """Nests a routing under prefixes: each prefix regex must match the start of its key.

    The matched part is cut off before the inner routes see the value, so
    ``include("chat.routing", path=r"^/chat")`` lets inner routes match ``r"^/room/$"``.
    The consumer still receives the original message.
    """

    def __init__(self, routing: Any, **prefixes: Any):
        self.router = Router(routing)
        self.channels = self.router.channels
        self.prefixes = _compile_filters(prefixes, "include()")

    def _find(self, channel: str, content: Any, partial: bool = False) -> tuple[Route, dict] | None:
        if channel not in self.channels:
            return None
        result = _match_filters(self.prefixes, content, partial)
        if result is None:
            return None
        kwargs, matched = result
        stripped = {**content, **{key: found.string[found.end():] for key, found in matched.items()}}
        inner = self.router._find(channel, stripped, partial)
        return None if inner is None else (inner[0], {**kwargs, **inner[1]})  # the inner route's names win

    def __repr__(self) -> str:
        return f"include({self.router.routes!r}{_filters_repr(self.prefixes)})"


route = Route
route_class = RouteClass
include = Include


class Router(_Matcher):
    """A routing table: ``match(message)`` returns ``(consumer, kwargs)`` or ``None``.

    *routing* is a list of routes (``route``/``route_class``/``include``), a dict
    ``{channel: consumer}``, or the dotted path of either.
    """

    def __init__(self, routing: Any):
        if isinstance(routing, Router):
            routing = routing.routes
        if isinstance(routing, str):
            routing = _import_by_path(routing, "Channel routing")
        self.routes: list[Route | Include] = list(_expand_routing(routing))
        self.channels: set[str] = set().union(*(r.channels for r in self.routes))

    def _find(self, channel: str, content: Any, partial: bool = False) -> tuple[Route, dict] | None:
        for entry in self.routes:
            result = entry._find(channel, content, partial)
            if result is not None:
                return result
        return None

    def __repr__(self) -> str:
        return "Router([\n" + "".join(f"    {entry!r},\n" for entry in self.routes) + "])"


def _expand_routing(routing: Any) -> Iterable[Route | Include]:
    if isinstance(routing, dict):
        for channel, consumer in routing.items():
            yield Route(channel, consumer)
    elif isinstance(routing, (list, tuple)):
        for entry in routing:
            if isinstance(entry, (Route, Include)):
                yield entry
            elif isinstance(entry, (list, tuple, dict)):
                yield from _expand_routing(entry)
            else:
                raise TypeError(f"Routing entries must be route(), route_class() or include() "
                                f"(got {entry!r}).")
    else:
        raise TypeError(f"A routing is a list of routes, a dict {{channel: consumer}} or a "
                        f"dotted path to one (got {type(routing).__name__} {routing!r}).")


def _resolve_consumer(consumer: Any, where: str) -> Any:
    if isinstance(consumer, str):
        consumer = _import_by_path(consumer, f"Consumer for {where}")
    if not callable(consumer):
        raise TypeError(f"Consumer for {where} must be callable or a dotted path "
                        f"(got {consumer!r}).")
    return consumer


# === 4. Consumers ===
# A consumer is user code called as `consumer(message, **kwargs)`. The classes re-create
# Channels 1.x's generic consumers on top of `BaseConsumer`, which dispatches each message
# to a method by `method_mapping`; sync and async methods mix freely in one class (each runs
# through `_run_handler`). `_handle_message` runs one message: route, consumer, then its
# deferred sends.

class BaseConsumer:
    """A class-based consumer: one instance per message, dispatched by ``method_mapping``.

    ``method_mapping = {"websocket.receive": "on_frame"}`` sends ``websocket.receive``
    messages to ``self.on_frame(message, **kwargs)``. Methods may be sync or ``async def``.
    As in Channels 1.x, ``Cls(message, **kwargs)`` dispatches at once (from sync code);
    routing builds the instance without ``__init__`` and awaits ``dispatch()`` instead."""

    #: Which method handles each channel: ``{channel name: method name}``.
    method_mapping: dict[str, str] = {}

    def __init__(self, message: Message, **kwargs: Any):
        self.message = message
        self.kwargs = kwargs
        try:
            async_to_sync(self.dispatch)()
        except RuntimeError as error:
            if "event loop" not in str(error):
                raise
            raise RuntimeError(
                f"{type(self).__name__}(message) dispatches synchronously, so it cannot be "
                f"called on a running event loop ({error}). Route the class, or call it from "
                f"sync code (e.g. through sync_to_async).") from None

    @classmethod
    def _instance(cls, message: Message, kwargs: dict) -> BaseConsumer:
        """An instance for routing, which awaits ``dispatch()`` (``__init__`` dispatches at once)."""
        consumer = cls.__new__(cls)
        consumer.message, consumer.kwargs = message, kwargs
        return consumer

    async def dispatch(self) -> None:
        """Call the method that ``method_mapping`` names for this message's channel."""
        for hook in _hooks.message:  # what the message carries: sessions, the user (Part II)
            if (loading := hook(self)) is not None:
                await loading
        channel = self.message.channel_name
        name = self.method_mapping.get(channel)
        if name is None:
            raise ValueError(f"{type(self).__name__} has no method for channel {channel!r}: its "
                             f"method_mapping is {self.method_mapping!r}. Add the channel, or route "
                             f"only the channels it lists.")
        await _run_handler(getattr(self, name), self.message, **self.kwargs)

    @classmethod
    def channel_names(cls) -> set[str]:
        """The channels this class handles (the keys of ``method_mapping``)."""
        return set(cls.method_mapping)

    @classmethod
    def as_route(cls, attrs: dict | None = None, **filters: Any) -> RouteClass:
        """A route to this class -- or, with *attrs*, to a subclass with those attributes set."""
        if attrs is not None:
            if not isinstance(attrs, dict):
                raise TypeError(f"as_route(attrs=...) takes a dict of class attributes "
                                f"(got {type(attrs).__name__} {attrs!r}).")
            names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
            cls = type(cls.__name__, (cls,), {**names, **attrs})
        return RouteClass(cls, **filters)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} channel={self.message.channel_name!r} kwargs={self.kwargs!r}>"


def _frame(text: str | None = None, bytes: bytes | None = None, close: bool | int = False) -> dict:
    """The reply-channel message for one outgoing frame (and/or a close)."""
    if text is not None and bytes is not None:
        raise ValueError("Send either text or bytes in one frame, not both.")
    reply: dict[str, Any] = {}
    if text is not None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str (got {type(text).__name__} {text!r:.80}). "
                            f"To send JSON, pass text=json.dumps(...) or use "
                            f"JsonWebsocketConsumer, whose send() takes the content itself.")
        reply["text"] = text
    elif bytes is not None:
        reply["bytes"] = bytes
    if close:
        reply["close"] = close
    if not reply:
        raise ValueError("Nothing to send: pass text=, bytes= or close=.")
    return reply


class WebsocketConsumer(BaseConsumer):
    """A WebSocket endpoint: override ``connect``, ``receive`` and ``disconnect``.

    ``groups`` (or ``connection_groups(**kwargs)``) are joined before ``connect()`` and
    left before ``disconnect()``, so a chat room is two lines::

        class Room(WebsocketConsumer):
            def connection_groups(self, room, **kwargs):
                return [f"room-{room}"]

            def receive(self, text=None, bytes=None, room=None, **kwargs):
                self.group_send(f"room-{room}", text=text)
    """

    method_mapping = {"websocket.connect": "raw_connect", "websocket.receive": "raw_receive",
                      "websocket.disconnect": "raw_disconnect"}
    #: Groups every socket of this consumer joins on connect.
    groups: list[str] | None = None
    #: Accepted for Channels 1.x code; messages of one socket are always handled in order.
    strict_ordering = False

    @property
    def path(self) -> str:
        """The socket's URL path, e.g. ``"/chat/lobby/"``."""
        return self.message["path"]

    def connection_groups(self, **kwargs: Any) -> list[str]:
        """The groups to join on connect and leave on disconnect (default: ``groups``)."""
        return list(self.groups or ())

    # -- what the router calls --

    async def raw_connect(self, message: Message, **kwargs: Any) -> None:
        """Join the connection groups, then call ``connect``."""
        # The default reads ``groups``: no worker thread (they may all be busy) is needed for that.
        overridden = type(self).connection_groups is not WebsocketConsumer.connection_groups
        names = await _run_handler(self.connection_groups, **kwargs) if overridden else self.groups
        for name in names or ():
            await Group(name, channel_layer=message.channel_layer).aadd(message.reply_channel)
        await _run_handler(self.connect, message, **kwargs)
        for hook in _hooks.connected:  # e.g. presence tracks the socket (Part II)
            await hook(self, kwargs)

    async def raw_receive(self, message: Message, **kwargs: Any) -> None:
        text = message.get("text")
        frame = {"text": text} if text is not None else {"bytes": message.get("bytes")}
        await _run_handler(self.receive, **frame, **kwargs)

    async def raw_disconnect(self, message: Message, **kwargs: Any) -> None:
        """Call ``disconnect``: the connection has already left every group it joined."""
        await _run_handler(self.disconnect, message, **kwargs)

    # -- what you override --

    def connect(self, message: Message, **kwargs: Any) -> None:
        """Called on the handshake; accepts by default. Raise ``DenyConnection`` to reject."""
        self.message.reply_channel.send({"accept": True})

    def receive(self, text: str | None = None, bytes: bytes | None = None, **kwargs: Any) -> None:
        """Called for each frame, with its ``text`` or ``bytes``."""

    def disconnect(self, message: Message, **kwargs: Any) -> None:
        """Called once the socket has closed; ``message["code"]`` is the close code."""

    # -- what you call --

    def send(self, text: str | None = None, bytes: bytes | None = None, close: bool | int = False) -> None:
        """Send a frame to this socket; ``close=True`` (or a code) closes it after the frame."""
        self.message.reply_channel.send(_frame(text, bytes, close))

    def close(self, status: bool | int = True) -> None:
        """Close this socket: ``True`` for code 1000, or a close code."""
        self.message.reply_channel.send({"close": status})

    @classmethod
    def group_send(cls, name: str, text: str | None = None, bytes: bytes | None = None,
                   close: bool | int = False) -> None:
        """Send a frame to every socket in group *name*."""
        Group(name).send(_frame(text, bytes, close))


# -- running one message --

async def _handle_message(router: Router, layer: Any, message: Message, results: list | None = None) -> bool:
    """Route *message* and run its consumer, then send what it deferred; False if unrouted.
    *results* gets the consumer's instance (a class) or return value (a function)."""
    matched = router._find(message.channel_name, message.content)
    if matched is None:
        return False
    route, kwargs = matched
    async with consumer_context(layer) as state:  # its exit sends what the handler deferred
        try:
            if isinstance(route.consumer, type) and issubclass(route.consumer, BaseConsumer):
                result = route.consumer._instance(message, kwargs)  # one per message
                await result.dispatch()
            else:
                result = await _run_handler(route.consumer, message, **kwargs)
            if results is not None:  # the 1.x test client returns it
                results.append(result)
        except DenyConnection:
            # A rejection wins over an accept the handler queued before raising.
            state.deferred = [op for op in state.deferred if not (
                op[0] == "send" and op[2][0] == message.get("reply_channel"))]
            raise
        except ChannelSocketException as error:
            error.run(message)  # e.g. WebsocketCloseException: close with its code
        finally:
            for hook in _hooks.handled:  # e.g. sessions saved, before the sends (Part II)
                if (saving := hook(message)) is not None:
                    await saving
    return True


# === 5. Binding ===
# Data binding re-creates the Channels 1.x feature that 2.0 removed: a `Binding` watches
# one model through Django's save/delete signals and sends each change to groups; a
# `WebsocketBinding` sends it as a text frame on a stream. Changes leave only when their
# transaction commits (Channels 1.x sent them at once). Writes back from clients are
# section 10's.

_bindings: list[type[Binding]] = _module_state([])  # every binding class, in definition order
_module_bindings: list[type[Binding]] = []  # those defined at module level: a reset keeps them
_SHOWN_CHARACTERS = 200  # of a client's value, in an answer or a log line: enough to recognise it
_send_failure_lock = threading.Lock()


class Binding:
    """Sends a model's saves and deletes to groups, as ``{"stream", "payload"}`` messages.

    Subclass it with ``model``, ``stream`` and ``fields`` (or ``exclude``), and say which
    groups hear about an instance::

        class OrderBinding(WebsocketBinding):
            model = "shop.Order"
            stream = "orders"
            fields = ["status", "total"]

            @classmethod
            def group_names(cls, instance):
                return [f"customer-{instance.customer_id}"]

    The class works as soon as it is defined. ``model = None`` makes an abstract binding.

    An invalid group name refuses a save inside a transaction before it commits; a change not
    sent after the commit is logged and counted in ``Binding.send_failures``: the save stands.
    Writes from clients (``consumer``, ``has_permission``, ``clean_data``) are section 10's.
    """

    #: The model class, or its ``"app_label.ModelName"`` label.
    model: Any = None
    #: The stream name clients see in each frame.
    stream: str | None = None
    #: Fields to send and accept, or ``"__all__"``; give this or ``exclude``.
    fields: list[str] | str | None = None
    #: Fields never sent nor accepted; the others are.
    exclude: list[str] | None = None
    #: Changes this process could not send after their transaction committed (read-only).
    send_failures: int = 0

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if cls.model is None:
            return
        if (cls.fields is None) == (cls.exclude is None):
            raise ImproperlyConfigured(
                f"{cls.__name__} must set exactly one of 'fields' or 'exclude' (got "
                f"fields={cls.fields!r}, exclude={cls.exclude!r}). Use fields = "
                f"['__all__'] to bind every field.")
        _connect_model_signals()  # once: the receivers have a dispatch_uid
        _bindings.append(cls)
        if "<locals>" not in cls.__qualname__:
            _module_bindings.append(cls)

    # -- outbound: what you override --

    @classmethod
    def group_names(cls, instance: Any) -> list[str]:
        """The groups that hear about *instance*."""
        return []

    def serialize(self, instance: Any, action: str) -> dict:
        """The payload sent for *action* on *instance*; return ``{}`` to send nothing.

        A ``delete`` to the groups a row leaves gets the row as stored before the change.
        """
        return {"action": action, "pk": _json_pk(instance), "data": self.serialize_data(instance),
                "model": instance._meta.label_lower}

    def serialize_data(self, instance: Any) -> dict:
        """The bound fields of *instance*, written as Django's JSON serializer writes them."""
        from django.core import serializers
        return json.loads(serializers.serialize("json", [instance], fields=self._field_names()))[0]["fields"]

    @classmethod
    def encode(cls, stream: str, payload: dict) -> dict:
        """The message sent to groups for one change."""
        return {"stream": stream, "payload": payload}

    # -- helpers --

    @classmethod
    def model_class(cls) -> Any:
        """The bound model class (a label is looked up in Django's app registry)."""
        if isinstance(cls.model, str):
            from django.apps import apps
            return apps.get_model(cls.model)
        return cls.model

    @classmethod
    def _field_names(cls) -> list[str] | None:
        """Bound field names; None means all of them."""
        if cls.fields is not None:
            return None if cls.fields in ("__all__", ["__all__"]) else list(cls.fields)
        meta = cls.model_class()._meta
        return [f.name for f in (*meta.concrete_fields, *meta.many_to_many)
                if f.name not in cls.exclude and not f.primary_key]

    @classmethod
    def _announce(cls, instance: Any, stored: Any, before: list[str], after: list[str],
                  using: str) -> None:
        """Queue, for commit time, delete (of the *stored* row) / update / create to the
        groups left / kept / joined: a group left never sees the new contents."""
        from django.db import transaction

        binding = cls()
        messages = []
        for action, names, row in (("delete", [g for g in before if g not in after], stored),
                                   ("update", [g for g in before if g in after], instance),
                                   ("create", [g for g in after if g not in before], instance)):
            payload = binding.serialize(row, action) if names else None
            if payload:
                message = cls.encode(cls.stream, payload)
                messages += [(group, message) for group in cls._groups_checked(names, using)]
        if messages and _inside_test_transaction.get():  # it never commits: send now, as 1.x did
            cls._send_to_groups(messages)
        elif messages:
            transaction.on_commit(functools.partial(cls._send_to_groups, messages), using=using)

    @classmethod
    def _groups_checked(cls, names: list[str], using: str) -> list[Group]:
        """*names* as groups, checked now, while a save with a bad name can still roll back."""
        from django.db import transaction

        groups = []
        for name in names:
            try:
                groups.append(Group(name))
            except (TypeError, ValueError) as error:
                if transaction.get_connection(using).in_atomic_block:
                    raise  # the transaction rolls back: nothing is saved and the caller hears why
                _report_send_failure(cls, name, error)  # autocommit: the row is already stored
        return groups

    @classmethod
    def _send_to_groups(cls, messages: list[tuple[Group, dict]]) -> None:
        for group, message in messages:
            # Sent now, not when a consumer's handler returns, so that a failure is met here;
            # and caught whatever it is: after COMMIT, raising would call a stored save failed.
            try:
                group.send(message, immediately=True)
            except Exception as error:
                _report_send_failure(cls, group.name, error)


def _stream_frame(stream: str, payload: Any, encode_json: Callable[[Any], str] | None = None) -> dict:
    """One message on a stream of a multiplexed socket, as Channels 1.x framed it; the default
    *encode_json* is Django's encoder, so the dates, Decimals and UUIDs of a custom ``serialize()`` pass."""
    from django.core.serializers.json import DjangoJSONEncoder

    encode_json = encode_json or functools.partial(json.dumps, cls=DjangoJSONEncoder)
    return {"text": encode_json({"stream": stream, "payload": payload})}


class WebsocketBinding(Binding):
    """A ``Binding`` whose messages are text frames on a ``WebsocketDemultiplexer`` stream."""

    @classmethod
    def encode(cls, stream: str, payload: dict) -> dict:
        return _stream_frame(stream, payload)


def _json_pk(instance: Any) -> Any:
    """The primary key as Django's serializers write it: numbers and strings as they are,
    anything else (a UUID, say) as its string form."""
    field = instance._meta.pk
    value = field.value_from_object(instance)
    return value if value is None or isinstance(value, (int, str)) else field.value_to_string(instance)


def _clip(text: str, limit: int = _SHOWN_CHARACTERS) -> str:
    """*text* on one line and cut to *limit* characters, saying how long it was."""
    text = text.replace("\n", " ")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _shown(value: Any) -> str:
    """A client's value as an answer or a log line shows it: its repr, cut short."""
    return _clip(repr(value))


def _report_send_failure(binding: type[Binding], group: str, error: Exception) -> None:
    """Count a change not sent after its commit; log each kind of failure at most every 10 s."""
    with _send_failure_lock:
        Binding.send_failures += 1
    _log_limited(logging.ERROR, "%s could not send a change to group %s after its transaction "
                 "committed; the save stands. %s: %s ({held} such failure(s) since the last "
                 "report; %d in all, see Binding.send_failures.)",
                 binding.__name__, _shown(group), _error_kind(error),
                 _clip(str(error), 5 * _SHOWN_CHARACTERS), Binding.send_failures,
                 key=f"binding send failure {_error_kind(error)}", every=10.0, burst=1)


def _connect_model_signals() -> None:
    # Connected for every sender: a binding may name its model before the app registry
    # can turn the label into a class.
    from django.db.models import signals

    for signal, receiver in ((signals.pre_save, _before_save), (signals.post_save, _after_save),
                             (signals.pre_delete, _before_delete), (signals.post_delete, _after_delete)):
        signal.connect(receiver, weak=False, dispatch_uid=f"{__name__}.{receiver.__name__}")


def _bindings_for(model: Any) -> list[type[Binding]]:
    label = model._meta.label_lower
    return [b for b in _bindings
            if b.model is model or (isinstance(b.model, str) and b.model.lower() == label)]


# Each signal pair hands its "before" on through the instance: {binding: (stored row, groups)}.

def _before_save(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    bindings = _bindings_for(sender)
    if not bindings:
        return
    stored = None
    if instance.pk is not None:
        stored = sender._base_manager.using(using).filter(pk=instance.pk).first()  # as Django does
    instance._binding_before = {
        b: (stored, list(b.group_names(stored)) if stored is not None else []) for b in bindings}


def _after_save(sender: Any, instance: Any, created: bool, using: str, **kwargs: Any) -> None:
    before_by_binding = instance.__dict__.pop("_binding_before", {})
    for binding in _bindings_for(sender):
        stored, before = (None, []) if created else before_by_binding.get(binding, (None, []))
        binding._announce(instance, stored, before, list(binding.group_names(instance)), using)


def _before_delete(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    bindings = _bindings_for(sender)
    if bindings:
        instance._binding_before = {b: (instance, list(b.group_names(instance))) for b in bindings}


def _after_delete(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
    before_by_binding = instance.__dict__.pop("_binding_before", {})
    for binding in _bindings_for(sender):
        stored, before = before_by_binding.get(binding, (None, []))
        binding._announce(instance, stored, before, [], using)


# === 6. Connection ===
# One websocket, as Channels 1.x's interface server saw it. *In*: the server's ASGI events
# become the messages `websocket.connect` / `receive` / `disconnect`, handled one at a time,
# in order, with a turn for the other sockets after each. *Out*: whatever is sent to the reply
# channel -- by its handlers, group sends, other sockets, threads, views -- waits in one outbox,
# in this process's memory whatever the layer, and leaves through `_deliver`. `_Connection` is
# the part a routed HTTP request shares (section 12).

def _connect_message(scope: Scope, reply_channel: str) -> dict:
    return {"reply_channel": reply_channel, "path": scope.get("path", ""),
            "query_string": scope.get("query_string", b""), "headers": scope.get("headers", []),
            "client": scope.get("client"), "server": scope.get("server"),
            "subprotocols": scope.get("subprotocols", []), "order": 0}


def _receive_message(reply_channel: str, path: str, order: int, event: dict) -> dict:
    if event.get("text") is not None:
        return {"reply_channel": reply_channel, "path": path, "order": order, "text": event["text"]}
    return {"reply_channel": reply_channel, "path": path, "order": order, "bytes": event.get("bytes") or b""}


def _frame_size(event: dict) -> int:
    text = event.get("text")
    if text is not None:
        return len(text) if text.isascii() else len(text.encode("utf-8"))
    return len(event.get("bytes") or b"")


class _Connection:
    """What every connection shares: a reply channel, its outbox, and the one way out.

    A subclass says how requests come in (`_run`), how one reply becomes ASGI events
    (`_deliver`) and how to end at once when a reply cannot be delivered (`_abort`);
    everything sent to the reply channel reaches `_deliver` through `_write`."""

    kind = "connection"  # the reply channel's prefix
    what = "connection"  # its name in log lines

    def __init__(self, scope: Scope, send: Send, router: Router, layer: Any):
        self.scope, self._send, self.router, self.layer = scope, send, router, layer
        self.path: str = scope.get("path", "")
        self.outbox = layer  # the reply channel's queue; an opened hook may move it (a shared layer)
        self.reply_channel = ""
        self.closed = False  # nothing more reaches the client
        self.closing = False  # a close is queued: what comes in from now on is dropped
        self.shared: dict = {}  # what every message of the connection carries (the http user)
        self.groups: set[str] = set()  # joined through connection_groups or Group.add

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} {self.reply_channel} closed={self.closed}>"

    async def serve(self, receive: Receive) -> None:
        """Serve the connection until the client or a consumer ends it."""
        # channels_redis reads each prefix of process-local channels with its own blocking
        # read, one at a time: with a shared layer, one prefix keeps replies from waiting.
        prefix = self.kind if isinstance(self.layer, InMemoryChannelLayer) else "websocket.send"
        self.reply_channel = await self.layer.new_channel(prefix)
        self.loop = asyncio.get_running_loop()
        tasks = [task for hook in _hooks.opened if (task := hook(self))]  # e.g. a shared layer's listener
        _local_sockets[self.reply_channel] = self
        tasks.append(asyncio.create_task(self._write()))
        try:
            await self._run(receive)
        finally:  # the client is gone (also when serving stopped without a disconnect event)
            self.closed = True
            await self._leave_groups()
            for hook in _hooks.closed:  # extensions let go of what it held: presence, sessions (Part II)
                await hook(self)
            del _local_sockets[self.reply_channel]
            for task in tasks:  # the writer: an in-memory receive is safe to cancel
                await _cancel_and_wait(task)
            self.outbox.discard_channel(self.reply_channel, gone=True)  # later sends: dropped quietly

    def _message(self, channel: str, content: dict) -> Message:
        message = Message(content, channel, self.layer)
        message.scope, message._socket_state = self.scope, self.shared
        return message

    def _queue(self, reply: dict) -> None:
        self.outbox.send_now(self.reply_channel, reply)

    def _queue_close(self, code: int) -> None:
        """Close behind whatever is already queued, so those replies still arrive."""
        if self.closing or self.closed:
            return
        self.closing = True
        try:
            self._queue({"close": code})
        except ChannelFull:  # its client stopped reading: what waits would never leave
            self.outbox.discard_channel(self.reply_channel)
            self._queue({"close": code})

    async def _write(self) -> None:
        """The one way out: each message of the outbox, in order, to `_deliver`."""
        while True:
            reply = await self.outbox.receive(self.reply_channel)
            try:
                for hook in _hooks.reply:  # e.g. history drops a duplicate, fills a gap first (Part II)
                    if (delivering := hook(self, reply)) is not None:
                        break
                else:
                    delivering = self._deliver(reply)
                await delivering
            except Exception:  # a malformed reply: that connection ends
                logger.exception("Cannot send reply %.200r to %s %.200s; closing it.",
                                 reply, self.what, self.path)
                await self._abort()

    async def _emit(self, event: dict) -> None:
        try:
            await self._send(event)
        except OSError:  # the client went away; its disconnect event follows
            self.closed = True

    async def _leave_groups(self) -> None:
        """Leave every group the connection joined, through connection_groups or Group.add."""
        for group in list(self.groups):
            try:
                await self.layer.group_discard(group, self.reply_channel)
            except Exception:
                _log_limited(logging.ERROR, "Cannot remove %s %s from group %r on the channel layer; "
                                   "the layer's group_expiry will.", self.what, self.path, group, **_OUTAGE)
        self.groups.clear()


# -- websockets --

class _WebsocketConnection(_Connection):
    """One websocket: its frames in as messages, its outbox out as frames."""

    kind, what = "websocket.send", "websocket"

    def __init__(self, scope: Scope, send: Send, router: Router, layer: Any, max_message_size: int):
        super().__init__(scope, send, router, layer)
        self.max_message_size = max_message_size
        self.order = 0
        self.accepted = False

    # frames in

    async def _run(self, receive: Receive) -> None:
        await self._connect()
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                self.closed = True
                self.order += 1
                await self._leave_groups()  # before disconnect(), as connection_groups promise
                await self._handle("websocket.disconnect", {
                    "reply_channel": self.reply_channel, "path": self.path, "order": self.order,
                    "code": event.get("code", 1000)})
                return
            if event["type"] == "websocket.receive" and not self.closing and not self.closed:
                if _frame_size(event) > self.max_message_size:
                    _log_limited(logging.WARNING, "Closing websocket %.200s with 1009: a frame of %d "
                                 "bytes exceeds max_message_size=%d.", self.path,
                                 _frame_size(event), self.max_message_size)
                    self._queue_close(1009)
                else:
                    self.order += 1
                    await self._handle("websocket.receive", _receive_message(
                        self.reply_channel, self.path, self.order, event))
            await asyncio.sleep(0)  # a turn for every other socket, however fast this one sends

    async def _connect(self) -> None:
        content = _connect_message(self.scope, self.reply_channel)
        if await self._handle("websocket.connect", content):
            return
        if self.router._find("websocket.receive", content, partial=True) is not None:
            self._queue({"accept": True})  # Channels 1.x: frames are routed, so accept
        else:
            _log_limited(logging.WARNING, "Rejected websocket to %.200s: no route for websocket.connect or "
                                 "websocket.receive matches that path.", self.path)
            self._queue_close(1000)

    async def _handle(self, channel: str, content: dict) -> bool:
        """Run the consumer for one message; a failure closes the socket. False if unrouted."""
        try:
            return await _handle_message(self.router, self.layer, self._message(channel, content))
        except DenyConnection:
            if channel == "websocket.connect":
                self._queue_close(1000)  # before any accept: the client gets HTTP 403
                return True
            logger.error("DenyConnection raised while handling %s on %.200s: it only rejects "
                         "in websocket.connect. Closing that socket with 1011.", channel, self.path)
        except Exception as error:
            # On connect, a close before the accept is a refused handshake.
            ending = (", or refusing its handshake (HTTP 403) if not accepted yet."
                      if channel == "websocket.connect" else ".")
            if isinstance(error, _InvalidName):  # a name built from the URL or a frame, most often
                _log_limited(logging.WARNING, "Consumer failed on %s for %.200s (order %s): %s Closing that "
                             "socket with 1011%s", channel, self.path, content.get("order"), error, ending)
            else:
                logger.exception("Consumer failed on %s for %.200s (order %s); closing that socket with "
                                 "1011%s", channel, self.path, content.get("order"), ending)
        self._queue_close(1011)
        return True

    # messages out

    async def _deliver(self, reply: dict) -> None:
        """Turn one reply-channel message into ASGI events (SPEC section 2, replies)."""
        if self.closed:
            return
        if "accept" in reply:
            if not reply["accept"]:
                return await self._close(1000)
            if not self.accepted:
                await self._accept(reply.get("subprotocol"))
        for key, kind in (("text", str), ("bytes", bytes)):
            if key in reply:
                if not isinstance(reply[key], kind):
                    logger.error("Reply on %s has %r of type %s; it must be %s. Not sent.",
                                 self.reply_channel, key, type(reply[key]).__name__, kind.__name__)
                    continue
                if not self.accepted:
                    await self._accept(None)
                await self._emit({"type": "websocket.send", key: reply[key]})
        close = reply.get("close")
        if close:
            if close is not True and not isinstance(close, int):
                raise TypeError(f"'close' must be True or a close code int (got {close!r}).")
            await self._close(1000 if close is True else close)

    async def _abort(self) -> None:
        await self._close(1011)

    async def _accept(self, subprotocol: str | None) -> None:
        self.accepted = True
        await self._emit({"type": "websocket.accept", "subprotocol": subprotocol})

    async def _close(self, code: int) -> None:
        """Close (or, before accepting, reject with HTTP 403) -- once."""
        if not self.closed:
            self.closed = True
            await self._emit({"type": "websocket.close", "code": code})


async def _cancel_and_wait(task: asyncio.Task, interval: float = 0.1) -> None:
    """Cancel *task* until it ends: a layer client (redis-py) can swallow one cancel."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=interval)


# === 7. ASGI app ===
# `Application` is what the server calls. A websocket scope whose origin is allowed gets a
# `_WebsocketConnection`; HTTP goes to Django (or to an extension's connection, section 12).
# Routed channels that are not `websocket.*`/`http.*` are consumed from the layer
# by background worker tasks, in the server process or in `runworker` processes.

_DEV_HOSTS = [".localhost", "127.0.0.1", "[::1]"]  # what Django allows when DEBUG has none
_DEFAULT_PORTS = {"http": "80", "ws": "80", "https": "443", "wss": "443"}


class Application:
    """The ASGI 3 application: websockets through *routing*, HTTP through Django.

    ``application = Application(channel_routing)`` in ``asgi.py``, then
    ``uvicorn mysite.asgi:application``. ``http`` replaces Django's ASGI handler;
    ``channel_layer`` replaces ``get_channel_layer()``; ``allowed_origins`` replaces
    ``ALLOWED_HOSTS`` for websocket ``Origin`` checks (same patterns, ``"*"`` for any,
    ``"null"`` to allow the ``null`` origin); larger frames than ``max_message_size``
    bytes close the socket with 1009. A routed ``http.request`` that nobody answers within
    ``http_timeout`` seconds gets 504.
    """

    def __init__(self, routing: Any, *, http: ASGIApp | None = None, channel_layer: Any = None,
                 allowed_origins: list[str] | None = None, max_message_size: int = 1_048_576,
                 http_timeout: float = 60):
        self.router = Router(routing) if routing is not None else None
        self.http = http
        self.http_timeout = http_timeout
        self._channel_layer = channel_layer
        self.allowed_origins = allowed_origins
        self.max_message_size = max_message_size
        self._workers: _BackgroundWorkers | None = None

    def __repr__(self) -> str:
        routes = len(self.router.routes) if self.router is not None else "from settings"
        return f"<Application routes={routes} layer={self._channel_layer!r}>"

    @property
    def channel_layer(self) -> Any:
        if self._channel_layer is None:
            self._channel_layer = get_channel_layer()
        return self._channel_layer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            return await self._lifespan(receive, send)
        self._prepare()
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http_request(scope, receive, send)
        else:
            raise ValueError(f"Application cannot serve ASGI scope type {kind!r}; it serves "
                             f"'websocket', 'http' and 'lifespan'.")

    # -- start-up and shut-down --

    def _prepare(self) -> None:
        """Load the routing (module-level ``application``) and start workers, once per loop."""
        if self.router is None:
            self.router = Router(_routing_from_settings())
        if self._workers is None or self._workers.loop is not asyncio.get_running_loop():
            for hook in _hooks.layer:  # a layer given to the app, not built from settings
                hook(self.channel_layer)
            self._workers = _BackgroundWorkers(self, _background_channels(self.router))
            self._workers.start(serving=True)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                try:
                    self._prepare()
                except Exception as error:
                    logger.exception("Application failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self._workers is not None:
                    await self._workers.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- HTTP and websockets --

    async def _http_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        """HTTP goes to Django, unless an extension serves it (routed ``http.request``)."""
        for hook in _hooks.http:
            connection = hook(self, scope, send)
            if connection is not None:
                return await connection.serve(receive)
        if self.http is None:  # Django's handler; without settings, a 404 for every request
            if _settings_ready():
                from django.core.asgi import get_asgi_application
                self.http = get_asgi_application()
            else:
                self.http = _not_found
        await self.http(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        origin = next((value.decode("latin-1") for name, value in scope.get("headers", ())
                       if name.lower() == b"origin"), None)
        if not self.origin_allowed(origin):
            _log_limited(logging.WARNING, "Rejected websocket to %.200s from origin %.200r: not in the "
                         "allowed origins (ALLOWED_HOSTS or allowed_origins).", scope.get("path"), origin)
            await send({"type": "websocket.close", "code": 1008})  # 403 before accepting
            return
        connection = _WebsocketConnection(scope, send, self.router, self.channel_layer,
                                          self.max_message_size)
        await connection.serve(receive)

    def origin_allowed(self, origin: str | None) -> bool:
        """Is a handshake with this ``Origin`` header value allowed? (None: no header.)"""
        if origin is None:
            return True
        patterns = self.allowed_origins
        if patterns is None:
            from django.conf import settings
            ready = _settings_ready()
            patterns = list(settings.ALLOWED_HOSTS) if ready else []
            if not patterns and (not ready or settings.DEBUG):
                patterns = _DEV_HOSTS
        return _origin_matches(origin, patterns)


def _background_channels(router: Router) -> list[str]:
    """The routed channels consumed from the layer: all but ``websocket.*`` and ``http.*``."""
    return sorted(c for c in router.channels if not c.startswith(("websocket.", "http.")))


def _routing_from_settings() -> Any:
    import django
    from django.apps import apps
    from django.conf import settings

    if not apps.ready:
        django.setup(set_prefix=False)
    routing = getattr(settings, "CHANNEL_ROUTING", None)
    if routing is None:  # Channels 1.x kept it in the layer's settings
        routing = (getattr(settings, "CHANNEL_LAYERS", None) or {}).get("default", {}).get("ROUTING")
    if routing is None:
        raise ImproperlyConfigured(
            "settings.CHANNEL_ROUTING is not set (nor CHANNEL_LAYERS['default']['ROUTING'], as "
            "in Channels 1.x), so the module-level 'application' has no routes. Set it to a "
            "routing list or its dotted path, e.g. CHANNEL_ROUTING = 'mysite.routing.channel_routing'.")
    return routing


def _origin_matches(origin: str, patterns: Iterable[str]) -> bool:
    from django.http.request import split_domain_port
    from django.utils.http import is_same_domain

    patterns = list(patterns)
    if origin == "null":  # sandboxed frames and file:// pages: never by a wildcard
        return "null" in patterns
    parts = urlsplit(origin)
    host, port = split_domain_port(parts.netloc)
    if parts.scheme not in _DEFAULT_PORTS or not host:
        return False
    port = port or _DEFAULT_PORTS[parts.scheme]
    for pattern in patterns:
        if pattern == "*":
            return True
        scheme, _, rest = pattern.rpartition("://")
        pattern_host, pattern_port = split_domain_port(rest) if rest != "null" else ("", "")
        if (pattern_host and (not scheme or scheme == parts.scheme)
                and (not pattern_port or pattern_port == port)
                and is_same_domain(host, pattern_host)):
            return True
    return False


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """The HTTP app when Django is not configured: every request is a 404."""
    body = b"Not found: this server has no HTTP application (Django settings are not configured)."
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": body})


class _BackgroundWorkers:
    """One task per background channel, receiving from the layer and running consumers."""

    def __init__(self, app: Application, channels: list[str]):
        self.app = app
        self.channels = channels
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._idle: set[asyncio.Task] = set()  # waiting for a message: safe to cancel
        self._stopping = False

    def start(self, serving: bool = False) -> None:
        """Start the workers; a server also starts what the extensions run while it serves."""
        self.loop = asyncio.get_running_loop()
        self._tasks = [self.loop.create_task(self._consume(channel)) for channel in self.channels]
        if serving:  # e.g. heartbeats and checks of what the served connections hold (Part II)
            keepers = [keeper for hook in _hooks.serving if (keeper := hook(self.app)) is not None]
            self._idle.update(self.loop.create_task(keeper) for keeper in keepers)  # stop cancels

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop receiving; a message in hand is finished (up to *timeout* seconds)."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        await asyncio.gather(*(_cancel_and_wait(task) for task in list(self._idle)))
        busy = [task for task in self._tasks if not task.done()]
        if busy:
            await asyncio.wait(busy, timeout=max(0.0, deadline - time.monotonic()))
        for task in busy:
            await _cancel_and_wait(task)

    async def _consume(self, channel: str) -> None:
        task = asyncio.current_task()
        layer = self.app.channel_layer
        while not self._stopping:
            self._idle.add(task)
            try:
                content = await layer.receive(channel)
            except asyncio.CancelledError:
                return
            except Exception:
                if self._stopping:
                    return
                _log_limited(logging.ERROR, "Background worker for %r cannot receive from the channel "
                                   "layer; retrying in 1 s.", channel, **_OUTAGE)
                await asyncio.sleep(1)
                continue
            finally:
                self._idle.discard(task)
            await self._run(channel, content)

    async def _run(self, channel: str, content: dict) -> None:
        message = Message(content, channel, self.app.channel_layer)
        try:
            if not await _handle_message(self.app.router, self.app.channel_layer, message):
                logger.warning("No route matched a message on %r (keys %s); dropped.",
                               channel, sorted(content))
        except Exception:
            logger.exception("Consumer failed on background channel %r", channel)


# === 8. Test helpers ===
# `WebsocketCommunicator` plays the server's part in-process, so tests drive an
# `Application` the way a browser would, with the method names Channels users know.
# `reset_channel_layers()` clears all module state between tests.

class WebsocketCommunicator:
    """Drives an ASGI app as one websocket client would, without a server::

        communicator = WebsocketCommunicator(application, "/chat/lobby/")
        connected, _ = await communicator.connect()
        await communicator.send_to(text_data="hello")
        assert await communicator.receive_from() == "hello"
        await communicator.disconnect()
    """

    def __init__(self, application: ASGIApp, path: str, headers: list | None = None,
                 subprotocols: list[str] | None = None):
        path, _, query = path.partition("?")
        self.application = application
        self.scope: Scope = {
            "type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws",
            "path": unquote(path), "raw_path": path.encode(), "root_path": "",
            "query_string": query.encode(),
            "headers": [(_as_bytes(name).lower(), _as_bytes(value)) for name, value in headers or []],
            "client": ["127.0.0.1", 50000], "server": ["127.0.0.1", 80],
            "subprotocols": list(subprotocols or []),
        }
        self._input, self._output = asyncio.Queue(), asyncio.Queue()  # events to the app, from it
        self._task: asyncio.Task | None = None
        self._held: dict | None = None  # an event receive_nothing() saw, for the next receive
        self._disconnect_sent = False

    async def connect(self, timeout: float = 1) -> tuple[bool, Any]:
        """Open the socket: ``(True, subprotocol)`` when accepted, ``(False, close_code)`` if not."""
        self._task = asyncio.ensure_future(self.application(self.scope, self._input.get, self._send))
        await self._input.put({"type": "websocket.connect"})
        event = await self.receive_output(timeout)
        if event["type"] == "websocket.accept":
            return True, event.get("subprotocol")
        if event["type"] == "websocket.close":
            return False, event.get("code", 1000)
        raise AssertionError(f"Expected websocket.accept or websocket.close, got {event!r}.")

    async def send_to(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Send one frame to the app."""
        event = {"type": "websocket.receive"}
        event.update({"text": text_data} if text_data is not None else {"bytes": bytes_data})
        await self._input.put(event)

    async def send_json_to(self, data: Any) -> None:
        """Send *data* as one JSON text frame."""
        await self.send_to(text_data=json.dumps(data))

    async def receive_from(self, timeout: float = 1) -> str | bytes:
        """The next frame's text or bytes; ``AssertionError`` if the app closed instead."""
        event = await self.receive_output(timeout)
        if event["type"] != "websocket.send":
            raise AssertionError(f"Expected a websocket.send frame, got {event!r}.")
        return event["text"] if event.get("text") is not None else event["bytes"]

    async def receive_json_from(self, timeout: float = 1) -> Any:
        """The next frame, decoded from JSON."""
        payload = await self.receive_from(timeout)
        if not isinstance(payload, str):
            raise AssertionError(f"Expected a JSON text frame, got bytes {payload!r:.80}.")
        return json.loads(payload)

    async def receive_nothing(self, timeout: float = 0.1) -> bool:
        """True if the app sends nothing within *timeout* seconds (or has ended)."""
        if self._held is not None or not self._output.empty():
            return False
        try:
            event = await self._next_output(timeout)
        except asyncio.TimeoutError:
            return True
        if event is None:
            return True
        self._held = event  # keep it for the next receive
        return False

    async def receive_output(self, timeout: float = 1) -> dict:
        """The next raw ASGI event the app sent; re-raises the app's own exception."""
        event = await self._next_output(timeout)
        if event is None:
            raise AssertionError("The application ended without sending anything.")
        return event

    async def _next_output(self, timeout: float) -> dict | None:
        """The next event, or None if the app ended without one (re-raising what it raised);
        ``asyncio.TimeoutError`` if neither happens within *timeout* seconds."""
        if self._held is not None:
            event, self._held = self._held, None
            return event
        getter = asyncio.ensure_future(self._output.get())
        waiting = {getter} | ({self._task} if self._task is not None else set())
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()  # a cancelled get leaves any event in the queue
        if self._task in done:
            self._task.result()  # re-raises what the app raised, as asgiref's communicator does
            return None
        raise asyncio.TimeoutError(f"Nothing from the application within {timeout} s.")

    async def disconnect(self, code: int = 1000, timeout: float = 1) -> None:
        """Close from the client side and wait for the app to finish."""
        if not self._disconnect_sent:
            self._disconnect_sent = True
            await self._input.put({"type": "websocket.disconnect", "code": code})
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
                raise asyncio.TimeoutError(f"The application did not finish within {timeout} s "
                                           f"of the disconnect.")
            self._task.result()

    async def _send(self, event: dict) -> None:
        await self._output.put(event)
        if event["type"] == "websocket.close" and not self._disconnect_sent:
            # A server tells the app its socket is gone once it has closed it.
            self._disconnect_sent = True
            await self._input.put({"type": "websocket.disconnect", "code": event.get("code", 1000)})


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


def reset_channel_layers() -> None:
    """Forget all the module keeps between calls, for tests: the layers ``get_channel_layer()``
    built (e.g. after a test changed settings), the rate limits of log lines, the connections
    and what extensions hold for them, and bindings defined inside functions (a test's own);
    bindings defined at module level stay bound."""
    with _layers_lock:
        for reset in _state_resets:
            reset()
    _bindings.extend(_module_bindings)


# === 9. Command line ===
# `python -m channels_mini runworker` consumes background channels from a layer shared
# between processes (e.g. Redis), as `manage.py runworker` did in Channels 1.x.

def main(argv: list[str] | None = None) -> int:
    """Run the command line; ``python -m <this module> runworker --help`` tells more."""
    import argparse
    import os

    program = f"python -m {__spec__.name if __spec__ else 'channels_mini'}"
    parser = argparse.ArgumentParser(prog=program, description="channels_mini commands.")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("runworker", help="Consume background channels from a shared layer.")
    worker.add_argument("--settings", help="Django settings module (else DJANGO_SETTINGS_MODULE).")
    worker.add_argument("--layer", default="default", help="CHANNEL_LAYERS alias (default: default).")
    worker.add_argument("--only-channels", nargs="+", metavar="PATTERN", default=None,
                        help="Consume only channels matching these glob patterns.")
    worker.add_argument("--exclude-channels", nargs="+", metavar="PATTERN", default=(),
                        help="Do not consume channels matching these glob patterns.")
    args = parser.parse_args(argv)
    if args.settings:
        os.environ["DJANGO_SETTINGS_MODULE"] = args.settings
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        router = Router(_routing_from_settings())
        layer = get_channel_layer(args.layer)
    except (ImproperlyConfigured, ImportError) as error:
        logger.error("runworker cannot start: %s", error)
        return 2
    if isinstance(layer, InMemoryChannelLayer):
        logger.error("runworker cannot start: channel layer %r is an InMemoryChannelLayer, which lives "
                     "inside one process, so nothing could ever reach this worker. Configure a shared "
                     "layer such as channels_redis.core.RedisChannelLayer in CHANNEL_LAYERS.", args.layer)
        return 2
    channels = _select_channels(_background_channels(router), args.only_channels, args.exclude_channels)
    if not channels:
        logger.error("runworker has no channel to consume: the routing's background channels are "
                     "%r and the filters leave none.", _background_channels(router))
        return 2
    logger.info("runworker listening on channels: %s", ", ".join(channels))
    asyncio.run(_run_worker(Application(router, channel_layer=layer), channels))
    logger.info("runworker stopped.")
    return 0


def _select_channels(channels: list[str], only: list[str] | None, exclude: Iterable[str]) -> list[str]:
    return [c for c in channels
            if (only is None or any(fnmatch.fnmatchcase(c, p) for p in only))
            and not any(fnmatch.fnmatchcase(c, p) for p in exclude)]


async def _run_worker(app: Application, channels: list[str]) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    workers = _BackgroundWorkers(app, channels)
    workers.start()
    await stop.wait()
    logger.info("runworker stopping: finishing the messages in hand.")
    await workers.stop()


# === Part II: extensions ===
# Everything below is optional to a reader of the core: each section adds one capability and
# plugs it in through the hooks of section 0 (`_hooks`), registering itself where it ends.
# A section uses only the core and the sections above it.

# === 10. JSON, streams and writes from clients ===
# Channels 1.x's JSON consumer and stream demultiplexing (several consumers on one socket,
# frames `{"stream", "payload"}`), and the binding's way back: `WebsocketBinding.consumer` on a
# stream applies create/update/delete requests from clients when `has_permission` allows,
# checked and answered so that a hostile request saves nothing and crashes nothing. Hooks:
# none of the core's; it defines `_write_checks`, where later sections refuse a write (a login
# that has ended). Costs: a JSON decode per frame on these consumers; none elsewhere.

CREATE, UPDATE, DELETE = "create", "update", "delete"  # a binding's actions, by their 1.x names
_ACTIONS = (CREATE, UPDATE, DELETE)
#: ``check(message)`` returns ``(why, close code or None)`` to refuse a binding write, or None.
_write_checks: list[Callable[[Message], tuple[str, int | None] | None]] = []


class JsonWebsocketConsumer(WebsocketConsumer):
    """A WebSocket endpoint that speaks JSON: ``receive(content)`` and ``send(content)``.

    A binary frame closes the socket with 1003 and invalid JSON with 1007; both log a
    warning.
    """

    async def raw_receive(self, message: Message, **kwargs: Any) -> None:
        text = message.get("text")
        if text is None:
            _log_limited(logging.WARNING, "%s got a binary frame on %.200s; it takes JSON text. Closing "
                                 "with 1003.", type(self).__name__, message.get("path"))
            self.close(1003)
            return
        try:
            content = self.decode_json(text)
        except (ValueError, RecursionError) as error:  # RecursionError: nested too deep to decode
            _log_limited(logging.WARNING, "%s got invalid JSON on %.200s (%.200s; received %.80r). Closing "
                                 "with 1007.", type(self).__name__, message.get("path"), error, text)
            self.close(1007)
            return
        await _run_handler(self.receive, content, **kwargs)

    def receive(self, content: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Called with each frame's decoded JSON."""

    def send(self, content: Any, close: bool | int = False) -> None:  # type: ignore[override]
        """Send *content* as JSON; inside a demultiplexer, on this consumer's stream."""
        multiplexer = self.kwargs.get("multiplexer")
        if multiplexer is not None:
            multiplexer.send(content)
            if close:
                self.close(close)
        else:
            super().send(text=self.encode_json(content), close=close)

    @classmethod
    def group_send(cls, name: str, content: Any, close: bool | int = False) -> None:  # type: ignore[override]
        """Send *content* as JSON to every socket in group *name*."""
        super().group_send(name, text=cls.encode_json(content), close=close)

    @classmethod
    def encode_json(cls, content: Any) -> str:
        """Turn *content* into a frame's text; override for another encoder."""
        return json.dumps(content)

    @classmethod
    def decode_json(cls, text: str) -> Any:
        """Turn a frame's text into content; raise ``ValueError`` for bad input."""
        return json.loads(text)


class SendNotAvailableOnDemultiplexer(Exception):
    """A demultiplexer cannot send by itself: send through a stream's multiplexer."""


class WebsocketMultiplexer:
    """One stream of a multiplexed socket: frames are ``{"stream": ..., "payload": {...}}``."""

    def __init__(self, stream: str, reply_channel: Channel):
        self.stream = stream
        self.reply_channel = reply_channel

    def send(self, payload: dict) -> None:
        """Send *payload* on this stream."""
        self.reply_channel.send(self.encode(self.stream, payload))

    @classmethod
    def encode_json(cls, content: Any) -> str:
        """Turn *content* into a frame's text with Django's JSON encoder (dates, Decimals, UUIDs);
        override for another encoder."""
        from django.core.serializers.json import DjangoJSONEncoder

        return json.dumps(content, cls=DjangoJSONEncoder)

    @classmethod
    def encode(cls, stream: str, payload: dict) -> dict:
        """The reply-channel message for *payload* on *stream*: ``{"text": ...}``, as Channels 1.x."""
        return _stream_frame(stream, payload, cls.encode_json)

    @classmethod
    def group_send(cls, name: str, stream: str, payload: dict, close: bool = False) -> None:
        """Send *payload* on *stream* to every socket in group *name*; ``close=True`` then closes them."""
        message = cls.encode(stream, payload)
        if close:
            message["close"] = True
        Group(name).send(message)

    def __repr__(self) -> str:
        return f"<WebsocketMultiplexer stream={self.stream!r} {self.reply_channel!r}>"


class WebsocketDemultiplexer(JsonWebsocketConsumer):
    """Carries several streams over one socket, each to its own consumer.

    ``consumers = {"chat": ChatConsumer, "items": ItemBinding.consumer}``. Each consumer
    gets a ``multiplexer`` kwarg whose ``send(payload)`` answers on its stream;
    connect and disconnect reach every consumer. A frame that is not
    ``{"stream": str, "payload": dict}``, or names an unknown stream, is answered with
    ``{"error": "<why>"}`` and the socket stays open.
    """

    #: ``{stream name: consumer}``; consumers are classes or functions, as in routing.
    consumers: dict[str, Any] = {}
    #: What each consumer gets as its ``multiplexer`` kwarg: ``cls(stream, reply_channel)``.
    multiplexer_class: type = WebsocketMultiplexer

    async def raw_connect(self, message: Message, **kwargs: Any) -> None:
        await super().raw_connect(message, **kwargs)
        for stream in self.consumers:
            await self._forward(stream, message, kwargs)

    async def raw_receive(self, message: Message, **kwargs: Any) -> None:
        text = message.get("text")
        try:
            frame = self.decode_json(text) if text is not None else None
        except (ValueError, RecursionError):
            frame = None
        problem = (_multiplexed_frame_problem(frame, self.consumers) if text is not None
                   else "Invalid multiplexed frame (received a binary frame): send JSON text "
                        '{"stream": "<name>", "payload": {...}}.')
        if problem:
            _log_limited(logging.WARNING, "%s on %.200s: %s", type(self).__name__, message.get("path"), problem)
            WebsocketConsumer.send(self, text=self.encode_json({"error": problem}))
            return
        stream = frame["stream"]
        forwarded = message.copy(text=self.encode_json(frame["payload"]))
        forwarded.content.pop("bytes", None)
        await self._forward(stream, forwarded, kwargs)

    async def raw_disconnect(self, message: Message, **kwargs: Any) -> None:
        for stream in self.consumers:
            await self._forward(stream, message, kwargs)
        await super().raw_disconnect(message, **kwargs)

    async def _forward(self, stream: str, message: Message, kwargs: dict) -> None:
        multiplexer = self.multiplexer_class(stream, message.reply_channel)
        consumer, kwargs = self.consumers[stream], {**kwargs, "multiplexer": multiplexer}
        if isinstance(consumer, type) and issubclass(consumer, BaseConsumer):
            await consumer._instance(message, kwargs).dispatch()  # as routing does
        else:
            await _run_handler(consumer, message, **kwargs)

    def send(self, *args: Any, **kwargs: Any) -> None:
        raise SendNotAvailableOnDemultiplexer(
            f"{type(self).__name__}.send() cannot tell which stream to use. Send through a "
            f"stream's multiplexer: WebsocketMultiplexer(stream, reply_channel).send(payload).")


def _multiplexed_frame_problem(frame: Any, consumers: dict) -> str | None:
    if not isinstance(frame, dict) or "stream" not in frame or "payload" not in frame:
        return (f"Invalid multiplexed frame (received {frame!r:.80}): send JSON "
                f'{{"stream": "<name>", "payload": {{...}}}}.')
    if not isinstance(frame["payload"], dict):
        return f"Payload of stream {frame['stream']!r} must be a JSON object (received {frame['payload']!r:.80})."
    if not isinstance(frame["stream"], str) or frame["stream"] not in consumers:
        return f"Unknown stream {frame['stream']!r:.80}; this socket has {sorted(consumers)!r}."
    return None


# -- writes from clients --

class _BindingWrites:
    """The inbound half of ``Binding`` (copied onto it below): a client's write passes
    ``has_permission`` (who asks, for which row) and ``clean_data`` (what they write)."""

    # -- inbound: what you override --

    def has_permission(self, user: Any, action: str, pk: Any) -> bool:
        """May *user* apply *action* to the row *pk*? The default denies every write."""
        return False

    def clean_data(self, action: str, pk: Any, data: dict) -> dict:
        """Checks the values of a write ``has_permission`` allowed; returns the values to apply.

        *data* holds only bound fields; ``self.user`` is who asks. Raise ``ValidationError``
        to refuse (nothing is saved), or return changed data. It runs inside the write's
        transaction. New here: in Channels 1.x, ``has_permission`` was the only check.
        """
        return data


    @classmethod
    def consumer(cls, message: Message, **kwargs: Any) -> None:
        """Applies a client's ``{"action", "pk", "data"}``: put it in a demultiplexer's ``consumers``.

        A refused request is answered ``{"error", "action", "pk"}``. A request that carries a
        ``request_id`` is always answered, with that id: on success ``{"action", "pk",
        "request_id"}``, ``pk`` being the saved row's (a new row's, for ``create``).
        """
        if message.channel_name != "websocket.receive":
            return  # connect and disconnect need nothing from a binding
        request = json.loads(message["text"])  # the demultiplexer checked it is an object
        # A check of an extension may refuse first (a login that has ended): (why, close code).
        refused = next(filter(None, (check(message) for check in _write_checks)), None)
        binding = cls()
        binding.message, binding.kwargs, binding.user = message, kwargs, message.user
        error, pk = (refused[0], request.get("pk")) if refused else binding._apply_request(request)
        answer = {"action": _echoed(request.get("action")), "pk": _echoed(pk)}
        if "request_id" in request:
            answer["request_id"] = _echoed(request["request_id"])
        if error is not None:
            error = _clip(error, 5 * _SHOWN_CHARACTERS)  # Django's messages may quote a value
            _report_refusal(cls, error)
            kwargs["multiplexer"].send({"error": error, **answer})
        elif "request_id" in request:
            kwargs["multiplexer"].send(answer)
        if refused and refused[1]:
            message.reply_channel.send({"close": refused[1]})

    def _apply_request(self, request: dict) -> tuple[str | None, Any]:
        """Check and apply one write; return why it was refused (or None) and the row's pk."""
        from django.core.exceptions import ObjectDoesNotExist, ValidationError
        from django.core.serializers.base import DeserializationError
        from django.db import DatabaseError, router, transaction

        action, pk, data = request.get("action"), request.get("pk"), request.get("data", {})
        problem = self._request_problem(action, pk, data)
        if problem:
            return problem, pk
        model = self.model_class()
        try:
            with transaction.atomic(using=router.db_for_write(model)):
                data = self.clean_data(action, pk, data)
                return None, getattr(self, f"_inbound_{action}")(model, pk, data)
        except ObjectDoesNotExist:
            return f"{model._meta.label_lower} with pk {_shown(pk)} does not exist.", pk
        except ValidationError as error:
            details = getattr(error, "message_dict", None) or error.messages
            return f"Invalid data: {_shown(details)}.", pk
        except (DeserializationError, ValueError, TypeError, OverflowError) as error:
            return f"Invalid data: {_clip(str(error).rstrip('.'))}.", pk
        except DatabaseError as error:  # what full_clean() cannot see: NOT NULL, ranges, encodings
            return f"The database refused the data: {_clip(str(error).rstrip('.'))}.", pk

    def _request_problem(self, action: Any, pk: Any, data: Any) -> str | None:
        if action not in _ACTIONS:
            return f"Unknown action {_shown(action)}; use one of {list(_ACTIONS)!r}."
        if action != "create" and pk is None:
            return f"Action {action!r} needs a 'pk'."
        if action != "create":  # checked before has_permission, which may look the pk up
            problem = self._pk_problem(pk)
            if problem:
                return problem
        if not self.has_permission(self.user, action, pk):
            return f"Permission denied: {action} on pk {_shown(pk)}."
        if not isinstance(data, dict):
            return f"'data' must be a JSON object of field values (received {_shown(data)})."
        writable = self._writable_fields()
        unknown = sorted(set(data) - set(writable))
        if unknown:
            return (f"Unknown field(s) {_shown(unknown)}; this binding accepts "
                    f"{sorted(writable)!r}.")
        not_finite = sorted(name for name, value in data.items() if not _is_finite(value))
        if not_finite:
            return (f"Invalid data: field(s) {_shown(not_finite)} hold Infinity or NaN; "
                    f"send finite numbers.")
        return None

    def _pk_problem(self, pk: Any) -> str | None:
        from django.core.exceptions import ValidationError

        if not _is_finite(pk):
            return f"Invalid pk {pk!r}: no row has it; send the pk as the server sent it."
        try:
            self.model_class()._meta.pk.to_python(pk)
        except ValidationError as error:
            return f"Invalid pk {_shown(pk)}: {' '.join(error.messages)}"
        return None

    def _writable_fields(self) -> list[str]:
        meta = self.model_class()._meta
        names = self._field_names()
        return [f.name for f in meta.concrete_fields
                if f.editable and not f.primary_key and (names is None or f.name in names)]

    def _deserialized(self, model: Any, pk: Any, data: dict) -> Any:
        from django.core import serializers
        from django.core.exceptions import ValidationError

        errors = {}
        for name, value in data.items():  # per field, so the answer names the field
            try:
                model._meta.get_field(name).to_python(value)
            except ValidationError as error:
                errors[name] = error.messages
        if errors:
            raise ValidationError(errors)
        record = {"model": model._meta.label_lower, "fields": data}
        if pk is not None:
            record["pk"] = pk
        return next(serializers.deserialize("python", [record])).object

    def _inbound_create(self, model: Any, pk: Any, data: dict) -> Any:
        instance = self._deserialized(model, None, data)  # the database picks the key, not the client
        instance.full_clean()
        instance.save()
        return _json_pk(instance)

    def _inbound_update(self, model: Any, pk: Any, data: dict) -> Any:
        instance = model._default_manager.get(pk=pk)
        changes = self._deserialized(model, pk, data)
        for name in data:  # only what the client sent
            attname = model._meta.get_field(name).attname
            setattr(instance, attname, getattr(changes, attname))
        # Check the fields this binding exposes, as a ModelForm checks its own: a stored row's
        # other fields (a user's blank password) are not the client's to fix.
        writable = set(self._writable_fields())
        instance.full_clean(exclude=[f.name for f in model._meta.fields if f.name not in writable])
        instance.save()
        return _json_pk(instance)

    def _inbound_delete(self, model: Any, pk: Any, data: dict) -> Any:
        model._default_manager.get(pk=pk).delete()
        return pk


for _name in ("has_permission", "clean_data", "consumer", "_apply_request", "_request_problem",
              "_pk_problem", "_writable_fields", "_deserialized", "_inbound_create",
              "_inbound_update", "_inbound_delete"):
    setattr(Binding, _name, vars(_BindingWrites)[_name])


def _is_finite(value: Any) -> bool:
    """False for JSON's Infinity, -Infinity and NaN (Python reads them as floats)."""
    return not isinstance(value, float) or float("-inf") < value < float("inf")  # NaN: False


def _echoed(value: Any) -> Any:
    """A client's value to send back: as it came, or shown as text if long or not valid JSON."""
    try:
        text = json.dumps(value, allow_nan=False)  # a browser's JSON.parse rejects NaN
    except ValueError:
        return _shown(value)
    return value if len(text) <= _SHOWN_CHARACTERS else _shown(value)


def _report_refusal(binding: type[Binding], error: str) -> None:
    """Log a refused request: a client's mistake, so one line, no traceback, once a second."""
    _log_limited(logging.WARNING, "%s refused {held} request(s) since the last report, e.g.: %s",
                 binding.__name__, error, key=f"refusals {binding.__name__}", burst=1)


__all__ += ["JsonWebsocketConsumer", "WebsocketDemultiplexer", "WebsocketMultiplexer",
            "SendNotAvailableOnDemultiplexer", "CREATE", "UPDATE", "DELETE"]


# === 11. Sessions and logins ===
# Channels 1.x's per-socket state and auth: `message.channel_session` (a Django session keyed
# by the reply channel), `message.http_session` and `message.user` from the handshake's
# cookie, the 1.x decorators (`channels.sessions`, `channels.auth`) and the 1.1 class
# attributes (`http_user`, ...), one loader for both. A connection opened with a login ends
# with it. Hooks: `message` (load before a class's handler), `handled` (save what changed),
# `closed` (delete the channel session), `serving` (login checks), `write` (re-check before a
# binding write). Costs: nothing for a consumer that uses none of it; a session read per
# socket for `http_user`; one session and user read per logged-in session every 2 s.

# -- channel sessions --
# Channels 1.x kept per-socket state in a Django session keyed by the reply channel, so any
# consumer of any message carrying that reply channel -- in any process sharing the session
# store -- sees it. It is read only when a handler touches it, saved after the handler when
# changed, and deleted when its socket closes. Its key is an HMAC of the reply channel with
# SECRET_KEY, so only the project can compute it, and it never holds a Django login (see
# `_transfer_user`). Without a usable session engine (no settings, or the database engine
# without django.contrib.sessions) a dict in this process stands in.

_DB_SESSIONS = "django.contrib.sessions.backends.db"
_SESSION_POOL_SIZE = 4  # threads for session I/O, which never waits behind blocked handlers
_fallback_sessions: dict[str, Any] = _module_state({})  # reply channel -> stand-in session
_sessions_used: set[str] = _module_state(set())  # reply channels (here) whose session was read


_process_secret = secrets.token_bytes(32)  # keys digests when there are no Django settings


def _keyed_digest(purpose: str, value: str) -> str:
    """A hex digest of *value* that only this project can compute: an HMAC keyed with
    ``SECRET_KEY`` (a secret of this process without settings), different for each *purpose*.
    Every process with the same settings computes the same digest."""
    if _settings_ready():
        from django.utils.crypto import salted_hmac
        return salted_hmac(f"channels_mini.{purpose}", value, algorithm="sha256").hexdigest()
    return hmac.new(_process_secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()


def _channel_session_key(reply_channel: str) -> str:
    # 1.x used sha1(reply channel): anyone shown a reply channel name could load that socket's
    # session as their own cookie. Keyed with the secret, nobody outside the project can.
    return "chn" + _keyed_digest("channel_session", reply_channel)[:29]  # as 1.x: 32 characters


def _session_engine() -> Any:
    """The module of ``SESSION_ENGINE``, or None when sessions cannot be stored."""
    from django.conf import settings

    if not _settings_ready():
        return None
    from django.apps import apps
    name = settings.SESSION_ENGINE
    if name == _DB_SESSIONS and not (apps.ready and apps.is_installed("django.contrib.sessions")):
        return None
    if name.endswith("signed_cookies"):
        raise ImproperlyConfigured(
            f"Channel sessions cannot use SESSION_ENGINE={name!r}: a cookie cannot hold a "
            f"socket's session. Use the database or cache engine (as Channels 1.x required).")
    return importlib.import_module(name)


class _DictSession(dict):
    """The stand-in session: a dict with the few session methods handlers call."""

    modified = False

    def save(self, must_create: bool = False) -> None:
        """Nothing to store: the dict lives in this process."""


def _channel_session_for(reply_channel: str) -> Any:
    """The session of *reply_channel*, loaded now (the caller touched it)."""
    if reply_channel in _local_sockets:
        _sessions_used.add(reply_channel)  # so its connection deletes it when it closes
    engine = _session_engine()
    if engine is None:
        return _fallback_sessions.setdefault(reply_channel, _DictSession())
    key = _channel_session_key(reply_channel)
    session = engine.SessionStore(session_key=key)
    try:
        session.keys()  # load now; a store that has no such row forgets the key ...
    except Exception as error:
        if type(error).__name__ != "SynchronousOnlyOperation":
            raise
        # An async def handler read it on the event loop, where Django forbids the query: read
        # it in a thread while the loop waits (@channel_session reads it without that wait).
        _log_limited(logging.WARNING, "message.channel_session was read in an async def handler: "
                     "every socket waited for the session store meanwhile. Decorate the handler "
                     "with @channel_session (or set channel_session = True) to read it in a thread "
                     "first.", key="channel session on the loop", every=3600.0, burst=1)
        _session_reader().submit(_with_fresh_db_connections, session.keys).result()
    session._session_key = key  # ... so give it back, as Channels 1.x did
    return session


@functools.lru_cache(maxsize=None)
def _session_reader() -> Any:
    """The one thread that reads a channel session for an async def handler on the loop."""
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(1, thread_name_prefix="channel-session-on-loop")


async def _in_session_thread(function: Callable, *args: Any) -> Any:
    """Run session-store (and presence) I/O in its own small pool, never behind blocked handlers."""
    return await _bridge("session", _SESSION_POOL_SIZE)(function, *args)


def _channel_session(message: Message) -> Any:
    """``message.channel_session``: the reply channel's session (a Django ``SessionStore``),
    loaded when first read; ``None`` for a message without a reply channel."""
    if vars(message).get("_channel_session") is None and message.content.get("reply_channel"):
        message._channel_session = _channel_session_for(message.content["reply_channel"])
    return vars(message).get("_channel_session")


def _set_channel_session(message: Message, session: Any) -> None:
    message._channel_session = session


Message.channel_session = property(_channel_session, _set_channel_session)  # type: ignore[attr-defined]


def _save_session(session: Any) -> None:
    from django.contrib.sessions.backends.base import UpdateError

    try:
        session.save()
    except UpdateError:  # a new channel session: no row to update yet
        session.save(must_create=True)
    session.modified = False


def _delete_channel_session(reply_channel: str) -> None:
    if _fallback_sessions.pop(reply_channel, None) is None:
        engine = _session_engine()
        if engine is not None:
            engine.SessionStore().delete(_channel_session_key(reply_channel))


# -- the handshake's session and user --

def _setting(name: str) -> Any:
    from django.conf import settings
    return getattr(settings, name)


def _header_items(headers: Any) -> list[tuple[bytes, bytes]]:
    """A message's headers as ASGI pairs, from pairs or the 1.x dict form (``{"cookie": b"..."}``)."""
    items = headers.items() if isinstance(headers, dict) else (headers or ())
    return [(_as_bytes(name).lower(), _as_bytes(value)) for name, value in items]


def _handshake_session_key(headers_from: Any) -> str | None:
    """The session key of a handshake: its ``session_key`` query parameter or its cookie (1.x)."""
    from django.http import QueryDict
    from django.http.cookie import parse_cookie

    query = headers_from.get("query_string") or b""
    key = QueryDict(query.decode("latin-1") if isinstance(query, bytes) else query).get("session_key")
    cookie = b"; ".join(value for name, value in _header_items(headers_from.get("headers"))
                        if name == b"cookie")
    return key or parse_cookie(cookie.decode("latin-1")).get(_setting("SESSION_COOKIE_NAME"))


def _user_of(session: Any) -> Any:
    """The user of *session*, as ``AuthenticationMiddleware`` finds it; AnonymousUser if none."""
    from django.contrib.auth import get_user
    from django.contrib.auth.models import AnonymousUser

    if session is None:
        return AnonymousUser()
    return get_user(type("SessionOnly", (), {"session": _SessionView(session.items())})())


class _SessionView(dict):
    """A copy of a session for ``get_user()``, which may flush the session (a changed password)
    or give it a new key (a rotated SECRET_KEY): neither may touch the browser's own session,
    whose cookie a websocket cannot change."""

    def flush(self) -> None:
        self.clear()

    def cycle_key(self) -> None:
        """The copy has no key."""


_CHANNEL_LOGIN = "channels_mini.login"  # where a channel session keeps the user copied into it


def _login_names() -> tuple[str, str, str]:
    from django.contrib import auth
    return auth.SESSION_KEY, auth.BACKEND_SESSION_KEY, auth.HASH_SESSION_KEY


def _transfer_user(from_session: Any, channel_session: Any) -> None:
    """Copy the logged-in user from the HTTP session into the channel session (1.x's
    ``transfer_user``) -- under a key of ours, not Django's own: a channel session is never
    a login, even for someone who learnt its key and sends it as a session cookie. The HTTP
    session's key goes with it, so that the login can be checked later."""
    names = _login_names()
    if from_session is not None and all(name in from_session for name in names):
        channel_session[_CHANNEL_LOGIN] = {"session_key": from_session.session_key,
                                           **{name: from_session[name] for name in names}}


def _channel_login(channel_session: Any) -> dict:
    """The login a channel session keeps, under Django's key names (and ``session_key``)."""
    return dict(channel_session.get(_CHANNEL_LOGIN) or {})


# -- loading sessions and users: one way, for the decorators and the class attributes --
# Each loader fills what it names into the message. They run in a session thread (session
# stores do I/O) before the handler: the decorators wrap a consumer, the 1.1 class
# attributes choose loaders for every method of a class. The handshake's session and user
# are read once per socket and kept for its later messages.

def _socket_cache(message: Message) -> dict:
    """What a socket's messages share (one dict per connection); a fresh one for a message
    that came from elsewhere (a background channel)."""
    return message._socket_state if message._socket_state is not None else {}


def _load_http_session(message: Message) -> None:
    cache = _socket_cache(message)
    if "http_session" not in cache:
        key = _handshake_session_key(message.scope or message.content)
        engine = importlib.import_module(_setting("SESSION_ENGINE"))
        cache["http_session"] = _loaded(engine.SessionStore(session_key=key)) if key else None
        _watch_login(message, cache["http_session"])
    message.http_session = cache["http_session"]


def _loaded(session: Any) -> Any:
    """*session*, read now (in the session thread), so async handlers may use it on the loop."""
    session.keys()
    return session


def _load_http_session_user(message: Message) -> None:
    _load_http_session(message)
    cache = _socket_cache(message)
    if "user" not in cache:
        cache["user"] = _user_of(message.http_session)
    message.user = cache["user"]


def _load_http_user(message: Message) -> None:
    """``http_user = True``: the handshake's session (an empty one without a cookie, as a
    view's ``request.session``) and user; on connect (Channels 1.1) a logged-in user is copied
    into the channel session too, for consumers of other channels."""
    _load_http_session_user(message)
    if message.http_session is None:
        engine = importlib.import_module(_setting("SESSION_ENGINE"))
        message.http_session = _socket_cache(message)["http_session"] = engine.SessionStore()
    if message.channel_name == "websocket.connect" and message.user.is_authenticated:
        _transfer_user(message.http_session, message.channel_session)
    elif message._socket_state is None and not message.user.is_authenticated and message.channel_session:
        # Not from a connection's handshake (the 1.x test client, a background channel): the
        # user the connect copied into the channel session, as 1.1 did.
        _load_channel_session_user(message)


def _load_channel_session(message: Message) -> None:
    if message.channel_session is None:
        raise ValueError(f"A message on {message.channel_name!r} has no reply_channel, so it has "
                         f"no channel session: use the session decorators on consumers of "
                         f"messages that carry one.")


def _load_channel_session_user(message: Message) -> None:
    _load_channel_session(message)
    message.user = _user_of(_channel_login(message.channel_session))


def _load_channel_session_user_from_http(message: Message) -> None:
    _load_http_session_user(message)
    _load_channel_session(message)
    _transfer_user(message.http_session, message.channel_session)


def _load_channel_and_http_session(message: Message) -> None:
    """Keep the handshake's session key in the channel session, and find it there later."""
    _load_http_session(message)
    _load_channel_session(message)
    name, channel_session = _setting("SESSION_COOKIE_NAME"), message.channel_session
    if message.http_session is not None and name not in channel_session:
        channel_session[name] = message.http_session.session_key
    elif message.http_session is None and name in channel_session:
        engine = importlib.import_module(_setting("SESSION_ENGINE"))
        message.http_session = _loaded(engine.SessionStore(session_key=channel_session[name]))


def _load_channel_and_http_session_user_from_http(message: Message) -> None:
    _load_channel_and_http_session(message)
    message.user = _user_of(message.http_session)
    _transfer_user(message.http_session, message.channel_session)


# -- the 1.x decorators --
# `channels.sessions` and `channels.auth` with their names and meanings, on function
# consumers and on methods, sync or `async def`. Compose them as in 1.x.

def _message_in(args: tuple, decorator: str) -> Message:
    for arg in args[:2]:  # a function's first argument, or a method's after self
        if isinstance(arg, Message):
            return arg
    raise ValueError(f"{decorator} called without Message instance: @{decorator} needs a consumer "
                     f"called with the message first (a method: after self); got {args[:2]!r:.200}.")


def _session_decorator(load: Callable[[Message], None], name: str, doc: str) -> Callable:
    def decorator(func: Callable) -> Callable:
        if _is_async(func):
            async def handler(*args: Any, **kwargs: Any) -> Any:
                await _in_session_thread(load, _message_in(args, name))
                return await func(*args, **kwargs)
        else:
            def handler(*args: Any, **kwargs: Any) -> Any:
                message = _message_in(args, name)
                load(message)  # a sync handler already runs in a worker thread
                result = func(*args, **kwargs)
                if _consumer_state.get() is None:  # called directly, not routed: save now, as 1.x
                    _save_changed(_changed_sessions(message))
                return result
        return functools.wraps(func)(handler)

    decorator.__name__ = decorator.__qualname__ = name
    decorator.__doc__ = doc
    return decorator


channel_session = _session_decorator(_load_channel_session, "channel_session", """\
Gives the consumer ``message.channel_session``: the session of the message's reply channel.""")
http_session = _session_decorator(_load_http_session, "http_session", """\
Gives the consumer ``message.http_session`` from the handshake's cookie (None without one).""")
http_session_user = _session_decorator(_load_http_session_user, "http_session_user", """\
``http_session``, plus ``message.user`` from it (``AnonymousUser`` without a session).""")
channel_session_user = _session_decorator(_load_channel_session_user, "channel_session_user", """\
``channel_session``, plus ``message.user`` from it: the user that ``..._from_http`` copied there.""")
channel_session_user_from_http = _session_decorator(
    _load_channel_session_user_from_http, "channel_session_user_from_http", """\
On ``websocket.connect``: ``http_session_user``, and the user copied into the channel session.""")
channel_and_http_session = _session_decorator(
    _load_channel_and_http_session, "channel_and_http_session", """\
Both sessions; the handshake's session key is kept in the channel session for later messages.""")
channel_and_http_session_user_from_http = _session_decorator(
    _load_channel_and_http_session_user_from_http, "channel_and_http_session_user_from_http", """\
``channel_and_http_session``, ``message.user``, and the user copied into the channel session.""")


def enforce_ordering(func: Callable | None = None, slight: bool = False) -> Any:
    """Accepted for Channels 1.x code: a socket's messages are always handled in order."""
    if slight:
        raise ValueError("Slight ordering is gone (as in Channels 1.1): remove slight=True; "
                         "ordering is always strict here.")
    return func if func is not None else (lambda function: function)


def _check_origin(message: Message) -> None:
    """Raise ``DenyConnection`` unless a handshake's ``Origin`` is an ASCII URL whose host is in
    ``ALLOWED_HOSTS`` (with ``DEBUG`` and none set: localhost), as Channels 1.x's check did."""
    from django.http.request import split_domain_port, validate_host

    if message.channel_name != "websocket.connect":
        return
    headers = message.content.get("headers") or ()
    pairs = headers.items() if isinstance(headers, dict) else (pair for pair in headers if len(pair) > 1)
    origins = [value for name, value, *_ in pairs if _as_bytes(name).lower() == b"origin"]
    try:  # the host as a Host header has it: IPv6 in brackets, as ALLOWED_HOSTS writes it
        host = split_domain_port(urlsplit(_as_bytes(origins[0]).decode("ascii")).netloc)[0] if origins else None
    except (UnicodeDecodeError, ValueError):
        host = None
    allowed = _setting("ALLOWED_HOSTS") or (["localhost", "127.0.0.1", "[::1]"] if _setting("DEBUG") else [])
    if not host or not validate_host(host, allowed):
        raise DenyConnection


allowed_hosts_only = _session_decorator(_check_origin, "allowed_hosts_only", """\
Refuses (``DenyConnection``) a handshake whose ``Origin`` header is missing or not in ALLOWED_HOSTS,
as in 1.x. ``Application`` checks every handshake's origin too (a missing one is allowed there).""")


# -- the 1.1 class attributes --

#: True gives ``message.user`` and ``message.http_session`` from the handshake's cookie on
#: every message, and (1.1) copies a logged-in user into the channel session on connect.
BaseConsumer.http_user = False  # type: ignore[attr-defined]
#: 1.1: as ``http_user``, and the handshake's session found again on later messages.
BaseConsumer.http_user_and_session = False  # type: ignore[attr-defined]
#: 1.1: load ``message.channel_session`` before each handler.
BaseConsumer.channel_session = False  # type: ignore[attr-defined]
#: 1.1: ``message.user`` from the channel session (implies ``channel_session``).
BaseConsumer.channel_session_user = False  # type: ignore[attr-defined]
#: On by default behind a demultiplexer, so bindings can check ``message.user``.
WebsocketDemultiplexer.http_user = True  # type: ignore[attr-defined]

_loaders_of_class: dict[type, list[Callable[[Message], None]]] = {}  # decided once per class


def _class_loaders(cls: type) -> list[Callable[[Message], None]]:
    """The loaders a consumer class's 1.x attributes ask for, in 1.1's order."""
    loaders = _loaders_of_class.get(cls)
    if loaders is None:
        loaders = [_load_http_user] if cls.http_user and not cls.http_user_and_session else []
        if cls.http_user_and_session:
            loaders.append(_load_channel_and_http_session_user_from_http)
        elif cls.channel_session_user:
            loaders.append(_load_channel_session_user)
        elif cls.channel_session:
            loaders.append(_load_channel_session)
        _loaders_of_class[cls] = loaders
    return loaders


def _load_for_class(consumer: BaseConsumer) -> Awaitable[None] | None:
    """Hook ``message``: load what the consumer's class attributes ask for (None: nothing)."""
    loaders, message = _class_loaders(type(consumer)), consumer.message
    if not loaders:
        return None
    cache = message._socket_state
    if loaders == [_load_http_user] and cache and "user" in cache and message.channel_name != "websocket.connect":
        message.http_session, message.user = cache["http_session"], cache["user"]  # no I/O left
        return None
    return _in_session_thread(_run_loaders, loaders, message)


def _run_loaders(loaders: list[Callable[[Message], None]], message: Message) -> None:
    for load in loaders:
        load(message)


def _save_sessions(message: Message) -> Awaitable[None] | None:
    """Hook ``handled``: save the sessions the handler changed, before its sends leave (their
    consumers may read them); None when none changed."""
    changed = _changed_sessions(message)
    return _in_session_thread(_save_changed, changed) if changed else None


def _changed_sessions(message: Message) -> list:
    return [session for session in (vars(message).get("_channel_session"), message.http_session)
            if session is not None and getattr(session, "modified", False)]


def _save_changed(sessions: list) -> None:
    for session in sessions:
        _save_session(session)


async def _forget_channel_session(connection: Any) -> None:
    """Hook ``closed``: delete the channel session the connection used, and its login."""
    _logins.pop(connection.reply_channel, None)
    if connection.reply_channel in _sessions_used:  # else no session row was ever made here
        _sessions_used.discard(connection.reply_channel)
        try:  # the session store may be down: the later hooks must run all the same
            await _in_session_thread(_delete_channel_session, connection.reply_channel)
        except Exception:
            _log_limited(logging.ERROR, "Cannot delete the channel session of a closed connection; "
                         "it expires with SESSION_COOKIE_AGE.", **_OUTAGE)


# -- connections end with their login --
# A connection opened with a logged-in Django session acts as that user until the login ends,
# however it ends. Logout in this process closes it at once (user_logged_out); everything else
# -- a logout in another process, another login flushing the session, a password change (the
# key cycled here, or the hash changed elsewhere), the user deactivated or deleted -- shows in
# the session store, which `_LoginWatch` reads every CHANNELS_MINI_LOGIN_CHECK seconds.

_LOGGED_OUT_CLOSE_CODE = 4401  # the login the connection was opened with has ended
_LOGIN_CHECK = 2.0  # seconds between two checks, unless CHANNELS_MINI_LOGIN_CHECK says otherwise
_logins: dict[str, tuple[str, Any, Any]] = _module_state({})  # reply channel -> its login, here
_receiver_failures: dict[str, int] = _module_state({})  # failures of our signal receivers, by signal


def _login_of(session: Any) -> tuple[str, Any, Any] | None:
    """What a connection's login is checked against later: (session key, user id, hash)."""
    user_id, _, user_hash = _login_names()
    if session is None or not session.session_key or user_id not in session:
        return None
    return session.session_key, session[user_id], session.get(user_hash)


def _watch_login(message: Message, session: Any) -> None:
    """Tie the message's connection, if this process serves it, to the login of *session*."""
    reply_channel = message.content.get("reply_channel") or ""
    login = _login_of(session)
    if login is not None and reply_channel in _local_sockets:
        _logins.setdefault(reply_channel, login)
        _watch_logouts()


def _user_now(login: tuple[str, Any, Any]) -> Any:
    """The user of *login* read now, as Django's AuthenticationMiddleware would read it, or
    None if the login has ended: the session must still hold that user and hash (not
    flushed, cycled or expired), and ``get_user`` must still find the user (password
    unchanged, ``is_active``)."""
    key, user_id, user_hash = login
    user_id_name, _, hash_name = _login_names()
    session = importlib.import_module(_setting("SESSION_ENGINE")).SessionStore(key)
    if session.get(user_id_name) != user_id or session.get(hash_name) != user_hash:
        return None
    user = _user_of(session)
    return user if user.is_authenticated and str(user.pk) == str(user_id) else None


def _refuse_ended_login(message: Message) -> tuple[str, int] | None:
    """Hook ``write``: before a binding write, read the user again from the HTTP session the
    socket was opened with (the channel session keeps its key); refuse and close the socket if
    the login has ended, else write as the user read now (its permissions as they are now)."""
    if not getattr(message.user, "is_authenticated", False):
        return None
    login = _login_of(message.http_session)
    if login is None and message.get("reply_channel"):
        kept = _channel_login(message.channel_session)
        user_id, _, user_hash = _login_names()
        if kept.get("session_key") and user_id in kept:
            login = (kept["session_key"], kept[user_id], kept.get(user_hash))
    if login is None:
        return None
    user = _user_now(login)
    if user is None:
        return "Your login has ended: log in again.", _LOGGED_OUT_CLOSE_CODE
    message.user = user
    return None


def _ended_logins(logins: Iterable[tuple[str, Any, Any]]) -> set[str]:
    """The session keys of the *logins* that have ended; one that cannot be read now (its
    backend failed) is logged and read again at the next check."""
    ended = set()
    for login in logins:
        try:
            if _user_now(login) is None:
                ended.add(login[0])
        except Exception:
            _log_limited(logging.ERROR, "Cannot check a login of this process's connections; "
                         "checking again in %g s.", _login_check_interval(), **_OUTAGE)
    return ended


def _end_logins(session_keys: set[str]) -> None:
    """Close (4401) this process's connections opened with one of *session_keys*; any thread."""
    for reply_channel, login in list(_logins.items()):
        connection = _local_sockets.get(reply_channel)
        if connection is not None and login[0] in session_keys:
            try:
                connection.loop.call_soon_threadsafe(connection._queue_close, _LOGGED_OUT_CLOSE_CODE)
            except RuntimeError:  # its loop has closed: so has the connection
                pass


def _watch_logouts() -> None:
    """Close a session's connections in this process when Django logs that session out."""
    from django.apps import apps

    if apps.ready and apps.is_installed("django.contrib.auth"):
        from django.contrib.auth.signals import user_logged_out
        user_logged_out.connect(_close_logged_out_connections, weak=False,
                                dispatch_uid=f"{__name__}._close_logged_out_connections")


def _close_logged_out_connections(sender: Any, request: Any = None, **kwargs: Any) -> None:
    """``user_logged_out``: end this process's connections of that session now. It never
    raises: Django sends the signal before it flushes the session, so an error here would
    answer the logout with 500 and leave the user logged in."""
    try:
        key = getattr(getattr(request, "session", None), "session_key", None)
        if key:
            _end_logins({key})
    except Exception:
        _receiver_failures["user_logged_out"] = _receiver_failures.get("user_logged_out", 0) + 1
        _log_limited(logging.ERROR, "The user_logged_out receiver failed (%d time(s) in all); the "
                     "logout goes on.", _receiver_failures["user_logged_out"], **_OUTAGE)


class _LoginWatch:
    """Every CHANNELS_MINI_LOGIN_CHECK seconds, ends this loop's connections whose login has
    ended: the session store tells every process what no signal reaches them all with. It
    costs one session read and one user read per logged-in session served, per check."""

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_login_check_interval())
            logins = {login for reply_channel, login in list(_logins.items())
                       if getattr(_local_sockets.get(reply_channel), "loop", None) is loop}
            if not logins:
                continue
            try:
                _end_logins(await _in_session_thread(_ended_logins, logins))
            except Exception:  # the session store or the database is down: check again later
                _log_limited(logging.ERROR, "Cannot check the logins of this process's connections; "
                                   "retrying in %g s.", _login_check_interval(), **_OUTAGE)


def _login_check_interval() -> float:
    from django.conf import settings
    seconds = getattr(settings, "CHANNELS_MINI_LOGIN_CHECK", _LOGIN_CHECK)
    if not isinstance(seconds, (int, float)) or not 0 < seconds <= 3600:
        raise ImproperlyConfigured(
            f"CHANNELS_MINI_LOGIN_CHECK must be a number of seconds between 0 and 3600 (got "
            f"{seconds!r}); it is how often connections check that their login still holds.")
    return float(seconds)


def _start_login_watch(app: Any) -> Any:
    """Hook ``serving``: the login checks, and the logout receiver for this process's views."""
    if not _settings_ready():
        return None
    _login_check_interval()  # a bad setting fails here, at start-up, not in the task
    _watch_logouts()
    return _LoginWatch().run()


# -- the 1.x test client --
# `channels.test` as of 1.1.8, so that a 1.x project's tests run with their imports changed.
# `ChannelTestCase` gives each test a fresh in-memory layer; `Client` sends a message to a
# channel and runs the consumer the routing picks for it, as a server would (sessions loaded
# and saved, deferred sends applied) but in the test's own thread and transaction;
# `WSClient` adds cookies, a session and logins. `apply_routes` swaps the routing they use
# (else `CHANNEL_ROUTING`). Bound changes are sent at once inside a test case, whose
# transaction never commits.

_test_routings: list[Any] = _module_state([])  # what apply_routes applied, innermost last
_json = json  # for WSClient.receive, whose json= argument (1.x's) hides the module
_UNANSWERED_HANDSHAKE = 10.0  # seconds before a handshake nobody answers is logged


DEFAULT_CHANNEL_LAYER = "default"


class _ChannelLayers:
    """``channel_layers[alias]``: Channels 1.x's way to reach a layer (``get_channel_layer``)."""

    def __getitem__(self, alias: str) -> Any:
        return get_channel_layer(alias)


channel_layers = _ChannelLayers()


def session_for_reply_channel(reply_channel: str) -> Any:
    """The channel session of *reply_channel*, loaded (Channels 1.x's name)."""
    return _channel_session_for(reply_channel)


def _test_router() -> Router:
    return Router(_test_routings[-1] if _test_routings else _routing_from_settings())


def _next_message(channel: str, alias: str) -> Message | None:
    """The next message on *channel*, or None at once if there is none (1.x's receive_many)."""
    layer = get_channel_layer(alias)
    if isinstance(layer, InMemoryChannelLayer):
        with layer._lock:
            queue = layer._queues.get(channel)
            content = layer._take(queue) if queue is not None else None
    else:
        raise TypeError(f"The 1.x test client reads the in-memory layer; {alias!r} is "
                        f"{type(layer).__name__}. Use ChannelTestCase, which gives each test one.")
    return None if content is None else Message(content, channel, layer)


class ChannelTestCaseMixin:
    """A fresh in-memory layer for each alias of ``test_channel_aliases`` during each test."""

    test_channel_aliases = ["default"]

    def _pre_setup(self) -> None:
        super()._pre_setup()  # type: ignore[misc]
        self._old_layers = {alias: _layers.get(alias) for alias in self.test_channel_aliases}
        for alias in self.test_channel_aliases:
            _layers[alias] = InMemoryChannelLayer()
        self._in_test = _inside_test_transaction.set(True)

    def _post_teardown(self) -> None:
        _inside_test_transaction.reset(self._in_test)
        for alias, layer in self._old_layers.items():
            if layer is None:
                _layers.pop(alias, None)
            else:
                _layers[alias] = layer
        super()._post_teardown()  # type: ignore[misc]

    def get_next_message(self, channel: str, alias: str = "default", require: bool = False) -> Message | None:
        """The next message sent to *channel* during the test, or None (a failure if *require*)."""
        message = _next_message(channel, alias)
        if message is None and require:
            self.fail(f"Expected a message on channel {channel}, got none")  # type: ignore[attr-defined]
        return message


class Client:
    """Sends messages from one reply channel and runs their consumers, as a worker would."""

    def __init__(self, alias: str = "default"):
        self.alias = alias
        self.reply_channel = alias + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))

    @property
    def channel_layer(self) -> Any:
        return get_channel_layer(self.alias)

    def get_next_message(self, channel: str) -> Message | None:
        return _next_message(channel, self.alias)

    def get_consumer_by_channel(self, channel: str) -> Any:
        matched = _test_router().match(Message({"text": ""}, channel, self.channel_layer))
        return matched[0] if matched else None

    def send(self, to: str, content: dict | None = None) -> None:
        """Send *content* to channel *to*, from this client's reply channel."""
        content = copy.deepcopy(content or {})
        content.setdefault("reply_channel", self.reply_channel)
        Channel(to, alias=self.alias).send(content, immediately=True)

    def consume(self, channel: str, fail_on_none: bool = True) -> Any:
        """Run the consumer the routing picks for the next message on *channel*."""
        message = self.get_next_message(channel)
        if message is None:
            if fail_on_none:
                raise AssertionError(f"No message for channel {channel}")
            return None
        router = _test_router()
        if router._find(channel, message.content) is None:
            if fail_on_none:
                raise AssertionError(f"Can't find consumer for message {message!r}")
            return None
        token, results = _inside_test_transaction.set(True), []
        try:
            async_to_sync(_handle_message)(router, self.channel_layer, message, results)
        finally:
            _inside_test_transaction.reset(token)
        return results[0] if results else None  # a class's instance, or what a function returned

    def send_and_consume(self, channel: str, content: dict | None = None, fail_on_none: bool = True) -> Any:
        self.send(channel, content)
        return self.consume(channel, fail_on_none=fail_on_none)

    def receive(self) -> dict | None:
        """The content of the next message sent to this client's reply channel, or None."""
        message = self.get_next_message(self.reply_channel)
        return message.content if message is not None else None

    def join_group(self, group_name: str) -> None:
        Group(group_name, alias=self.alias).add(self.reply_channel, immediately=True)


class WSClient(Client):
    """A websocket client for tests: cookies, headers, a Django session and logins."""

    def __init__(self, alias: str = "default", ordered: bool = False):
        super().__init__(alias)
        self._ordered = ordered
        self._session: Any = None
        self._headers: dict[str, Any] = {}
        self._cookies: dict[str, str] = {}
        self._session_cookie = True  # the first message carries the session cookie, as in 1.x
        self.order = 0

    def set_cookie(self, key: str, value: str) -> None:
        self._cookies[key] = value

    def set_header(self, key: str, value: Any) -> None:
        if key == "cookie":
            raise ValueError("Use set_cookie method for cookie header")
        self._headers[key] = value

    def get_cookies(self) -> dict[str, str]:
        from django.apps import apps

        cookies = dict(self._cookies)
        if self._session_cookie and apps.is_installed("django.contrib.sessions"):
            cookies[_setting("SESSION_COOKIE_NAME")] = self.session.session_key
        return cookies

    @property
    def headers(self) -> dict[str, Any]:
        from django.http.cookie import SimpleCookie

        headers = copy.deepcopy(self._headers)
        cookies = SimpleCookie()
        for key, value in self.get_cookies().items():
            cookies[key] = value
        headers.setdefault("cookie", cookies.output(header="", sep=";").encode("ascii"))
        return headers

    @property
    def session(self) -> Any:
        """The client's HTTP session (Django's session engine): a login goes into it, and its
        cookie goes with the first message. (1.x used the channel session for this; a channel
        session here is never a login.)"""
        from django.apps import apps

        if not apps.is_installed("django.contrib.sessions"):
            raise OSError("Add django.contrib.sessions to the INSTALLED_APPS to use session")
        if self._session is None:
            self._session = importlib.import_module(_setting("SESSION_ENGINE")).SessionStore()
            self._session.create()
        return self._session

    def receive(self, json: bool = True) -> Any:  # type: ignore[override]
        """The next reply's text (decoded from JSON if *json*), else its content; or None."""
        content = super().receive()
        if content and json and isinstance(content.get("text"), str):
            return _json.loads(content["text"])
        return content.get("text", content) if content else None

    def send(self, to: str, content: dict | None = None,  # type: ignore[override]
             text: Any = None, path: str = "/") -> None:
        if to != "websocket.connect" and "?" in path:
            path = path.split("?")[0]
        Channel(to, alias=self.alias).send(self._get_content(content, text, path), immediately=True)
        self._session_cookie = False

    def _get_content(self, content: dict | None = None, text: Any = None, path: str = "/") -> dict:
        content = copy.deepcopy(content or {})
        content.setdefault("reply_channel", self.reply_channel)
        path, _, query = path.partition("?")
        content.setdefault("path", path)
        if query:
            content.setdefault("query_string", query)
        content.setdefault("headers", self.headers)
        if self._ordered:
            if "order" in content:
                raise ValueError('Do not use "order" manually with "ordered=True"')
            content["order"], self.order = self.order, self.order + 1
        text = text or content.get("text")
        if text is not None:
            content["text"] = text if isinstance(text, str) else _json.dumps(text)
        return content

    def send_and_consume(self, channel: str, content: dict | None = None,  # type: ignore[override]
                         text: Any = None, path: str = "/", fail_on_none: bool = True,
                         check_accept: bool = True) -> Any:
        self.send(channel, content, text, path)
        return self.consume(channel, fail_on_none=fail_on_none, check_accept=check_accept)

    def consume(self, channel: str, fail_on_none: bool = True,  # type: ignore[override]
                check_accept: bool = True) -> Any:
        result = super().consume(channel, fail_on_none=fail_on_none)
        if channel == "websocket.connect" and check_accept:
            received = self.receive(json=False)
            if received != {"accept": True}:
                raise AssertionError(f"Connection rejected: {received} != '{{accept: True}}'")
        return result

    def login(self, **credentials: Any) -> bool:
        """Log in as Django's test client does; False if the credentials are refused."""
        from django.contrib.auth import authenticate

        user = authenticate(**credentials)
        if user is None or not user.is_active:
            return False
        self._login(user)
        return True

    def force_login(self, user: Any, backend: str | None = None) -> None:
        user.backend = backend or _setting("AUTHENTICATION_BACKENDS")[0]
        self._login(user)

    def _login(self, user: Any) -> None:
        from django.contrib.auth import login

        login(type("FakeRequest", (), {"session": self.session, "META": {}})(), user)
        self.session.save()


HttpClient = WSClient  # 1.x's older name


class apply_routes:
    """Use *routes* as the routing of the test clients, as a context manager or a decorator
    of a test function or class."""

    def __init__(self, routes: Any, aliases: list[str] | None = None):
        if isinstance(routes, (list, tuple)) and routes and isinstance(routes[0], (list, tuple)):
            routes = [Include(inner) for inner in routes]
        self.routes = routes if isinstance(routes, (list, tuple)) else [routes]

    def enter(self) -> None:
        _test_routings.append(self.routes)

    def exit(self, *exc_info: Any) -> None:
        _test_routings.remove(self.routes)

    __enter__, __exit__ = enter, exit

    def __call__(self, test: Any) -> Any:
        if isinstance(test, type):
            set_up, tear_down = test.setUp, test.tearDown

            def setUp(case: Any) -> None:
                self.enter()
                set_up(case)

            def tearDown(case: Any) -> None:
                self.exit()
                tear_down(case)

            test.setUp, test.tearDown = setUp, tearDown
            return test

        @functools.wraps(test)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with self:
                return test(*args, **kwargs)
        return inner


def name_that_thing(thing: Any) -> str:
    """A dotted name for a function or class, a classmethod's class, or an object's class;
    else its repr (Channels 1.x's helper for messages about consumers)."""
    if inspect.ismethod(thing) and isinstance(thing.__self__, type):
        thing = thing.__self__
    elif not isinstance(thing, type) and not inspect.isroutine(thing):
        thing = type(thing)
    module, name = getattr(thing, "__module__", None), getattr(thing, "__name__", None)
    return f"{module}.{name}" if module and name else repr(thing)


def _add_route(router: Router, route: Route | Include) -> None:
    """``Router.add_route(route)``: *route* at the end of the routing (Channels 1.x)."""
    router.routes.append(route)
    router.channels = router.channels | route.channels


Router.add_route = _add_route  # type: ignore[attr-defined]


def _warn_if_never_accepted(connection: Any) -> None:
    """Hook ``opened``: say so when a websocket's handshake is neither accepted nor refused
    10 s after it began (a connect consumer that sends no accept leaves the client waiting)."""
    import weakref

    def check(reference: weakref.ref = weakref.ref(connection)) -> None:
        connection = reference()  # the timer must not keep a closed connection alive
        if connection is not None and not (connection.accepted or connection.closed or connection.closing):
            _log_limited(logging.WARNING, "Websocket %.200s: no consumer accepted or refused its "
                         "handshake within 10 s; the client is still waiting. Send {'accept': True} "
                         "(or raise DenyConnection) from the websocket.connect consumer.", connection.path)

    if connection.kind == "websocket.send":
        asyncio.get_running_loop().call_later(_UNANSWERED_HANDSHAKE, check)



_hooks.message.append(_load_for_class)
_hooks.handled.append(_save_sessions)
_hooks.closed.append(_forget_channel_session)
_hooks.serving.append(_start_login_watch)
_hooks.opened.append(_warn_if_never_accepted)
__all__ += ["ChannelTestCase", "TransactionChannelTestCase", "Client", "WSClient", "HttpClient",
            "apply_routes", "session_for_reply_channel", "name_that_thing", "channel_layers",
            "DEFAULT_CHANNEL_LAYER",
            "channel_session", "http_session", "http_session_user", "channel_session_user",
            "channel_session_user_from_http", "channel_and_http_session",
            "channel_and_http_session_user_from_http", "enforce_ordering", "allowed_hosts_only"]
_write_checks.append(_refuse_ended_login)


# === 12. HTTP consumers and event streams ===
# Channels 1.x routed `http.request` like any channel: a consumer answers on the request's
# reply channel -- at once, or later from any code (long-polling), or as a stream that stays
# open (server-sent events). Requests no route takes still go to Django. Hook: `http` (a
# routed request gets an `_HttpConnection`, the core's connection with requests in instead of
# frames). Costs: one route match per HTTP request when `http.request` is routed; else none.


class RequestTimeout(Exception):
    """A request's body did not arrive within ``AsgiRequest.body_receive_timeout`` (1.x)."""


class RequestAborted(Exception):
    """The client went away while its request's body was arriving (1.x)."""


def _asgi_request_class() -> type:
    """``AsgiRequest``: made on first use, as it subclasses Django's ``ASGIRequest``, whose
    module takes as long to import as this whole one."""
    made = globals().get("AsgiRequest")
    if made is not None:
        return made
    import io

    from django.core.handlers.asgi import ASGIRequest

    class AsgiRequest(ASGIRequest):
        """A Django ``HttpRequest`` for an ``http.request`` message (Channels 1.x's name):
        ``request = AsgiRequest(message)``, then ``request.GET``, ``request.POST``,
        ``request.COOKIES`` and ``request.body`` as in a view. A body sent in chunks on the
        message's ``body_channel`` (1.x) is read first: ``RequestTimeout`` if it takes over
        ``body_receive_timeout`` seconds, ``RequestAborted`` if the client goes away."""

        body_receive_timeout = 60

        def __init__(self, message: Message):
            self.message, self.reply_channel = message, message.reply_channel
            scope = {"type": "http", **{key: message.get(key) for key in (
                "http_version", "method", "path", "root_path", "scheme", "query_string",
                "headers", "client", "server")}}
            if isinstance(scope["path"], bytes):
                scope["path"] = scope["path"].decode("utf-8")
            scope["root_path"], scope["headers"] = scope["root_path"] or "", _header_items(scope["headers"])
            body = message.get("body") or b""
            if message.get("body_channel"):
                body += _body_from_channel(message, self.body_receive_timeout)
            super().__init__(scope, io.BytesIO(body))

    globals()["AsgiRequest"] = AsgiRequest
    return AsgiRequest


def _body_from_channel(message: Message, timeout: float) -> bytes:
    """The chunks of a body that 1.x sent on ``body_channel``, until one says there is no more."""
    layer, channel = message.channel_layer or get_channel_layer(), message["body_channel"]
    body, deadline = b"", time.monotonic() + timeout
    while True:
        try:
            chunk = async_to_sync(asyncio.wait_for)(layer.receive(channel), deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise RequestTimeout(f"The body of {message.get('path')!r} did not arrive on "
                                 f"{channel!r} within {timeout} s.") from None
        if chunk.get("closed"):
            raise RequestAborted(f"The client of {message.get('path')!r} went away mid-body.")
        body += chunk.get("content") or b""
        if not chunk.get("more_content"):
            return body


class AsgiHandler:
    """Channels 1.x's handler: ``AsgiHandler()(message)`` runs an ``http.request`` message
    through Django's middleware and views and yields its reply messages (``ViewConsumer``'s
    work); ``encode_response(response)`` gives the replies for a response you made."""

    #: Bytes of body per reply message.
    chunk_size = 512 * 1024

    def __init__(self) -> None:
        from django.core.handlers.base import BaseHandler

        self._django = BaseHandler()
        self._django.load_middleware()

    def get_response(self, request: Any) -> Any:
        return self._django.get_response(request)

    def __call__(self, message: Message) -> Iterable[dict]:
        from django.http import FileResponse, HttpResponse, HttpResponseBadRequest
        from django.urls import set_script_prefix

        set_script_prefix(message.get("root_path") or "")
        try:
            request = _asgi_request_class()(message)
        except UnicodeDecodeError:
            response = HttpResponseBadRequest()
        except RequestTimeout:
            response = HttpResponse("408 Request Timeout (upload too slow)", status=408)
        except RequestAborted:
            return
        else:
            response = self.get_response(request)
            if isinstance(response, FileResponse):
                response.block_size = self.chunk_size
        yield from self.encode_response(response)

    @classmethod
    def encode_response(cls, response: Any) -> list[dict]:
        """The reply messages for a Django ``HttpResponse`` (streaming ones too), in order:
        ``for reply in AsgiHandler.encode_response(response): message.reply_channel.send(reply)``.
        From sync code (consumers, views), as in 1.x."""
        from django.core.handlers.asgi import ASGIHandler

        events: list[dict] = []

        async def collect(event: dict) -> None:
            events.append(event)

        # Django's own encoder (headers, cookies, streaming), with this class's chunks, and
        # without building a handler: that would load the middleware, which it needs none of.
        async_to_sync(ASGIHandler.send_response)(cls, response, collect)
        start, bodies = events[0], events[1:]
        replies = [{"content": body.get("body", b""), "more_content": body.get("more_body", False)}
                   for body in bodies] or [{"content": b"", "more_content": False}]
        replies[0].update(status=start["status"], headers=start["headers"])
        return replies

    @classmethod
    def chunk_bytes(cls, data: bytes) -> Iterable[tuple[bytes, bool]]:
        """*data* in pieces of ``chunk_size``: ``(piece, is_last)`` pairs (one for no data)."""
        if not data:
            yield data, True
        for start in range(0, len(data), cls.chunk_size):
            yield data[start:start + cls.chunk_size], start + cls.chunk_size >= len(data)


def sse_event(data: str | None = None, *, event: str | None = None, id: str | None = None,
              retry: int | None = None, comment: str | None = None) -> bytes:
    """One server-sent event, framed for an ``EventSource``: send it as a reply's ``content``.

    ``sse_event("hello", event="chat", id="7")`` is ``b"event: chat\\nid: 7\\ndata: hello\\n\\n"``;
    ``sse_event(comment="keep-alive")`` is a comment that keeps proxies from timing out.
    """
    lines = [f": {line}" for line in (comment or "").splitlines()] if comment is not None else []
    for name, value in (("event", event), ("id", id), ("retry", retry)):
        if value is not None:
            lines.append(f"{name}: {value}")
    if data is not None:
        lines += [f"data: {line}" for line in str(data).split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


#: The headers a server-sent events reply starts with.
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


# -- the connection of one request --

_TOO_LARGE = object()  # what _read_body returns for a body over the limit
_ANSWERED = object()  # a request answered before any consumer ran (413, 408)


_MESSAGE_KEYS["http.request"] = {"reply_channel", "http_version", "method", "path", "root_path",
                                 "scheme", "query_string", "headers", "body", "client", "server"}
_MESSAGE_KEYS["http.disconnect"] = {"reply_channel", "path"}


def _request_message(scope: Scope, reply_channel: str, body: bytes = b"") -> dict:
    return {"reply_channel": reply_channel, "http_version": scope.get("http_version", "1.1"),
            "method": scope.get("method", "GET"), "path": scope.get("path", ""),
            "root_path": scope.get("root_path", ""), "scheme": scope.get("scheme", "http"),
            "query_string": scope.get("query_string", b""), "headers": scope.get("headers", []),
            "body": body, "client": scope.get("client"), "server": scope.get("server")}


async def _read_body(receive: Receive, limit: int | None) -> Any:
    """The whole request body; `_TOO_LARGE` over *limit* bytes, None if the client left."""
    chunks, size = [], 0
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            return None
        chunk = event.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            return _TOO_LARGE
        chunks.append(chunk)
        if not event.get("more_body"):
            return b"".join(chunks)


def _header_pairs(headers: Any) -> list[tuple[bytes, bytes]]:
    """Reply headers as ASGI wants them: pairs of bytes (1.x code often wrote str)."""
    return [tuple(part.encode("latin-1") if isinstance(part, str) else bytes(part)
                  for part in pair) for pair in headers]


def _plain_reply(status: int, text: str) -> dict:
    return {"status": status, "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            "content": text.encode(), "more_content": False}


class _HttpConnection(_Connection):
    """One routed HTTP request: its ``http.request`` message in; replies on its reply channel
    -- from the consumer, or later from any code -- out as the response, streamed if asked."""

    kind, what = "http.response", "HTTP request"

    def __init__(self, scope: Scope, send: Send, router: Router, layer: Any,
                 body_limit: int | None, timeout: float):
        super().__init__(scope, send, router, layer)
        self.body_limit, self.timeout = body_limit, timeout
        self.started = False
        self.done = asyncio.Event()  # the response is complete

    async def _run(self, receive: Receive) -> None:
        deadline = time.monotonic() + self.timeout  # both limits count from the arrival
        body = await self._read(receive, deadline)
        if body is None:
            return  # the client left
        handler = None
        if body is not _ANSWERED:
            handler = asyncio.create_task(self._handle(
                "http.request", _request_message(self.scope, self.reply_channel, body)))
        left = await self._wait(receive, deadline if handler is not None else None)
        if handler is not None:
            await handler  # a consumer still busy after a 504: its replies are dropped
        if left:
            self.closed = True
            await self._leave_groups()  # first: nothing more can reach the client
            await self._handle("http.disconnect", {"reply_channel": self.reply_channel,
                                                   "path": self.path})

    async def _read(self, receive: Receive, deadline: float) -> Any:
        """The body; `_ANSWERED` if it is refused (413) or too slow (408); None if the client left."""
        try:
            body = await asyncio.wait_for(_read_body(receive, self.body_limit),
                                          deadline - time.monotonic())
        except asyncio.TimeoutError:
            _log_limited(logging.WARNING, "The body of %s %.200s did not arrive within %g s: 408.",
                                 self.scope.get("method"), self.path, self.timeout)
            self._queue(_plain_reply(408, "The request body did not arrive in time."))
            return _ANSWERED
        if body is _TOO_LARGE:
            _log_limited(logging.WARNING, "Refused a request body over %d bytes on %.200s (413).",
                                 self.body_limit, self.path)
            self._queue(_plain_reply(413, f"Request body over {self.body_limit} bytes."))
            return _ANSWERED
        return body

    async def _wait(self, receive: Receive, deadline: float | None) -> bool:
        """Until the response is complete or the client leaves (True); 504 at *deadline* if
        nothing was answered yet, whatever the consumer is still doing (None: already answered)."""
        done = asyncio.create_task(self.done.wait())
        left = asyncio.create_task(_http_disconnected(receive))
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            finished, _ = await asyncio.wait({done, left}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
            if not finished and not self.started:
                _log_limited(logging.WARNING, "Nobody answered %s %.200s within %g s: 504.",
                                     self.scope.get("method"), self.path, self.timeout)
                self._queue(_plain_reply(504, "Nobody answered this request in time."))
            if not finished:  # a stream goes on for as long as its client listens
                await asyncio.wait({done, left}, return_when=asyncio.FIRST_COMPLETED)
            return left.done() and not done.done()
        finally:
            done.cancel()
            left.cancel()

    async def _handle(self, channel: str, content: dict) -> None:
        try:
            await _handle_message(self.router, self.layer, self._message(channel, content))
        except Exception:
            logger.exception("Consumer failed on %s for %.200s; answering 500.", channel, self.path)
            if not self.started and not self.closed:
                self._queue(_plain_reply(500, "The server failed to answer this request."))

    async def _deliver(self, reply: dict) -> None:
        """Turn one 1.x reply (``status``, ``headers``, ``content``, ``more_content``) into
        ASGI response events. A started stream takes websocket frames too: a group's
        ``{"text": ...}`` arrives as one server-sent event, so one group feeds both."""
        if self.closed or self.done.is_set() or ("status" in reply and self.started):
            return  # late: the response is over, or has started (after a 504, say)
        if reply.get("close") == _LOGGED_OUT_CLOSE_CODE:  # the login ended: end the stream, or refuse
            reply = ({"content": b"", "more_content": False} if self.started else
                     _plain_reply(403, "The login this request was made with has ended."))
        if "text" in reply and self.started:  # a websocket frame sent to a group a stream joined
            reply = {"content": sse_event(reply["text"]), "more_content": True}
        if not self.started:
            await self._emit({"type": "http.response.start", "status": int(reply["status"]),
                              "headers": _header_pairs(reply.get("headers", ()))})
            self.started = True
        more = bool(reply.get("more_content", False))
        await self._emit({"type": "http.response.body", "body": reply.get("content", b""),
                          "more_body": more})
        if not more:
            self.done.set()

    async def _abort(self) -> None:
        if not self.started:
            await self._deliver(_plain_reply(500, "The server failed to answer this request."))
        self.done.set()


async def _http_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _http_connection(app: Any, scope: Scope, send: Send) -> _HttpConnection | None:
    """Hook ``http``: a routed ``http.request`` gets a connection of its own; None leaves it
    to Django."""
    router = app.router
    if ("http.request" not in router.channels
            or router._find("http.request", _request_message(scope, "")) is None):
        return None
    limit = _setting("DATA_UPLOAD_MAX_MEMORY_SIZE") if _settings_ready() else None
    return _HttpConnection(scope, send, router, app.channel_layer,
                           limit if limit is not None else app.max_message_size, app.http_timeout)


_hooks.http.append(_http_connection)
__all__ += ["AsgiRequest", "AsgiHandler", "RequestTimeout", "RequestAborted", "sse_event", "SSE_HEADERS"]


# === 13. Presence ===
# Who is in a group, which Channels never had (Phoenix calls it Presence). A socket is
# tracked in a group under a key -- its user, or one opaque anonymous key per socket -- with a
# small JSON-able `meta`; `Group(name).presence()` lists one entry per key with the metas of
# its sockets. Each process keeps its own members in a cache (one entry per group and process,
# refreshed by a heartbeat, and an index of the processes per group; every key expires and is
# deleted when it empties). By default that cache is the module's own, in this process: it
# never evicts the application's cache entries or sessions. Point it at a shared cache
# (Django's RedisCache) and every process sees the same members; those of a process that dies
# leave when its entry has expired and stays gone for two heartbeats. Keys that join or leave
# go to the group as one "presence_diff" frame; within a process one lock makes joins, leaves
# and reads exact. A cache outage degrades presence to this process's members and closes
# nothing; the joins and leaves it held up go out when the cache returns. Hooks: `connected`
# (track a consumer's socket), `closed` (untrack it), `serving` (the heartbeat). Costs:
# nothing for a group nobody tracks; a few cache reads and writes per join and leave.

_PRESENCE_DEFAULTS = {"CACHE": None, "HEARTBEAT": 5.0, "TIMEOUT": 20.0}
_process_id = secrets.token_hex(6)  # names this process's presence entries
_tracked: dict[str, dict[str, tuple[str, dict]]] = _module_state({})  # group -> {channel: (key, meta)}, here
#: What the cache has not heard yet (it was down): group -> {"joins"/"leaves": {channel: (key, meta)}}.
_held_back: dict[str, dict[str, dict[str, tuple[str, dict]]]] = _module_state({})
_presence_lock = threading.RLock()  # one join, leave or beat at a time: each reads, then writes
_own_cache: Any = None  # the module's own presence storage, made on first use


def _presence_setting(name: str) -> Any:
    from django.conf import settings

    configured = getattr(settings, "CHANNELS_MINI_PRESENCE", {}) if _settings_ready() else {}
    return configured.get(name, _PRESENCE_DEFAULTS[name])


def _presence_cache() -> Any:
    """The Django cache named by ``CHANNELS_MINI_PRESENCE["CACHE"]``; without one, the module's
    own in-process storage (never Django's default cache: presence would evict its entries)."""
    global _own_cache
    alias = _presence_setting("CACHE")
    if alias is not None:
        from django.core.cache import caches
        return caches[alias]
    if _own_cache is None:
        from django.core.cache.backends.locmem import LocMemCache
        own = LocMemCache("channels_mini.presence", {"OPTIONS": {"MAX_ENTRIES": 10**7}})
        _own_cache = _module_state(own)  # reset_channel_layers() empties it
    return _own_cache


def _presence_index(group: str) -> str:
    return f"channels_mini.presence.{group}"  # the processes with members; each has index.<id>


def _publish_tracked(group: str) -> None:
    """Write this process's members of *group* and refresh its name in the group's index;
    with none left, delete both (the index when nobody else is in it)."""
    cache, index_key, timeout = _presence_cache(), _presence_index(group), _presence_setting("TIMEOUT")
    members = dict(_tracked.get(group, {}))
    index = cache.get(index_key) or set()
    if members:
        cache.set(f"{index_key}.{_process_id}", members, timeout)
        cache.set(index_key, index | {_process_id}, timeout)  # a lost race: the next beat mends it
        return
    cache.delete(f"{index_key}.{_process_id}")
    if index - {_process_id}:
        cache.set(index_key, index - {_process_id}, timeout)
    else:
        cache.delete(index_key)


def _presence_entries(group: str, also: Iterable[str] = ()) -> dict[str, dict]:
    """``{process id: {channel: (key, meta)}}`` for every live process with members: those in
    the group's index, and *also* these."""
    cache, index_key = _presence_cache(), _presence_index(group)
    processes = {*(cache.get(index_key) or ()), *also}
    found = cache.get_many([f"{index_key}.{process}" for process in processes])
    return {name.rsplit(".", 1)[1]: entry for name, entry in found.items()}


def _members(entries: dict[str, dict]) -> dict[str, list[dict]]:
    members: dict[str, list[dict]] = {}
    for entry in entries.values():
        for key, meta in entry.values():
            members.setdefault(key, []).append(meta)
    return members


def _keys_here(group: str) -> set[str]:
    return {key for key, _ in _tracked.get(group, {}).values()}


def _announce_presence(group: Group, joins: dict, leaves: dict) -> None:
    if joins or leaves:
        diff = {"type": "presence_diff", "group": group.name, "joins": joins, "leaves": leaves}
        group.send({"text": json.dumps(diff)})  # in a consumer: after its own replies


def _presence_outage(group: str) -> None:
    _log_limited(logging.ERROR, "Cannot read or write the presence of group %r in the cache: "
                 "presence lists only this process's members until it is back; its joins and "
                 "leaves go out then.", group, **{**_OUTAGE, "key": "presence outage"})


def _track(group: Group, channel: str, key: str, meta: dict) -> None:
    json.dumps(meta)  # a meta that is not JSON-able fails here, in the caller's code
    group.add(channel)  # tracked sockets hear the diffs
    with _presence_lock:
        here = key in _keys_here(group.name)
        _tracked.setdefault(group.name, {})[channel] = (key, meta)
        try:
            before = here or key in _members(_presence_entries(group.name))
            _publish_tracked(group.name)
        except Exception:
            _held_back.setdefault(group.name, {"joins": {}, "leaves": {}})["joins"][channel] = (key, meta)
            return _presence_outage(group.name)
    _announce_presence(group, {} if before else {key: [meta]}, {})


def _untrack(group: Group, channel: str) -> None:
    with _presence_lock:
        key, meta = _tracked.get(group.name, {}).pop(channel, (None, None))
        if group.name in _tracked and not _tracked[group.name]:
            del _tracked[group.name]
        if key is None:
            return
        held = _held_back.get(group.name)
        if held is not None and held["joins"].pop(channel, None):
            return  # it came and went while the cache was down: nobody heard of it
        try:
            _publish_tracked(group.name)
            still_here = key in _members(_presence_entries(group.name))  # another tab of that user
        except Exception:
            _held_back.setdefault(group.name, {"joins": {}, "leaves": {}})["leaves"][channel] = (key, meta)
            return _presence_outage(group.name)
    _announce_presence(group, {}, {} if still_here else {key: [meta]})


def _presence_read(group: str) -> dict[str, list[dict]]:
    with _presence_lock:
        try:
            return _members(_presence_entries(group))
        except Exception:
            _presence_outage(group)
            return _members({_process_id: dict(_tracked.get(group, {}))})


def _presence_key(user: Any, channel: str) -> str:
    """A socket's default key: its user's pk, or one anonymous key per socket."""
    if getattr(user, "is_authenticated", False):
        return str(user.pk)
    return _anonymous_key(channel)


def _anonymous_key(channel: str) -> str:
    """An anonymous socket's presence key: opaque, so that the members of a group, who all
    see it, learn nothing of the socket's reply channel (nor, from it, its channel session)."""
    return "anonymous." + _keyed_digest("presence", channel)[:24]


# -- the Group and consumer API --

class _GroupPresence:
    """The presence methods of ``Group`` (copied onto it below)."""

    def track(self, channel: Channel | str, key: str | None = None, meta: dict | None = None) -> None:
        """List *channel* in this group's presence under *key* (default: a key of its own)
        with *meta* (a small JSON-able dict); it joins the group too, and both end when its
        socket closes. A new key is announced to the group as a ``presence_diff`` frame."""
        name = _channel_name(channel)
        _track(self, name, key or _anonymous_key(name), dict(meta or {}))

    def untrack(self, channel: Channel | str) -> None:
        """Stop listing *channel*; a key with no socket left is announced as a leave."""
        _untrack(self, _channel_name(channel))

    def presence(self) -> dict[str, list[dict]]:
        """Who is in the group, in every process: ``{key: [meta, ...]}``, a meta per socket
        (while the cache is down, those of this process only)."""
        return _presence_read(self.name)

    async def atrack(self, channel: Channel | str, key: str | None = None,
                     meta: dict | None = None) -> None:
        """``track``, from async code (the cache is read and written in a thread)."""
        await _in_session_thread(self.track, channel, key, meta)

    async def apresence(self) -> dict[str, list[dict]]:
        """``presence``, from async code."""
        return await _in_session_thread(self.presence)


class _ConsumerPresence:
    """The presence attributes of ``WebsocketConsumer`` (copied onto it below)."""

    #: Groups whose presence lists every socket of this consumer (see ``presence_groups``).
    presence: list[str] | None = None

    def presence_groups(self, **kwargs: Any) -> list[str]:
        """The groups whose presence lists this socket after ``connect`` (default:
        ``presence``): under its user's pk with ``http_user = True``, else a key of its own."""
        return list(self.presence or ())

    def presence_meta(self, **kwargs: Any) -> dict:
        """The socket's entry in a presence list: its user's name and when it joined."""
        user = self.message.user
        name = user.get_username() if getattr(user, "is_authenticated", False) else "anonymous"
        return {"name": name, "joined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


for _name in ("track", "untrack", "presence", "atrack", "apresence"):
    setattr(Group, _name, vars(_GroupPresence)[_name])
for _name in ("presence", "presence_groups", "presence_meta"):
    setattr(WebsocketConsumer, _name, vars(_ConsumerPresence)[_name])


async def _track_connected(consumer: WebsocketConsumer, kwargs: dict) -> None:
    """Hook ``connected``: list the socket in its ``presence_groups()``."""
    if type(consumer).presence_groups is _ConsumerPresence.presence_groups and not consumer.presence:
        return  # the default, with nothing declared: no thread hop for every socket
    names = await _run_handler(consumer.presence_groups, **kwargs)
    if names:
        message = consumer.message
        key = _presence_key(message.user, message.reply_channel.name)
        meta = await _run_handler(consumer.presence_meta, **kwargs)
        for name in names:
            await Group(name, channel_layer=message.channel_layer).atrack(message.reply_channel, key, meta)


async def _untrack_closed(connection: Any) -> None:
    """Hook ``closed``: the socket leaves every presence list, announced as a leave."""
    # No lock here, on the event loop: a heartbeat thread may hold it while it waits for the loop.
    groups = [group for group, members in list(_tracked.items()) if connection.reply_channel in members]
    for group in groups:
        try:
            untrack = Group(group, channel_layer=connection.layer).untrack
            await _in_session_thread(untrack, connection.reply_channel)
        except Exception:
            _log_limited(logging.ERROR, "Cannot remove a connection from the presence of a group; "
                         "its entry expires by itself.", **_OUTAGE)


class _PresenceHeartbeat:
    """Refreshes this process's presence entries, sends the joins and leaves an outage held
    back, and announces the keys of a process that died as leaves, on *layer* (the app's, where
    its sockets' groups live).

    A process is dead when its entry is missing at two beats in a row: a cache that restarted
    empty is refilled by every live process within one beat, so none of them is announced gone.
    Of the processes that saw the dead one, the first to claim it in the cache announces, so
    each leave goes once; a live process that finds itself claimed announces its keys back."""

    def __init__(self, layer: Any):
        self.layer = layer
        self.seen: dict[str, dict[str, dict]] = {}  # group -> {process: entry} at the last beat
        self.missing: dict[str, set[str]] = {}  # group -> processes missing at the last beat

    async def run(self) -> None:
        period = _presence_setting("HEARTBEAT")
        next_beat = time.monotonic() + period
        while True:  # a fixed period, whatever a beat takes: the death rule counts on it
            await asyncio.sleep(max(0.0, next_beat - time.monotonic()))
            next_beat += period
            try:
                await _in_session_thread(self.beat)
            except Exception:
                _log_limited(logging.ERROR, "Cannot refresh this process's presence entries in the "
                                   "cache; retrying.", **{**_OUTAGE, "key": "presence outage"})

    def beat(self) -> None:
        with _presence_lock:
            groups = set(_tracked) | set(_held_back) | set(self.seen)
        for group in groups:
            with _presence_lock:
                diffs = self._beat(group)
            target = Group(group, channel_layer=self.layer)
            for joins, leaves in diffs:  # sent without the lock: a send may wait for the loop
                _announce_presence(target, joins, leaves)
        self.seen = {group: seen for group, seen in self.seen.items() if group in _tracked}

    def _beat(self, group: str) -> list[tuple[dict, dict]]:
        """Refresh *group*'s entry and read the others: the diffs to announce (joins, leaves)."""
        _publish_tracked(group)
        seen = self.seen.get(group, {})
        entries = _presence_entries(group, also=seen)  # a process a lost index write left out is no death
        elsewhere = _members({process: entry for process, entry in entries.items()
                              if process != _process_id})
        diffs = [self._held_back(group, elsewhere), self._claimed_but_here(group)]
        missing = {process for process in seen if process not in entries}
        twice = missing & self.missing.get(group, set())  # dead: decided, whoever announces it
        gone: dict[str, list[dict]] = {}
        for process in twice:
            if self._claim(group, process):
                for key, meta in seen[process].values():
                    if key not in elsewhere and key not in _keys_here(group):
                        gone.setdefault(key, []).append(meta)
        self.missing[group] = missing - twice
        self.seen[group] = {**{process: seen[process] for process in self.missing[group]}, **entries}
        return [*diffs, ({}, gone)]

    @staticmethod
    def _held_back(group: str, elsewhere: dict) -> tuple[dict, dict]:
        """The cache is back: the joins and leaves it missed, as they stand now."""
        held = _held_back.pop(group, None)
        joins: dict[str, list[dict]] = {}
        leaves: dict[str, list[dict]] = {}
        if held is None:
            return joins, leaves
        here = _keys_here(group)
        heard_before = {key for channel, (key, _) in _tracked.get(group, {}).items()
                        if channel not in held["joins"]}
        heard_before |= {key for key, _ in held["leaves"].values()}
        for key, meta in held["joins"].values():
            if key not in heard_before and key not in elsewhere:
                joins.setdefault(key, []).append(meta)
        for key, meta in held["leaves"].values():
            if key not in here and key not in elsewhere:
                leaves.setdefault(key, []).append(meta)
        return joins, leaves

    @staticmethod
    def _claimed_but_here(group: str) -> tuple[dict, dict]:
        """Another process took this one for dead (its entry went missing too long): its keys,
        to say they are here after all."""
        cache, marker = _presence_cache(), f"{_presence_index(group)}.{_process_id}.gone"
        joins: dict[str, list[dict]] = {}
        if cache.get(marker) is not None:
            cache.delete(marker)
            for key, meta in _tracked.get(group, {}).values():
                joins.setdefault(key, []).append(meta)
        return joins, {}

    @staticmethod
    def _claim(group: str, process: str) -> bool:
        """Be the one process that announces *process*'s death (``cache.add`` sets only once)."""
        cache, index_key = _presence_cache(), _presence_index(group)
        if not cache.add(f"{index_key}.{process}.gone", True, _presence_setting("TIMEOUT")):
            return False
        index = cache.get(index_key) or set()
        if index - {process}:
            cache.set(index_key, index - {process}, _presence_setting("TIMEOUT"))
        return True


def _start_heartbeat(app: Any) -> Any:
    """Hook ``serving``: this process's presence heartbeat."""
    return _PresenceHeartbeat(app.channel_layer).run()


_hooks.connected.append(_track_connected)
_hooks.closed.append(_untrack_closed)
_hooks.serving.append(_start_heartbeat)


# === 14. Several processes: shared layers ===
# With a shared layer (channels_redis), a connection's outbox stays in this process's memory,
# and what other processes send to it arrives through Redis: a listener per connection moves
# it into the outbox. Sync sends made on an event loop go to one layer thread, so they never
# block the loop (elsewhere they wait for Redis, as Channels 1.x's did). channels_redis keeps
# the messages for every socket of a process under one Redis key, capped by the layer's
# `capacity` (100) unless told otherwise, and its connection pools raise when 100 are busy: a
# layer gets room for a burst to every socket of the process and pools that wait, and what it
# still drops is counted and logged as a warning (it logs it at INFO). A Redis restart (empty,
# from a snapshot, a failover) can lose group memberships while the sockets stay open: each
# server process watches the Redis servers' run ids and a canary group, and joins its sockets
# to their groups again when either tells. (The core already keeps sends to this process's
# sockets off Redis, so an outage does not close them.) And a group send that reaches nobody
# in a process without consumers (a bound save in `manage.py shell`) says once that it needs a
# shared layer. Hooks: `layer` (capacity, pools, counting), `opened`/`closed` (the outbox and
# listener), `layer_call` (the layer thread), `serving` (the membership keeper), `unheard` (the
# warning). Costs: nothing with the in-memory layer; one Redis read per connection, and a
# group send and an INFO every 2 s per process.

_STOP = {"channels_mini.connection": "stop"}  # never a user reply: those hold accept/text/bytes/close
_listeners: dict[str, asyncio.Task] = _module_state({})  # reply channel -> its listener


_process_outboxes: InMemoryChannelLayer | None = None  # the outboxes of this process's connections


def _outboxes(layer: Any) -> InMemoryChannelLayer:
    """Where the outboxes of connections on *layer* live: the layer itself if in memory, else
    one in-memory layer for the whole process."""
    global _process_outboxes
    if isinstance(layer, InMemoryChannelLayer):
        return layer
    if _process_outboxes is None:
        _process_outboxes = InMemoryChannelLayer(capacity=getattr(layer, "capacity", 100))
    return _process_outboxes


def _application_stats(app: Any) -> dict[str, int]:
    """``Application.stats()``: what waits for this process's connections, as
    ``InMemoryChannelLayer.stats()`` counts it in the layer holding their outboxes. ``"dropped"``
    counts every message dropped on its way to one of them, and with a shared layer also the
    group messages that layer dropped when this process sent them."""
    return _outboxes(app.channel_layer).stats()


Application.stats = _application_stats  # type: ignore[attr-defined]


def _start_listener(connection: Any) -> asyncio.Task | None:
    """Hook ``opened``: with a shared layer, the connection's outbox lives in this process's memory,
    and a listener moves into it what reaches the connection through the shared layer."""
    if isinstance(connection.layer, InMemoryChannelLayer):
        return None
    connection.outbox = _outboxes(connection.layer)
    task = _listeners[connection.reply_channel] = asyncio.create_task(_listen(connection))
    return task


async def _listen(connection: Any) -> None:
    """Move what reaches *connection* through the shared layer (group sends, other processes)
    into its outbox. A full outbox drops the message, counted and logged."""
    while True:
        try:
            message = await connection.layer.receive(connection.reply_channel)
        except Exception:
            if connection.closed:
                return  # the client is gone: a late error from its receive is no news
            _log_limited(logging.ERROR, "Cannot receive messages for %s %s from the channel layer; "
                         "retrying in 1 s.", connection.what, connection.path, **_OUTAGE)
            await asyncio.sleep(1)
            continue
        if message == _STOP:
            return
        try:
            connection._queue(message)
        except ChannelFull:
            connection.outbox._report_drops("From the channel layer", [connection.reply_channel])


async def _stop_listener(connection: Any) -> None:
    """Hook ``closed``: stop the listener with a message rather than a cancel: a Redis layer
    shares one connection between the sockets of a process, and a cancel landing mid-read can
    lose another socket's message. (The core cancels what is left.)"""
    listener = _listeners.pop(connection.reply_channel, None)
    if listener is None:
        return
    try:
        await asyncio.wait_for(connection.layer.send(connection.reply_channel, dict(_STOP)), 2)
        await asyncio.wait({listener}, timeout=2)
    except Exception:  # the layer is down or the channel full: cancelling is all that is left
        pass


class _LayerThread:
    """A thread with its own event loop that applies sync-form layer calls made on an event loop.

    It keeps them in call order (each takes one lock, in turn), never blocks the caller's
    loop, and outlives it (a task on that loop would be cancelled with it). Only layers
    other than the in-memory one need it.
    """

    _instance: _LayerThread | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def submit(cls, function: Callable[..., Awaitable], args: tuple) -> None:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            thread = cls._instance
            thread.last = asyncio.run_coroutine_threadsafe(thread._apply(function, args), thread.loop)

    def __init__(self):
        import atexit

        self.loop = asyncio.new_event_loop()
        self.last: Any = None  # the latest call's future: once it is done, all are
        self.turns: asyncio.Lock | None = None  # made on the thread's own loop
        threading.Thread(target=self.loop.run_forever, daemon=True, name="channels-mini-layer").start()
        atexit.register(self._finish)

    def _finish(self) -> None:
        """Let queued sends leave before the process ends (up to 5 s)."""
        import concurrent.futures
        if self.last is not None:
            concurrent.futures.wait([self.last], timeout=5)

    async def _apply(self, function: Callable[..., Awaitable], args: tuple) -> None:
        self.turns = self.turns or asyncio.Lock()
        async with self.turns:  # asyncio.Lock serves waiters first come, first served
            try:
                await function(*args)
            except Exception:
                logger.exception("Channel layer operation %s%r failed.",
                                 getattr(function, "__name__", function), args)


#: The channels of a process's sockets on a shared layer (section 6 names them all
#: "websocket.send..."): channels_redis keeps their messages under one Redis key per process.
_PROCESS_INBOX = "websocket.send.*!*"
_PROCESS_INBOX_CAPACITY = 100_000  # messages for all the sockets of one process; they expire
_POOL_WAIT = 20.0  # seconds a Redis command waits for a pooled connection before it fails
_tuned_layers: Any = None  # weakref.WeakSet of the layers already tuned


def _redis_core_layer(layer: Any) -> bool:
    """Is *layer* channels_redis's core layer (or a subclass)? Only looked up if imported."""
    import sys

    module = sys.modules.get("channels_redis.core")
    return module is not None and isinstance(layer, module.RedisChannelLayer)


def _tune_shared_layer(layer: Any) -> None:
    """Hook ``layer``: give a channels_redis core layer room for a burst to every socket of a
    process, connection pools that wait rather than raise, and drops that are counted."""
    global _tuned_layers
    import weakref

    if not _redis_core_layer(layer):
        return
    if _tuned_layers is None:
        _tuned_layers = weakref.WeakSet()
    if layer in _tuned_layers:
        return
    _tuned_layers.add(layer)
    sample = "websocket.send.process!socket"
    if not any(pattern.match(sample) for pattern, _ in layer.channel_capacity):
        inbox = re.compile(fnmatch.translate(_PROCESS_INBOX))
        layer.channel_capacity.insert(0, (inbox, max(_PROCESS_INBOX_CAPACITY, layer.capacity)))
    layer.create_pool = functools.partial(_waiting_pool, layer.create_pool)
    redis_logger = logging.getLogger("channels_redis.core")
    if not any(isinstance(f, _CountRedisDrops) for f in redis_logger.filters):
        redis_logger.addFilter(_CountRedisDrops(layer))
        if not redis_logger.isEnabledFor(logging.INFO):  # else the filter never sees the record
            redis_logger.setLevel(logging.INFO)


def _waiting_pool(create_pool: Callable[[int], Any], index: int) -> Any:
    """channels_redis's pool for host *index*, made to wait for a free connection (up to
    ``_POOL_WAIT`` s): redis-py's default pool raises ``MaxConnectionsError`` at 100 busy, and a
    reconnect storm (600 handshakes at once) would be refused, memberships left behind."""
    from redis import asyncio as aioredis

    pool = create_pool(index)
    if type(pool) is not aioredis.ConnectionPool:  # Sentinel pools and others: as configured
        return pool
    return aioredis.BlockingConnectionPool(max_connections=pool.max_connections, timeout=_POOL_WAIT,
                                           connection_class=pool.connection_class,
                                           **pool.connection_kwargs)


class _CountRedisDrops(logging.Filter):
    """channels_redis says only at INFO that a group send skipped full channels: count them
    with the other drops of this process and say it instead as a rate-limited warning."""

    def __init__(self, layer: Any):
        super().__init__()
        self.capacity = layer.get_capacity("websocket.send.process!socket")
        self.outboxes = _outboxes(layer)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg.startswith("%s of %s channels over capacity") and len(record.args) == 3:
            skipped, _, group = record.args
            outboxes = self.outboxes
            with outboxes._lock:
                outboxes.dropped += skipped
            _log_limited(logging.WARNING, "The Redis channel layer dropped a message to group %r "
                         "for {held} channel(s) at capacity (%d dropped in all). A receiving "
                         "process's sockets share one Redis key; raise its capacity with CONFIG "
                         "'channel_capacity': {%r: N} in CHANNEL_LAYERS (now %d).", group,
                         outboxes.dropped, _PROCESS_INBOX, self.capacity,
                         key="redis drops", burst=1, count=skipped)
            return False
        return True


class _MembershipKeeper:
    """With a shared layer, joins this process's sockets to their groups again when the layer
    may have lost them. Two signs, checked every *interval* seconds: a Redis server's run id
    changed (any restart or failover, also one from a snapshot that still holds the canary), or
    a canary group of this process no longer answers (any layer). Without it, those sockets
    would stay open and hear nothing."""

    def __init__(self, layer: Any, interval: float = 2.0):
        self.layer, self.interval = layer, interval
        self.group = f"channels_mini.canary.{secrets.token_hex(8)}"
        self.channel = ""
        self.sent = self.heard = 0
        self.servers: list | None = None  # the Redis servers' run ids at the last check

    async def run(self) -> None:
        # The sockets' prefix: channels_redis serves the process-local channels of a prefix
        # with one blocking read, so a second prefix would make theirs wait behind this one.
        self.channel = await self.layer.new_channel("websocket.send")
        listener = asyncio.create_task(self._listen())
        try:
            lost = True
            while True:
                try:
                    servers = await self._servers()
                    if lost or self.heard < self.sent or servers != self.servers:
                        await self._rejoin()
                    self.servers = servers
                    await self.layer.group_send(self.group, {"n": self.sent + 1})
                    self.sent += 1
                    lost = False
                except Exception:
                    _log_limited(logging.ERROR, "Cannot check this process's group memberships on the "
                                       "channel layer; retrying in %g s.", self.interval, **_OUTAGE)
                await asyncio.sleep(self.interval)
        finally:
            await _cancel_and_wait(listener)

    async def _servers(self) -> list | None:
        """The run id of each Redis server of a channels_redis layer: a new one is a restart.
        None when unknown: another layer, or a Redis user not allowed INFO (the canary tells)."""
        if not _redis_core_layer(self.layer):
            return None
        try:
            return [(await self.layer.connection(index).info("server"))["run_id"]
                    for index in range(self.layer.ring_size)]
        except Exception as error:
            if type(error).__name__ != "NoPermissionError":
                raise  # Redis is down: run() reports it
            _log_limited(logging.WARNING, "The Redis user may not run INFO (%s), so a restart from a "
                         "snapshot or a failover may go unnoticed: allow +info.", error,
                         key="redis info", every=3600.0, burst=1)
            return None

    async def _rejoin(self) -> None:
        await self.layer.group_add(self.group, self.channel)
        for reply_channel, connection in list(_local_sockets.items()):
            if connection.layer is self.layer:
                for group in list(connection.groups):
                    await self.layer.group_add(group, reply_channel)

    async def _listen(self) -> None:
        while True:
            try:
                self.heard = max(self.heard, (await self.layer.receive(self.channel))["n"])
            except Exception:  # the layer is down: run() reports it
                await asyncio.sleep(1)


def _call_shared_layer(function: Callable[..., Awaitable], args: tuple) -> None:
    """Hook ``layer_call``: a sync-form call of a shared layer waits for its coroutine in a plain
    thread (or a sync handler's worker thread); on an event loop, waiting would freeze every
    socket, so the layer thread applies it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return async_to_sync(function)(*args)
    _LayerThread.submit(function, args)


_nobody_listens_warned = threading.Event()  # set once a group send has "reached nobody"


def _warn_if_nobody_listens(layer: InMemoryChannelLayer, group: str) -> None:
    """Hook ``unheard``: warn once per process when a group send finds no group and no
    receiver at all.

    Then nothing in this process consumes from the layer and the message reached
    nobody. The usual cause: a bound save or a ``Group.send`` from ``manage.py shell``
    or a script, while the sockets live in the server process, in that process's layer.
    """
    if _nobody_listens_warned.is_set():
        return
    with layer._lock:
        if layer._groups or any(queue.waiters for queue in layer._queues.values()):
            return  # something here listens: an empty group is ordinary (an empty room)
        if _nobody_listens_warned.is_set():
            return
        _nobody_listens_warned.set()
    logger.warning(
        "Group %r has no members and nothing in this process receives from its in-memory "
        "channel layer, so the message reached nobody. The in-memory layer lives inside one "
        "process: a send from 'manage.py shell', a script or another server process never "
        "reaches the sockets of your server. To reach them, configure a shared layer "
        "(channels_redis) in CHANNEL_LAYERS. (Logged once per process.)", group)


def _start_membership_keeper(app: Any) -> Any:
    """Hook ``serving``: keep memberships on a shared layer (nothing to keep in memory)."""
    layer = app.channel_layer
    return None if isinstance(layer, InMemoryChannelLayer) else _MembershipKeeper(layer).run()


_hooks.layer.append(_tune_shared_layer)
_hooks.unheard.append(_warn_if_nobody_listens)
_hooks.opened.append(_start_listener)
_hooks.closed.append(_stop_listener)
_hooks.layer_call.append(_call_shared_layer)
_hooks.serving.append(_start_membership_keeper)


# === 15. History and resume ===
# A socket drops for a few seconds all the time (a phone changes networks, a server restarts),
# and whatever its groups said meanwhile is gone. For the groups a project names in
# `CHANNELS_MINI_HISTORY`, every message is stored first, then fanned out, stamped with its
# *position*: an offset that grows by one per message of the group, and an epoch that changes
# whenever the stored history is lost (an in-memory process restarts, Redis restarts). In memory
# a bounded log per group; with channels_redis a Redis stream per group, written with one
# script per send. A consumer with `resumable = True` gets those messages in an envelope with
# their position; its one way out drops duplicates and fills gaps from history, and says
# "lost" for a gap history cannot fill. A client that reconnects with its last positions gets
# an ordinary handshake (origin, login, `connect()`), then what it missed, in order, then
# "resumed" or "lost" per group. Hooks: `group_send` (store and stamp, in memory), `layer`
# (the same on Redis), `connected` (read the client's positions), `reply` (the way out),
# `closed` (forget the socket), `http` (serve the JS client). Costs: a cached pattern check per
# group send; for groups with history, a deque append or one Redis script per send; nothing
# kept per socket once it closes.

_STAMP = "__history__"  # in a group message: [group, epoch, offset]; never sent to a client
#: A socket's reply: the handshake is done, catch up and say how it went. Random: no message
#: from elsewhere can carry it.
_RESUME = f"__resume_{secrets.token_hex(8)}__"
_HELD_AT_MOST = 1_000  # stamped replies a socket keeps while its handshake runs
_META_LIFETIME = 86_400  # seconds a group's position outlives its messages (a few bytes)
_MAX_RESUME_TEXT = 65_536  # characters of the ?resume= parameter read at most
_CLIENT_PATH = "/channels_mini.js"  # where `Application` serves the JS client


class _HistoryRules:
    """``CHANNELS_MINI_HISTORY``: which groups keep history, as ``(SIZE, TTL)`` by group name.
    A group's answer is cached: the check is a dict lookup for every group send."""

    def __init__(self) -> None:
        self.patterns: list[tuple[re.Pattern, tuple[int, float]]] | None = None
        self.by_group: dict[str, tuple[int, float] | None] = {}

    def clear(self) -> None:  # reset_channel_layers(): settings may have changed
        self.patterns = None
        self.by_group.clear()

    def __call__(self, group: str) -> tuple[int, float] | None:
        try:
            return self.by_group[group]
        except KeyError:
            pass
        patterns = self.patterns
        if patterns is None:
            patterns = self.patterns = self._read_setting()
        if len(self.by_group) > 10_000:  # per-user groups: keep the cache bounded
            self.by_group.clear()
        rule = self.by_group[group] = next(
            (rule for pattern, rule in patterns if pattern.fullmatch(group)), None)
        return rule

    @staticmethod
    def _read_setting() -> list[tuple[re.Pattern, tuple[int, float]]]:
        from django.conf import settings

        setting = getattr(settings, "CHANNELS_MINI_HISTORY", None) if _settings_ready() else None
        if not setting:
            return []
        if not isinstance(setting, dict):
            raise ImproperlyConfigured(f"CHANNELS_MINI_HISTORY must map group-name patterns to "
                                       f"{{'SIZE': ..., 'TTL': ...}} (got {setting!r:.200}).")
        rules = []
        for pattern, options in setting.items():
            size, ttl = (options.get("SIZE"), options.get("TTL")) if isinstance(options, dict) else (0, 0)
            if (not isinstance(pattern, str) or type(size) is not int or size < 1
                    or not isinstance(ttl, (int, float)) or not 0 < ttl < float("inf")):
                raise ImproperlyConfigured(
                    f"CHANNELS_MINI_HISTORY[{pattern!r:.100}] is {options!r:.200}: give a glob "
                    f"pattern a positive integer SIZE (messages kept) and a positive TTL (seconds), "
                    f"e.g. {{'chat-*': {{'SIZE': 200, 'TTL': 300}}}}.")
            rules.append((re.compile(fnmatch.translate(pattern)), (size, float(ttl))))
        return rules


_history_rule = _module_state(_HistoryRules())


def _group_key(group: str) -> str:
    """The name a client sees for *group*: a keyed digest, so internal names stay hidden."""
    key = _group_keys.get(group)
    if key is None:
        if len(_group_keys) > 10_000:
            _group_keys.clear()
        key = _group_keys[group] = _keyed_digest("history", group)[:16]
    return key


_group_keys: dict[str, str] = _module_state({})


# -- storing: in memory --

@dataclasses.dataclass
class _Log:
    """One group's history in memory: its epoch, its last offset, the messages still kept."""
    epoch: str
    ttl: float
    entries: deque  # (offset, sent at, message), oldest first, at most SIZE
    top: int = 0
    last_sent: float = 0.0


#: What a history read finds: the epoch, the last offset, and the messages after the offset
#: asked for that are still kept (offset, message), in order. A group never sent to (or not for
#: a day, or whose history was lost) gets a new epoch at offset 0.
_Found = tuple[str, int, list[tuple[int, dict]]]


class _MemoryHistory:
    """The history of one in-memory layer's groups, in this process: gone with it."""

    def __init__(self, layer: InMemoryChannelLayer):
        self.layer = layer
        self.lock = threading.Lock()
        self.logs: dict[str, _Log] = {}
        self.next_sweep = 0.0

    def append(self, group: str, message: dict, size: int, ttl: float) -> tuple[str, int]:
        with self.lock:
            log = self._log(group, size, ttl)
            log.top += 1
            log.entries.append((log.top, log.last_sent, message))
            return log.epoch, log.top

    async def read(self, group: str, after: int, size: int, ttl: float, limit: int) -> _Found:
        with self.lock:
            log = self._log(group, size, ttl, sending=False)
            if not limit:
                return log.epoch, log.top, []
            alive = time.monotonic() - ttl
            kept = [(offset, message) for offset, sent, message in log.entries
                    if offset > after and sent > alive][:limit]
            return log.epoch, log.top, kept

    def _log(self, group: str, size: int, ttl: float, sending: bool = True) -> _Log:
        """The group's log; a new one (a new epoch) if it has none or its SIZE changed."""
        now = time.monotonic()
        self._sweep(now)
        log = self.logs.get(group)
        if log is None or log.entries.maxlen != size:
            log = self.logs[group] = _Log(secrets.token_hex(6), ttl, deque(maxlen=size), last_sent=now)
        log.ttl = ttl
        if sending:
            log.last_sent = now
        return log

    def stats(self) -> dict[str, int]:
        with self.lock:
            self._sweep(time.monotonic(), force=True)
            return {"history_groups": sum(1 for log in self.logs.values() if log.entries),
                    "history_messages": sum(len(log.entries) for log in self.logs.values()),
                    "history_positions": len(self.logs)}

    def _sweep(self, now: float, force: bool = False) -> None:
        """Once a second: free the messages older than their TTL, and positions a day unsent."""
        if now < self.next_sweep and not force:
            return
        self.next_sweep = now + 1.0
        for group, log in list(self.logs.items()):
            while log.entries and log.entries[0][1] <= now - log.ttl:
                log.entries.popleft()
            if log.last_sent < now - (_META_LIFETIME if log.top else log.ttl):
                del self.logs[group]  # a position only read (never sent to) lasts TTL


def _without_stamp(message: dict) -> dict:
    """A copy of *message* without a position: a stamp is only the store's to make."""
    return {key: value for key, value in message.items() if key != _STAMP}


def _stamp_in_memory(layer: InMemoryChannelLayer, group: str, message: dict) -> dict:
    """Hook ``group_send``: store a message to a group with history, and stamp its position."""
    rule = _history_rule(group)
    if rule is None:
        return message if _STAMP not in message else _without_stamp(message)
    message = _without_stamp(message)  # history's own copy: the caller may change theirs
    epoch, offset = _history_of(layer).append(group, message, *rule)
    return {**message, _STAMP: [group, epoch, offset]}


# -- storing: Redis --
# One Redis stream per group, its entry ids the offsets, beside a small hash: the epoch, the
# last offset, and the run id of the Redis server that holds them. A send runs one script:
# a missing hash or another run id (Redis restarted empty, from a snapshot, or failed over)
# starts a new epoch; then the offset, the entry (trimmed to SIZE) and the expiries.

_REDIS_POSITION = """
local ok, info = pcall(redis.call, 'INFO', 'server')
local run = ok and string.match(info, 'run_id:(%x+)') or ''
local meta = redis.call('HMGET', KEYS[2], 'e', 'r', 's')
local epoch, top = meta[1], tonumber(meta[3])
if not epoch or meta[2] ~= run then
  epoch, top = ARGV[1], 0
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 'r', run, 's', 0)
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
"""
_REDIS_APPEND = _REDIS_POSITION + """
top = redis.call('HINCRBY', KEYS[2], 's', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], top .. '-0', 'd', ARGV[5], 't', now)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return {epoch, top}
"""
_REDIS_READ = _REDIS_POSITION + """
local entries = {}
if tonumber(ARGV[4]) > 0 then
  entries = redis.call('XRANGE', KEYS[1], ARGV[3], '+', 'COUNT', ARGV[4])
end
return {epoch, top, now, entries}
"""


def _close_with_loop(loop: asyncio.AbstractEventLoop, clients: dict) -> None:
    """Close *clients* (Redis clients of *loop*) when the loop closes, as channels_redis does
    for its own: ``async_to_sync`` gives each sync send outside a server a loop of its own."""
    close = loop.close

    def closing() -> None:
        for client in clients.values():
            try:
                loop.run_until_complete(client.aclose())
            except Exception:  # the connection is gone anyway
                pass
        close()

    loop.close = closing  # type: ignore[method-assign]


@functools.lru_cache(maxsize=None)
def _script_sha(script: str) -> str:
    return hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()


class _RedisHistory:
    """The history of a channels_redis layer's groups, on the layer's own Redis servers (the
    same ``CONFIG["hosts"]``, either layer); messages serialized as the layer does (encrypted
    if it encrypts)."""

    def __init__(self, layer: Any):
        from channels_redis.utils import _consistent_hash, decode_hosts

        self.layer = layer
        config = getattr(layer, "_kwargs", {})  # the pub/sub layer keeps its arguments
        self.hosts = getattr(layer, "hosts", None) or decode_hosts(
            config.get("hosts") or (layer._args[0] if getattr(layer, "_args", ()) else None))
        self.prefix = getattr(layer, "prefix", None) or config.get("prefix", "asgi")
        self.shard = functools.partial(_consistent_hash, ring_size=len(self.hosts))
        self.clients: Any = None  # WeakKeyDictionary: event loop -> {host index: client}

    def _redis(self, group: str) -> Any:
        index = self.shard(group)
        if _redis_core_layer(self.layer):
            return self.layer.connection(index)  # its pools, per event loop
        import weakref
        from channels_redis.utils import create_pool
        from redis import asyncio as aioredis

        self.clients = self.clients if self.clients is not None else weakref.WeakKeyDictionary()
        loop = asyncio.get_running_loop()
        if loop not in self.clients:
            self.clients[loop] = {}
            _close_with_loop(loop, self.clients[loop])
        clients = self.clients[loop]
        if index not in clients:
            clients[index] = aioredis.Redis(connection_pool=create_pool(self.hosts[index]))
        return clients[index]

    async def _script(self, script: str, group: str, keep: float, *args: Any) -> Any:
        """Run *script* on the group's keys, by its SHA1 (the text is sent once per server). A
        position it has to make lasts *keep* seconds."""
        import math

        from redis.exceptions import NoScriptError

        redis = self._redis(group)
        args = (*self._keys(group), secrets.token_hex(6), max(1, math.ceil(keep)), *args)
        try:
            return await redis.evalsha(_script_sha(script), 2, *args)
        except NoScriptError:
            return await redis.eval(script, 2, *args)

    def _keys(self, group: str) -> list[str]:
        base = f"{self.prefix}:history:{{{group}}}"  # {group}: one cluster slot for both keys
        return [base + ":messages", base + ":position"]

    async def append(self, group: str, message: dict, size: int, ttl: float) -> tuple[str, int]:
        epoch, offset = await self._script(_REDIS_APPEND, group, max(_META_LIFETIME, ttl), size,
                                           max(1, int(ttl * 1000)),
                                           self.layer.serialize(message))
        return epoch.decode(), int(offset)

    async def read(self, group: str, after: int, size: int, ttl: float, limit: int) -> _Found:
        epoch, top, now, entries = await self._script(_REDIS_READ, group, ttl, f"{after + 1}-0", limit)
        kept = []
        for entry_id, fields in entries:
            fields = dict(zip(fields[::2], fields[1::2]))
            if int(fields[b"t"]) > int(now) - ttl * 1000:
                kept.append((int(entry_id.split(b"-")[0]), self.layer.deserialize(fields[b"d"])))
        return epoch.decode(), int(top), kept


def _redis_layer(layer: Any) -> bool:
    """A channels_redis layer, core or pub/sub (only looked up if imported)?"""
    import sys

    module = sys.modules.get("channels_redis.pubsub")
    return _redis_core_layer(layer) or (module is not None and isinstance(layer, module.RedisPubSubChannelLayer))


def _stamp_on_redis(layer: Any) -> None:
    """Hook ``layer``: a channels_redis layer's ``group_send`` stores a message to a group with
    history on Redis first, then fans it out stamped with its position."""
    if not _redis_layer(layer) or getattr(layer.group_send, "stores_history", False):
        return
    fan_out = layer.group_send

    async def group_send(group: str, message: dict) -> None:
        rule = _history_rule(group)
        if rule is not None or _STAMP in message:
            message = _without_stamp(message)
        if rule is not None:
            epoch, offset = await _history_of(layer).append(group, message, *rule)
            message[_STAMP] = [group, epoch, offset]
        await fan_out(group, message)

    group_send.stores_history = True  # type: ignore[attr-defined]
    layer.group_send = group_send


def _history_of(layer: Any) -> _MemoryHistory | _RedisHistory:
    """Where the history of *layer*'s groups is kept: in memory, or on its Redis servers."""
    history = _histories.get(id(layer))
    if history is None or history.layer is not layer:
        with _histories_lock:  # two threads' first sends must share one history (one epoch)
            history = _histories.get(id(layer))
            if history is None or history.layer is not layer:
                kind = _MemoryHistory if isinstance(layer, InMemoryChannelLayer) else _RedisHistory
                history = _histories[id(layer)] = kind(layer)
    return history


_histories: dict[int, Any] = _module_state({})  # id(layer) -> its history
_histories_lock = threading.Lock()


# -- resumable sockets --

class _ResumableSocket:
    """What a resumable socket has sent of each of its groups with history, by group:
    ``[epoch, offset]``. It exists before the socket joins its groups; its stamped replies pass
    through `deliver`, one at a time, in order, and wait while the handshake finds out where
    each group starts (a message can arrive before that is known)."""

    def __init__(self, connection: Any):
        self.connection = connection
        self.history = _history_of(connection.layer)
        self.sent: dict[str, list] = {}
        self.resuming: set[str] = set()  # asked with a position that history may catch up
        self.lost: set[str] = set()  # asked, but what it missed is gone
        self.held: list[dict] | None = []  # stamped replies during the handshake; None once it is done

    async def start(self, asked: dict[str, tuple[str, int]]) -> None:
        """Where each group with history starts: at the client's position if history still has
        it (caught up in `_finish_resume`), else at the group's last offset."""
        for group in sorted(self.connection.groups):
            position = asked.get(_group_key(group))
            epoch, top = await self._position(group)
            if epoch is not None and position is not None and position[0] == epoch and position[1] <= top:
                self.sent[group] = list(position)
                self.resuming.add(group)
                continue
            if epoch is not None:  # else no history, or it cannot be read now
                self.sent[group] = [epoch, top]
            if position is not None:
                self.lost.add(group)

    async def deliver(self, reply: dict) -> None:
        if _RESUME in reply:
            await self._finish_resume()
        elif self.held is not None:
            if len(self.held) < _HELD_AT_MOST:  # beyond it, history fills the gap (or says lost)
                self.held.append(reply)
        else:
            await self._deliver_stamped(reply)

    async def _deliver_stamped(self, reply: dict) -> None:
        group, epoch, offset = reply[_STAMP]
        sent = self.sent.get(group)
        if sent is None:  # joined after the handshake: it starts here
            sent = self.sent[group] = [epoch, offset - 1]
        if (sent[0] != epoch or offset > sent[1] + 1) and not await self._stored(group, epoch, offset):
            return await self.connection._deliver(reply)  # not a position the store gave: as sent
        if sent[0] != epoch:  # the history its position was in is gone
            await self._lose(group, epoch, 0)
            sent = self.sent[group]
        if offset <= sent[1]:
            return  # a duplicate: filling a gap brought it already
        if offset > sent[1] + 1 and not await self._fill(group, offset - 1):
            await self._lose(group, epoch, offset - 1)
        await self._send(group, epoch, offset, reply)

    async def _stored(self, group: str, epoch: str, offset: int) -> bool:
        """Did the store give this position? Asked only when it breaks the sequence: a stamp
        copied into a direct send, or from a history since lost, must not move the socket on."""
        stored_epoch, top = await self._position(group)
        return stored_epoch == epoch and offset <= top

    async def _position(self, group: str) -> tuple[str | None, int]:
        """The group's epoch and last offset; (None, 0) if it has no history (or it is down)."""
        rule = _history_rule(group)
        if rule is None:
            return None, 0
        try:
            epoch, top, _ = await self.history.read(group, 0, *rule, 0)
            return epoch, top
        except Exception:
            _log_limited(logging.ERROR, "Cannot read the history of group %r.", group, **_OUTAGE)
            return None, 0

    async def _fill(self, group: str, upto: int | None) -> bool:
        """Send this group's messages after the last one sent, up to *upto* (None: its last
        one), from history. False (and nothing sent) unless history still holds all of them."""
        epoch, after = self.sent[group]
        rule = _history_rule(group)
        if upto is not None and upto <= after:
            return True
        if rule is None or (upto or 0) - after > rule[0]:  # more than history keeps: never a partial replay
            return False
        try:
            found_epoch, top, found = await self.history.read(
                group, after, *rule, rule[0] if upto is None else upto - after)
        except Exception:
            _log_limited(logging.ERROR, "Cannot read the history of group %r to fill a gap; telling "
                         "the client it lost messages.", group, **_OUTAGE)
            return False
        upto = top if upto is None else upto
        if found_epoch != epoch or [offset for offset, _ in found] != list(range(after + 1, upto + 1)):
            return False
        for offset, message in found:  # a close is not repeated: the client came back
            await self._send(group, epoch, offset, {k: v for k, v in message.items() if k != "close"})
        return True

    async def _lose(self, group: str, epoch: str, offset: int) -> None:
        """What the client missed of *group* is gone: it starts again at *offset*, and is told."""
        self.sent[group] = [epoch, offset]
        self.resuming.discard(group)
        if self.held is not None:
            self.lost.add(group)  # told with the others in "$resume"
            return
        positions = {_group_key(group): [epoch, offset]}
        await self.connection._deliver({"text": _compact({"$lost": {"positions": positions}})})

    async def _send(self, group: str, epoch: str, offset: int, reply: dict) -> None:
        """One group message, in its envelope (its position moves on even if it cannot go)."""
        self.sent[group] = [epoch, offset]
        frame = {key: reply[key] for key in ("accept", "close") if key in reply}
        position = [_group_key(group), epoch, offset]
        text, data = reply.get("text"), reply.get("bytes")
        if isinstance(text, str):
            frame["text"] = _compact({"$pos": position, "text": text})
        elif isinstance(data, bytes):
            import base64
            frame["text"] = _compact({"$pos": position, "bytes": base64.b64encode(data).decode()})
        elif text is not None or data is not None:
            logger.error("Group message to %r has text or bytes of the wrong type (%.100r); not sent.",
                         group, text if text is not None else data)
        if frame:
            await self.connection._deliver(frame)

    async def _finish_resume(self) -> None:
        """Behind the handshake's replies: send what each resumed group missed, then what came
        during the handshake, then the frame that says where every group stands, and which
        resumed or lost. A group the client did not ask for starts before the first message it
        heard during the handshake, if any, else at the last offset."""
        held, self.held = self.held or [], []
        for reply in held:
            group, epoch, offset = reply[_STAMP]
            sent = self.sent.get(group)
            if group not in self.resuming and sent is not None and sent[0] == epoch and offset <= sent[1]:
                sent[1] = offset - 1
        for group in sorted(self.resuming):
            if not await self._fill(group, None):
                epoch, top = await self._position(group)
                await self._lose(group, epoch or "", top)
        for reply in held:
            await self._deliver_stamped(reply)
        self.held = None
        await self.connection._deliver({"text": _compact({"$resume": {
            "positions": {_group_key(group): sent for group, sent in self.sent.items()},
            "resumed": _keys_of(self.resuming), "lost": _keys_of(self.lost)}})})


def _keys_of(groups: Iterable[str]) -> list[str]:
    return sorted(_group_key(group) for group in groups)


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


_resumable: dict[str, _ResumableSocket] = _module_state({})  # reply channel -> its socket


class _Membership(set):
    """A resumable socket's groups (``connection.groups``): leaving one forgets its position,
    so that joining it again starts afresh rather than replaying what was said meanwhile."""

    def __init__(self, groups: Iterable[str], sent: dict[str, list]):
        super().__init__(groups)
        self.sent = sent

    def discard(self, group: str) -> None:
        super().discard(group)
        self.sent.pop(group, None)


def _resumable_opens(consumer: BaseConsumer) -> None:
    """Hook ``message``: a resumable socket's handshake begins, before its groups are joined.
    (A ``WebsocketConsumer`` only: its handshake ends with the ``connected`` hook, which lets
    out what the socket holds meanwhile.)"""
    if (isinstance(consumer, WebsocketConsumer) and consumer.resumable
            and consumer.message.channel_name == "websocket.connect"):
        connection = _local_sockets.get(consumer.message.reply_channel.name)
        if connection is not None:
            socket = _resumable[connection.reply_channel] = _ResumableSocket(connection)
            connection.groups = _Membership(connection.groups, socket.sent)


async def _resume_connected(consumer: WebsocketConsumer, kwargs: dict) -> None:
    """Hook ``connected``: a resumable socket reads the positions its client sent, after an
    ordinary handshake (origin, login, groups joined, ``connect()``), and queues its catch-up
    behind the handshake's replies."""
    socket = _resumable.get(consumer.message.reply_channel.name)
    if socket is None or socket.connection.closing:
        return
    await socket.start(_positions_asked(socket.connection))
    consumer.message.reply_channel.send({_RESUME: True})  # deferred: after the accept


def _positions_asked(connection: Any) -> dict[str, tuple[str, int]]:
    """The ``resume`` parameter of the handshake, ``{key: [epoch, offset]}``, as far as it is
    well formed: one warning for the rest (a client can send anything)."""
    from urllib.parse import parse_qsl

    query = connection.scope.get("query_string", b"").decode("latin-1")
    text = next((value for name, value in parse_qsl(query) if name == "resume"), "")
    if not text:
        return {}
    asked: Any = None
    if len(text) <= _MAX_RESUME_TEXT:
        try:
            asked = json.loads(text)
        except ValueError:
            pass
    if not isinstance(asked, dict):
        _log_limited(logging.WARNING, "Ignored the resume positions of a websocket to %.200s: expected "
                     "a JSON object {key: [epoch, offset]} of at most %d characters, got %.100r.",
                     connection.path, _MAX_RESUME_TEXT, text, key="resume positions")
        return {}
    keys = {_group_key(group) for group in connection.groups if _history_rule(group)}
    good = {key: tuple(value) for key, value in asked.items() if key in keys and isinstance(value, list)
            and len(value) == 2 and isinstance(value[0], str) and type(value[1]) is int and value[1] >= 0}
    if len(good) < len(asked):
        _log_limited(logging.WARNING, "Ignored %d of the %d resume positions of a websocket to %.200s: "
                     "each must be key: [epoch, offset >= 0] for a group with history that the socket "
                     "is in.", len(asked) - len(good), len(asked), connection.path, key="resume positions")
    return good


async def _forget_resumable(connection: Any) -> None:
    """Hook ``closed``: nothing of a socket is kept once it closes."""
    _resumable.pop(connection.reply_channel, None)


def _resumable_reply(connection: Any, reply: dict) -> Awaitable[None] | None:
    """Hook ``reply``: a resumable socket's stamped replies go through it (others: unchanged,
    the stamp ignored)."""
    if _STAMP not in reply and _RESUME not in reply:
        return None
    socket = _resumable.get(connection.reply_channel)
    if socket is None or _RESUME in reply:
        return socket.deliver(reply) if socket is not None else None
    stamp = reply[_STAMP]
    if not (isinstance(stamp, list) and len(stamp) == 3 and isinstance(stamp[0], str)
            and stamp[0] in connection.groups and isinstance(stamp[1], str) and type(stamp[2]) is int):
        return None  # malformed, or a group it has left since
    return socket.deliver(reply)


WebsocketConsumer.resumable = False  # type: ignore[attr-defined]
# True: the groups with history of its sockets are resumed across reconnects (section 15).


# -- the JS client --

class _ClientScript:
    """``GET /channels_mini.js``: the reconnecting client, from this file (vendoring brings it)."""

    def __init__(self, scope: Scope, send: Send):
        self.scope, self.send = scope, send

    async def serve(self, receive: Receive) -> None:
        body = _CLIENT_JS.encode()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:16].encode() + b'"'
        unchanged = dict(_header_items(self.scope.get("headers", ()))).get(b"if-none-match") == etag
        headers = [(b"content-type", b"text/javascript; charset=utf-8"), (b"etag", etag),
                   (b"cache-control", b"no-cache")]
        if not unchanged:
            headers.append((b"content-length", str(len(body)).encode()))
        await self.send({"type": "http.response.start", "status": 304 if unchanged else 200,
                         "headers": headers})
        sent = b"" if unchanged or self.scope.get("method") == "HEAD" else body
        await self.send({"type": "http.response.body", "body": sent})


def _serve_client(app: Any, scope: Scope, send: Send) -> _ClientScript | None:
    """Hook ``http``: the JS client at ``/channels_mini.js``."""
    if scope.get("path") == _CLIENT_PATH and scope.get("method") in ("GET", "HEAD"):
        return _ClientScript(scope, send)
    return None


def _stats_with_history(app: Any) -> dict[str, int]:
    """``Application.stats()``, plus what in-memory history holds for the app's layer."""
    stats = _application_stats(app)
    stats["resumable"] = len(_resumable)  # open resumable sockets, in this process
    if isinstance(app.channel_layer, InMemoryChannelLayer):
        stats.update(_history_of(app.channel_layer).stats())
    return stats


Application.stats = _stats_with_history  # type: ignore[attr-defined]
_hooks.group_send.append(_stamp_in_memory)
_hooks.layer.append(_stamp_on_redis)
_hooks.message.append(_resumable_opens)
_hooks.connected.append(_resume_connected)
_hooks.reply.append(_resumable_reply)
_hooks.closed.append(_forget_resumable)
_hooks.http.insert(0, _serve_client)

#: The JS client, served at ``/channels_mini.js`` (section 15): ``new ChannelsMini.Bridge()``.
_CLIENT_JS = r"""/* channels_mini.js: the browser side of channels_mini. A WebSocket client in
 * the style of Django Channels 1.x's WebSocketBridge: it reconnects by itself,
 * routes multiplexed streams and (new here) asks the server to replay the group
 * messages sent while it was away. Plain ES2017: the server serves this text as is.
 */
(function () {
  "use strict";

  // 4401: the server says the login ended. 1008: refused on policy.
  // Knocking again would only be refused again, so these end the bridge.
  const FINAL_CODES = [4401, 1008];

  function orDefault(value, fallback) { return value === undefined ? fallback : value; }
  function isObject(x) { return x !== null && typeof x === "object" && !Array.isArray(x); }

  // One faulty callback must not take the socket handling down with it.
  function callAll(callbacks, args) {
    for (const cb of callbacks.slice()) {
      try { cb.apply(null, args); } catch (err) { console.error("channels_mini: a callback threw", err); }
    }
  }

  // Paths are relative to the page, and the socket scheme follows the
  // page's (an https page may only open wss sockets).
  function toSocketUrl(url) {
    const full = new URL(url || window.location.pathname, window.location.href);
    full.hash = ""; // a WebSocket URL may not carry a fragment
    return full.href.replace(/^http/, "ws");
  }

  // App text frames are JSON by convention, but not every app keeps to it.
  function parseOrRaw(text) {
    try { return JSON.parse(text); } catch (err) { return text; }
  }

  // The server wraps binary group messages in base64 inside a JSON frame.
  function base64ToBuffer(text) {
    return Uint8Array.from(atob(text), (c) => c.charCodeAt(0)).buffer;
  }

  // Group keys are opaque server strings, so positions maps have no prototype:
  // a key such as "__proto__" then stays an ordinary entry.
  function mergePositions(into, from) {
    if (isObject(from)) {
      for (const key of Object.keys(from)) into[key] = from[key];
    }
    return into;
  }

  class Bridge {
    constructor(options) {
      const opt = options || {};
      this.minDelay = orDefault(opt.minDelay, 500);
      this.maxDelay = orDefault(opt.maxDelay, 10000);
      this.factor = orDefault(opt.factor, 2);
      this.jitter = Math.min(1, Math.max(0, orDefault(opt.jitter, 0.5)));
      this.resume = orDefault(opt.resume, true);
      this.positions = Object.create(null); // group key -> [epoch, offset] last seen
      this.socket = null;
      this.status = null;
      this._url = null; // as given to connect(); the resume query is added per attempt
      this._stopped = true;
      this._failures = 0; // attempts in a row that never opened
      this._timer = null;
      this._streams = new Map(); // a Map, so a stream named "constructor" is safe
      this._callbacks = {message: [], open: [], close: [], status: [], resumed: [], lost: []};
    }

    connect(url, protocols) {
      this._url = toSocketUrl(url);
      this._protocols = protocols;
      this._stopped = false;
      this._failures = 0;
      this._dropSocket();
      this._open();
    }

    close(code) {
      this._stopped = true;
      clearTimeout(this._timer);
      const ws = this.socket;
      if (ws && ws.readyState < WebSocket.CLOSING) ws.close(code);
      this._setStatus("closed");
    }

    listen(cb) { this._callbacks.message.push(cb); }
    onOpen(cb) { this._callbacks.open.push(cb); }
    onClose(cb) { this._callbacks.close.push(cb); }
    onStatus(cb) { this._callbacks.status.push(cb); }
    onResumed(cb) { this._callbacks.resumed.push(cb); }
    onLost(cb) { this._callbacks.lost.push(cb); }

    demultiplex(stream, cb) {
      if (!this._streams.has(stream)) this._streams.set(stream, []);
      this._streams.get(stream).push(cb);
    }

    // Nothing is queued while offline: a message sent into a stale state
    // is worse than a caller who knows it was not sent.
    send(data) {
      const ws = this.socket;
      if (!ws || ws.readyState !== WebSocket.OPEN) return false;
      ws.send(JSON.stringify(data));
      return true;
    }

    stream(name) { return {send: (payload) => this.send({stream: name, payload: payload})}; }

    _open() {
      this._setStatus("connecting");
      const ws = new WebSocket(this._attemptUrl(), this._protocols);
      ws.binaryType = "arraybuffer";
      let opened = false;
      // Each handler checks it still belongs to the current socket: an old
      // socket replaced by connect() may still report events.
      ws.onopen = () => {
        if (ws !== this.socket) return;
        opened = true;
        this._failures = 0;
        this._setStatus("online");
        callAll(this._callbacks.open, []);
      };
      ws.onmessage = (event) => {
        if (ws !== this.socket) return;
        // A malformed frame (say, bad base64) is reported; the next may be fine.
        try { this._receive(event.data); } catch (err) { console.error("channels_mini: bad frame", err); }
      };
      ws.onclose = (event) => { if (ws === this.socket) this._closed(ws, event, opened); };
      this.socket = ws;
    }

    // Rebuilt from the connect() URL each time, so resume never piles up.
    _attemptUrl() {
      if (!this.resume || Object.keys(this.positions).length === 0) return this._url;
      const sep = this._url.includes("?") ? "&" : "?";
      return this._url + sep + "resume=" + encodeURIComponent(JSON.stringify(this.positions));
    }

    _closed(ws, event, opened) {
      callAll(this._callbacks.close, [event]);
      if (ws !== this.socket) return; // a callback called connect() again
      if (FINAL_CODES.includes(event.code)) this._stopped = true;
      if (this._stopped) return this._setStatus("closed");
      this._failures = opened ? 0 : this._failures + 1;
      this._setStatus("offline");
      this._timer = setTimeout(() => this._open(), this._delay());
    }

    // Exponential backoff, shrunk by a random share so that the clients a
    // server restart dropped together do not all come back together.
    _delay() {
      const step = Math.min(this.maxDelay, this.minDelay * Math.pow(this.factor, this._failures));
      return step * (1 - this.jitter * Math.random());
    }

    _dropSocket() {
      clearTimeout(this._timer);
      const old = this.socket;
      this.socket = null; // first, so the old socket's close is ignored
      if (old && old.readyState < WebSocket.CLOSING) old.close();
    }

    _setStatus(state) {
      if (state === this.status) return;
      this.status = state;
      callAll(this._callbacks.status, [state]);
    }

    // "$" frames are the resume protocol; everything else belongs to the app.
    _receive(data) {
      if (typeof data !== "string") return this._dispatch(data);
      const frame = parseOrRaw(data);
      if (isObject(frame)) {
        if ("$pos" in frame) return this._onPos(frame);
        if ("$resume" in frame) return this._onResume(frame.$resume);
        if ("$lost" in frame) return this._onLost(frame.$lost);
      }
      this._dispatch(frame);
    }

    // The position is recorded before the app sees the message, so a
    // callback that reconnects already asks for what follows it.
    _onPos(frame) {
      const pos = frame.$pos;
      if (Array.isArray(pos) && pos.length === 3) this.positions[pos[0]] = [pos[1], pos[2]];
      if (typeof frame.text === "string") this._dispatch(parseOrRaw(frame.text));
      else if (typeof frame.bytes === "string") this._dispatch(base64ToBuffer(frame.bytes));
    }

    // The server's view after replay is the truth, so it replaces ours whole.
    _onResume(info) {
      if (!isObject(info)) return;
      this.positions = mergePositions(Object.create(null), info.positions);
      const nonEmpty = (list) => Array.isArray(list) && list.length > 0;
      if (nonEmpty(info.resumed)) callAll(this._callbacks.resumed, [info.resumed]);
      if (nonEmpty(info.lost)) callAll(this._callbacks.lost, [info.lost]);
    }

    _onLost(info) {
      if (!isObject(info) || !isObject(info.positions)) return;
      mergePositions(this.positions, info.positions);
      callAll(this._callbacks.lost, [Object.keys(info.positions)]);
    }

    // Like 1.x: {"stream", "payload"} goes to that stream's handlers only,
    // and silently nowhere if the page registered none.
    _dispatch(message) {
      if (isObject(message) && "stream" in message && "payload" in message) {
        const handlers = this._streams.get(message.stream) || [];
        return callAll(handlers, [message.payload, message.stream]);
      }
      callAll(this._callbacks.message, [message, null]);
    }
  }

  window.ChannelsMini = {Bridge: Bridge};
  // Pages written for Channels 1.x look for channels.WebSocketBridge; one
  // already there (the real 1.x script) is left in place.
  window.channels = window.channels || {};
  if (!window.channels.WebSocketBridge) window.channels.WebSocketBridge = Bridge;
})();
"""


# -- what is made on first use --

def __getattr__(name: str) -> Any:
    """``AsgiRequest``, ``ChannelTestCase`` and ``TransactionChannelTestCase``, made when first
    used: they subclass Django classes whose modules are slow to import, and few need them."""
    if name == "AsgiRequest":
        return _asgi_request_class()
    if name in ("ChannelTestCase", "TransactionChannelTestCase"):
        from django import test
        base = test.TestCase if name == "ChannelTestCase" else test.TransactionTestCase
        made = globals()[name] = type(name, (ChannelTestCaseMixin, base), {"__module__": __name__})
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the module-level application --

application = Application(None)

if __name__ == "__main__":
    import sys

    # Run the copy of this module that user code imports, not a second copy named __main__.
    module = importlib.import_module(__spec__.name) if __spec__ else None
    sys.exit((module.main if module else main)())
