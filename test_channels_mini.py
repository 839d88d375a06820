"""Tests for channels_mini, in the module's section order (grep -n '^# ===').

Everything goes through the public API. End-to-end tests start real servers
(uvicorn, daphne, hypercorn, redis-server) on 127.0.0.1 in subprocesses and talk to
them with the `websockets` client; the servers import this very file as their ASGI
module (`test_channels_mini:server_app`), so one file holds the whole test project:
Django settings, models, views and routing. (Names below use `__name__`, never the
file's name, so the header works in any copy of it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One SQLite file shared by this process and the servers it starts (they inherit the env).
os.environ.setdefault("CHANNELS_MINI_TEST_DB",
                      os.path.join(tempfile.mkdtemp(prefix="channels-mini-test-"), "db.sqlite3"))

from django.conf import settings  # noqa: E402

if not settings.configured:
    _redis_url = os.environ.get("CHANNELS_MINI_TEST_REDIS")  # set by tests that start servers on Redis
    # On Redis, presence uses Django's RedisCache too (alias "default"); a test wanting a quick
    # heartbeat passes more of CHANNELS_MINI_PRESENCE as JSON in CHANNELS_MINI_TEST_PRESENCE.
    _on_redis = {"CACHES": {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                        "LOCATION": _redis_url}},
                 "CHANNELS_MINI_PRESENCE": {"CACHE": "default"}} if _redis_url else {}
    if os.environ.get("CHANNELS_MINI_TEST_PRESENCE"):
        _on_redis["CHANNELS_MINI_PRESENCE"] = {
            "CACHE": "default", **json.loads(os.environ["CHANNELS_MINI_TEST_PRESENCE"])}
    if os.environ.get("CHANNELS_MINI_TEST_PRESENCE_CACHE"):  # presence on a Redis of its own
        _on_redis["CACHES"]["presence"] = {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                           "LOCATION": os.environ["CHANNELS_MINI_TEST_PRESENCE_CACHE"]}
        _on_redis["CHANNELS_MINI_PRESENCE"]["CACHE"] = "presence"
    if os.environ.get("CHANNELS_MINI_TEST_SECRET_ROTATED"):  # a new SECRET_KEY, the old one a fallback
        _on_redis.update(SECRET_KEY="channels-mini-tests-rotated",
                         SECRET_KEY_FALLBACKS=["channels-mini-tests-only"])
    if os.environ.get("CHANNELS_MINI_TEST_LOGIN_CHECK"):  # seconds between two login checks
        _on_redis["CHANNELS_MINI_LOGIN_CHECK"] = float(os.environ["CHANNELS_MINI_TEST_LOGIN_CHECK"])
    settings.configure(
        DEBUG=False,
        SECRET_KEY=_on_redis.pop("SECRET_KEY", "channels-mini-tests-only"),  # popped before **_on_redis
        ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth",
                        "django.contrib.sessions", __name__],
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
                    "django.contrib.auth.middleware.AuthenticationMiddleware"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": os.environ["CHANNELS_MINI_TEST_DB"],
                               "OPTIONS": {"timeout": 30}}},
        ROOT_URLCONF=__name__,
        USE_TZ=True,
        CHANNEL_ROUTING=f"{__name__}.server_routing",
        CHANNEL_LAYERS=({"default": {"BACKEND": os.environ.get(
            "CHANNELS_MINI_TEST_REDIS_BACKEND", "channels_redis.core.RedisChannelLayer"),
            "CONFIG": {"hosts": [_redis_url],
                       **json.loads(os.environ.get("CHANNELS_MINI_TEST_REDIS_CONFIG", "{}"))}}}
            if _redis_url else {}),
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        LOGGING_CONFIG=None,
        # Section 15: the groups that keep history (the tests name their groups after these).
        CHANNELS_MINI_HISTORY={"hist-*": {"SIZE": 200, "TTL": 300}, "hsmall-*": {"SIZE": 10, "TTL": 300},
                               "hshort-*": {"SIZE": 200, "TTL": 1.5}},
        **_on_redis,
    )

import django  # noqa: E402

django.setup()

import channels_mini  # noqa: E402
from channels_mini import (  # noqa: E402
    AsgiHandler, AsgiRequest, SSE_HEADERS, sse_event,
    Application, BaseConsumer, Binding, Channel, ChannelFull, ChannelSocketException,
    DenyConnection, Group, Include, InMemoryChannelLayer, JsonWebsocketConsumer, Message, Route,
    RouteClass, Router, SendNotAvailableOnDemultiplexer, WebsocketBinding,
    WebsocketCloseException, WebsocketCommunicator, WebsocketConsumer, WebsocketDemultiplexer,
    WebsocketMultiplexer, allowed_hosts_only, channel_and_http_session,
    channel_and_http_session_user_from_http, channel_session, channel_session_user,
    channel_session_user_from_http, consumer_context, enforce_ordering, get_channel_layer,
    http_session, http_session_user, include, reset_channel_layers, route, route_class,
)
from channels_mini import (  # noqa: E402  -- the 1.x names (channels.test, channels.utils, ...)
    CREATE, DELETE, UPDATE, ChannelTestCase, Client, RequestAborted, RequestTimeout, WSClient,
    apply_routes, name_that_thing, session_for_reply_channel,
)
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.db import models  # noqa: E402


# --- the test project: models, views, urls -----------------------------------------

class Item(models.Model):
    """A model with the field types Django's serializer writes specially."""

    name = models.CharField(max_length=50)
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    when = models.DateTimeField(null=True, blank=True)
    uid = models.UUIDField(default=uuid.uuid4)
    owner = models.ForeignKey("auth.User", null=True, blank=True, on_delete=models.SET_NULL)
    team = models.CharField(max_length=20, default="red")

    class Meta:
        app_label = __name__

    def __str__(self) -> str:
        return self.name


def _view_create_item(request):
    from django.http import JsonResponse
    item = Item.objects.create(name=request.GET.get("name", "from-view"),
                               team=request.GET.get("team", "red"))
    return JsonResponse({"pk": item.pk})


def _view_page(request):
    from django.http import HttpResponse
    return HttpResponse("django page ok")


def _view_logout(request):
    from django.contrib.auth import logout
    from django.http import HttpResponse
    logout(request)
    return HttpResponse("logged out")


def _view_login(request):
    """Log in with Django's own form and login(): what LoginView does, minus its template.

    CSRF-exempt, so a test can POST username and password with a plain HTTP client and
    keep the session cookie from the answer, as a browser would after logging in.
    """
    from django.contrib.auth import login
    from django.contrib.auth.forms import AuthenticationForm
    from django.http import HttpResponse

    form = AuthenticationForm(request, data=request.POST)
    if not form.is_valid():
        return HttpResponse(form.errors.as_json(), status=403, content_type="application/json")
    login(request, form.get_user())
    return HttpResponse("logged in")


def _view_whoami(request):
    """Who Django's AuthenticationMiddleware says the request is: the username, or "anonymous"."""
    from django.http import HttpResponse
    return HttpResponse(request.user.get_username() if request.user.is_authenticated else "anonymous")


def _view_password(request):
    """Change the logged-in user's password and keep this session logged in, as Django's
    PasswordChangeView does (update_session_auth_hash cycles the session key)."""
    from django.contrib.auth import update_session_auth_hash
    from django.http import HttpResponse
    request.user.set_password(request.POST["password"])
    request.user.save()
    update_session_auth_hash(request, request.user)
    return HttpResponse("password changed")


def _url_patterns():
    from django.urls import path
    from django.views.decorators.csrf import csrf_exempt
    return [path("page/", _view_page), path("items/create/", _view_create_item),
            path("logout/", _view_logout), path("login/", csrf_exempt(_view_login)),
            path("whoami/", _view_whoami), path("password/", csrf_exempt(_view_password))]


urlpatterns = _url_patterns()

_database_ready = False


def ensure_database() -> None:
    """Create the tables once per test DB file (the servers share the file)."""
    global _database_ready
    if not _database_ready:
        from django.apps import apps
        from django.core.management import call_command
        # This file is its own app without a `models` submodule: tell Django where they are.
        apps.get_app_config(__name__).models_module = sys.modules[__name__]
        call_command("migrate", run_syncdb=True, verbosity=0)
        _database_ready = True


# --- helpers every section uses --------------------------------------------------------

def run(coroutine, timeout: float = 30):
    """Run *coroutine* on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coroutine, timeout))


def asynchronous(test=None, *, timeout: float = 30):
    """Run an ``async def`` test on a fresh event loop, bounded by *timeout* seconds
    (pytest sees a plain function, fixtures included).

    Use as ``@asynchronous`` or ``@asynchronous(timeout=60)``, below any ``pytest.mark``.
    The whole body runs on the loop: the ORM and blocking waits belong off it (the ORM
    refuses to run there), in ``asyncio.to_thread`` or in a plain test calling ``run``.
    """
    if test is None:
        return functools.partial(asynchronous, timeout=timeout)

    @functools.wraps(test)  # pytest reads the fixtures from test's signature (__wrapped__)
    def bounded(*args, **kwargs):
        return run(test(*args, **kwargs), timeout)

    return bounded


@pytest.fixture(autouse=True)
def fresh_layers():
    """Each test starts with fresh channel layers and leaves none behind."""
    reset_channel_layers()
    yield
    reset_channel_layers()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


class Server:
    """A server subprocess: its port, and its log once stopped or on demand."""

    def __init__(self, port: int, process: subprocess.Popen, log_path: str):
        self.port, self.process, self.log_path = port, process, log_path

    def url(self, path: str, scheme: str = "ws") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()


def server_command(kind: str, app: str, port: int) -> list[str]:
    if kind == "uvicorn":
        return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
                "--app-dir", ROOT, "--log-level", "warning"]
    if kind == "daphne":
        return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), app]
    if kind == "hypercorn":
        return [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", app]
    raise ValueError(kind)


@contextlib.contextmanager
def running_server(kind: str = "uvicorn", app: str = f"{__name__}:server_app",
                   env: dict | None = None, extra_args: list[str] | None = None,
                   cwd: str = ROOT):
    """Start a real ASGI server on a free 127.0.0.1 port; always stopped on exit."""
    ensure_database()
    port = free_port()
    log_file = tempfile.NamedTemporaryFile("wb", suffix=".log", delete=False)
    command = server_command(kind, app, port) + list(extra_args or ())
    if cwd != ROOT:  # another project: import from there, and channels_mini from here
        command = [part if part != ROOT else cwd for part in command]
        env = {"PYTHONPATH": ROOT, **(env or {})}
    process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})},
                               stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield Server(port, process, log_file.name)
    finally:
        stop_process(process)
        log_file.close()


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def ws_connect(url: str, origin: str | None = None, **kwargs):
    """A real websocket client connection (use with `async with`)."""
    from websockets.asyncio.client import connect
    return connect(url, origin=origin, open_timeout=10, close_timeout=5, **kwargs)


async def recv(websocket, timeout: float = 10):
    """The next frame of a real websocket client, within *timeout* seconds."""
    return await asyncio.wait_for(websocket.recv(), timeout)


def wait_until(predicate, timeout: float = 10, what: str = "condition") -> None:
    """Poll *predicate* every 50 ms until it is true; AssertionError after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout} s")


@contextlib.contextmanager
def running_redis(port: int | None = None, workdir: str | None = None, *args: str):
    """A real redis-server on a free port (or *port*), keeping no snapshot unless *args* say
    so, its files in *workdir* (a restart from there loads its dump); always stopped on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: .ci/run installs it "
                           "(apt-get install -y redis-server).")
    port = port or free_port()
    workdir = workdir or tempfile.mkdtemp(prefix="channels-mini-redis-")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", workdir, *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_process(process)


# --- end of shared header ---


# === 1. Channel layer ===

@asynchronous
async def test_layer_send_then_receive_returns_the_message():
    layer = InMemoryChannelLayer()

    await layer.send("email.send", {"to": "a@example.com"})
    assert await layer.receive("email.send") == {"to": "a@example.com"}


@asynchronous
async def test_layer_receive_waits_for_a_later_send():
    layer = InMemoryChannelLayer()

    waiting = asyncio.ensure_future(layer.receive("jobs"))
    await asyncio.sleep(0.02)
    assert not waiting.done()
    await layer.send("jobs", {"n": 1})
    assert await asyncio.wait_for(waiting, 1) == {"n": 1}


@asynchronous
async def test_layer_keeps_order_within_a_channel():
    layer = InMemoryChannelLayer()

    for n in range(50):
        await layer.send("ordered", {"n": n})
    assert [(await layer.receive("ordered"))["n"] for _ in range(50)] == list(range(50))


def test_layer_send_rejects_non_dict():
    layer = InMemoryChannelLayer()
    with pytest.raises(TypeError, match=re.escape("Message must be a dict (got str 'hello')")):
        run(layer.send("chan", "hello"))


@pytest.mark.parametrize("name, error, text", [
    (b"bytes.name", TypeError, "Channel name must be a str (got bytes b'bytes.name')."),
    ("bad name", ValueError, "Channel name 'bad name' is invalid"),
    ("x" * 100, ValueError, "use fewer than 100 ASCII letters"),
    ("two!bangs!here", ValueError, "and at most one '!'"),
])
def test_layer_validates_channel_names(name, error, text):
    layer = InMemoryChannelLayer()
    with pytest.raises(error, match=re.escape(text)):
        run(layer.send(name, {}))


def test_layer_validates_group_names_and_states_the_rule():
    layer = InMemoryChannelLayer()
    with pytest.raises(ValueError, match=re.escape(
            "Group name 'room!1' is invalid: use fewer than 100 ASCII letters, digits, '-', '_' or '.'.")):
        run(layer.group_add("room!1", "chan"))
    with pytest.raises(TypeError, match=re.escape("Group name must be a str (got int 5).")):
        run(layer.group_send(5, {}))


@asynchronous
async def test_layer_allows_process_local_channel_names():
    layer = InMemoryChannelLayer()

    name = await layer.new_channel()
    other = await layer.new_channel("websocket.send")
    await layer.send(name, {"ok": True})
    message = await layer.receive(name)
    assert name.startswith("specific.") and name.count("!") == 1
    assert other.startswith("websocket.send.") and name != other
    assert message == {"ok": True}


@asynchronous
async def test_layer_new_channel_names_are_unique():
    layer = InMemoryChannelLayer()

    assert len({await layer.new_channel() for _ in range(1000)}) == 1000


@asynchronous
async def test_layer_capacity_raises_channel_full_with_advice():
    layer = InMemoryChannelLayer(capacity=2)

    with pytest.raises(ChannelFull, match=re.escape(
            "Channel 'small' holds 2 messages, its capacity. Its receiver is slow or gone; "
            "raise 'capacity' or 'channel_capacity' if bursts are expected.")):
        await layer.send("small", {"n": 1})
        await layer.send("small", {"n": 2})
        await layer.send("small", {"n": 3})


@asynchronous
async def test_layer_channel_capacity_patterns_glob_and_regex():
    layer = InMemoryChannelLayer(capacity=1, channel_capacity={
        "http.response!*": 3, re.compile(r"^websocket\.send!"): 2})

    async def fill(channel):
        sent = 0
        with contextlib.suppress(ChannelFull):
            for _ in range(10):
                await layer.send(channel, {})
                sent += 1
        return sent

    assert await fill("http.response!abc") == 3
    assert await fill("websocket.send!xyz") == 2
    assert await fill("other") == 1


@asynchronous
async def test_layer_messages_expire():
    layer = InMemoryChannelLayer(expiry=0.05)

    await layer.send("old", {"n": 1})
    await asyncio.sleep(0.1)
    await layer.send("old", {"n": 2})
    assert await layer.receive("old") == {"n": 2}


@asynchronous
async def test_layer_expired_messages_free_capacity():
    layer = InMemoryChannelLayer(expiry=0.05, capacity=1)

    await layer.send("tiny", {"n": 1})
    await asyncio.sleep(0.1)
    await layer.send("tiny", {"n": 2})  # would be ChannelFull if the old one still counted
    assert await layer.receive("tiny") == {"n": 2}


@asynchronous
async def test_layer_group_send_reaches_every_member_once():
    layer = InMemoryChannelLayer()

    for name in ("a", "b", "c"):
        await layer.group_add("room", name)
    await layer.group_add("room", "a")  # twice: still one membership
    await layer.group_send("room", {"text": "hi"})
    received = [await layer.receive(name) for name in ("a", "b", "c")]
    extra = asyncio.ensure_future(layer.receive("a"))
    await asyncio.sleep(0.02)
    nothing_more = not extra.done()
    extra.cancel()
    assert received == [{"text": "hi"}] * 3
    assert nothing_more


@asynchronous
async def test_layer_group_discard_stops_delivery_and_frees_the_group():
    layer = InMemoryChannelLayer()

    await layer.group_add("room", "a")
    await layer.group_add("room", "b")
    await layer.group_discard("room", "a")
    await layer.group_discard("room", "never-joined")
    await layer.group_send("room", {"n": 1})
    with_b = layer.stats()
    await layer.receive("b")
    await layer.group_discard("room", "b")
    after = layer.stats()
    assert with_b["members"] == 1 and with_b["messages"] == 1
    assert after == {"channels": 0, "groups": 0, "members": 0, "messages": 0, "dropped": 0}


@asynchronous
async def test_layer_group_send_skips_full_members_counts_and_warns_once(caplog):
    layer = InMemoryChannelLayer(capacity=1)

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        await layer.group_add("room", "slow")
        await layer.group_add("room", "fast")
        for n in range(5):
            await layer.group_send("room", {"n": n})  # never raises
            await layer.receive("fast")
        first = await layer.receive("slow")
    assert first == {"n": 0}
    assert layer.dropped == 4 and layer.stats()["dropped"] == 4
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: one report a second, not one per drop
    assert "Group 'room': 1 message(s) dropped" in warnings[0].getMessage()


@asynchronous
async def test_layer_group_expiry_removes_stale_members():
    layer = InMemoryChannelLayer(group_expiry=0.05)

    await layer.group_add("room", "old")
    await asyncio.sleep(0.1)
    await layer.group_add("room", "new")
    await layer.group_send("room", {"n": 1})
    stats, message = layer.stats(), await layer.receive("new")
    assert stats["members"] == 1 and stats["messages"] == 1
    assert message == {"n": 1}


@asynchronous
async def test_layer_flush_drops_everything():
    layer = InMemoryChannelLayer()

    await layer.send("a", {})
    await layer.group_add("g", "a")
    await layer.flush()
    await layer.close()
    assert layer.stats() == {"channels": 0, "groups": 0, "members": 0, "messages": 0, "dropped": 0}
    assert layer.extensions == ["groups", "flush"]


@asynchronous
async def test_layer_discard_channel_leaves_every_group_and_frees_the_queue():
    layer = InMemoryChannelLayer()

    await layer.group_add("g1", "sock!1")
    await layer.group_add("g2", "sock!1")
    await layer.group_add("g2", "sock!2")
    await layer.send("sock!1", {"pending": True})
    layer.discard_channel("sock!1")
    assert layer.stats() == {"channels": 0, "groups": 1, "members": 1, "messages": 0, "dropped": 0}


@asynchronous
async def test_layer_isolates_receivers_at_the_top_level():
    layer = InMemoryChannelLayer()
    original = {"text": "hi", "meta": "sender's"}

    await layer.group_add("g", "a")
    await layer.group_add("g", "b")
    await layer.group_send("g", original)
    first = await layer.receive("a")
    first["text"] = "changed by a"
    first["extra"] = 1
    assert await layer.receive("b") == {"text": "hi", "meta": "sender's"}
    assert original == {"text": "hi", "meta": "sender's"}


@asynchronous
async def test_layer_send_from_a_plain_thread_wakes_a_receiver_on_the_loop():
    layer = InMemoryChannelLayer()

    waiting = asyncio.ensure_future(layer.receive("cross"))
    await asyncio.sleep(0.02)
    thread = threading.Thread(target=Channel("cross", channel_layer=layer).send, args=({"from": "thread"},))
    thread.start()
    message = await asyncio.wait_for(waiting, 2)
    thread.join(2)
    assert message == {"from": "thread"}


@asynchronous
async def test_layer_send_from_another_threads_event_loop_wakes_a_receiver():
    layer = InMemoryChannelLayer()
    errors = []

    def other_thread():
        try:
            asyncio.run(layer.send("cross", {"from": "other loop"}))
            asyncio.run(layer.group_send("g", {"from": "other loop, group"}))
        except Exception as error:  # collected: the assertion below reports it
            errors.append(error)

    await layer.group_add("g", "cross")
    waiting = asyncio.ensure_future(layer.receive("cross"))
    await asyncio.sleep(0.02)
    thread = threading.Thread(target=other_thread)
    thread.start()
    first = await asyncio.wait_for(waiting, 2)
    second = await asyncio.wait_for(layer.receive("cross"), 2)
    thread.join(2)
    assert [first, second] == [{"from": "other loop"}, {"from": "other loop, group"}]
    assert errors == []


@asynchronous
async def test_layer_serves_receivers_on_two_loops_without_loop_errors():
    layer = InMemoryChannelLayer()
    results = {}

    def receive_in_thread():
        results["thread"] = asyncio.run(asyncio.wait_for(layer.receive("t"), 5))

    thread = threading.Thread(target=receive_in_thread)
    thread.start()
    waiting = asyncio.ensure_future(layer.receive("m"))
    await asyncio.sleep(0.05)
    await layer.send("t", {"to": "thread"})
    await layer.send("m", {"to": "main"})
    results["main"] = await asyncio.wait_for(waiting, 2)
    await asyncio.to_thread(thread.join, 5)
    assert results == {"thread": {"to": "thread"}, "main": {"to": "main"}}


@asynchronous
async def test_layer_cancelled_receiver_loses_no_message():
    layer = InMemoryChannelLayer()

    first = asyncio.ensure_future(layer.receive("c"))
    second = asyncio.ensure_future(layer.receive("c"))
    await asyncio.sleep(0.01)
    await layer.send("c", {"n": 1})
    first.cancel()  # woken, but cancelled before it could take the message
    await asyncio.sleep(0)
    message, channels_left = await asyncio.wait_for(second, 1), layer.stats()["channels"]
    assert message == {"n": 1}
    assert channels_left == 0


@asynchronous
async def test_layer_many_threads_sending_lose_nothing():
    layer = InMemoryChannelLayer(capacity=10_000)

    def sender(base):
        for n in range(200):
            Channel("many", channel_layer=layer).send({"n": base + n})

    threads = [threading.Thread(target=sender, args=(k * 1000,)) for k in range(8)]
    for thread in threads:
        thread.start()
    got = [(await asyncio.wait_for(layer.receive("many"), 5))["n"] for _ in range(1600)]
    for thread in threads:
        thread.join(5)
    assert sorted(got) == sorted(k * 1000 + n for k in range(8) for n in range(200))
    for k in range(8):  # each sender's messages stay in its order
        mine = [n for n in got if k * 1000 <= n < k * 1000 + 200]
        assert mine == sorted(mine)


@asynchronous
async def test_layer_group_send_to_many_waiting_receivers():
    layer = InMemoryChannelLayer()

    names = [f"r{n}" for n in range(1000)]
    for name in names:
        await layer.group_add("all", name)
    waiting = [asyncio.ensure_future(layer.receive(name)) for name in names]
    await asyncio.sleep(0.01)
    await layer.group_send("all", {"n": 1})
    assert await asyncio.wait_for(asyncio.gather(*waiting), 5) == [{"n": 1}] * 1000


def test_get_channel_layer_default_is_one_shared_in_memory_layer():
    first = get_channel_layer()
    assert isinstance(first, InMemoryChannelLayer)
    assert get_channel_layer("default") is first


def test_get_channel_layer_builds_backend_from_settings():
    from django.test import override_settings

    config = {"default": {"BACKEND": "channels_mini.InMemoryChannelLayer", "CONFIG": {"capacity": 7}},
              "other": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    with override_settings(CHANNEL_LAYERS=config):
        reset_channel_layers()
        assert get_channel_layer().capacity == 7
        assert isinstance(get_channel_layer("other"), InMemoryChannelLayer)


def test_get_channel_layer_accepts_the_1x_in_memory_backend_name():
    from django.test import override_settings

    config = {"default": {"BACKEND": "asgiref.inmemory.ChannelLayer", "ROUTING": "mysite.routing.x",
                          "CONFIG": {"capacity": 9}}}
    with override_settings(CHANNEL_LAYERS=config):
        reset_channel_layers()
        layer = get_channel_layer()
        assert type(layer) is InMemoryChannelLayer and layer.capacity == 9

def test_get_channel_layer_errors_name_alias_and_backend():
    from django.test import override_settings

    with pytest.raises(ImproperlyConfigured, match=re.escape(
            "Channel layer alias 'missing' is not configured: settings.CHANNEL_LAYERS is empty.")):
        get_channel_layer("missing")
    config = {"default": {"BACKEND": "nowhere.Layer"}, "bad": {"BACKEND": "channels_mini.InMemoryChannelLayer",
                                                            "CONFIG": {"nonsense": 1}}}
    with override_settings(CHANNEL_LAYERS=config):
        reset_channel_layers()
        with pytest.raises(ImproperlyConfigured, match=re.escape(
                "CHANNEL_LAYERS['default']['BACKEND']: cannot import 'nowhere.Layer'")):
            get_channel_layer()
        with pytest.raises(ImproperlyConfigured, match=re.escape(
                "Channel layer 'bad' (channels_mini.InMemoryChannelLayer) could not be built with CONFIG "
                "{'nonsense': 1}")):
            get_channel_layer("bad")
        with pytest.raises(ImproperlyConfigured, match=re.escape(
                "Channel layer alias 'nope' is not in settings.CHANNEL_LAYERS (it has ['bad', 'default'])")):
            get_channel_layer("nope")


def test_module_imports_without_settings_and_without_side_effects(tmp_path):
    script = ("import sys, threading, logging; sys.path.insert(0, sys.argv[1]); "
              "before = threading.active_count(); import channels_mini as m; "
              "from django.conf import settings; "
              "assert not settings.configured; assert threading.active_count() == before; "
              "assert m._layers == {} and m._bindings == []; print('clean')")
    result = subprocess.run([sys.executable, "-c", script, ROOT], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env={k: v for k, v in os.environ.items()
                                                           if k != "DJANGO_SETTINGS_MODULE"})
    assert result.stdout.strip() == "clean", result.stderr


def test_module_works_when_vendored_under_another_package(tmp_path):
    package = tmp_path / "mysite"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(os.path.join(ROOT, "channels_mini.py"), package / "channels_mini.py")
    # Shadow any installed copy: the vendored module must never import itself by name.
    (tmp_path / "channels_mini.py").write_text("raise ImportError('imported channels_mini by name')\n")
    script = (
        "import asyncio\n"
        "from mysite.channels_mini import Application, WebsocketConsumer, WebsocketCommunicator\n"
        "class Echo(WebsocketConsumer):\n"
        "    def receive(self, text=None, **kwargs):\n"
        "        self.send(text=text.upper())\n"
        "async def main():\n"
        "    c = WebsocketCommunicator(Application([Echo.as_route()], allowed_origins=['*']), '/')\n"
        "    assert (await c.connect())[0]\n"
        "    await c.send_to('hi')\n"
        "    print(await c.receive_from())\n"
        "    await c.disconnect()\n"
        "asyncio.run(main())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.stdout.strip() == "HI", result.stderr


# Layer-level checks against a real redis-server: channels_redis plugs in through
# CHANNEL_LAYERS, and the sync Channel/Group forms reach it from plain threads and
# from code running on an event loop, outside consumers.

redis_CORE = "channels_redis.core.RedisChannelLayer"
redis_PUBSUB = "channels_redis.pubsub.RedisPubSubChannelLayer"


def redis_layer(url: str, **config):
    """A fresh channels_redis core layer on *url*, for the test process itself."""
    from channels_redis.core import RedisChannelLayer
    return RedisChannelLayer(hosts=[url], **config)


async def redis_receive(layer, channel: str, timeout: float = 10) -> dict:
    return await asyncio.wait_for(layer.receive(channel), timeout)


def test_layer_redis_backend_comes_from_channel_layers_setting():
    from channels_redis.core import RedisChannelLayer
    from django.test import override_settings

    with running_redis() as url, override_settings(CHANNEL_LAYERS={
            "default": {"BACKEND": redis_CORE, "CONFIG": {"hosts": [url]}}}):
        reset_channel_layers()
        layer = get_channel_layer()
        assert isinstance(layer, RedisChannelLayer)
        assert get_channel_layer() is layer

        async def round_trip():
            await Channel("redis-setting.check").asend({"n": 1})
            return await redis_receive(layer, "redis-setting.check")

        assert run(round_trip()) == {"n": 1}


def test_layer_redis_sync_sends_outside_consumers_reach_redis_from_threads():
    """Group.add/send and Channel.send (sync forms) from the main thread and from other
    threads each run on a throwaway event loop: every call must still reach Redis."""
    with running_redis() as url:
        layer = redis_layer(url)
        Group("redis-sync-group", channel_layer=layer).add("redis-sync.member")
        for number in range(3):  # several calls: a new loop each time, one pool per loop
            Channel("redis-sync.direct", channel_layer=layer).send({"n": number})
        errors = []

        def from_thread():
            try:
                Group("redis-sync-group", channel_layer=layer).send({"from": "thread"})
            except Exception as error:  # reported below, with its text
                errors.append(error)

        thread = threading.Thread(target=from_thread)
        thread.start()
        thread.join(20)
        assert not thread.is_alive() and errors == []

        async def collect():
            reader = redis_layer(url)
            try:
                direct = [await redis_receive(reader, "redis-sync.direct") for _ in range(3)]
                grouped = await redis_receive(reader, "redis-sync.member")
            finally:
                await reader.close_pools()
            return direct, grouped

        direct, grouped = run(collect())
        assert direct == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert grouped == {"from": "thread"}


def test_layer_redis_sync_send_on_an_event_loop_does_not_block_and_arrives():
    with running_redis() as url:
        layer = redis_layer(url)

        async def send_from_loop():
            reader = redis_layer(url)
            try:
                started = time.perf_counter()
                Channel("redis-loop.direct", channel_layer=layer).send({"on": "loop"})
                returned_after = time.perf_counter() - started
                message = await redis_receive(reader, "redis-loop.direct")
            finally:
                await reader.close_pools()
            return returned_after, message

        returned_after, message = run(send_from_loop())
        assert message == {"on": "loop"}
        assert returned_after < 0.05  # scheduled as a task, never awaited on the loop


def test_layer_redis_consumer_context_defers_sends_until_the_block_ends():
    with running_redis() as url:

        async def deferred():
            layer = redis_layer(url)
            try:
                async with consumer_context(layer):
                    Channel("redis-deferred.a").send({"step": 1})
                    Group("redis-deferred-group").add("redis-deferred.b")
                    Group("redis-deferred-group").send({"step": 2})
                    # Nothing has left yet: the queue is empty in Redis.
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(layer.receive("redis-deferred.a"), 0.3)
                first = await redis_receive(layer, "redis-deferred.a")
                second = await redis_receive(layer, "redis-deferred.b")
            finally:
                await layer.close_pools()
            return first, second

        assert run(deferred()) == ({"step": 1}, {"step": 2})


def test_layer_redis_sync_sends_on_an_event_loop_arrive_in_call_order():
    """Async code outside a consumer (an async view, a script) calling the sync forms:
    SPEC says they happen at once, so a burst arrives complete and in call order, as it
    does with the in-memory layer. 150 is more than channels_redis's connection pool
    (100) but less than the channel's capacity (raised to 1000 here)."""
    with running_redis() as url:
        sending = redis_layer(url, capacity=1000)

        async def burst():
            reader = redis_layer(url)
            try:
                for number in range(150):
                    Channel("redis-burst.direct", channel_layer=sending).send({"n": number})
                received = []
                with contextlib.suppress(asyncio.TimeoutError):
                    for _ in range(150):
                        received.append((await redis_receive(reader, "redis-burst.direct", 3))["n"])
            finally:
                await reader.close_pools()
            return received

        assert run(burst(), timeout=60) == list(range(150))


def test_layer_redis_sync_send_from_a_short_lived_event_loop_is_not_lost():
    """`asyncio.run(main())` where main() calls Channel(...).send(): the message must
    arrive (or the call must raise), not vanish when the loop ends."""
    with running_redis() as url:
        sending = redis_layer(url)

        async def main():
            Channel("redis-short-loop.direct", channel_layer=sending).send({"n": 1})

        asyncio.run(main())

        async def collect():
            reader = redis_layer(url)
            try:
                return await redis_receive(reader, "redis-short-loop.direct", 3)
            except asyncio.TimeoutError:
                return "nothing arrived within 3 s"
            finally:
                await reader.close_pools()

        assert run(collect()) == {"n": 1}


@pytest.mark.parametrize("name", ["chat\n", "chat\u0663", "a!\u00e9", "room\n"])
def test_layer_names_are_ascii_and_whole(name):
    layer = InMemoryChannelLayer()
    with pytest.raises(ValueError, match=re.escape(f"Channel name {name!r} is invalid")):
        run(layer.send(name, {}))
    with pytest.raises(ValueError, match=re.escape("is invalid")):
        Group(name)


def test_layer_unhashable_channel_name_is_a_clear_type_error():
    with pytest.raises(TypeError, match=re.escape("Channel name must be a str (got list ['x']).")):
        run(InMemoryChannelLayer().send(["x"], {}))
    with pytest.raises(TypeError, match=re.escape("Channel name must be a str (got list ['x']).")):
        run(InMemoryChannelLayer().receive(["x"]))


def test_get_channel_layer_reads_settings_named_by_the_environment_before_anything_else(tmp_path):
    (tmp_path / "env_settings.py").write_text(
        "SECRET_KEY = 'x'\nCHANNEL_LAYERS = {'default': {'BACKEND': "
        "'channels_mini.InMemoryChannelLayer', 'CONFIG': {'capacity': 7}}}\n"
        "ALLOWED_HOSTS = ['only.example.com']\n")
    script = ("import channels_mini as m; print(m.get_channel_layer().capacity, "
              "m.Application([]).origin_allowed('https://only.example.com'), "
              "m.Application([]).origin_allowed('http://localhost'))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
                                 "DJANGO_SETTINGS_MODULE": "env_settings"})
    assert result.stdout.split() == ["7", "True", "False"], result.stderr


# === 2. Messages ===

def test_messages_channel_send_outside_a_consumer_acts_at_once():
    layer = InMemoryChannelLayer()
    Channel("out", channel_layer=layer).send({"n": 1})
    assert layer.stats()["messages"] == 1
    assert run(layer.receive("out")) == {"n": 1}


def test_messages_content_must_be_a_dict():
    with pytest.raises(TypeError, match=re.escape("Content must be a dict (got list [1, 2])")):
        Channel("c").send([1, 2])
    with pytest.raises(TypeError, match=re.escape("Content must be a dict (got str 'hi')")):
        Group("g").send("hi")
    with pytest.raises(TypeError, match=re.escape("Content must be a dict (got NoneType None)")):
        run(Channel("c").asend(None))


def test_messages_names_are_checked_when_made():
    with pytest.raises(ValueError, match=re.escape("Group name 'a b' is invalid")):
        Group("a b")
    with pytest.raises(TypeError, match=re.escape("Channel name must be a str (got int 3).")):
        Channel(3)


@asynchronous
async def test_messages_group_add_send_discard_sync_and_async_forms():
    layer = InMemoryChannelLayer()

    group = Group("room", channel_layer=layer)
    group.add(Channel("a", channel_layer=layer))
    await group.aadd("b")
    group.send({"n": 1})
    await group.asend({"n": 2})
    group.discard("a")
    await group.adiscard("b")
    got = [await layer.receive(name) for name in ("a", "a", "b", "b")]
    stats = layer.stats()
    assert got == [{"n": 1}, {"n": 2}, {"n": 1}, {"n": 2}]
    assert stats["groups"] == 0


@asynchronous
async def test_messages_deferred_inside_consumer_context_in_call_order():
    layer = InMemoryChannelLayer()

    async with consumer_context(layer):
        Group("room").add("a")
        Channel("a").send({"n": 1})
        Group("room").send({"n": 2})
        Group("room").discard("a")
        Group("room").send({"n": 3})  # after the discard: reaches nobody
        queued_inside = layer.stats()["messages"]
    got, stats = [await layer.receive("a") for _ in range(2)], layer.stats()
    assert queued_inside == 0
    assert got == [{"n": 1}, {"n": 2}]
    assert stats["messages"] == 0 and stats["groups"] == 0


@asynchronous
async def test_messages_deferred_sends_are_applied_when_the_block_raises():
    layer = InMemoryChannelLayer()

    with pytest.raises(RuntimeError, match="boom"):
        async with consumer_context(layer):
            Channel("a").send({"sent": "anyway"})
            raise RuntimeError("boom")
    assert await layer.receive("a") == {"sent": "anyway"}


@asynchronous
async def test_messages_immediately_and_awaited_forms_act_at_once_inside_a_consumer():
    layer = InMemoryChannelLayer()

    async with consumer_context(layer):
        Channel("a").send({"n": 1}, immediately=True)
        await Channel("a").asend({"n": 2})
        await Group("g").aadd("a")
        Group("g").send({"n": 3}, immediately=True)
        inside = layer.stats()["messages"]
    assert inside == 3


@asynchronous
async def test_messages_deferral_reaches_sync_code_run_in_threads():
    layer = InMemoryChannelLayer()
    from asgiref.sync import sync_to_async

    def sync_handler():
        Channel("a").send({"from": "thread"})
        return layer.stats()["messages"]

    async with consumer_context(layer):
        inside = await sync_to_async(sync_handler, thread_sensitive=False)()
    assert (inside, await layer.receive("a")) == (0, {"from": "thread"})


@asynchronous
async def test_messages_inside_a_consumer_default_names_use_the_consumer_layer():
    layer = InMemoryChannelLayer()

    async with consumer_context(layer):
        assert Channel("a").channel_layer is layer
        assert Group("g").channel_layer is layer
    assert Channel("a").channel_layer is get_channel_layer()


@asynchronous
async def test_messages_deferred_send_to_a_full_channel_waits_then_fails():
    layer = InMemoryChannelLayer(capacity=1)

    async def drain_later():
        await asyncio.sleep(0.2)
        return await layer.receive("full")

    # Room appears while the deferred send waits.
    await layer.send("full", {"n": 0})
    draining = asyncio.ensure_future(drain_later())
    started = time.monotonic()
    async with consumer_context(layer):
        Channel("full").send({"n": 1})
    waited, first, second = time.monotonic() - started, await draining, await layer.receive("full")
    assert 0.1 < waited < 2 and first == {"n": 0} and second == {"n": 1}

    # Room never appears.
    await layer.send("stuck", {"n": 0})
    started = time.monotonic()
    with pytest.raises(ChannelFull):
        async with consumer_context(layer):
            Channel("stuck").send({"n": 1})
    assert 1.9 < time.monotonic() - started < 4


def test_messages_message_is_dict_like_with_channels():
    layer = InMemoryChannelLayer()
    message = Message({"reply_channel": "websocket.send!x", "path": "/a/"}, "websocket.receive", layer)
    assert message["path"] == "/a/" and "path" in message and "text" not in message
    assert message.get("text", "none") == "none"
    assert sorted(message.keys()) == ["path", "reply_channel"]
    assert dict(message.items()) == message.content
    assert message.channel == Channel("websocket.receive")
    assert message.channel.channel_layer is layer
    assert message.reply_channel.name == "websocket.send!x"
    clone = message.copy()
    clone.content["path"] = "/b/"
    assert message["path"] == "/a/"
    assert Message({}, "email.receive", layer).reply_channel is None
    assert repr(message).startswith("<Message channel='websocket.receive'")


@asynchronous
async def test_messages_deferred_sends_keep_the_content_as_it_was_when_sent():
    layer = InMemoryChannelLayer()

    content = {"text": "as sent"}
    async with consumer_context(layer):
        Channel("a").send(content)
        Group("g").send(content)
        content["text"] = "changed later"
    assert await layer.receive("a") == {"text": "as sent"}


# === 3. Routing ===

def route_consumer(message, **kwargs):
    return kwargs


async def route_async_consumer(message, **kwargs):
    return kwargs


def other_route_consumer(message, **kwargs):
    return kwargs


class RouteChat(BaseConsumer):
    method_mapping = {"chat.receive": "on_receive", "chat.join": "on_join"}

    def on_receive(self, message, **kwargs):
        pass

    def on_join(self, message, **kwargs):
        pass


def msg(channel, **content):
    return Message(content, channel, None)



def test_routing_a_filter_on_a_key_no_message_carries_is_an_error_naming_the_keys():
    """`pth=` for `path=` would never match, and (on websocket.connect alone) would have let
    every path's handshake through to frames going nowhere: it fails when the route is made."""
    with pytest.raises(ValueError, match=re.escape(
            "Filter 'pth' for route('websocket.connect') can never match: messages on "
            "['websocket.connect'] carry ['client', 'headers', 'order', 'path', 'query_string', "
            "'reply_channel', 'server', 'subprotocols']. Check its spelling")):
        route("websocket.connect", lambda message: None, pth=r"^/chat/$")
    with pytest.raises(ValueError, match=re.escape("Filter 'pth' for route(['websocket.connect', "
                                                   "'websocket.disconnect', 'websocket.receive'])")):
        WebsocketConsumer.as_route(pth=r"^/chat/$")
    with pytest.raises(ValueError, match=re.escape("Filter 'methd' for route('http.request')")):
        route("http.request", lambda message: None, methd="^GET$")
    # Channels of your own carry whatever you send on them.
    assert route("email.receive", lambda message: None, to_address=r".*@example\.com$")


def test_routing_route_matches_channel_and_filters_with_named_groups():
    router = Router([route("websocket.receive", route_consumer, path=r"^/chat/(?P<room>\w+)/$")])
    assert router.match(msg("websocket.receive", path="/chat/lobby/")) == (route_consumer, {"room": "lobby"})
    assert router.match(msg("websocket.receive", path="/other/")) is None
    assert router.match(msg("websocket.connect", path="/chat/lobby/")) is None


def test_routing_filters_apply_to_any_key_and_all_must_match():
    router = Router([route("email.receive", route_consumer, to_address=r".*@example\.com$",
                           subject=r"^(?P<tag>\[\w+\])")])
    assert router.match(msg("email.receive", to_address="a@example.com", subject="[x] hi")) == (
        route_consumer, {"tag": "[x]"})
    assert router.match(msg("email.receive", to_address="a@example.org", subject="[x] hi")) is None
    assert router.match(msg("email.receive", to_address="a@example.com", subject="hi")) is None


def test_routing_missing_and_non_string_keys_never_match():
    router = Router([route("c", route_consumer, key=r".*")])
    assert router.match(msg("c")) is None
    assert router.match(msg("c", key=5)) is None
    assert router.match(msg("c", key=None)) is None
    assert router.match(msg("c", key="")) == (route_consumer, {})


def test_routing_bytes_values_are_decoded_as_ascii():
    router = Router([route("c", route_consumer, query_string=r"^token=(?P<token>\w+)")])
    assert router.match(msg("c", query_string=b"token=abc")) == (route_consumer, {"token": "abc"})
    assert router.match(msg("c", query_string="token=é".encode())) is None


def test_routing_bytes_patterns_are_decoded_as_ascii_as_in_1x():
    router = Router([route("websocket.connect", route_consumer, path=rb"^/chat/(?P<room>\w+)/$")])
    assert router.match(msg("websocket.connect", path="/chat/lobby/")) == (route_consumer, {"room": "lobby"})
    assert router.match(msg("websocket.connect", path=b"/chat/hall/")) == (route_consumer, {"room": "hall"})
    with pytest.raises(ValueError, match=re.escape(
            "Filter 'path' for route 'c' is a bytes pattern that is not ASCII (got b'^/caf\\xc3\\xa9/$'). "
            "Write it as a str.")):
        route("c", route_consumer, path="^/café/$".encode())

def test_routing_route_takes_a_list_of_channels():
    router = Router([route(["a.x", "b.x"], route_consumer)])
    assert router.match(msg("b.x")) == (route_consumer, {})
    assert router.channels == {"a.x", "b.x"}


def test_routing_first_match_wins():
    router = Router([route("c", route_consumer, path=r"^/a"), route("c", other_route_consumer),
                     route("c", route_consumer)])
    assert router.match(msg("c", path="/a/b"))[0] is route_consumer
    assert router.match(msg("c", path="/b"))[0] is other_route_consumer


def test_routing_positional_groups_are_a_value_error():
    with pytest.raises(ValueError, match=re.escape(
            "Filter 'path' for route 'websocket.receive' uses an unnamed group "
            "(got '^/room/(\\\\d+)/$'). Name it, e.g. (?P<room_id>\\d+)")):
        route("websocket.receive", route_consumer, path=r"^/room/(\d+)/$")
    with pytest.raises(ValueError, match=re.escape("Filter 'path' for include() uses an unnamed group")):
        include([], path=r"^/(a)")


def test_routing_filters_must_be_strings():
    with pytest.raises(TypeError, match=re.escape(
            "Filter 'path' for route 'c' must be a regex string (got int 5).")):
        route("c", route_consumer, path=5)


def test_routing_dotted_path_consumers_and_routings():
    name = __name__
    router = Router([route("c", f"{name}.route_consumer")])
    assert router.match(msg("c")) == (route_consumer, {})
    assert Router(f"{name}.routing_as_module_list").match(msg("x.y"))[0] is other_route_consumer
    with pytest.raises(ImproperlyConfigured, match=re.escape(
            "Consumer for route('c'): cannot import 'nowhere.consumer'")):
        route("c", "nowhere.consumer")
    with pytest.raises(ImproperlyConfigured, match=re.escape(
            f"Consumer for route('c'): cannot import '{name}.no_such_consumer'")):
        route("c", f"{name}.no_such_consumer")


routing_as_module_list = [route("x.y", other_route_consumer)]


def test_routing_bad_routing_values_say_what_they_got():
    with pytest.raises(TypeError, match=re.escape(
            "A routing is a list of routes, a dict {channel: consumer} or a dotted path to one (got int 5).")):
        Router(5)
    with pytest.raises(TypeError, match=re.escape(
            "Routing entries must be route(), route_class() or include() (got 'oops').")):
        Router(["oops"])
    with pytest.raises(TypeError, match=re.escape("Consumer for route('c') must be callable")):
        route("c", 42)


def test_routing_dict_routing_maps_channels_to_consumers():
    router = Router({"a": route_consumer, "b": f"{__name__}.other_route_consumer"})
    assert router.match(msg("a")) == (route_consumer, {})
    assert router.match(msg("b")) == (other_route_consumer, {})
    assert router.channels == {"a", "b"}


def test_routing_route_class_uses_channel_names():
    entry = route_class(RouteChat, room=r"^(?P<room>\w+)$")
    assert entry.channels == {"chat.receive", "chat.join"}
    assert Router([entry]).match(msg("chat.join", room="r1")) == (RouteChat, {"room": "r1"})
    with pytest.raises(ValueError, match=re.escape(
            "route_class() needs a class with a channel_names() method")):
        route_class(route_consumer)

    class Empty(BaseConsumer):
        pass

    with pytest.raises(ValueError, match=re.escape("channel_names() lists no channel")):
        route_class(Empty)


def test_routing_as_route_with_attrs_makes_a_subclass():
    entry = RouteChat.as_route(attrs={"greeting": "hello"}, room=r"^main$")
    assert issubclass(entry.consumer, RouteChat) and entry.consumer is not RouteChat
    assert entry.consumer.greeting == "hello"
    assert not hasattr(RouteChat, "greeting")
    assert RouteChat.as_route().consumer is RouteChat
    with pytest.raises(TypeError, match=re.escape(
            "as_route(attrs=...) takes a dict of class attributes (got list ['x'])")):
        RouteChat.as_route(attrs=["x"])


def test_routing_include_strips_prefixes_and_inner_kwargs_win():
    inner = [route("websocket.receive", route_consumer, path=r"^/(?P<room>\w+)/$")]
    router = Router([include(inner, path=r"^/chat/(?P<room>\w+)(?P<section>-\w+)?")])
    message = msg("websocket.receive", path="/chat/outer/inner/")
    assert router.match(message) == (route_consumer, {"room": "inner", "section": None})
    assert message["path"] == "/chat/outer/inner/"  # the consumer gets the original message
    assert router.match(msg("websocket.receive", path="/other/inner/")) is None


def test_routing_include_nests_and_accepts_dotted_paths():
    router = Router([include(f"{__name__}.routing_as_module_list", key=r"^pre")])
    assert router.match(msg("x.y", key="prefix")) == (other_route_consumer, {})
    assert router.match(msg("x.y", key="nope")) is None
    assert router.channels == {"x.y"}
    nested = Router([include([include([route("c", route_consumer, p=r"^c$")], p=r"^b")], p=r"^a")])
    assert nested.match(msg("c", p="abc")) == (route_consumer, {})


def test_routing_routes_print_readably():
    entry = route("websocket.receive", route_consumer, path=r"^/chat/$")
    assert repr(entry) == f"route('websocket.receive', {__name__}.route_consumer, path='^/chat/$')"
    assert repr(route_class(RouteChat)) == f"route_class({__name__}.RouteChat)"
    table = repr(Router([entry, include([entry], path=r"^/x")]))
    assert table.startswith("Router([\n    route('websocket.receive'")
    assert "include([route('websocket.receive'" in table and "path='^/x')" in table


def test_routing_classes_behind_the_helpers():
    assert route is Route and route_class is RouteClass and include is Include


def test_routing_invalid_regex_names_the_filter_and_pattern():
    with pytest.raises(ValueError, match=re.escape(
            "Filter 'path' for route 'c' is not a valid regex (missing ), unterminated subpattern "
            "at position 0; got '(oops').")):
        route("c", route_consumer, path="(oops")


def test_routing_as_route_subclass_keeps_the_users_module_and_name():
    entry = RouteChat.as_route(attrs={"greeting": "hi"})
    assert repr(entry) == f"route_class({__name__}.RouteChat)"


# === 4. Consumers ===
# Consumers report what they saw on the channel APP_OBSERVED (a deferred send, like any
# other a handler makes); tests read those reports from the layer. Replies the client
# must see go to the socket itself.

APP_OBSERVED = "app.observed"


def app_report(**facts) -> None:
    """Inside a consumer: queue *facts* on APP_OBSERVED (sent when the handler returns)."""
    Channel(APP_OBSERVED).send(facts)


def app_where() -> dict:
    """Where the calling code runs: on the main thread? with an event loop running?"""
    try:
        asyncio.get_running_loop()
        on_loop = True
    except RuntimeError:
        on_loop = False
    return {"main_thread": threading.current_thread() is threading.main_thread(),
            "on_loop": on_loop}


async def app_observed(layer, timeout: float = 5) -> dict:
    """The next report a consumer made (fails after *timeout* seconds)."""
    return await asyncio.wait_for(layer.receive(APP_OBSERVED), timeout)


async def app_nothing_observed(layer, timeout: float = 0.3) -> bool:
    try:
        await asyncio.wait_for(layer.receive(APP_OBSERVED), timeout)
    except asyncio.TimeoutError:
        return True
    return False


async def app_close_code(communicator, timeout: float = 5) -> int:
    """The code of the close the app sends next (fails if it sends anything else)."""
    event = await communicator.receive_output(timeout)
    assert event["type"] == "websocket.close", event
    return event["code"]


def app_setup(routing, **options):
    """An Application on the default layer (fresh per test), and that layer."""
    return Application(routing, **options), get_channel_layer()


# -- function consumers --

def app_sync_function(message, **kwargs):
    if message.channel_name == "websocket.connect":
        message.reply_channel.send({"accept": True})
    elif message.channel_name == "websocket.receive":
        message.reply_channel.send({"text": json.dumps(
            {"flavour": "sync", "text": message["text"], "kwargs": kwargs, **app_where()})})
    else:
        app_report(flavour="sync", code=message["code"], kwargs=kwargs, **app_where())


async def app_async_function(message, **kwargs):
    if message.channel_name == "websocket.connect":
        message.reply_channel.send({"accept": True})
    elif message.channel_name == "websocket.receive":
        message.reply_channel.send({"text": json.dumps(
            {"flavour": "async", "text": message["text"], "kwargs": kwargs, **app_where()})})
    else:
        app_report(flavour="async", code=message["code"], kwargs=kwargs, **app_where())


# -- class-based consumers --

class AppMapped(BaseConsumer):
    """method_mapping dispatch, one sync and one async method."""

    method_mapping = {"websocket.connect": "on_connect", "websocket.receive": "on_frame"}

    def on_connect(self, message, **kwargs):
        message.reply_channel.send({"accept": True})

    async def on_frame(self, message, **kwargs):
        assert self.message is message
        message.reply_channel.send({"text": json.dumps(
            {"class": type(self).__name__, "kwargs": self.kwargs, "text": message["text"]})})


class AppConnectOnly(BaseConsumer):
    method_mapping = {"websocket.connect": "on_connect"}

    def on_connect(self, message, **kwargs):
        message.reply_channel.send({"accept": True})


class AppPlain(WebsocketConsumer):
    """No connect(): the default accepts. Joins `groups`."""

    groups = ["plain-a", "plain-b"]


class AppGroupProbe(WebsocketConsumer):
    """Reports the layer's group membership seen inside connect() and disconnect()."""

    groups = ["probe"]

    def connect(self, message, **kwargs):
        app_report(event="connect", stats=message.channel_layer.stats())
        super().connect(message, **kwargs)

    def disconnect(self, message, **kwargs):
        app_report(event="disconnect", stats=message.channel_layer.stats())


# The same chat room in three flavours of one hierarchy: all-sync, all-async, mixed.

def app_room_connect(consumer, message, room):
    app_report(event="connect", room=room, path=consumer.path,
               members=message.channel_layer.stats()["members"], **app_where())
    WebsocketConsumer.connect(consumer, message)


def app_room_receive(consumer, text, bytes, room):
    if bytes is not None:
        consumer.send(bytes=bytes[::-1])
    elif text == "where":
        consumer.send(text=json.dumps({"room": room, "path": consumer.path, **app_where()}))
    else:
        consumer.group_send(f"room-{room}", text=f"{room}: {text}")


def app_room_disconnect(consumer, message, room):
    app_report(event="disconnect", room=room, code=message["code"],
               members=message.channel_layer.stats()["members"], **app_where())


class AppRoomSync(WebsocketConsumer):
    def connection_groups(self, room, **kwargs):
        return [f"room-{room}"]

    def connect(self, message, room, **kwargs):
        app_room_connect(self, message, room)

    def receive(self, text=None, bytes=None, room=None, **kwargs):
        app_room_receive(self, text, bytes, room)

    def disconnect(self, message, room, **kwargs):
        app_room_disconnect(self, message, room)


class AppRoomAsync(AppRoomSync):
    async def connect(self, message, room, **kwargs):
        app_room_connect(self, message, room)

    async def receive(self, text=None, bytes=None, room=None, **kwargs):
        app_room_receive(self, text, bytes, room)

    async def disconnect(self, message, room, **kwargs):
        app_room_disconnect(self, message, room)


class AppRoomMixed(AppRoomAsync):
    """Async connect/disconnect inherited, sync receive overridden."""

    def receive(self, text=None, bytes=None, room=None, **kwargs):
        app_room_receive(self, text, bytes, room)


class AppCloser(WebsocketConsumer):
    """Frames name what to do: close, close with a code, send then close, binary."""

    def receive(self, text=None, bytes=None, **kwargs):
        if text == "close":
            self.close()
        elif text == "close 4001":
            self.close(4001)
        elif text == "bye 4002":
            self.send(text="bye", close=4002)
        elif text == "bye":
            self.send(text="bye", close=True)
        elif text == "binary":
            self.send(bytes=b"\x00\x01\xff")


class AppSlowSync(WebsocketConsumer):
    def receive(self, text=None, bytes=None, **kwargs):
        if text == "slow":
            time.sleep(1.5)
        self.send(text=text)


class AppSlowAsync(WebsocketConsumer):
    async def receive(self, text=None, bytes=None, **kwargs):
        if text == "slow":
            await asyncio.sleep(1.5)
        self.send(text=text)


class AppDeferring(WebsocketConsumer):
    groups = ["deferring"]

    def receive(self, text=None, bytes=None, **kwargs):
        if text == "deferred":
            self.send(text="sent before the pause")
            time.sleep(1.0)  # nothing may reach the client during this
            self.send(text="sent after the pause")
        elif text == "immediately":
            self.message.reply_channel.send({"text": "now"}, immediately=True)
            time.sleep(2.0)
            self.send(text="later")


class AppFailingSync(WebsocketConsumer):
    def receive(self, text=None, bytes=None, **kwargs):
        if text == "fail":
            self.send(text="about to fail")
            raise RuntimeError("boom in receive")
        if text == "fail loudly":
            self.send(text="about to fail")
            Group("watchers").send({"text": "a watcher is told"})
            raise RuntimeError("boom in receive")
        self.send(text=f"ok {text}")


class AppFailingAsync(WebsocketConsumer):
    async def receive(self, text=None, bytes=None, **kwargs):
        if text == "fail":
            self.send(text="about to fail")
            raise RuntimeError("boom in receive")
        if text == "fail loudly":
            self.send(text="about to fail")
            Group("watchers").send({"text": "a watcher is told"})
            raise RuntimeError("boom in receive")
        self.send(text=f"ok {text}")


class AppWatcher(WebsocketConsumer):
    groups = ["watchers"]

    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=f"watcher {text}")


class AppDenySync(WebsocketConsumer):
    def connect(self, message, **kwargs):
        app_report(event="connect")
        raise DenyConnection


class AppDenyAsync(WebsocketConsumer):
    async def connect(self, message, **kwargs):
        app_report(event="connect")
        raise DenyConnection


class AppJson(JsonWebsocketConsumer):
    groups = ["json-fans"]

    def receive(self, content, **kwargs):
        if isinstance(content, dict) and "broadcast" in content:
            self.group_send("json-fans", {"news": content["broadcast"]})
        elif content == "last":
            self.send({"goodbye": True}, close=4010)
        else:
            self.send({"echo": content})


class AppStreamEcho(JsonWebsocketConsumer):
    """A stream consumer: its send() answers on its own stream."""

    def connect(self, message, multiplexer, **kwargs):
        app_report(event="connect", stream=multiplexer.stream, path=message["path"])

    def receive(self, content, multiplexer, **kwargs):
        self.send({"echo": content, "stream": multiplexer.stream})

    def disconnect(self, message, multiplexer, **kwargs):
        app_report(event="disconnect", stream=multiplexer.stream)


def app_stream_function(message, multiplexer, **kwargs):
    if message.channel_name == "websocket.receive":
        multiplexer.send({"got": json.loads(message["text"]),
                          "multiplexer": type(multiplexer).__name__})
    else:
        app_report(event=message.channel_name.split(".")[1], stream=multiplexer.stream)


class AppDemux(WebsocketDemultiplexer):
    consumers = {"echo": AppStreamEcho, "func": app_stream_function}
    groups = ["demux-fans"]

    def connect(self, message, **kwargs):
        try:
            self.send({"not": "allowed"})
        except SendNotAvailableOnDemultiplexer as error:
            app_report(event="send refused", error=str(error))
        super().connect(message, **kwargs)


class AppSessionCounter(WebsocketConsumer):
    def connect(self, message, **kwargs):
        message.channel_session["count"] = 0
        super().connect(message, **kwargs)

    def receive(self, text=None, bytes=None, **kwargs):
        session = self.message.channel_session
        session["count"] += 1
        scope = self.message.scope
        self.send(text=json.dumps({"count": session["count"], "type": scope["type"],
                                   "path": scope["path"],
                                   "query": scope["query_string"].decode()}))

    def disconnect(self, message, **kwargs):
        app_report(event="disconnect", count=message.channel_session["count"])


class AppWhoAmI(WebsocketConsumer):
    http_user = True

    def connect(self, message, **kwargs):
        app_report(event="connect", **app_describe_user(message))
        super().connect(message, **kwargs)

    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=json.dumps(app_describe_user(self.message)))


def app_describe_user(message) -> dict:
    user, session = message.user, message.http_session
    return {"class": type(user).__name__, "authenticated": user.is_authenticated,
            "username": user.get_username(), "pk": user.pk,
            "session_key": session.session_key, "color": session.get("color")}


# -- tests --

@pytest.mark.parametrize("consumer", [app_sync_function, app_async_function], ids=["sync", "async"])
@asynchronous
async def test_consumers_function_consumers_sync_and_async(consumer):
    flavour = "async" if consumer is app_async_function else "sync"
    app, layer = app_setup([route(["websocket.connect", "websocket.receive", "websocket.disconnect"],
                                  consumer, path=r"^/fn/(?P<name>\w+)/$")])

    communicator = WebsocketCommunicator(app, "/fn/ada/")
    assert await communicator.connect(timeout=5) == (True, None)
    await communicator.send_to(text_data="hello")
    reply = json.loads(await communicator.receive_from(timeout=5))
    await communicator.disconnect(code=4004)
    disconnected = await app_observed(layer)
    on_loop = flavour == "async"  # sync consumers run in worker threads, never on the loop
    assert reply == {"flavour": flavour, "text": "hello", "kwargs": {"name": "ada"},
                     "main_thread": on_loop, "on_loop": on_loop}
    assert disconnected == {"flavour": flavour, "code": 4004, "kwargs": {"name": "ada"},
                            "main_thread": on_loop, "on_loop": on_loop}


@asynchronous
async def test_consumers_method_mapping_dispatches_to_sync_and_async_methods():
    assert AppMapped.channel_names() == {"websocket.connect", "websocket.receive"}
    app, _ = app_setup([AppMapped.as_route(path=r"^/mapped/(?P<slot>\d+)/$")])

    communicator = WebsocketCommunicator(app, "/mapped/7/")
    assert await communicator.connect(timeout=5) == (True, None)
    await communicator.send_to(text_data="frame")
    reply = json.loads(await communicator.receive_from(timeout=5))
    await communicator.disconnect()
    assert reply == {"class": "AppMapped", "kwargs": {"slot": "7"}, "text": "frame"}



def test_consumers_text_that_is_not_a_str_says_how_to_send_json():
    with pytest.raises(TypeError, match=re.escape(
            "text must be a str (got dict {'a': 1}). To send JSON, pass text=json.dumps(...) or "
            "use JsonWebsocketConsumer, whose send() takes the content itself.")):
        WebsocketConsumer.group_send("anywhere", text={"a": 1})


def test_consumers_missing_method_mapping_entry_names_channel_class_and_mapping(caplog):
    expected = ("AppConnectOnly has no method for channel 'websocket.receive': its "
                "method_mapping is {'websocket.connect': 'on_connect'}. Add the channel, or "
                "route only the channels it lists.")
    # Called directly, as Channels 1.x code does: the constructor dispatches.
    message = Message({"text": "x", "path": "/"}, "websocket.receive", InMemoryChannelLayer())
    with pytest.raises(ValueError, match=re.escape(expected)):
        AppConnectOnly(message)

    # Routed for a channel it does not map: logged, and the socket closes with 1011.
    app, _ = app_setup([route(["websocket.connect", "websocket.receive"], AppConnectOnly,
                              path=r"^/only/$")])

    async def scenario():
        communicator = WebsocketCommunicator(app, "/only/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(text_data="x")
        code = await app_close_code(communicator)
        await communicator.disconnect()
        return code

    with caplog.at_level(logging.ERROR, logger="channels_mini"):
        assert run(scenario()) == 1011
    failures = [r for r in caplog.records if r.name == "channels_mini" and r.exc_info]
    assert len(failures) == 1
    assert str(failures[0].exc_info[1]) == expected


@asynchronous
async def test_consumers_default_connect_accepts_and_class_groups_are_joined():
    app, layer = app_setup([AppPlain.as_route(path=r"^/plain/$")])

    first = WebsocketCommunicator(app, "/plain/")
    second = WebsocketCommunicator(app, "/plain/")
    assert await first.connect(timeout=5) == (True, None)
    assert await second.connect(timeout=5) == (True, None)
    assert layer.stats()["groups"] == 2 and layer.stats()["members"] == 4
    # group_send outside any consumer: at once, on the default layer.
    AppPlain.group_send("plain-b", text="news")
    received = [await first.receive_from(timeout=5), await second.receive_from(timeout=5)]
    await first.disconnect()
    await second.disconnect()
    assert received == ["news", "news"]
    assert layer.stats()["members"] == 0 and layer.stats()["groups"] == 0


@asynchronous
async def test_consumers_groups_joined_before_connect_and_left_before_disconnect():
    app, layer = app_setup([AppGroupProbe.as_route(path=r"^/probe/$")])

    communicator = WebsocketCommunicator(app, "/probe/")
    assert await communicator.connect(timeout=5) == (True, None)
    connected = await app_observed(layer)
    await communicator.disconnect()
    disconnected = await app_observed(layer)
    assert (connected["event"], connected["stats"]["groups"], connected["stats"]["members"]) == (
        "connect", 1, 1)
    assert (disconnected["event"], disconnected["stats"]["groups"],
            disconnected["stats"]["members"]) == ("disconnect", 0, 0)


@pytest.mark.parametrize("consumer, async_handlers", [
    (AppRoomSync, set()),
    (AppRoomAsync, {"connect", "receive", "disconnect"}),
    (AppRoomMixed, {"connect", "disconnect"}),
], ids=["sync", "async", "mixed"])
@asynchronous
async def test_consumers_websocket_consumer_handlers_sync_or_async(consumer, async_handlers):
    app, layer = app_setup([consumer.as_route(path=r"^/room/(?P<room>\w+)/$")])

    def placed(handler):  # async def handlers run on the loop, sync ones in a worker thread
        on_loop = handler in async_handlers
        return {"main_thread": on_loop, "on_loop": on_loop}

    alice = WebsocketCommunicator(app, "/room/blue/")
    bob = WebsocketCommunicator(app, "/room/blue/")
    carol = WebsocketCommunicator(app, "/room/red/")
    for communicator in (alice, bob, carol):
        assert await communicator.connect(timeout=5) == (True, None)
    connects = [await app_observed(layer) for _ in range(3)]
    assert connects == [
        {"event": "connect", "room": room, "path": f"/room/{room}/", "members": members,
         **placed("connect")}
        for room, members in (("blue", 1), ("blue", 2), ("red", 3))
    ]
    await alice.send_to(text_data="hi")
    assert await alice.receive_from(timeout=5) == "blue: hi"
    assert await bob.receive_from(timeout=5) == "blue: hi"
    assert await carol.receive_nothing(timeout=0.3)
    await carol.send_to(text_data="where")
    assert json.loads(await carol.receive_from(timeout=5)) == {
        "room": "red", "path": "/room/red/", **placed("receive")}
    await carol.send_to(bytes_data=b"abc")
    assert await carol.receive_from(timeout=5) == b"cba"
    await alice.disconnect(code=4001)
    assert await app_observed(layer) == {"event": "disconnect", "room": "blue", "code": 4001,
                                         "members": 2, **placed("disconnect")}
    await bob.send_to(text_data="alone")
    assert await bob.receive_from(timeout=5) == "blue: alone"
    await bob.disconnect()
    await carol.disconnect()
    last = [await app_observed(layer) for _ in range(2)]
    assert [(r["room"], r["code"], r["members"]) for r in last] == [("blue", 1000, 1), ("red", 1000, 0)]
    assert layer.stats() == {"channels": 0, "groups": 0, "members": 0, "messages": 0, "dropped": 0}


@asynchronous
async def test_consumers_send_close_and_close_codes():
    app, _ = app_setup([AppCloser.as_route(path=r"^/closer/$")])

    async def one(command):
        communicator = WebsocketCommunicator(app, "/closer/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(text_data=command)
        frames = []
        while True:
            event = await communicator.receive_output(timeout=5)
            if event["type"] == "websocket.close":
                await communicator.disconnect()
                return frames, event["code"]
            frames.append(event.get("text") if event.get("text") is not None else event["bytes"])

    results = {c: await one(c) for c in ("close", "close 4001", "bye 4002", "bye")}
    communicator = WebsocketCommunicator(app, "/closer/")
    assert await communicator.connect(timeout=5) == (True, None)
    await communicator.send_to(text_data="binary")
    results["binary"] = await communicator.receive_from(timeout=5)
    assert await communicator.receive_nothing(timeout=0.2)
    await communicator.disconnect()
    assert results == {
        "close": ([], 1000), "close 4001": ([], 4001), "bye 4002": (["bye"], 4002),
        "bye": (["bye"], 1000), "binary": b"\x00\x01\xff",
    }


@pytest.mark.parametrize("consumer", [AppSlowSync, AppSlowAsync], ids=["sync", "async"])
@asynchronous
async def test_consumers_one_socket_in_order_and_a_slow_handler_delays_only_its_socket(consumer):
    app, _ = app_setup([consumer.as_route(path=r"^/slow/$")])
    frames = ["slow"] + [str(n) for n in range(20)]

    busy = WebsocketCommunicator(app, "/slow/")
    other = WebsocketCommunicator(app, "/slow/")
    assert await busy.connect(timeout=5) == (True, None)
    assert await other.connect(timeout=5) == (True, None)
    for frame in frames:
        await busy.send_to(text_data=frame)
    await other.send_to(text_data="fast")
    assert await other.receive_from(timeout=5) == "fast"
    # the other socket was answered while this one's first handler still sleeps
    assert await busy.receive_nothing(timeout=0.01)
    received = [await busy.receive_from(timeout=5) for _ in frames]
    await busy.disconnect()
    await other.disconnect()
    assert received == frames


@asynchronous
async def test_consumers_sends_are_deferred_until_the_handler_returns():
    app, _ = app_setup([AppDeferring.as_route(path=r"^/defer/$")])

    communicator = WebsocketCommunicator(app, "/defer/")
    assert await communicator.connect(timeout=5) == (True, None)
    await communicator.send_to(text_data="deferred")
    assert await communicator.receive_nothing(timeout=0.4)  # the handler sleeps 1 s
    deferred = [await communicator.receive_from(timeout=5) for _ in range(2)]
    await communicator.send_to(text_data="immediately")
    now = await communicator.receive_from(timeout=1.5)  # the handler sleeps 2 s
    later = await communicator.receive_from(timeout=5)
    await communicator.disconnect()
    assert (deferred, now, later) == (["sent before the pause", "sent after the pause"], "now", "later")


@pytest.mark.parametrize("consumer", [AppFailingSync, AppFailingAsync], ids=["sync", "async"])
@asynchronous
async def test_consumers_exception_logged_with_traceback_closes_1011_deferred_sends_still_go(consumer, caplog):
    app, _ = app_setup([consumer.as_route(path=r"^/fail/$"), AppWatcher.as_route(path=r"^/watch/$")])

    async def failing_socket(command):
        failing = WebsocketCommunicator(app, "/fail/")
        assert await failing.connect(timeout=5) == (True, None)
        await failing.send_to(text_data=command)
        events = [await failing.receive_output(timeout=5) for _ in range(2)]
        await failing.disconnect()
        return events

    with caplog.at_level(logging.ERROR, logger="channels_mini"):
        watcher = WebsocketCommunicator(app, "/watch/")
        assert await watcher.connect(timeout=5) == (True, None)
        loud = await failing_socket("fail loudly")
        assert await watcher.receive_from(timeout=5) == "a watcher is told"
        quiet = await failing_socket("fail")
        # the server and the other sockets carry on
        await watcher.send_to(text_data="still here")
        assert await watcher.receive_from(timeout=5) == "watcher still here"
        survivor = WebsocketCommunicator(app, "/fail/")
        assert await survivor.connect(timeout=5) == (True, None)
        await survivor.send_to(text_data="again")
        assert await survivor.receive_from(timeout=5) == "ok again"
        await survivor.disconnect()
        await watcher.disconnect()
    expected = [{"type": "websocket.send", "text": "about to fail"},
                {"type": "websocket.close", "code": 1011}]
    assert loud == expected
    assert quiet == expected  # the one deferred send, then the close
    failures = [r for r in caplog.records if r.name == "channels_mini" and r.levelno == logging.ERROR]
    assert len(failures) == 2
    for record in failures:
        assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
        assert str(record.exc_info[1]) == "boom in receive"
        assert "/fail/" in record.getMessage() and "1011" in record.getMessage()
        assert "Traceback" in caplog.text


@pytest.mark.parametrize("consumer", [AppDenySync, AppDenyAsync], ids=["sync", "async"])
@asynchronous
async def test_consumers_deny_connection_rejects(consumer, caplog):
    app, layer = app_setup([consumer.as_route(path=r"^/deny/$")])

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        communicator = WebsocketCommunicator(app, "/deny/")
        connected, _ = await communicator.connect(timeout=5)
        await communicator.disconnect()
        assert (connected, await app_observed(layer)) == (False, {"event": "connect"})
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@asynchronous
async def test_consumers_json_consumer_echo_group_send_and_close():
    app, _ = app_setup([AppJson.as_route(path=r"^/json/$")])

    first = WebsocketCommunicator(app, "/json/")
    second = WebsocketCommunicator(app, "/json/")
    assert await first.connect(timeout=5) == (True, None)
    assert await second.connect(timeout=5) == (True, None)
    await first.send_json_to({"x": [1, 2], "y": "é"})
    assert await first.receive_json_from(timeout=5) == {"echo": {"x": [1, 2], "y": "é"}}
    await first.send_json_to({"broadcast": "hello all"})
    assert await first.receive_json_from(timeout=5) == {"news": "hello all"}
    assert await second.receive_json_from(timeout=5) == {"news": "hello all"}
    AppJson.group_send("json-fans", {"from": "outside"})
    assert await second.receive_json_from(timeout=5) == {"from": "outside"}
    assert await first.receive_json_from(timeout=5) == {"from": "outside"}
    await second.send_json_to("last")
    assert await second.receive_json_from(timeout=5) == {"goodbye": True}
    assert await app_close_code(second) == 4010
    await first.disconnect()
    await second.disconnect()


@pytest.mark.parametrize("frame, code, logged", [
    ({"bytes_data": b"\x01\x02"}, 1003, "binary frame"),
    ({"text_data": "{not json"}, 1007, "invalid JSON"),
], ids=["binary-1003", "invalid-json-1007"])
@asynchronous
async def test_consumers_json_consumer_rejects_binary_and_invalid_json(frame, code, logged, caplog):
    app, _ = app_setup([AppJson.as_route(path=r"^/json/$")])

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        communicator = WebsocketCommunicator(app, "/json/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(**frame)
        closed = await app_close_code(communicator)
        await communicator.disconnect()
        assert closed == code
    warnings = [r for r in caplog.records if r.name == "channels_mini" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert logged in warnings[0].getMessage() and str(code) in warnings[0].getMessage()


@asynchronous
async def test_consumers_demultiplexer_streams_connect_disconnect_and_multiplexer():
    await asyncio.to_thread(ensure_database)  # the demultiplexer loads message.user (http_user = True)
    app, layer = app_setup([AppDemux.as_route(path=r"^/demux/$")])

    communicator = WebsocketCommunicator(app, "/demux/")
    assert await communicator.connect(timeout=5) == (True, None)
    connected = [await app_observed(layer) for _ in range(3)]
    await communicator.send_json_to({"stream": "echo", "payload": {"a": 1}})
    echo = await communicator.receive_json_from(timeout=5)
    await communicator.send_json_to({"stream": "func", "payload": {"b": 2}})
    function = await communicator.receive_json_from(timeout=5)
    WebsocketMultiplexer.group_send("demux-fans", "func", {"hello": "fans"})
    group = await communicator.receive_json_from(timeout=5)
    await communicator.disconnect()
    disconnected = [await app_observed(layer) for _ in range(2)]
    assert connected == [
        {"event": "send refused", "error": (
            "AppDemux.send() cannot tell which stream to use. Send through a stream's "
            "multiplexer: WebsocketMultiplexer(stream, reply_channel).send(payload).")},
        {"event": "connect", "stream": "echo", "path": "/demux/"},
        {"event": "connect", "stream": "func"},
    ]
    assert echo == {"stream": "echo", "payload": {"echo": {"a": 1}, "stream": "echo"}}
    assert function == {"stream": "func",
                        "payload": {"got": {"b": 2}, "multiplexer": "WebsocketMultiplexer"}}
    assert group == {"stream": "func", "payload": {"hello": "fans"}}
    assert sorted(disconnected, key=lambda r: r["stream"]) == [
        {"event": "disconnect", "stream": "echo"}, {"event": "disconnect", "stream": "func"}]
    assert layer.stats()["members"] == 0


@asynchronous
async def test_consumers_demultiplexer_answers_bad_frames_with_error_and_stays_open(caplog):
    await asyncio.to_thread(ensure_database)  # the ORM, off the loop
    app, layer = app_setup([AppDemux.as_route(path=r"^/demux/$")])
    bad_frames = [
        {"text_data": "not json"},
        {"text_data": json.dumps({"stream": "echo"})},
        {"text_data": json.dumps({"payload": {}})},
        {"text_data": json.dumps({"stream": "echo", "payload": [1, 2]})},
        {"text_data": json.dumps({"stream": "nope", "payload": {}})},
        {"bytes_data": b"\x00"},
    ]

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        communicator = WebsocketCommunicator(app, "/demux/")
        assert await communicator.connect(timeout=5) == (True, None)
        answers = []
        for frame in bad_frames:
            await communicator.send_to(**frame)
            answers.append(await communicator.receive_json_from(timeout=5))
        await communicator.send_json_to({"stream": "echo", "payload": {"still": "open"}})
        last = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
    assert all(list(answer) == ["error"] and isinstance(answer["error"], str) for answer in answers)
    assert "'nope'" in answers[4]["error"] and "['echo', 'func']" in answers[4]["error"]
    assert last == {"stream": "echo", "payload": {"echo": {"still": "open"}, "stream": "echo"}}


@asynchronous
async def test_consumers_channel_session_per_socket_and_scope():
    await asyncio.to_thread(ensure_database)  # the channel session is a row of the session table
    app, layer = app_setup([AppSessionCounter.as_route(path=r"^/count/$")])

    first = WebsocketCommunicator(app, "/count/?who=first")
    second = WebsocketCommunicator(app, "/count/")
    assert await first.connect(timeout=5) == (True, None)
    assert await second.connect(timeout=5) == (True, None)
    replies = []
    for communicator in (first, first, second, first):
        await communicator.send_to(text_data="tick")
        replies.append(json.loads(await communicator.receive_from(timeout=5)))
    await first.disconnect()
    disconnected = await app_observed(layer)
    assert replies == [
        {"count": 1, "type": "websocket", "path": "/count/", "query": "who=first"},
        {"count": 2, "type": "websocket", "path": "/count/", "query": "who=first"},
        {"count": 1, "type": "websocket", "path": "/count/", "query": ""},
        {"count": 3, "type": "websocket", "path": "/count/", "query": "who=first"},
    ]
    assert disconnected == {"event": "disconnect", "count": 3}


@asynchronous
async def test_consumers_http_user_anonymous_without_cookie():
    await asyncio.to_thread(ensure_database)  # the ORM, off the loop
    app, layer = app_setup([AppWhoAmI.as_route(path=r"^/me/$")])

    communicator = WebsocketCommunicator(app, "/me/")
    assert await communicator.connect(timeout=5) == (True, None)
    await communicator.send_to(text_data="who")
    reply = json.loads(await communicator.receive_from(timeout=5))
    await communicator.disconnect()
    anonymous = {"class": "AnonymousUser", "authenticated": False, "username": "", "pk": None,
                 "session_key": None, "color": None}
    assert (await app_observed(layer), reply) == ({"event": "connect", **anonymous}, anonymous)


def test_consumers_http_user_from_django_session_cookie():
    ensure_database()
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore

    user = User.objects.create_user(f"app-{uuid.uuid4().hex[:10]}", password="pw-not-used")
    session = SessionStore()
    session[SESSION_KEY] = user._meta.pk.value_to_string(user)  # what auth.login() stores
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session["color"] = "teal"
    session.save()
    app, layer = app_setup([AppWhoAmI.as_route(path=r"^/me/$")])
    cookie = f"theme=dark; {settings.SESSION_COOKIE_NAME}={session.session_key}"

    async def scenario(cookie_value):
        communicator = WebsocketCommunicator(app, "/me/", headers=[("cookie", cookie_value)])
        assert await communicator.connect(timeout=5) == (True, None)
        replies = []
        for _ in range(2):  # on every message of the socket
            await communicator.send_to(text_data="who")
            replies.append(json.loads(await communicator.receive_from(timeout=5)))
        await communicator.disconnect()
        return await app_observed(layer), replies

    logged_in = {"class": "User", "authenticated": True, "username": user.username, "pk": user.pk,
                 "session_key": session.session_key, "color": "teal"}
    assert run(scenario(cookie)) == ({"event": "connect", **logged_in}, [logged_in, logged_in])
    # a cookie naming no stored session: anonymous, never an error
    connected, replies = run(scenario(f"{settings.SESSION_COOKIE_NAME}=nosuchsessionkey12345"))
    assert connected["class"] == "AnonymousUser" and replies[0]["authenticated"] is False


class ReviewDenyAfterAccept(WebsocketConsumer):
    def connect(self, message, **kwargs):
        message.reply_channel.send({"accept": True})
        raise DenyConnection()


class ReviewDenyInReceive(WebsocketConsumer):
    def receive(self, text=None, bytes=None, **kwargs):
        raise DenyConnection()


class ReviewDatabaseGroups(WebsocketConsumer):
    def connection_groups(self, **kwargs):
        from django.contrib.auth.models import User
        return [f"users-{User.objects.count()}"]  # the ORM: only allowed off the event loop

    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=threading.current_thread().name)


class ReviewAsyncGroups(WebsocketConsumer):
    async def connection_groups(self, room, **kwargs):
        return [f"async-{room}"]

    def receive(self, text=None, bytes=None, room=None, **kwargs):
        self.group_send(f"async-{room}", text=text)


@asynchronous
async def test_consumers_deny_connection_wins_over_a_queued_accept():
    app = Application([ReviewDenyAfterAccept.as_route()])

    communicator = WebsocketCommunicator(app, "/")
    assert await communicator.connect() == (False, 1000)


@asynchronous
async def test_consumers_deny_connection_outside_connect_is_an_error(caplog):
    app = Application([ReviewDenyInReceive.as_route()])

    with caplog.at_level(logging.ERROR, logger="channels_mini"):
        communicator = WebsocketCommunicator(app, "/")
        assert (await communicator.connect())[0]
        await communicator.send_to("x")
        assert await communicator.receive_output() == {"type": "websocket.close", "code": 1011}
    assert "DenyConnection raised while handling websocket.receive on /: it only rejects in " \
           "websocket.connect." in caplog.text


@asynchronous
async def test_consumers_connection_groups_may_query_the_database_or_be_async():
    await asyncio.to_thread(ensure_database)  # the ORM, off the loop
    app = Application([ReviewDatabaseGroups.as_route(path=r"^/db/$"),
                       ReviewAsyncGroups.as_route(path=r"^/a/(?P<room>\w+)/$")])

    database = WebsocketCommunicator(app, "/db/")
    assert (await database.connect())[0]
    await database.send_to("which thread?")
    thread = await database.receive_from()
    members = get_channel_layer().stats()["members"]
    await database.disconnect()
    first, second = WebsocketCommunicator(app, "/a/x/"), WebsocketCommunicator(app, "/a/x/")
    assert (await first.connect())[0] and (await second.connect())[0]
    await first.send_to("hello")
    heard = await second.receive_from()
    await first.disconnect()
    await second.disconnect()
    members_after = get_channel_layer().stats()["members"]
    assert thread != threading.main_thread().name and members == 1
    assert heard == "hello" and members_after == 0


@asynchronous
async def test_consumers_a_malformed_group_reply_closes_members_and_the_server_goes_on(caplog):
    app = Application([route_class(RouteEchoGroup)], allowed_origins=["*"])

    with caplog.at_level(logging.ERROR, logger="channels_mini"):
        member = WebsocketCommunicator(app, "/")
        assert (await member.connect())[0]
        await Group("review-echo").asend({"close": "soon"})
        closed = await member.receive_output()
        fresh = WebsocketCommunicator(app, "/")
        assert (await fresh.connect())[0]
        await Group("review-echo").asend({"text": "still here"})
        heard = await fresh.receive_from()
    assert closed == {"type": "websocket.close", "code": 1011}
    assert heard == "still here"
    assert "'close' must be True or a close code int (got 'soon')." in caplog.text


class RouteEchoGroup(WebsocketConsumer):
    groups = ["review-echo"]


@asynchronous
async def test_app_unrouted_connect_accepted_when_a_receive_route_matches_the_path_only():
    app = Application([route("websocket.receive", route_consumer, path=r"^/echo", text=r"^ping")])

    communicator = WebsocketCommunicator(app, "/echo")
    assert await communicator.connect() == (True, None)


class ReviewDirect(BaseConsumer):
    method_mapping = {"direct.call": "on_call"}
    calls: list = []

    def on_call(self, message, **kwargs):
        ReviewDirect.calls.append((message["n"], kwargs))


def test_consumers_calling_a_class_directly_dispatches_as_in_channels_1():
    ReviewDirect.calls = []
    ReviewDirect(Message({"n": 1}, "direct.call", None), room="r")
    assert ReviewDirect.calls == [(1, {"room": "r"})]

    async def on_the_loop():
        ReviewDirect(Message({"n": 2}, "direct.call", None))

    with pytest.raises(RuntimeError, match=re.escape(
            "ReviewDirect(message) dispatches synchronously, so it cannot be called on a running "
            "event loop")):
        run(on_the_loop())
    assert ReviewDirect.calls == [(1, {"room": "r"})]


# === 5. Binding ===
# One WebsocketBinding on Item, heard by group "bind-items-all" and by one group per team,
# and a demultiplexer that carries it on stream "items" (and a binding that keeps the
# default has_permission on stream "deny"). Outbound tests listen on the default layer
# with plain channel names; inbound tests drive the demultiplexer with the communicator.

class bind_ItemBinding(WebsocketBinding):
    model = Item
    stream = "items"
    fields = ["__all__"]

    @classmethod
    def group_names(cls, instance):
        return ["bind-items-all", f"bind-items-{instance.team}"]

    def has_permission(self, user, action, pk):
        # Logged-in users may create, and change or delete rows nobody else owns.
        if user is None or not user.is_authenticated:
            return False
        return action == "create" or not Item.objects.filter(pk=pk).exclude(owner=user).exists()

    def clean_data(self, action, pk, data):
        # ... and may give a row to nobody or to themselves only.
        from django.core.exceptions import ValidationError
        if data.get("owner") not in (None, self.user.pk):
            raise ValidationError({"owner": "You can only assign items to yourself."})
        return data


class bind_DenyingItemBinding(WebsocketBinding):
    model = Item
    stream = "deny"
    fields = ["name"]  # has_permission left as it is: denies every write


class bind_Demultiplexer(WebsocketDemultiplexer):
    consumers = {"items": bind_ItemBinding.consumer, "deny": bind_DenyingItemBinding.consumer}
    groups = ["bind-items-all"]  # so every socket also hears the outbound frames


class bind_TeamWatcher(WebsocketDemultiplexer):
    consumers = {"items": bind_ItemBinding.consumer}

    def connection_groups(self, team, **kwargs):
        return [f"bind-items-{team}"]  # hears the rows of one team only


bind_server_app = Application([bind_Demultiplexer.as_route(path=r"^/bind/ws/$"),
                               bind_TeamWatcher.as_route(path=r"^/bind/team/(?P<team>[a-z]+)/$")])


bind_ALL_FIELDS = {"name", "price", "when", "uid", "owner", "team"}


def bind_listen(*groups: str, channel: str = "bind.listener") -> str:
    """Put *channel* in *groups* on the default layer; returns the channel name."""
    layer = get_channel_layer()

    async def join():
        for group in groups:
            await layer.group_add(group, channel)
    run(join())
    return channel


def bind_frame(channel: str, timeout: float = 5) -> dict:
    """The next message on *channel*: it must be a text frame; returns its decoded JSON."""
    message = run(get_channel_layer().receive(channel), timeout)
    assert set(message) == {"text"} and isinstance(message["text"], str), message
    return json.loads(message["text"])


def bind_nothing_on(channel: str, timeout: float = 0.3) -> bool:
    """True when no message reaches *channel* within *timeout* seconds."""
    try:
        message = run(get_channel_layer().receive(channel), timeout)
    except TimeoutError:
        return True
    print("unexpected message:", message)
    return False


def bind_user(name: str = "user"):
    from django.contrib.auth.models import User
    return User.objects.create(username=f"bind-{name}-{uuid.uuid4().hex[:8]}")


def bind_cookie_headers(user) -> list:
    """Headers carrying a valid Django session cookie for *user*."""
    from django.test import Client
    client = Client()
    client.force_login(user)
    session_id = client.cookies[settings.SESSION_COOKIE_NAME].value
    return [(b"cookie", f"{settings.SESSION_COOKIE_NAME}={session_id}".encode())]


def bind_label() -> str:
    return f"{__name__}.item".lower()


# -- outbound --

def test_binding_create_update_delete_reach_the_groups_of_the_instance():
    ensure_database()
    red = bind_listen("bind-items-red", channel="bind.red")
    blue = bind_listen("bind-items-blue", channel="bind.blue")

    item = Item.objects.create(name="apple", team="red")
    created = bind_frame(red)
    item.name = "apple pie"
    item.save()
    updated = bind_frame(red)
    pk = item.pk
    item.delete()
    deleted = bind_frame(red)

    assert (created["stream"], created["payload"]["action"], created["payload"]["pk"]) == \
        ("items", "create", pk)
    assert (updated["payload"]["action"], updated["payload"]["data"]["name"]) == \
        ("update", "apple pie")
    assert (deleted["payload"]["action"], deleted["payload"]["pk"]) == ("delete", pk)
    assert set(created) == {"stream", "payload"}
    assert set(created["payload"]) == {"action", "pk", "data", "model"}
    assert created["payload"]["model"] == bind_label()
    assert bind_nothing_on(red) and bind_nothing_on(blue)


def test_binding_payload_writes_values_as_djangos_json_serializer():
    import datetime
    from decimal import Decimal

    from django.core import serializers
    ensure_database()
    owner = bind_user("owner")
    listener = bind_listen("bind-items-green")

    item = Item.objects.create(
        name="typed", price=Decimal("12.50"), team="green",
        when=datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc),
        uid=uuid.UUID("12345678-1234-5678-1234-567812345678"), owner=owner)
    frame = bind_frame(listener)

    assert frame == {"stream": "items", "payload": {
        "action": "create", "pk": item.pk, "model": bind_label(),
        "data": {"name": "typed", "price": "12.50", "when": "2024-05-06T07:08:09.123Z",
                 "uid": "12345678-1234-5678-1234-567812345678", "owner": owner.pk,
                 "team": "green"}}}
    # ... which is what Django's own JSON serializer writes for the row.
    django_json = json.loads(serializers.serialize("json", [item]))[0]
    assert frame["payload"]["data"] == django_json["fields"]


def test_binding_custom_serialize_may_return_datetimes_decimals_and_uuids():
    """A ``WebsocketBinding`` writes its frames with Django's JSON encoder, as Channels 1.x's
    did, so a ``serialize()`` of your own may return the row's values as they are."""
    import datetime
    from decimal import Decimal
    ensure_database()

    class bind_StampedBinding(WebsocketBinding):
        model = Item
        stream = "stamped"
        fields = ["name"]

        @classmethod
        def group_names(cls, instance):
            return ["bind-stamped"] if instance.team == "stamped" else []

        def serialize(self, instance, action):
            return {"action": action, "price": instance.price, "uid": instance.uid,
                    "at": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)}

    listener = bind_listen("bind-stamped")
    Item.objects.create(name="stamped", team="stamped", price=Decimal("2.50"), uid=uuid.UUID(int=7))
    assert bind_frame(listener) == {"stream": "stamped", "payload": {
        "action": "create", "price": "2.50", "uid": "00000000-0000-0000-0000-000000000007",
        "at": "2024-05-06T07:08:09Z"}}
    assert bind_nothing_on(listener)


def test_binding_changed_groups_get_delete_update_create_from_the_stored_row():
    ensure_database()
    item = Item.objects.create(name="mover", team="red")
    stale = Item.objects.get(pk=item.pk)  # still says team "red" after the next save
    item.team = "blue"
    item.save()  # stored row: blue

    left = bind_listen("bind-items-blue", channel="bind.left")
    kept = bind_listen("bind-items-all", channel="bind.kept")
    joined = bind_listen("bind-items-green", channel="bind.joined")
    never = bind_listen("bind-items-red", channel="bind.never")
    every = bind_listen("bind-items-blue", "bind-items-all", "bind-items-green", "bind-items-red",
                        channel="bind.every")
    stale.team = "green"
    stale.save()  # groups before are those of the stored row (blue), not of `stale` (red)

    assert bind_frame(left)["payload"]["action"] == "delete"
    assert bind_frame(kept)["payload"]["action"] == "update"
    created = bind_frame(joined)["payload"]
    assert (created["action"], created["pk"], created["data"]["team"]) == \
        ("create", item.pk, "green")
    assert [bind_frame(every)["payload"]["action"] for _ in range(3)] == \
        ["delete", "update", "create"]
    assert bind_nothing_on(never) and bind_nothing_on(every)
    assert bind_nothing_on(left) and bind_nothing_on(kept) and bind_nothing_on(joined)


def test_binding_sends_nothing_for_a_rolled_back_transaction():
    from django.db import transaction
    ensure_database()
    listener = bind_listen("bind-items-rollback")

    with pytest.raises(RuntimeError, match="roll it back"):
        with transaction.atomic():
            item = Item.objects.create(name="ghost", team="rollback")
            item.name = "ghost 2"
            item.save()
            raise RuntimeError("roll it back")

    assert not Item.objects.filter(team="rollback").exists()
    assert bind_nothing_on(listener, timeout=0.5)


def test_binding_sends_once_when_the_transaction_commits():
    from django.db import transaction
    ensure_database()
    listener = bind_listen("bind-items-commit")

    with transaction.atomic():
        item = Item.objects.create(name="committed", team="commit")
        assert bind_nothing_on(listener)  # not before the commit

    frame = bind_frame(listener)
    assert (frame["payload"]["action"], frame["payload"]["pk"]) == ("create", item.pk)
    assert bind_nothing_on(listener)


def test_binding_accepts_a_string_model_label():
    ensure_database()

    class bind_LabelBinding(WebsocketBinding):
        model = f"{__name__}.Item"  # "app_label.ModelName"
        stream = "labelled"
        fields = ["name"]

        @classmethod
        def group_names(cls, instance):
            return ["bind-label"] if instance.team == "label" else []

    listener = bind_listen("bind-label")
    item = Item.objects.create(name="by label", team="label")

    assert bind_frame(listener) == {"stream": "labelled", "payload": {
        "action": "create", "pk": item.pk, "data": {"name": "by label"}, "model": bind_label()}}
    assert bind_LabelBinding.model_class() is Item


def test_binding_defined_before_django_setup_works():
    script = r'''
import asyncio, json
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    DEFAULT_AUTO_FIELD="django.db.models.AutoField", USE_TZ=True)
from channels_mini import WebsocketBinding, get_channel_layer

class UserBinding(WebsocketBinding):  # the apps are not ready yet
    model = "auth.User"
    stream = "users"
    fields = ["username"]

    @classmethod
    def group_names(cls, instance):
        return ["users"]

import django
django.setup()
from django.core.management import call_command
call_command("migrate", run_syncdb=True, verbosity=0)
from django.contrib.auth.models import User

layer = get_channel_layer()
asyncio.run(layer.group_add("users", "probe"))
user = User.objects.create(username="early")
message = asyncio.run(asyncio.wait_for(layer.receive("probe"), 10))
print(json.dumps({"pk": user.pk, "message": message}))
'''
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": ROOT, "DJANGO_SETTINGS_MODULE": ""})
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(printed["message"]["text"]) == {"stream": "users", "payload": {
        "action": "create", "pk": printed["pk"], "data": {"username": "early"},
        "model": "auth.user"}}


def test_binding_fields_exclude_and_all_choose_the_data_sent():
    ensure_database()

    class bind_FieldsBinding(WebsocketBinding):
        model = Item
        stream = "fields"
        fields = ["name", "price"]

        @classmethod
        def group_names(cls, instance):
            return ["bind-fields"]

    class bind_ExcludeBinding(WebsocketBinding):
        model = Item
        stream = "exclude"
        exclude = ["uid", "when"]

        @classmethod
        def group_names(cls, instance):
            return ["bind-exclude"]

    class bind_AllBinding(WebsocketBinding):
        model = Item
        stream = "all"
        fields = ["__all__"]

        @classmethod
        def group_names(cls, instance):
            return ["bind-all"]

    only = bind_listen("bind-fields", channel="bind.fields")
    excluded = bind_listen("bind-exclude", channel="bind.exclude")
    everything = bind_listen("bind-all", channel="bind.all")
    Item.objects.create(name="shape", team="fields")

    assert set(bind_frame(only)["payload"]["data"]) == {"name", "price"}
    assert set(bind_frame(excluded)["payload"]["data"]) == {"name", "price", "owner", "team"}
    assert set(bind_frame(everything)["payload"]["data"]) == bind_ALL_FIELDS


def test_binding_needs_exactly_one_of_fields_or_exclude():
    with pytest.raises(ImproperlyConfigured, match=re.escape(
            "bind_NeitherBinding must set exactly one of 'fields' or 'exclude' (got "
            "fields=None, exclude=None). Use fields = ['__all__'] to bind every field.")):
        class bind_NeitherBinding(WebsocketBinding):
            model = Item
            stream = "neither"

    with pytest.raises(ImproperlyConfigured, match=re.escape(
            "bind_BothBinding must set exactly one of 'fields' or 'exclude' (got "
            "fields=['name'], exclude=['team']). Use fields = ['__all__'] to bind every field.")):
        class bind_BothBinding(WebsocketBinding):
            model = Item
            stream = "both"
            fields = ["name"]
            exclude = ["team"]


def test_binding_abstract_binding_registers_nothing_and_its_subclass_sends_once():
    ensure_database()

    class bind_TeamGroupsBinding(WebsocketBinding):  # abstract: no model, no fields needed
        model = None
        stream = "abstract"

        @classmethod
        def group_names(cls, instance):
            return ["bind-abstract"] if instance.team == "abstract" else []

    listener = bind_listen("bind-abstract")
    Item.objects.create(name="unheard", team="abstract")
    assert bind_nothing_on(listener)

    class bind_ConcreteBinding(bind_TeamGroupsBinding):
        model = Item
        fields = ["name"]

    item = Item.objects.create(name="heard", team="abstract")
    frame = bind_frame(listener)
    assert (frame["stream"], frame["payload"]["pk"], frame["payload"]["data"]) == \
        ("abstract", item.pk, {"name": "heard"})
    assert bind_nothing_on(listener)


def test_binding_serialize_returning_empty_dict_sends_nothing():
    ensure_database()

    class bind_QuietBinding(WebsocketBinding):
        model = Item
        stream = "quiet"
        fields = ["name"]

        @classmethod
        def group_names(cls, instance):
            return ["bind-quiet"]

        def serialize(self, instance, action):
            if instance.name.startswith("quiet"):
                return {}
            return super().serialize(instance, action)

    listener = bind_listen("bind-quiet")
    quiet = Item.objects.create(name="quiet one", team="quiet")
    quiet.delete()
    assert bind_nothing_on(listener)

    loud = Item.objects.create(name="loud one", team="quiet")
    assert bind_frame(listener)["payload"] == {
        "action": "create", "pk": loud.pk, "data": {"name": "loud one"}, "model": bind_label()}


def test_binding_serialize_data_gives_the_bound_fields():
    from decimal import Decimal
    ensure_database()
    item = Item.objects.create(name="data", price=Decimal("3.25"), team="red",
                               uid=uuid.UUID("00000000-0000-0000-0000-000000000042"))

    assert bind_ItemBinding().serialize_data(item) == {
        "name": "data", "price": "3.25", "when": None,
        "uid": "00000000-0000-0000-0000-000000000042", "owner": None, "team": "red"}
    assert bind_DenyingItemBinding().serialize_data(item) == {"name": "data"}
    assert bind_ItemBinding().serialize(item, "update") == {
        "action": "update", "pk": item.pk, "model": bind_label(),
        "data": bind_ItemBinding().serialize_data(item)}



def test_binding_documented_limit_queryset_update_and_bulk_create_send_nothing():
    from django.db import connection
    ensure_database()
    listener = bind_listen("bind-items-limits")

    Item.objects.bulk_create([Item(name="bulk", team="limits")])
    Item.objects.filter(team="limits").update(name="bulk updated")
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {Item._meta.db_table} SET name = %s WHERE team = %s",
                       ["raw", "limits"])
    assert bind_nothing_on(listener)

    item = Item.objects.get(team="limits")  # a save() after the fact is bound again
    item.save()
    assert bind_frame(listener)["payload"]["data"]["name"] == "raw"


# -- end to end --

def test_binding_model_saved_in_a_django_view_reaches_a_websocket_client_under_uvicorn():
    ensure_database()
    name = f"view-{uuid.uuid4().hex[:8]}"

    async def scenario(server):
        async with ws_connect(server.url("/bind/ws/")) as websocket:
            status, body = await asyncio.to_thread(
                http_get, server.url(f"/items/create/?name={name}&team=e2e", scheme="http"))
            assert status == 200, body
            frame = json.loads(await asyncio.wait_for(websocket.recv(), 10))
            return json.loads(body)["pk"], frame

    with running_server("uvicorn", app=f"{__name__}:bind_server_app") as server:
        pk, frame = run(scenario(server), timeout=30)

    assert frame["stream"] == "items"
    assert frame["payload"]["action"] == "create"
    assert frame["payload"]["pk"] == pk
    assert (frame["payload"]["data"]["name"], frame["payload"]["data"]["team"]) == (name, "e2e")
    assert Item.objects.get(pk=pk).name == name


class ReviewVisibleManager(models.Manager):
    def get_queryset(self):
        return super().get_queryset().filter(hidden=False)


class ReviewSoft(models.Model):
    team = models.CharField(max_length=20)
    hidden = models.BooleanField(default=False)
    objects = ReviewVisibleManager()

    class Meta:
        app_label = __name__


class ReviewSoftBinding(WebsocketBinding):
    model = ReviewSoft
    stream = "soft"
    fields = ["team"]

    @classmethod
    def group_names(cls, instance):
        return [f"soft-{instance.team}"]

    def serialize_data(self, instance):
        return {"team": instance.team.upper()}


def test_binding_groups_before_come_from_the_stored_row_even_behind_a_filtering_manager():
    ensure_database()
    layer = get_channel_layer()

    async def listen():
        await layer.group_add("soft-red", "review.soft")
        await layer.group_add("soft-blue", "review.soft")

    run(listen())
    row = ReviewSoft.objects.create(team="red", hidden=True)
    assert json.loads(run(layer.receive("review.soft"))["text"])["payload"]["action"] == "create"
    row.team = "blue"
    row.save()  # the default manager hides this row; the stored groups must still be found
    frames = [json.loads(run(layer.receive("review.soft"))["text"]) for _ in range(2)]
    assert [f["payload"]["action"] for f in frames] == ["delete", "create"]
    assert frames[1]["payload"]["data"] == {"team": "BLUE"}  # serialize_data is the override


# -- hardening (issue 12): only the truth is answered, and only what a group may see --

@pytest.fixture(scope="module")
def bind_server():
    """One uvicorn server on `bind_server_app` for the end-to-end binding tests."""
    with running_server("uvicorn", app=f"{__name__}:bind_server_app") as server:
        yield server


def bind_cookie(user) -> dict:
    """The session cookie of *user*, as `ws_connect` headers."""
    return {"Cookie": bind_cookie_headers(user)[0][1].decode()}


async def bind_recv(websocket, timeout: float = 10) -> dict:
    return json.loads(await recv(websocket, timeout))


async def bind_silent(websocket, timeout: float = 0.3) -> bool:
    """True when nothing arrives on *websocket* within *timeout* seconds."""
    try:
        print("unexpected frame:", await asyncio.wait_for(websocket.recv(), timeout))
    except TimeoutError:
        return True
    return False


def test_binding_group_left_gets_the_stored_row_never_the_new_contents(bind_server):
    """Moving a row from team red to blue: red's watchers get a delete holding the row as it
    was stored, blue's get the new contents (real uvicorn, real websocket clients)."""
    user = bind_user()
    item = Item.objects.create(name="red-public", team="red", owner=user)
    stored = bind_ItemBinding().serialize_data(Item.objects.get(pk=item.pk))
    cookie = bind_cookie(user)

    async def scenario():
        async with ws_connect(bind_server.url("/bind/team/red/")) as red, \
                ws_connect(bind_server.url("/bind/team/blue/")) as blue, \
                ws_connect(bind_server.url("/bind/ws/"), additional_headers=cookie) as writer:
            await writer.send(json.dumps(bind_items_frame(
                "update", item.pk, {"name": "BLUE-CONFIDENTIAL", "team": "blue"})))
            heard = await bind_recv(red), await bind_recv(blue), await bind_recv(writer)
            return (*heard, await bind_silent(red), await bind_silent(blue))

    left, joined, kept, red_quiet, blue_quiet = run(scenario())
    assert left == {"stream": "items", "payload": {
        "action": "delete", "pk": item.pk, "data": stored, "model": bind_label()}}
    assert stored["name"] == "red-public" and stored["team"] == "red"
    assert (joined["payload"]["action"], joined["payload"]["data"]["name"]) == \
        ("create", "BLUE-CONFIDENTIAL")
    assert (kept["payload"]["action"], kept["payload"]["data"]["team"]) == ("update", "blue")
    assert red_quiet and blue_quiet


def test_binding_inbound_write_with_an_invalid_group_name_saves_nothing_and_says_why(bind_server):
    """Group names are checked before the commit: a write whose row would get an invalid
    group name is refused with the reason, nothing is saved and no group hears of it."""
    user = bind_user()
    item = Item.objects.create(name="keep", team="red", owner=user)
    rows_before = list(Item.objects.order_by("pk").values())
    cookie = bind_cookie(user)
    invalid = ("Invalid data: Group name {!r} is invalid: use fewer than 100 ASCII letters, "
               "digits, '-', '_' or '.'. If the name comes from a URL, clean it first, e.g. "
               "re.sub(r'[^A-Za-z0-9_.-]', '_', name).")

    async def scenario():
        async with ws_connect(bind_server.url("/bind/team/red/")) as red, \
                ws_connect(bind_server.url("/bind/ws/"), additional_headers=cookie) as writer:
            await writer.send(json.dumps(bind_items_frame("update", item.pk, {"team": "red team"})))
            await writer.send(json.dumps(bind_items_frame("create", data={"name": "x", "team": "équipe"})))
            await writer.send(json.dumps(bind_items_frame("update", item.pk, {"team": "a/b"})))
            answers = [await bind_recv(writer) for _ in range(3)]
            return answers, await bind_silent(writer), await bind_silent(red)

    answers, writer_quiet, red_quiet = run(scenario())
    assert answers == [bind_error("update", item.pk, invalid.format("bind-items-red team")),
                       bind_error("create", None, invalid.format("bind-items-équipe")),
                       bind_error("update", item.pk, invalid.format("bind-items-a/b"))]
    assert writer_quiet and red_quiet
    assert list(Item.objects.order_by("pk").values()) == rows_before


def test_binding_view_save_with_an_invalid_group_name_is_answered_200_and_logged_once(bind_server):
    """A view's save in autocommit is stored before any signal runs: a group name that turns
    out invalid is logged and counted, the view answers 200, the valid groups hear the row."""
    name = f"view-{uuid.uuid4().hex[:8]}"
    start = len(bind_server.log())

    async def scenario():
        async with ws_connect(bind_server.url("/bind/ws/")) as websocket:
            status, body = await asyncio.to_thread(http_get, bind_server.url(
                f"/items/create/?name={name}&team=red%20team", scheme="http"))
            return status, body, await bind_recv(websocket)

    status, body, frame = run(scenario())
    assert status == 200, body
    pk = json.loads(body)["pk"]
    assert list(Item.objects.filter(name=name).values_list("pk", "team")) == [(pk, "red team")]
    assert (frame["payload"]["action"], frame["payload"]["pk"]) == ("create", pk)
    log = bind_server.log()[start:]
    assert log.count("could not send a change") == 1, log
    assert ("bind_ItemBinding could not send a change to group 'bind-items-red team' after its "
            "transaction committed; the save stands. ValueError: Group name 'bind-items-red "
            "team' is invalid") in log
    assert "Traceback" not in log


class bind_BrokenLayer:
    """A channel layer whose every group send fails, as a Redis layer does while Redis is down."""

    extensions = ["groups", "flush"]

    def __init__(self, **config):
        pass

    async def group_send(self, group, message):
        raise ConnectionError("the layer is down (test)")


def test_binding_send_failures_after_commit_are_counted_logged_rate_limited_and_never_raised(caplog):
    """What fails after the commit -- an invalid group name in autocommit, a layer error --
    never raises from save(): each failure counts in Binding.send_failures, and each kind is
    logged once (then at most every 10 s)."""
    from django.test import override_settings
    ensure_database()
    failures = Binding.send_failures
    caplog.set_level(logging.WARNING, logger="channels_mini")

    ReviewSoft.objects.create(team="a b")  # autocommit: stored before the name is checked
    ReviewSoft.objects.create(team="c d")
    with override_settings(CHANNEL_LAYERS={"default": {"BACKEND": f"{__name__}.bind_BrokenLayer"}}):
        reset_channel_layers()
        ReviewSoft.objects.create(team="red")
        ReviewSoft.objects.create(team="blue")
    reset_channel_layers()

    assert {"a b", "c d", "red", "blue"} <= set(ReviewSoft.objects.values_list("team", flat=True))
    assert Binding.send_failures == WebsocketBinding.send_failures == failures + 4
    reports = [record.getMessage() for record in caplog.records if "could not send" in record.getMessage()]
    assert len(reports) == 2, reports
    assert reports[0].startswith(
        "ReviewSoftBinding could not send a change to group 'soft-a b' after its transaction "
        "committed; the save stands. ValueError: Group name 'soft-a b' is invalid")
    assert reports[1] == (
        "ReviewSoftBinding could not send a change to group 'soft-red' after its transaction "
        "committed; the save stands. ConnectionError: the layer is down (test) (1 such "
        f"failure(s) since the last report; {failures + 3} in all, see Binding.send_failures.)")
    assert all(record.levelname == "ERROR" and not record.exc_info
               for record in caplog.records if "could not send" in record.getMessage())


def test_binding_refused_requests_are_short_warnings_at_most_once_a_second(bind_server):
    """A flood of 0.9 MB bad requests: every one is answered, each answer is short, and the
    log gets one short WARNING line (no traceback) a second, counting the rest."""
    huge = "x" * 900_000
    start = len(bind_server.log())

    async def scenario():
        async with ws_connect(bind_server.url("/bind/ws/"), max_size=2**21) as websocket:
            began = time.monotonic()
            for _ in range(20):
                await websocket.send(json.dumps(bind_items_frame(huge, data={"name": "x"})))
            answers = [await bind_recv(websocket, 30) for _ in range(20)]
            elapsed = time.monotonic() - began
            await asyncio.sleep(1.1)
            await websocket.send(json.dumps(bind_items_frame("create", data={"name": "x"})))
            answers.append(await bind_recv(websocket))
            return answers, elapsed

    answers, elapsed = run(scenario(), timeout=60)
    shown = f"{huge!r}"[:200]
    assert answers[0] == bind_error(
        f"{shown}... (900002 characters)", None,
        f"Unknown action {shown}... (900002 characters); use one of ['create', 'update', 'delete'].")
    assert all(len(json.dumps(answer)) < 1000 for answer in answers)
    assert answers[-1]["payload"]["error"] == "Permission denied: create on pk None."
    time.sleep(0.2)
    lines = [line for line in bind_server.log()[start:].splitlines() if "refused" in line]
    assert 1 <= len(lines) <= int(elapsed) + 2, lines  # 21 refusals, one line a second
    assert all(len(line) < 1000 for line in lines), [len(line) for line in lines]
    assert re.fullmatch(r"bind_ItemBinding refused \d+ request\(s\) since the last report, "
                        r"e\.g\.: Permission denied: create on pk None\.", lines[-1]), lines
    assert "Traceback" not in bind_server.log()[start:]


def test_binding_inbound_clean_data_refuses_assigning_a_row_to_another_user():
    """has_permission sees the user, action and pk; clean_data sees what is written."""
    ensure_database()
    user, other = bind_user("writer"), bind_user("other")
    mine = Item.objects.create(name="mine", team="refused", owner=user)
    refusal = "Invalid data: {'owner': ['You can only assign items to yourself.']}."
    bind_check_refused(bind_cookie_headers(user),
                       bind_items_frame("create", data={"name": "x", "owner": other.pk}),
                       bind_error("create", None, refusal))
    bind_check_refused(bind_cookie_headers(user),
                       bind_items_frame("update", mine.pk, {"owner": other.pk}),
                       bind_error("update", mine.pk, refusal))
    assert Item.objects.get(pk=mine.pk).owner_id == user.pk


def test_binding_inbound_request_id_is_answered_with_the_saved_pk_or_the_error():
    """A client that sends a request_id always hears back: the saved row's pk, or why not."""
    ensure_database()
    headers = bind_cookie_headers(bind_user())
    created, saved, refused = run(bind_exchange(headers, [
        {"stream": "items", "payload": {"action": "create", "data": {"name": "acked"},
                                        "request_id": "r-1"}},
        {"stream": "items", "payload": {"action": "rename", "pk": 1, "request_id": "r-2"}}], 3))

    pk = Item.objects.get(name="acked").pk
    assert (created["payload"]["action"], created["payload"]["pk"]) == ("create", pk)
    assert saved == {"stream": "items", "payload": {"action": "create", "pk": pk, "request_id": "r-1"}}
    assert refused == {"stream": "items", "payload": {
        "error": "Unknown action 'rename'; use one of ['create', 'update', 'delete'].",
        "action": "rename", "pk": 1, "request_id": "r-2"}}


# === 6. Connection ===
# One socket as the connection sees it: the 1.x message keys, replies on the reply channel,
# unrouted sockets. The consumers and the `server_app` here serve the later sections too.
# `server_routing` / `server_app` are what the header's settings (CHANNEL_ROUTING) and
# `running_server()` name: the real servers below import this module and serve them.

class AppEcho(WebsocketConsumer):
    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=text, bytes=bytes)


class AppChat(WebsocketConsumer):
    def connection_groups(self, room, **kwargs):
        return [f"chat-{room}"]

    def receive(self, text=None, bytes=None, room=None, **kwargs):
        self.group_send(f"chat-{room}", text=text)


class AppCloseWithCode(WebsocketConsumer):
    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text="bye")
        self.close(4242)


class AppMailer(WebsocketConsumer):
    """Each frame is an address: it goes to the background channel with this socket to reply to."""

    def receive(self, text=None, bytes=None, **kwargs):
        Channel("email.receive").send({"to_address": text, "subject": "from a socket",
                                       "reply_channel": self.message.reply_channel.name})


class AppMailroom(WebsocketConsumer):
    groups = ["mailroom"]


def app_email_consumer(message, user, **kwargs):
    """A background consumer: `user` comes from the route's to_address filter."""
    reply = {"text": f"mail for {user}: {message['subject']} ({json.dumps(app_where())})"}
    if message.reply_channel is not None:
        message.reply_channel.send(reply)
    else:
        Group("mailroom").send(reply)


server_routing = [
    AppEcho.as_route(path=r"^/echo/$"),
    AppChat.as_route(path=r"^/chat/(?P<room>\w+)/$"),
    AppCloseWithCode.as_route(path=r"^/close/$"),
    AppMailer.as_route(path=r"^/mail/$"),
    AppMailroom.as_route(path=r"^/mailroom/$"),
    route("email.receive", app_email_consumer, to_address=r"^(?P<user>[^@]+)@example\.com$"),
]

server_app = Application(server_routing)

APP_IN_THREAD = json.dumps({"main_thread": False, "on_loop": False})


def app_record_message(message, **kwargs):
    app_report(channel=message.channel_name, content=dict(message.content), kwargs=kwargs)
    if message.channel_name == "websocket.connect":
        message.reply_channel.send({"accept": True})


def app_frame_echo(message, **kwargs):
    message.reply_channel.send({"text": f"echo {message['text']}"})


APP_CONNECT_REPLIES = {
    "accept": {"accept": True},
    "refuse": {"accept": False},
    "close": {"close": True},
    "text": {"text": "hello"},
    "bytes": {"bytes": b"\x01\x02"},
    "textclose": {"text": "bye", "close": 4000},
    "subprotocol": {"accept": True, "subprotocol": "chat.v2"},
}


def app_connect_reply(message, reply, **kwargs):
    message.reply_channel.send(APP_CONNECT_REPLIES[reply])


def app_report_connect(message, **kwargs):
    app_report(event="connect", origin=dict(message["headers"]).get(b"origin"))
    message.reply_channel.send({"accept": True})


@asynchronous
async def test_app_websocket_message_keys_and_order():
    app, layer = app_setup([route(["websocket.connect", "websocket.receive", "websocket.disconnect"],
                                  app_record_message, path=r"^/keys/(?P<tag>\w+)/$")])

    communicator = WebsocketCommunicator(app, "/keys/t1/?a=1&b=2", headers=[("X-Test", "yes")],
                                         subprotocols=["p1", "p2"])
    assert await communicator.connect(timeout=5) == (True, None)
    await communicator.send_to(text_data="one")
    await communicator.send_to(bytes_data=b"two")
    reports = [await app_observed(layer) for _ in range(3)]
    await communicator.disconnect(code=4005)
    reports.append(await app_observed(layer))
    connect, first, second, disconnect = reports
    scope = communicator.scope
    assert [r["channel"] for r in (connect, first, second, disconnect)] == [
        "websocket.connect", "websocket.receive", "websocket.receive", "websocket.disconnect"]
    assert all(r["kwargs"] == {"tag": "t1"} for r in (connect, first, second, disconnect))
    connect, first, second, disconnect = (r["content"] for r in (connect, first, second, disconnect))
    assert set(connect) == {"reply_channel", "path", "query_string", "headers", "client", "server",
                            "subprotocols", "order"}
    reply_channel = connect["reply_channel"]
    assert isinstance(reply_channel, str) and reply_channel
    assert (connect["path"], connect["query_string"], connect["order"]) == ("/keys/t1/", b"a=1&b=2", 0)
    assert (b"x-test", b"yes") in [tuple(h) for h in connect["headers"]]
    assert connect["subprotocols"] == ["p1", "p2"]
    assert (connect["client"], connect["server"]) == (scope["client"], scope["server"])
    assert first == {"reply_channel": reply_channel, "path": "/keys/t1/", "order": 1, "text": "one"}
    assert second == {"reply_channel": reply_channel, "path": "/keys/t1/", "order": 2, "bytes": b"two"}
    assert disconnect == {"reply_channel": reply_channel, "path": "/keys/t1/", "order": 3, "code": 4005}


@pytest.mark.parametrize("reply, connected, frames, close_code", [
    ("accept", (True, None), [], None),
    ("refuse", False, [], None),
    ("close", False, [], None),
    ("text", (True, None), ["hello"], None),
    ("bytes", (True, None), [b"\x01\x02"], None),
    ("textclose", (True, None), ["bye"], 4000),
    ("subprotocol", (True, "chat.v2"), [], None),
])
@asynchronous
async def test_app_reply_channel_messages(reply, connected, frames, close_code):
    app, _ = app_setup([route("websocket.connect", app_connect_reply, path=r"^/reply/(?P<reply>\w+)/$")])

    communicator = WebsocketCommunicator(app, f"/reply/{reply}/",
                                         subprotocols=["chat.v1", "chat.v2"])
    result = await communicator.connect(timeout=5)
    received, code = [], None
    if result[0]:
        for _ in frames:
            received.append(await communicator.receive_from(timeout=5))
        if close_code is not None:
            code = await app_close_code(communicator)
        else:
            assert await communicator.receive_nothing(timeout=0.1)
    await communicator.disconnect()
    if connected is False:
        assert result[0] is False  # rejected before accepting: HTTP 403 on a real server
    else:
        assert result == connected
    assert (received, code) == (frames, close_code)


@asynchronous
async def test_app_unrouted_connect_accepted_only_if_a_receive_route_matches(caplog):
    app, _ = app_setup([route("websocket.receive", app_frame_echo, path=r"^/frames/$")])

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        routed = WebsocketCommunicator(app, "/frames/")
        assert await routed.connect(timeout=5) == (True, None)
        await routed.send_to(text_data="x")
        assert await routed.receive_from(timeout=5) == "echo x"
        await routed.disconnect()
        unrouted = WebsocketCommunicator(app, "/elsewhere/")
        connected, _ = await unrouted.connect(timeout=5)
        await unrouted.disconnect()
        assert connected is False
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "channels_mini" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "/elsewhere/" in warnings[0] and "no route" in warnings[0]


@pytest.mark.parametrize("allowed_origins, origin, accepted", [
    (None, None, True),                          # no Origin header: allowed
    (None, "", False),                           # an empty one is not
    (None, "http://127.0.0.1:8000", True),       # ALLOWED_HOSTS has 127.0.0.1 (any port)
    (None, "https://testserver", True),
    (None, "http://evil.example", False),
    (None, "http://127.0.0.1.evil.example", False),
    ([".example.com"], "https://chat.example.com", True),
    ([".example.com"], "http://example.com", True),
    ([".example.com"], "http://notexample.com", False),
    ([".example.com"], "http://127.0.0.1", False),  # allowed_origins replaces ALLOWED_HOSTS
    (["*"], "http://anything.test:1234", True),
], ids=lambda value: repr(value))
# === 7. ASGI app ===
@asynchronous
async def test_app_origin_checks_before_any_consumer_runs(allowed_origins, origin, accepted, caplog):
    app, layer = app_setup([route("websocket.connect", app_report_connect, path=r"^/o/$")],
                           allowed_origins=allowed_origins)
    headers = [] if origin is None else [("origin", origin)]

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        communicator = WebsocketCommunicator(app, "/o/", headers=headers)
        connected, _ = await communicator.connect(timeout=5)
        await communicator.disconnect()
        if accepted:
            observed = await app_observed(layer)
        else:
            observed = await app_nothing_observed(layer)
    warnings = [r for r in caplog.records if r.name == "channels_mini" and r.levelno == logging.WARNING]
    if accepted:
        assert connected is True
        assert observed == {"event": "connect", "origin": None if origin is None else origin.encode()}
        assert warnings == []
    else:
        assert connected is False and observed is True  # the consumer never ran
        assert len(warnings) == 1 and repr(origin) in warnings[0].getMessage()


@asynchronous
async def test_app_max_message_size_closes_with_1009(caplog):
    app, _ = app_setup([AppEcho.as_route(path=r"^/echo/$")], max_message_size=64)

    async def one(frame):
        communicator = WebsocketCommunicator(app, "/echo/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(**frame)
        event = await communicator.receive_output(timeout=5)
        await communicator.disconnect()
        return event

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        events = [await one({"text_data": "a" * 64}), await one({"text_data": "a" * 65}),
                await one({"bytes_data": b"b" * 64}), await one({"bytes_data": b"b" * 65}),
                await one({"text_data": "é" * 33})]  # 33 characters, 66 bytes of UTF-8
    close = {"type": "websocket.close", "code": 1009}
    assert events == [{"type": "websocket.send", "text": "a" * 64}, close,
                      {"type": "websocket.send", "bytes": b"b" * 64}, close, close]
    assert sum("1009" in r.getMessage() for r in caplog.records if r.name == "channels_mini") == 3


@asynchronous
async def test_app_background_channel_from_a_plain_thread_reaches_its_consumer_with_kwargs(caplog):
    app, _ = app_setup(server_routing)

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        mailroom = WebsocketCommunicator(app, "/mailroom/")  # starts the background workers
        assert await mailroom.connect(timeout=5) == (True, None)

        def send_from_thread(content):  # outside any consumer and any event loop
            thread = threading.Thread(target=Channel("email.receive").send, args=(content,))
            thread.start()
            thread.join(5)

        await asyncio.to_thread(send_from_thread, {"to_address": "ann@example.com", "subject": "hi"})
        delivered = await mailroom.receive_from(timeout=5)
        await asyncio.to_thread(send_from_thread, {"to_address": "bob@elsewhere.org", "subject": "no"})
        nothing = await mailroom.receive_nothing(timeout=0.5)
        # and from a socket: the background consumer replies on that socket's reply channel
        mailer = WebsocketCommunicator(app, "/mail/")
        assert await mailer.connect(timeout=5) == (True, None)
        await mailer.send_to(text_data="cy@example.com")
        replied = await mailer.receive_from(timeout=5)
        await mailer.disconnect()
        await mailroom.disconnect()
    assert delivered == f"mail for ann: hi ({APP_IN_THREAD})"
    assert nothing is True
    assert replied == f"mail for cy: from a socket ({APP_IN_THREAD})"
    dropped = [r.getMessage() for r in caplog.records if r.name == "channels_mini"]
    assert len(dropped) == 1 and "'email.receive'" in dropped[0] and "No route matched" in dropped[0]


@asynchronous
async def test_app_module_level_application_reads_channel_routing_setting():
    import channels_mini as module

    assert settings.CHANNEL_ROUTING == f"{__name__}.server_routing"

    echo = WebsocketCommunicator(module.application, "/echo/")
    assert await echo.connect(timeout=5) == (True, None)
    await echo.send_to(text_data="via settings")
    echoed = await echo.receive_from(timeout=5)
    first = WebsocketCommunicator(module.application, "/chat/settings/")
    second = WebsocketCommunicator(module.application, "/chat/settings/")
    assert await first.connect(timeout=5) == (True, None)
    assert await second.connect(timeout=5) == (True, None)
    await first.send_to(text_data="room message")
    heard = [await first.receive_from(timeout=5), await second.receive_from(timeout=5)]
    for communicator in (echo, first, second):
        await communicator.disconnect()
    assert (echoed, heard) == ("via settings", ["room message", "room message"])


def test_app_module_level_application_takes_the_routing_from_a_1x_channel_layers_setting(tmp_path):
    """A 1.x settings file, unchanged: no CHANNEL_ROUTING, and CHANNEL_LAYERS naming
    asgiref.inmemory.ChannelLayer with its ROUTING. The module-level `application` serves that
    routing on the in-memory layer (in a fresh process: `application` reads its settings once)."""
    (tmp_path / "old_settings.py").write_text(
        "SECRET_KEY = 'x'\nINSTALLED_APPS = []\nALLOWED_HOSTS = ['testserver']\n"
        "CHANNEL_LAYERS = {'default': {'BACKEND': 'asgiref.inmemory.ChannelLayer',\n"
        "                              'ROUTING': 'old_routing.channel_routing'}}\n")
    (tmp_path / "old_routing.py").write_text(
        "from channels_mini import route\n"
        "def ws_message(message):\n"
        "    message.reply_channel.send({'text': message['text'].upper()})\n"
        "channel_routing = [route('websocket.receive', ws_message)]\n")
    script = (
        "import asyncio\n"
        "from channels_mini import InMemoryChannelLayer, WebsocketCommunicator, application, get_channel_layer\n"
        "async def main():\n"
        "    communicator = WebsocketCommunicator(application, '/')\n"
        "    assert await communicator.connect(timeout=5) == (True, None)\n"
        "    await communicator.send_to(text_data='old routing')\n"
        "    print(await communicator.receive_from(timeout=5))\n"
        "    await communicator.disconnect()\n"
        "asyncio.run(main())\n"
        "print(type(get_channel_layer()) is InMemoryChannelLayer)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}",
                                               "DJANGO_SETTINGS_MODULE": "old_settings"})
    assert result.stdout.split() == ["OLD", "ROUTING", "True"], result.stderr

def test_app_unknown_consumer_path_is_improperly_configured_at_construction():
    missing = f"{__name__}.app_no_such_consumer"
    expected = f"Consumer for route('email.receive'): cannot import {missing!r}"
    with pytest.raises(ImproperlyConfigured, match=re.escape(expected)):
        Application({"email.receive": missing})
    with pytest.raises(ImproperlyConfigured,
                       match=re.escape("Channel routing: cannot import 'app_no_such_module.routing'")):
        Application("app_no_such_module.routing")


class AppLeakProbe(WebsocketConsumer):
    groups = ["leak-all"]

    def connection_groups(self, n, **kwargs):
        return [*self.groups, f"leak-{int(n) % 7}"]

    async def receive(self, text=None, bytes=None, **kwargs):
        if text == "close":
            self.send(text="closing", close=4000)  # the app closes this one
        else:
            self.group_send("leak-all", text=text)


async def app_leak_manual_join(message, **kwargs):
    """Channels 1.x style: joins a group by hand and never leaves it."""
    Group("leak-manual").add(message.reply_channel)
    message.reply_channel.send({"accept": True})


@asynchronous(timeout=120)
async def test_app_no_leaks_after_1000_connect_disconnect_cycles():
    layer = InMemoryChannelLayer()
    app = Application([AppLeakProbe.as_route(path=r"^/leak/(?P<n>\d+)/$"),
                       route("websocket.connect", app_leak_manual_join, path=r"^/manual/$")],
                      channel_layer=layer)

    started = time.monotonic()
    for n in range(1000):
        manual = n % 4 == 3
        communicator = WebsocketCommunicator(app, "/manual/" if manual else f"/leak/{n}/")
        assert await communicator.connect(timeout=5) == (True, None)
        if n == 0:
            assert layer.stats()["members"] == 2  # leak-all and leak-0: really joined
        if manual:
            assert layer.stats()["members"] == 1  # the hand-made membership
            await layer.group_send("leak-manual", {"text": "unread"})  # never read by the client
        elif n % 2:
            await communicator.send_to(text_data="close")
            assert await communicator.receive_from(timeout=5) == "closing"
            assert await app_close_code(communicator) == 4000
        elif n % 10 == 0:
            await communicator.send_to(text_data="hello")
            assert await communicator.receive_from(timeout=5) == "hello"
        await communicator.disconnect()
    assert layer.stats() == {"channels": 0, "groups": 0, "members": 0, "messages": 0, "dropped": 0}
    assert time.monotonic() - started < 120


# -- real servers: the same module served by uvicorn, daphne and hypercorn --

@pytest.fixture(scope="module", params=["uvicorn", "daphne", "hypercorn"])
def app_live_server(request):
    with running_server(request.param) as server:
        yield server


@asynchronous
async def test_app_server_echo(app_live_server):
    async with ws_connect(app_live_server.url("/echo/")) as connection:
        await connection.send("ping")
        text = await recv(connection)
        await connection.send(b"\x00\xffbinary")
        binary = await recv(connection)
    assert (text, binary) == ("ping", b"\x00\xffbinary")


@asynchronous
async def test_app_server_group_broadcast_reaches_the_other_client(app_live_server):
    room = f"r{uuid.uuid4().hex[:8]}"

    async with ws_connect(app_live_server.url(f"/chat/{room}/")) as alice, \
            ws_connect(app_live_server.url(f"/chat/{room}/")) as bob, \
            ws_connect(app_live_server.url("/chat/elsewhere/")) as carol:
        await alice.send("hello room")
        heard = [await recv(bob), await recv(alice)]
        with pytest.raises(asyncio.TimeoutError):
            await recv(carol, timeout=0.5)
    assert heard == ["hello room", "hello room"]


@asynchronous
async def test_app_server_close_code_reaches_the_client(app_live_server):
    from websockets.exceptions import ConnectionClosed

    async with ws_connect(app_live_server.url("/close/")) as connection:
        await connection.send("please close")
        text = await recv(connection)
        with pytest.raises(ConnectionClosed) as closed:
            await recv(connection)
    assert (text, closed.value.rcvd.code) == ("bye", 4242)


@asynchronous
async def test_app_server_rejects_cross_origin_handshake_with_403(app_live_server):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as rejected:
        async with ws_connect(app_live_server.url("/echo/"), origin="http://evil.example"):
            pass
    own_origin = f"http://127.0.0.1:{app_live_server.port}"
    async with ws_connect(app_live_server.url("/echo/"), origin=own_origin) as connection:
        await connection.send("same origin")
        echoed = await recv(connection)
    assert (rejected.value.response.status_code, echoed) == (403, "same origin")


def test_app_server_serves_django_http_through_the_same_app(app_live_server):
    assert http_get(app_live_server.url("/page/", scheme="http")) == (200, "django page ok")
    status, _ = http_get(app_live_server.url("/no-such-page/", scheme="http"))
    assert status == 404


@asynchronous
async def test_app_server_background_channel_replies_to_the_socket(app_live_server):
    async with ws_connect(app_live_server.url("/mail/")) as connection:
        await connection.send("dee@example.com")
        reply = await recv(connection)
    assert reply == f"mail for dee: from a socket ({APP_IN_THREAD})"


def test_app_uvicorn_lifespan_on_starts_and_stops_cleanly():
    with running_server("uvicorn", extra_args=["--lifespan", "on", "--log-level", "info"]) as server:
        async def scenario():
            async with ws_connect(server.url("/mail/")) as connection:
                await connection.send("eve@example.com")
                return await recv(connection)

        assert run(scenario()) == f"mail for eve: from a socket ({APP_IN_THREAD})"
    assert server.process.returncode == 0
    log = server.log()
    assert "Application startup complete." in log and "Application shutdown complete." in log
    assert "Traceback" not in log and "ERROR" not in log


# === 8. Test helpers ===

def app_query_echo(message, **kwargs):
    if message.channel_name == "websocket.connect":
        offered = message["subprotocols"]
        message.reply_channel.send({"accept": True, "subprotocol": offered[0] if offered else None})
    elif message.get("bytes") is not None:
        message.reply_channel.send({"bytes": message["bytes"]})
    elif message["text"] == "close":
        message.reply_channel.send({"close": 4100})
    else:
        message.reply_channel.send({"text": json.dumps(
            {"query": message.scope["query_string"].decode(), "path": message["path"],
             "got": json.loads(message["text"])})})


@asynchronous
async def test_helpers_communicator_round_trip():
    app, _ = app_setup([route(["websocket.connect", "websocket.receive"], app_query_echo,
                              path=r"^/helper/")])

    communicator = WebsocketCommunicator(app, "/helper/a%20b/?x=1&y=two", subprotocols=["v1", "v2"])
    assert communicator.scope["query_string"] == b"x=1&y=two"
    assert await communicator.connect(timeout=5) == (True, "v1")
    assert await communicator.receive_nothing() is True
    await communicator.send_json_to({"n": [1, "é"]})
    assert await communicator.receive_json_from(timeout=5) == {
        "query": "x=1&y=two", "path": "/helper/a b/", "got": {"n": [1, "é"]}}
    await communicator.send_to(bytes_data=b"\x00raw")
    assert await communicator.receive_from(timeout=5) == b"\x00raw"
    await communicator.send_to(bytes_data=b"\x01")
    with pytest.raises(AssertionError, match=re.escape("Expected a JSON text frame, got bytes")):
        await communicator.receive_json_from(timeout=5)
    with pytest.raises(asyncio.TimeoutError):
        await communicator.receive_from(timeout=0.1)
    await communicator.send_to(text_data="close")
    with pytest.raises(AssertionError, match=re.escape("Expected a websocket.send frame, got ")):
        await communicator.receive_from(timeout=5)
    await communicator.disconnect()


@asynchronous
async def test_helpers_connect_reports_rejection_with_close_code():
    app, _ = app_setup([AppDenySync.as_route(path=r"^/deny/$")], allowed_origins=["good.example"])

    denied = WebsocketCommunicator(app, "/deny/")
    foreign = WebsocketCommunicator(app, "/deny/", headers=[("origin", "http://bad.example")])
    results = [await denied.connect(timeout=5), await foreign.connect(timeout=5)]
    await denied.disconnect()
    await foreign.disconnect()
    for connected, code in results:
        assert connected is False and isinstance(code, int) and 1000 <= code < 5000


@asynchronous
async def test_helpers_receive_nothing_after_the_app_closed_the_socket():
    # As in Channels: nothing more arrives from an app that closed the socket and finished.
    app, _ = app_setup([AppCloser.as_route(path=r"^/closer/$")])

    communicator = WebsocketCommunicator(app, "/closer/")
    assert await communicator.connect(timeout=5) == (True, None)
    await communicator.send_to(text_data="close 4001")
    assert await app_close_code(communicator) == 4001
    nothing = await communicator.receive_nothing(timeout=0.2)
    await communicator.disconnect()
    assert nothing is True


# === 9. Command line ===
# `runworker` processes sharing one real redis-server with the servers; runworker runs from a
# tiny Django project written into a temporary directory.

# -- runworker: a tiny Django project in a temporary directory --

redis_WORKER_SETTINGS = '''\
import os

SECRET_KEY = "runworker-tests-only"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ["CHANNELS_MINI_TEST_DB"], "OPTIONS": {"timeout": 30}}}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
CHANNEL_ROUTING = "redis_worker_routing.channel_routing"
_url = os.environ.get("CHANNELS_MINI_TEST_REDIS")
CHANNEL_LAYERS = ({"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                               "CONFIG": {"hosts": [_url]}}} if _url else {})
'''

# Plain functions and a dict routing: no import of channels_mini, so the same
# project runs under a vendored copy (mysite/channels_mini.py) too.
redis_WORKER_ROUTING = '''\
import time


def fast(message):
    from django.contrib.auth.models import Group
    if message.get("record"):
        Group.objects.get_or_create(name=message["record"])  # the shared SQLite file
    message.reply_channel.send({"done": message["n"], "channel": message.channel.name})


def slow(message):
    message.reply_channel.send({"started": message["n"]}, immediately=True)
    time.sleep(message["seconds"])
    message.reply_channel.send({"done": message["n"], "channel": message.channel.name})


channel_routing = {
    "redis-work.fast": "redis_worker_routing.fast",
    "redis-work.slow": "redis_worker_routing.slow",
    "redis-extra.other": "redis_worker_routing.fast",
}
'''


def redis_worker_project(directory) -> str:
    """Write the settings and routing modules into *directory*; return it as a str."""
    directory = str(directory)
    with open(os.path.join(directory, "redis_worker_settings.py"), "w") as handle:
        handle.write(redis_WORKER_SETTINGS)
    with open(os.path.join(directory, "redis_worker_routing.py"), "w") as handle:
        handle.write(redis_WORKER_ROUTING)
    return directory


def redis_worker_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, "runworker", "--settings", "redis_worker_settings", *args]


@contextlib.contextmanager
def redis_running_worker(directory: str, url: str | None, *args: str,
                         module: str = "channels_mini", pythonpath: str | None = None):
    """A runworker subprocess; yields (process, log reader); always stopped on exit."""
    env = {**os.environ, "PYTHONPATH": pythonpath or f"{directory}{os.pathsep}{ROOT}"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    if url:
        env["CHANNELS_MINI_TEST_REDIS"] = url
    log_path = os.path.join(directory, f"worker-{uuid.uuid4().hex[:6]}.log")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(redis_worker_command(module, *args), cwd=directory, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)

    def log() -> str:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    try:
        yield process, log
    finally:
        stop_process(process)


def redis_wait_for_log(process, log, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log():
            return
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the worker's log within {timeout} s "
                         f"(exit code {process.poll()}):\n{log()}")


async def redis_ask_worker(url: str, sends: list[tuple[str, dict]], expect: int,
                           timeout: float = 20) -> list[dict]:
    """Send *sends* (channel, content) with a fresh reply channel; collect *expect* replies."""
    layer = redis_layer(url)
    reply = f"redis-test-reply.{uuid.uuid4().hex}"
    try:
        for channel, content in sends:
            await Channel(channel, channel_layer=layer).asend({**content, "reply_channel": reply})
        return [await redis_receive(layer, reply, timeout) for _ in range(expect)]
    finally:
        await layer.close_pools()


def test_command_line_redis_runworker_consumes_messages_sent_from_another_process(tmp_path):
    from django.contrib.auth.models import Group as AuthGroup

    ensure_database()
    directory = redis_worker_project(tmp_path)
    record = f"redis-worker-{uuid.uuid4().hex[:8]}"
    with running_redis() as url:
        # Sent before the worker starts: a shared layer keeps it until someone listens.
        sender = subprocess.run(
            [sys.executable, "-c",
             "import sys; sys.path.insert(0, sys.argv[1]); import django, os; "
             "os.environ['DJANGO_SETTINGS_MODULE'] = 'redis_worker_settings'; django.setup(); "
             "import channels_mini; "
             "channels_mini.Channel('redis-work.fast').send({'n': 1, 'record': sys.argv[2], "
             "'reply_channel': sys.argv[3]})",
             directory, record, "redis-test-reply.from-script"],
            cwd=directory, env={**os.environ, "CHANNELS_MINI_TEST_REDIS": url,
                                "PYTHONPATH": f"{directory}{os.pathsep}{ROOT}"},
            capture_output=True, text=True, timeout=60)
        assert sender.returncode == 0, sender.stderr
        with redis_running_worker(directory, url) as (process, log):
            redis_wait_for_log(process, log, "runworker listening on channels: "
                                             "redis-extra.other, redis-work.fast, redis-work.slow")

            async def first_reply():
                layer = redis_layer(url)
                try:
                    return await redis_receive(layer, "redis-test-reply.from-script", 20)
                finally:
                    await layer.close_pools()

            assert run(first_reply()) == {"done": 1, "channel": "redis-work.fast"}
            replies = run(redis_ask_worker(url, [("redis-extra.other", {"n": 2}),
                                                 ("redis-work.fast", {"n": 3})], 2))
            assert sorted(r["done"] for r in replies) == [2, 3]
            assert process.poll() is None
        assert AuthGroup.objects.filter(name=record).exists()
        assert process.returncode == 0, log()


def test_command_line_redis_runworker_honours_only_and_exclude_channel_globs(tmp_path):
    directory = redis_worker_project(tmp_path)
    with running_redis() as url:
        with redis_running_worker(directory, url, "--only-channels", "redis-work.*",
                                  "--exclude-channels", "*.slow") as (process, log):
            redis_wait_for_log(process, log, "runworker listening on channels: redis-work.fast\n")

            async def scenario():
                layer = redis_layer(url)
                reply = f"redis-test-reply.{uuid.uuid4().hex}"
                try:
                    await layer.send("redis-work.slow", {"n": 1, "seconds": 0, "reply_channel": reply})
                    await layer.send("redis-extra.other", {"n": 2, "reply_channel": reply})
                    await layer.send("redis-work.fast", {"n": 3, "reply_channel": reply})
                    answered = await redis_receive(layer, reply, 20)
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(layer.receive(reply), 1.0)
                    # Nobody took the others: they are still waiting in Redis.
                    left = [await redis_receive(layer, "redis-work.slow", 5),
                            await redis_receive(layer, "redis-extra.other", 5)]
                finally:
                    await layer.close_pools()
                return answered, left

            answered, left = run(scenario())
            assert answered == {"done": 3, "channel": "redis-work.fast"}
            assert [m["n"] for m in left] == [1, 2]
        assert process.returncode == 0, log()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_command_line_redis_runworker_stops_cleanly_finishing_the_message_in_hand(tmp_path, signum):
    directory = redis_worker_project(tmp_path)
    with running_redis() as url:
        with redis_running_worker(directory, url) as (process, log):
            redis_wait_for_log(process, log, "runworker listening on channels")

            async def scenario():
                layer = redis_layer(url)
                reply = f"redis-test-reply.{uuid.uuid4().hex}"
                try:
                    await layer.send("redis-work.slow", {"n": 7, "seconds": 1.5, "reply_channel": reply})
                    started = await redis_receive(layer, reply, 20)
                    process.send_signal(signum)  # while the handler sleeps
                    signalled_at = time.monotonic()
                    done = await redis_receive(layer, reply, 20)
                    exit_code = await asyncio.to_thread(process.wait, 15)
                    return started, done, exit_code, time.monotonic() - signalled_at
                finally:
                    await layer.close_pools()

            started, done, exit_code, took = run(scenario(), timeout=60)
        assert started == {"started": 7}
        assert done == {"done": 7, "channel": "redis-work.slow"}
        assert exit_code == 0, log()
        assert took < 8, log()
        assert "runworker stopping: finishing the messages in hand." in log()
        assert "runworker stopped." in log()
        assert "Traceback" not in log(), log()


def test_command_line_redis_runworker_stops_promptly_right_after_a_message(tmp_path):
    """SIGTERM just after a message was handled, when the worker re-enters receive():
    the stop must not wait out _BackgroundWorkers.stop()'s 5 s timeout. (redis-py 8
    sometimes loses a cancel in that instant, so one cancel is not enough.) Three tries."""
    directory = redis_worker_project(tmp_path)
    durations = []
    with running_redis() as url:
        for attempt in range(3):
            with redis_running_worker(directory, url, "--only-channels", "redis-work.fast") as (process, log):
                redis_wait_for_log(process, log, "runworker listening on channels")
                replies = run(redis_ask_worker(url, [("redis-work.fast", {"n": attempt})], 1))
                process.send_signal(signal.SIGTERM)
                started = time.monotonic()
                assert process.wait(15) == 0, log()
                durations.append(round(time.monotonic() - started, 2))
            assert replies == [{"done": attempt, "channel": "redis-work.fast"}]
    assert max(durations) < 3, f"seconds from SIGTERM to exit: {durations}"


def test_command_line_redis_runworker_refuses_the_in_memory_layer_and_says_why(tmp_path):
    directory = redis_worker_project(tmp_path)
    env = {**os.environ, "PYTHONPATH": f"{directory}{os.pathsep}{ROOT}"}
    env.pop("CHANNELS_MINI_TEST_REDIS", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    finished = subprocess.run(redis_worker_command("channels_mini"), cwd=directory, env=env,
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2
    output = finished.stdout + finished.stderr
    assert ("runworker cannot start: channel layer 'default' is an InMemoryChannelLayer, which "
            "lives inside one process, so nothing could ever reach this worker. Configure a "
            "shared layer such as channels_redis.core.RedisChannelLayer in CHANNEL_LAYERS."
            ) in output


def test_command_line_redis_runworker_from_a_vendored_copy(tmp_path):
    directory = redis_worker_project(tmp_path)
    package = tmp_path / "mysite"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(os.path.join(ROOT, "channels_mini.py"), package / "channels_mini.py")
    only_vendored = {**os.environ, "PYTHONPATH": directory}
    only_vendored.pop("DJANGO_SETTINGS_MODULE", None)
    # A top-level channels_mini that refuses to load shadows any installed copy: the vendored
    # module must never import itself by that name.
    with open(os.path.join(directory, "channels_mini.py"), "w") as shadow:
        shadow.write("raise ImportError('the vendored copy imported channels_mini by name')\n")
    probe = subprocess.run([sys.executable, "-c", "import channels_mini"], cwd=directory,
                           env=only_vendored, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "the vendored copy imported channels_mini" in probe.stderr
    usage = subprocess.run([sys.executable, "-m", "mysite.channels_mini", "runworker", "--help"],
                           cwd=directory, env=only_vendored, capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 0 and "python -m mysite.channels_mini runworker" in usage.stdout
    with running_redis() as url:
        with redis_running_worker(directory, url, module="mysite.channels_mini",
                                  pythonpath=directory) as (process, log):
            redis_wait_for_log(process, log, "runworker listening on channels")
            replies = run(redis_ask_worker(url, [("redis-work.fast", {"n": 1})], 1))
            assert replies == [{"done": 1, "channel": "redis-work.fast"}]
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0, log()
        assert "Traceback" not in log(), log()


# === Across the sections: reliability and security ===
# What users rely on when things go wrong: nothing is lost silently, one socket's
# trouble stays with that socket, nothing is left behind, hostile input and foreign
# origins are turned away. Most tests run a real uvicorn server on `rel_app` below;
# its tiny HTTP endpoint reports the server's `get_channel_layer().stats()`.

import gc  # noqa: E402

import psutil  # noqa: E402
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test,
)

REL_MARKERS_ENV = "CHANNELS_MINI_REL_MARKERS"  # where server-side consumers write marker files
REL_ZERO_STATS = {"channels": 0, "groups": 0, "members": 0, "messages": 0}


def rel_counts(stats: dict) -> dict:
    """The stats that must return to zero ("dropped" is a running total)."""
    return {key: stats[key] for key in REL_ZERO_STATS}


# rel_app's background worker waits on 'rel.work', so its idle layer has that one channel.
REL_IDLE_STATS = {**REL_ZERO_STATS, "channels": 1}


def rel_write_marker(name: str, text: str = "") -> None:
    """Leave a file the test process can look for (no-op when the env var is not set)."""
    directory = os.environ.get(REL_MARKERS_ENV)
    if directory:
        with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
            handle.write(text)


class rel_Note(models.Model):
    title = models.CharField(max_length=20)
    count = models.IntegerField(default=0)
    owner = models.ForeignKey("auth.User", null=True, blank=True, on_delete=models.CASCADE,
                              related_name="+")

    class Meta:
        app_label = __name__


class rel_FuzzNote(models.Model):
    title = models.CharField(max_length=20, blank=True)
    count = models.IntegerField(default=0)
    when = models.DateTimeField(null=True, blank=True)
    owner = models.ForeignKey("auth.User", null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")

    class Meta:
        app_label = __name__


class rel_PkNote(models.Model):
    title = models.CharField(max_length=20)

    class Meta:
        app_label = __name__


# -- consumers --

class rel_SyncEcho(WebsocketConsumer):
    """Echoes from a worker thread; 'block' holds the thread 5 s, 'raise' fails."""

    def receive(self, text=None, bytes=None, **kwargs):
        if text == "block":
            time.sleep(5)
            self.send(text="unblocked")
        elif text == "raise":
            raise RuntimeError("rel_SyncEcho raised on purpose")
        else:
            self.send(text=text, bytes=bytes)


class rel_AsyncEcho(WebsocketConsumer):
    """The same on the event loop."""

    async def receive(self, text=None, bytes=None, **kwargs):
        if text == "block":
            await asyncio.sleep(5)
            self.send(text="unblocked")
        elif text == "raise":
            raise RuntimeError("rel_AsyncEcho raised on purpose")
        else:
            self.send(text=text, bytes=bytes)


class rel_Fanout(WebsocketConsumer):
    """Every socket joins one group; 'fanout N' group-sends N numbered frames in one handler."""

    groups = ["rel-fanout"]

    async def receive(self, text=None, bytes=None, **kwargs):
        for number in range(int(text.split()[1])):
            self.group_send("rel-fanout", text=str(number))


class rel_Vanish(WebsocketConsumer):
    """Joins a group; 'slow-sync'/'slow-async' answer after 1 s, to the socket and the group."""

    groups = ["rel-vanish"]

    def receive(self, text=None, bytes=None, **kwargs):
        if text == "slow-sync":
            time.sleep(1)
            self.send(text="late")
            self.group_send("rel-vanish", text="late-group")


class rel_AsyncVanish(rel_Vanish):
    async def receive(self, text=None, bytes=None, **kwargs):
        await asyncio.sleep(1)
        self.send(text="late")
        self.group_send("rel-vanish", text="late-group")


class rel_Leak(WebsocketConsumer):
    """Joins a group and echoes: what a connect/disconnect cycle exercises."""

    groups = ["rel-leak"]

    async def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=text)


class rel_SyncLeak(rel_Leak):
    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=text)


class rel_Named(WebsocketConsumer):
    """Builds group/channel names from a URL kwarg, as careless code does."""

    def receive(self, text=None, bytes=None, name=None, **kwargs):
        if text == "group":
            Group(f"rel-{name}").add(self.message.reply_channel)
        elif text == "channel":
            Channel(f"rel.{name}").send({"text": "hello"})
        self.send(text="ok")


class rel_NamedOnConnect(WebsocketConsumer):
    def connection_groups(self, name=None, **kwargs):
        return [f"rel-{name}"]


class rel_NonDict(WebsocketConsumer):
    """Sends content that is not a dict."""

    def receive(self, text=None, bytes=None, **kwargs):
        if text == "channel":
            Channel("rel.nondict").send("plain text")
        elif text == "group":
            Group("rel-nondict").send(["a", "list"])
        elif text == "reply":
            self.message.reply_channel.send(None)


class rel_Json(JsonWebsocketConsumer):
    def receive(self, content, **kwargs):
        self.send({"echo": content})


class rel_JsonStream(JsonWebsocketConsumer):
    async def receive(self, content, **kwargs):
        self.send({"echo": content})


class rel_NoteBinding(WebsocketBinding):
    """Signed-in users create; only a note's owner updates or deletes it."""

    model = rel_Note
    stream = "notes"
    fields = ["title", "count", "owner"]

    def has_permission(self, user, action, pk):
        if user is None or not user.is_authenticated:
            return False
        if action == "create":
            return True
        return rel_Note.objects.filter(pk=pk, owner=user).exists()


class rel_DenyingNoteBinding(WebsocketBinding):
    """has_permission is not overridden: every write is refused."""

    model = rel_Note
    stream = "denied"
    fields = ["__all__"]


class rel_OpenFuzzBinding(WebsocketBinding):
    """Allows every write, so random requests reach deserialisation and the database."""

    model = rel_FuzzNote
    stream = "open"
    fields = ["title", "count", "when", "owner"]

    def has_permission(self, user, action, pk):
        return True


class rel_PkBinding(WebsocketBinding):
    """Allows every write on a table of its own (a test here may exhaust its id range)."""

    model = rel_PkNote
    stream = "pick"
    fields = ["title"]

    def has_permission(self, user, action, pk):
        return True


class rel_Demux(WebsocketDemultiplexer):
    consumers = {"echo": rel_JsonStream, "notes": rel_NoteBinding.consumer,
                 "denied": rel_DenyingNoteBinding.consumer, "open": rel_OpenFuzzBinding.consumer,
                 "pick": rel_PkBinding.consumer}


class rel_Cswsh(WebsocketConsumer):
    """Leaves a marker when its connect handler runs, naming the session's user."""

    http_user = True

    def connect(self, message, token=None, **kwargs):
        rel_write_marker(f"cswsh-{token}", message.user.get_username())
        message.reply_channel.send({"accept": True})
        message.reply_channel.send({"text": f"hello {message.user.get_username()}"})


class rel_AsyncWhoAmI(WebsocketConsumer):
    """Greets the session's user from an async connect: it needs no handler thread."""

    http_user = True

    async def connect(self, message, **kwargs):
        self.send(text=f"hello {message.user.get_username()}")


class rel_Marker(WebsocketConsumer):
    """Leaves a marker from its (sync) disconnect handler; 'work' starts a background job."""

    def receive(self, text=None, bytes=None, name=None, **kwargs):
        if text == "work":
            Channel("rel.work").send({"name": name})
        self.send(text="ok")

    def disconnect(self, message, name=None, **kwargs):
        rel_write_marker(f"disconnect-{name}", str(message["code"]))


class rel_AsyncMarker(rel_Marker):
    async def disconnect(self, message, name=None, **kwargs):
        rel_write_marker(f"disconnect-{name}", str(message["code"]))


async def rel_work(message):
    """A background-channel consumer that takes 1.5 s."""
    rel_write_marker(f"work-started-{message['name']}")
    await asyncio.sleep(1.5)
    rel_write_marker(f"work-done-{message['name']}")


class rel_Flood(WebsocketConsumer):
    """'group N SIZE' group-sends N frames of SIZE bytes to 'rel-flood'; listeners join it."""

    groups = ["rel-flood"]

    async def receive(self, text=None, bytes=None, **kwargs):
        if text and text.startswith("group "):
            _, count, size = text.split()
            for number in range(int(count)):
                self.group_send("rel-flood", text=f"{number:08d}".ljust(int(size), "."))
        elif text and text.startswith("direct "):
            for number in range(int(text.split()[1])):
                self.send(text=str(number))


class rel_FloodProducer(rel_Flood):
    """The same commands, from a socket that is not in the group."""

    groups = []


async def rel_stats_http(scope, receive, send):
    """GET anything: the server's channel layer stats as JSON."""
    if scope["type"] != "http":
        return
    body = json.dumps(get_channel_layer().stats()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


rel_routing = [
    rel_SyncEcho.as_route(path=r"^/rel/echo/sync/$"),
    rel_AsyncEcho.as_route(path=r"^/rel/echo/async/$"),
    rel_Fanout.as_route(path=r"^/rel/fanout/$"),
    rel_Vanish.as_route(path=r"^/rel/vanish/sync/$"),
    rel_AsyncVanish.as_route(path=r"^/rel/vanish/async/$"),
    rel_Leak.as_route(path=r"^/rel/leak/async/$"),
    rel_SyncLeak.as_route(path=r"^/rel/leak/sync/$"),
    rel_Named.as_route(path=r"^/rel/named/(?P<name>[^/]*)/$"),
    rel_NamedOnConnect.as_route(path=r"^/rel/named-connect/(?P<name>[^/]*)/$"),
    rel_NonDict.as_route(path=r"^/rel/nondict/$"),
    rel_Json.as_route(path=r"^/rel/json/$"),
    rel_Demux.as_route(path=r"^/rel/demux/$"),
    rel_Cswsh.as_route(path=r"^/rel/cswsh/(?P<token>\w+)/$"),
    rel_AsyncWhoAmI.as_route(path=r"^/rel/whoami/async/$"),
    rel_Marker.as_route(path=r"^/rel/marker/sync/(?P<name>\w+)/$"),
    rel_AsyncMarker.as_route(path=r"^/rel/marker/async/(?P<name>\w+)/$"),
    rel_Flood.as_route(path=r"^/rel/flood/$"),
    rel_FloodProducer.as_route(path=r"^/rel/flood-producer/$"),
    route("rel.work", rel_work),
]

rel_app = Application(rel_routing, http=rel_stats_http)

# No background channel: an idle layer is all zeros.
rel_leak_app = Application([rel_Leak.as_route(path=r"^/rel/leak/async/$"),
                            rel_SyncLeak.as_route(path=r"^/rel/leak/sync/$")], http=rel_stats_http)


# -- helpers --

@pytest.fixture(scope="module")
def rel_server(tmp_path_factory):
    """One uvicorn server on `rel_app` (default settings) for the tests that can share it."""
    markers = tmp_path_factory.mktemp("rel-markers")
    with running_server(app=f"{__name__}:rel_app", env={REL_MARKERS_ENV: str(markers)}) as server:
        server.markers = str(markers)
        yield server


def rel_stats(server: Server) -> dict:
    status, body = http_get(server.url("/stats", scheme="http"))
    assert status == 200, body
    return json.loads(body)


def rel_wait_for_stats(server: Server, expected: dict, timeout: float = 10) -> dict:
    """Poll the server's layer stats until the *expected* keys match (or give up)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = rel_stats(server)
        if {key: stats[key] for key in expected} == expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def rel_wait_for_log(server: Server, text: str, start: int = 0, timeout: float = 5) -> str:
    """The server log from offset *start*, once it contains *text* (or after *timeout*)."""
    deadline = time.monotonic() + timeout
    while True:
        log = server.log()[start:]
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


def rel_rss(pid: int | None = None) -> int:
    gc.collect()
    return psutil.Process(pid or os.getpid()).memory_info().rss


async def rel_until_closed(websocket, timeout: float = 10, limit: int = 10_000) -> tuple[list, int | None]:
    """Read frames until the server closes; (frames, close code). TimeoutError if it stays open."""
    from websockets.exceptions import ConnectionClosed

    frames: list = []
    deadline = time.monotonic() + timeout
    for _ in range(limit):
        try:
            frames.append(await asyncio.wait_for(websocket.recv(), max(deadline - time.monotonic(), 0.01)))
        except ConnectionClosed as closed:
            return frames, closed.rcvd.code if closed.rcvd is not None else None
    raise AssertionError(f"more than {limit} frames before a close")


async def rel_echo_works(server: Server, path: str = "/rel/echo/async/") -> bool:
    """Another socket still gets its frame echoed: the server keeps serving."""
    token = uuid.uuid4().hex
    async with ws_connect(server.url(path)) as websocket:
        await websocket.send(token)
        return await asyncio.wait_for(websocket.recv(), 5) == token


def rel_handshake_status(server: Server, path: str, **kwargs) -> int:
    """Connect and return 101 if accepted, else the HTTP status of the refusal."""
    from websockets.exceptions import InvalidStatus

    async def attempt():
        try:
            async with ws_connect(server.url(path), **kwargs):
                return 101
        except InvalidStatus as refused:
            return refused.response.status_code

    return run(attempt())


def rel_login(username: str):
    """A user and a Django session cookie for it (as a browser would hold after logging in)."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore

    ensure_database()
    user = User.objects.create_user(f"{username}-{uuid.uuid4().hex[:8]}", password="x")
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return user, f"{settings.SESSION_COOKIE_NAME}={session.session_key}"


@contextlib.contextmanager
def rel_captured_logs(level: int = logging.WARNING):
    """Records the 'channels_mini' logger emits inside the block (usable under hypothesis)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level)
    log = logging.getLogger("channels_mini")
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def rel_report(**figures) -> None:
    """Print measured figures (visible with -s; the part's final report quotes them)."""
    print("\nREL-FIGURES " + " ".join(f"{key}={value}" for key, value in figures.items()))


async def rel_read(websocket, count: int, timeout: float) -> list:
    """The next *count* frames, all within *timeout* seconds."""
    deadline = time.monotonic() + timeout
    return [await asyncio.wait_for(websocket.recv(), max(deadline - time.monotonic(), 0.01))
            for _ in range(count)]


class rel_StalledClient:
    """ASGI middleware: outgoing frames wait until `resume` is set -- a client that stopped
    reading, as a server's `send` waits while the socket's write buffer is full."""

    def __init__(self, app):
        self.app = app
        self.resume: asyncio.Event | None = None

    async def __call__(self, scope, receive, send):
        self.resume = asyncio.Event()

        async def stalled_send(event):
            if event["type"] == "websocket.send":
                await self.resume.wait()
            await send(event)

        await self.app(scope, receive, stalled_send)


# -- 1. no silent loss --

def test_reliability_group_fanout_delivers_every_frame_in_order(rel_server):
    """One handler group-sends 200 frames to 200 sockets: all 40,000 arrive, each socket's in order."""
    clients, frames = 200, 200
    assert rel_counts(rel_wait_for_stats(rel_server, REL_IDLE_STATS)) == REL_IDLE_STATS
    dropped_before = rel_stats(rel_server)["dropped"]

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            sockets = []
            for _ in range(clients // 20):
                sockets += await asyncio.gather(*(
                    stack.enter_async_context(ws_connect(rel_server.url("/rel/fanout/")))
                    for _ in range(20)))
            members = rel_stats(rel_server)["members"]
            start = time.monotonic()
            await sockets[0].send(f"fanout {frames}")
            received = await asyncio.gather(*(rel_read(ws, frames, 120) for ws in sockets))
            return members, received, time.monotonic() - start

    members, received, elapsed = run(scenario(), timeout=240)
    assert members == clients
    expected = [str(number) for number in range(frames)]
    in_order = sum(frames_of_one == expected for frames_of_one in received)
    assert in_order == clients, f"{clients - in_order} sockets missed frames or got them out of order"
    assert rel_stats(rel_server)["dropped"] == dropped_before
    assert rel_counts(rel_wait_for_stats(rel_server, REL_IDLE_STATS)) == REL_IDLE_STATS
    rel_report(fanout_frames=clients * frames, fanout_seconds=round(elapsed, 2),
               fanout_frames_per_second=round(clients * frames / elapsed))


@asynchronous
async def test_reliability_drops_at_capacity_are_counted_and_logged_rate_limited(caplog):
    """A member at capacity is skipped, never an exception; each drop is counted, warnings are rate-limited."""
    layer = InMemoryChannelLayer(capacity=2, channel_capacity={"rel.wide": 5})

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        for name in ("rel.a", "rel.b", "rel.wide"):
            await layer.group_add("g", name)
        for number in range(5):
            await layer.group_send("g", {"n": number})
        first = (layer.dropped, layer.stats()["dropped"])
        await asyncio.sleep(1.1)  # past the warning's rate limit
        await layer.group_send("g", {"n": 5})
        queued = {name: [(await layer.receive(name))["n"] for _ in range(count)]
                  for name, count in (("rel.a", 2), ("rel.b", 2), ("rel.wide", 5))}
    assert first == (6, 6)  # messages 2, 3, 4 skipped on rel.a and rel.b
    assert queued == {"rel.a": [0, 1], "rel.b": [0, 1], "rel.wide": [0, 1, 2, 3, 4]}
    assert layer.dropped == layer.stats()["dropped"] == 9  # message 5 skipped by all three
    warnings = [r.getMessage() for r in caplog.records if r.name == "channels_mini"
                and "dropped since the last report" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "Group 'g': 2 message(s) dropped" in warnings[0] and "Total dropped: 2." in warnings[0]
    assert "Group 'g': 7 message(s) dropped" in warnings[1] and "Total dropped: 9." in warnings[1]
    assert layer.stats() == {**REL_ZERO_STATS, "groups": 1, "members": 3, "dropped": 9}


# -- 2. ordering under load --

def test_reliability_ordering_under_load(rel_server):
    """50 sockets x 1,000 frames (half sync, half async consumers): every reply arrives, in order."""
    sockets, per_socket = 50, 1000
    dropped_before = rel_stats(rel_server)["dropped"]

    async def one_socket(index: int) -> list:
        path = "/rel/echo/sync/" if index % 2 else "/rel/echo/async/"
        async with ws_connect(rel_server.url(path)) as websocket:
            async def send_all():
                for number in range(per_socket):
                    await websocket.send(f"{index}:{number}")
            sending = asyncio.create_task(send_all())
            replies = await rel_read(websocket, per_socket, 150)
            await sending
            return replies

    async def scenario():
        start = time.monotonic()
        results = await asyncio.gather(*(one_socket(index) for index in range(sockets)))
        return results, time.monotonic() - start

    results, elapsed = run(scenario(), timeout=200)
    for index, replies in enumerate(results):
        assert replies == [f"{index}:{number}" for number in range(per_socket)], f"socket {index}"
    assert rel_stats(rel_server)["dropped"] == dropped_before
    rel_report(ordering_round_trips=sockets * per_socket, ordering_seconds=round(elapsed, 2),
               ordering_messages_per_second=round(sockets * per_socket / elapsed))


# -- 3. slow and stuck code --

@asynchronous
async def test_reliability_blocked_handler_stalls_only_its_own_socket(rel_server):
    """A sync handler blocked 5 s in its thread and an async one awaiting 5 s hold only their sockets."""
    async with ws_connect(rel_server.url("/rel/echo/sync/")) as blocked_sync, \
            ws_connect(rel_server.url("/rel/echo/async/")) as blocked_async:
        start = time.monotonic()
        for websocket in (blocked_sync, blocked_async):
            await websocket.send("block")
            await websocket.send("after")
        latencies = []
        async with ws_connect(rel_server.url("/rel/echo/sync/")) as other_sync, \
                ws_connect(rel_server.url("/rel/echo/async/")) as other_async:
            while time.monotonic() - start < 3.5:
                for websocket in (other_sync, other_async):
                    sent = time.monotonic()
                    await websocket.send("ping")
                    assert await asyncio.wait_for(websocket.recv(), 3) == "ping"
                    latencies.append(time.monotonic() - sent)
        fresh_socket_works = await rel_echo_works(rel_server, "/rel/echo/sync/")
        replies = {}
        for name, websocket in (("sync", blocked_sync), ("async", blocked_async)):
            first = await asyncio.wait_for(websocket.recv(), 10)
            replies[name] = (first, round(time.monotonic() - start, 1),
                             await asyncio.wait_for(websocket.recv(), 5))
    assert len(latencies) >= 6 and max(latencies) < 2.0, latencies
    assert fresh_socket_works
    for name, (first, seconds, second) in replies.items():
        assert (first, second) == ("unblocked", "after"), name
        assert 4.5 <= seconds < 12, (name, seconds)


def test_reliability_handshakes_load_their_session_while_every_handler_thread_is_blocked(rel_server):
    """32 sync handlers blocked in their threads (the whole pool) do not hold up the session
    load of an http_user handshake: it has threads of its own."""
    user, cookie = rel_login("handshake")

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            blocked = [await stack.enter_async_context(ws_connect(rel_server.url("/rel/echo/sync/")))
                       for _ in range(32)]
            for websocket in blocked:
                await websocket.send("block")  # each holds a pool thread for 5 s
            await asyncio.sleep(0.5)
            start = time.monotonic()
            async with ws_connect(rel_server.url("/rel/whoami/async/"),
                                  additional_headers=[("Cookie", cookie)]) as websocket:
                greeting = await asyncio.wait_for(websocket.recv(), 10)
            took = time.monotonic() - start
            unblocked = [await asyncio.wait_for(websocket.recv(), 15) for websocket in blocked]
            return greeting, took, unblocked

    greeting, took, unblocked = run(scenario(), timeout=60)
    assert greeting == f"hello {user.username}"
    assert took < 2.0, took
    assert unblocked == ["unblocked"] * 32


@asynchronous
async def test_reliability_stalled_reader_group_sends_are_capped_dropped_and_counted(caplog):
    """A client that stops reading holds at most `capacity` queued messages; the rest are dropped
    and counted -- every message is either delivered, in order, or counted -- and the socket stays open."""
    layer = InMemoryChannelLayer(capacity=5)
    stalled = rel_StalledClient(Application([rel_Flood.as_route(path=r"^/rel/flood/$")],
                                            channel_layer=layer))
    frame = [f"{number:08d}".ljust(10, ".") for number in range(50)]

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        client = WebsocketCommunicator(stalled, "/rel/flood/")
        assert (await client.connect())[0]
        await client.send_to(text_data="group 50 10")
        for _ in range(200):  # until the handler's 50 group sends are applied
            if layer.stats()["dropped"] + layer.stats()["messages"] >= 49:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        while_stalled = layer.stats()
        stalled.resume.set()  # the client reads again
        delivered = []
        for _ in range(60):
            try:
                delivered.append(await client.receive_from(timeout=0.3))
            except asyncio.TimeoutError:
                break
        await client.send_to(text_data="direct 1")
        still_open = await client.receive_from()
        await client.disconnect()
    assert {key: while_stalled[key] for key in ("channels", "groups", "members", "messages")} == \
        {"channels": 1, "groups": 1, "members": 1, "messages": 5}  # capacity reached, no more
    assert len(delivered) in (5, 6), delivered  # the queue, plus one frame in the stalled send
    assert len(delivered) + while_stalled["dropped"] == 50  # delivered or counted: nothing silent
    assert delivered[0] == frame[0] and set(delivered) <= set(frame)
    assert sorted(delivered) == delivered and len(set(delivered)) == len(delivered)  # in order
    assert still_open == "0"
    drop_warnings = [r for r in caplog.records if "dropped since the last report" in r.getMessage()]
    assert len(drop_warnings) == 1  # rate-limited: one warning for the burst
    assert layer.stats() == {**REL_ZERO_STATS, "dropped": while_stalled["dropped"]}


@asynchronous
async def test_reliability_stalled_reader_direct_sends_fail_the_handler_after_2s(caplog):
    """Deferred direct sends to a client that stopped reading wait at most 2 s, then fail the
    handler: logged, and the socket closes with 1011; nothing beyond the capacity is held."""
    layer = InMemoryChannelLayer(capacity=5)
    stalled = rel_StalledClient(Application([rel_Flood.as_route(path=r"^/rel/flood/$")],
                                            channel_layer=layer))

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        client = WebsocketCommunicator(stalled, "/rel/flood/")
        assert (await client.connect())[0]
        start = time.monotonic()
        await client.send_to(text_data="direct 20")
        failed = None
        for _ in range(400):
            failed = next((r for r in caplog.records if r.name == "channels_mini"
                           and r.levelno == logging.ERROR), None)
            if failed is not None:
                break
            await asyncio.sleep(0.02)
        waited = time.monotonic() - start
        held = layer.stats()["messages"]
        stalled.resume.set()
        events = []
        for _ in range(25):
            events.append(await client.receive_output(timeout=3))
            if events[-1]["type"] == "websocket.close":
                break
        await client.disconnect()
    assert failed is not None, "the handler's failure was not logged"
    assert failed.exc_info is not None
    assert "closing that socket with 1011" in failed.getMessage()
    assert 1.9 <= waited < 8, waited
    assert held <= 5  # never more than the capacity
    frames = [event.get("text") for event in events[:-1]]
    assert frames == [str(number) for number in range(len(frames))] and len(frames) <= 6, events
    assert events[-1] == {"type": "websocket.close", "code": 1011}
    assert layer.stats() == {**REL_ZERO_STATS, "dropped": 0}


def rel_serving_pid(server: Server) -> int:
    """The process that serves: the server's own, or its worker (Hypercorn spawns one, beside
    multiprocessing's resource tracker)."""
    workers = [child for child in psutil.Process(server.process.pid).children(recursive=True)
               if "spawn_main" in " ".join(child.cmdline())]
    return workers[0].pid if workers else server.process.pid


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn"])
def test_reliability_client_that_stops_reading_cannot_grow_server_memory(kind):
    """A real client stops reading while 50 MB are group-sent to it: the server holds at most
    its reply channel's capacity (100 frames), drops and counts the rest, and its RSS stays flat.
    (daphne never makes a send wait, so it buffers all of it: docs/guarantees.md.)"""
    frames, size = 5000, 10_000
    with running_server(kind, app=f"{__name__}:rel_app") as server:
        pid = rel_serving_pid(server)

        async def scenario():
            async with ws_connect(server.url("/rel/flood/"), compression=None, max_queue=1) as stalled, \
                    ws_connect(server.url("/rel/flood-producer/")) as producer:
                before = rel_rss(pid)
                for _ in range(frames // 100):
                    await producer.send(f"group 100 {size}")
                await producer.send("direct 1")
                assert await asyncio.wait_for(producer.recv(), 60) == "0"  # every group send applied
                await asyncio.sleep(0.5)
                during = rel_stats(server), rel_rss(pid)
                first = await asyncio.wait_for(stalled.recv(), 5)  # it can still read, from the start
            return before, during, first

        before, (stats, after), first = run(scenario(), timeout=120)
        idle = rel_wait_for_stats(server, REL_IDLE_STATS)
    assert first == "00000000".ljust(size, ".")
    assert stats["members"] == 1 and stats["messages"] <= 100, stats
    assert stats["dropped"] >= frames // 2, stats  # the kernel's socket buffers took some; the rest dropped
    assert rel_counts(idle) == REL_IDLE_STATS
    growth = (after - before) / 2**20
    rel_report(stalled_offered_mb=round(frames * size / 2**20), stalled_dropped=stats["dropped"],
               stalled_queued=stats["messages"], stalled_rss_growth_mb=round(growth, 2))
    assert growth < 20


# -- 4. faults --

@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_reliability_raising_handler_closes_only_its_socket(rel_server, flavour):
    """An exception closes that socket with 1011 and is logged with its traceback; others carry on."""
    start = len(rel_server.log())

    async def scenario():
        async with ws_connect(rel_server.url(f"/rel/echo/{flavour}/")) as failing, \
                ws_connect(rel_server.url(f"/rel/echo/{flavour}/")) as neighbour:
            await failing.send("raise")
            closed = await rel_until_closed(failing)
            await neighbour.send("still here")
            return closed, await asyncio.wait_for(neighbour.recv(), 5)

    closed, neighbour_reply = run(scenario())
    assert closed == ([], 1011)
    assert neighbour_reply == "still here"
    assert run(rel_echo_works(rel_server))
    cls = "rel_SyncEcho" if flavour == "sync" else "rel_AsyncEcho"
    log = rel_wait_for_log(rel_server, f"RuntimeError: {cls} raised on purpose", start)
    assert (f"Consumer failed on websocket.receive for /rel/echo/{flavour}/ (order 1); "
            f"closing that socket with 1011.") in log
    assert "Traceback (most recent call last)" in log
    assert f"RuntimeError: {cls} raised on purpose" in log


def test_reliability_vanished_clients_leave_no_channel_or_membership(rel_server):
    """Clients that vanish (TCP abort) while their handlers run leave zero channels and members."""
    assert rel_counts(rel_wait_for_stats(rel_server, REL_IDLE_STATS)) == REL_IDLE_STATS
    start = len(rel_server.log())

    async def scenario():
        sockets = []
        for index in range(10):
            flavour = "sync" if index % 2 else "async"
            websocket = await ws_connect(rel_server.url(f"/rel/vanish/{flavour}/"))
            sockets.append((websocket, f"slow-{flavour}"))
        connected = rel_stats(rel_server)
        for websocket, text in sockets:
            await websocket.send(text)
        await asyncio.sleep(0.3)  # the handlers are now sleeping
        for websocket, _ in sockets:
            websocket.transport.abort()
        return connected

    connected = run(scenario())
    assert {key: connected[key] for key in ("channels", "groups", "members")} == \
        {"channels": 11, "groups": 1, "members": 10}
    assert rel_counts(rel_wait_for_stats(rel_server, REL_IDLE_STATS)) == REL_IDLE_STATS
    time.sleep(1)  # the late replies have been attempted
    assert rel_counts(rel_stats(rel_server)) == REL_IDLE_STATS
    assert "Traceback" not in rel_server.log()[start:]


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_reliability_shutdown_runs_disconnect_handlers_and_stops_workers(tmp_path, signal_name):
    """SIGINT/SIGTERM with sockets open: every disconnect handler runs, the background job in
    hand finishes, and the process exits promptly."""
    names = ["sync0", "sync1", "async0", "async1"]
    with running_server(app=f"{__name__}:rel_app", env={REL_MARKERS_ENV: str(tmp_path)}) as server:
        async def scenario():
            sockets = []
            for name in names:
                flavour = name[:-1]
                websocket = await ws_connect(server.url(f"/rel/marker/{flavour}/{name}/"))
                await websocket.send("work" if name == "sync0" else "hello")
                assert await asyncio.wait_for(websocket.recv(), 5) == "ok"
                sockets.append(websocket)
            for _ in range(100):  # until the background job is running
                if (tmp_path / "work-started-sync0").exists():
                    break
                await asyncio.sleep(0.05)
            signalled = time.monotonic()
            server.process.send_signal(getattr(signal, signal_name))
            for _ in range(300):
                if server.process.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            exited_after = time.monotonic() - signalled
            codes = [(await rel_until_closed(websocket, timeout=5))[1] for websocket in sockets]
            return exited_after, codes

        exited_after, codes = run(scenario())
        log = server.log()
    # uvicorn re-raises the signal once its graceful shutdown is done
    assert server.process.returncode in (0, -getattr(signal, signal_name)), log
    assert exited_after < 8, exited_after
    markers = {path.name: path.read_text() for path in tmp_path.iterdir()}
    assert {f"disconnect-{name}" for name in names} <= set(markers), markers
    assert "work-done-sync0" in markers  # the message in hand was finished
    assert "Traceback" not in log, log
    assert set(codes) <= {1012, 1001, 1006, None}, codes
    rel_report(**{f"shutdown_{signal_name}_seconds": round(exited_after, 2)})


# -- 5. leaks --

@asynchronous(timeout=300)
async def test_reliability_communicator_cycles_leave_nothing_behind():
    """10,000 connect/echo/disconnect cycles: zero channels and members; RSS grows < 10 MB."""
    layer = InMemoryChannelLayer()
    app = Application([rel_Leak.as_route(path=r"^/async/$"), rel_SyncLeak.as_route(path=r"^/sync/$")],
                      channel_layer=layer)

    async def cycles(count: int) -> None:
        for index in range(count):
            communicator = WebsocketCommunicator(app, "/sync/" if index % 2 else "/async/")
            connected, _ = await communicator.connect()
            assert connected
            await communicator.send_to(text_data="x")
            assert await communicator.receive_from() == "x"
            await communicator.disconnect()

    with rel_captured_logs() as records:
        await cycles(1000)  # warm-up: thread pool, caches, allocator arenas
        before, tasks_before = rel_rss(), len(asyncio.all_tasks())
        start = time.monotonic()
        await cycles(10_000)
        elapsed = time.monotonic() - start
        await asyncio.sleep(0.1)
        after, tasks = rel_rss(), len(asyncio.all_tasks()) - tasks_before
    assert layer.stats() == {**REL_ZERO_STATS, "dropped": 0}
    assert tasks == 0  # no relay or handler task outlives its socket
    assert records == []
    growth = (after - before) / 2**20
    rel_report(communicator_cycles=10_000, communicator_seconds=round(elapsed, 1),
               communicator_rss_before_mb=round(before / 2**20, 1),
               communicator_rss_growth_mb=round(growth, 2))
    assert growth < 10


def test_reliability_server_cycles_leave_nothing_behind():
    """1,000 connect/echo/close cycles through uvicorn: zero channels and members; server RSS grows < 10 MB."""
    async def cycle(index: int) -> None:
        path = "/rel/leak/sync/" if index % 2 else "/rel/leak/async/"
        async with ws_connect(rel_server.url(path)) as websocket:
            await websocket.send("x")
            assert await asyncio.wait_for(websocket.recv(), 5) == "x"

    async def cycles(count: int) -> None:
        for batch in range(0, count, 10):
            await asyncio.gather(*(cycle(batch + index) for index in range(10)))

    with running_server(app=f"{__name__}:rel_leak_app") as rel_server:
        pid = rel_server.process.pid
        run(cycles(200), timeout=120)  # warm-up
        rel_wait_for_stats(rel_server, REL_ZERO_STATS)
        before = rel_rss(pid)
        start = time.monotonic()
        run(cycles(1000), timeout=300)
        elapsed = time.monotonic() - start
        stats = rel_wait_for_stats(rel_server, REL_ZERO_STATS)
        after = rel_rss(pid)
    assert rel_counts(stats) == REL_ZERO_STATS
    growth = (after - before) / 2**20
    rel_report(server_cycles=1000, server_cycles_seconds=round(elapsed, 1),
               server_rss_before_mb=round(before / 2**20, 1), server_rss_growth_mb=round(growth, 2))
    assert growth < 10


# -- expiry --

@asynchronous
async def test_reliability_expired_messages_are_skipped_and_free_capacity():
    """A message older than `expiry` is never delivered and no longer takes room in its channel."""
    layer = InMemoryChannelLayer(expiry=0.2, capacity=1)

    await layer.send("rel.a", {"n": 1})
    with pytest.raises(ChannelFull, match=re.escape(
            "Channel 'rel.a' holds 1 messages, its capacity. Its receiver is slow or gone; "
            "raise 'capacity' or 'channel_capacity' if bursts are expected.")):
        await layer.send("rel.a", {"n": 2})
    await asyncio.sleep(0.3)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("rel.a"), 0.05)
    await layer.send("rel.a", {"n": 3})
    assert await asyncio.wait_for(layer.receive("rel.a"), 1) == {"n": 3}
    assert layer.stats() == {**REL_ZERO_STATS, "dropped": 0}


@asynchronous
async def test_reliability_group_membership_expires():
    """A member older than `group_expiry` is dropped from the group and gets nothing."""
    layer = InMemoryChannelLayer(group_expiry=0.2)

    await layer.group_add("g", "rel.old")
    await asyncio.sleep(0.3)
    await layer.group_add("g", "rel.new")
    await layer.group_send("g", {"n": 1})
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("rel.old"), 0.05)
    assert await asyncio.wait_for(layer.receive("rel.new"), 1) == {"n": 1}
    assert layer.stats() == {**REL_ZERO_STATS, "groups": 1, "members": 1, "dropped": 0}


@asynchronous
async def test_reliability_expired_messages_on_unread_channels_are_freed():
    """Replies sent to channels nobody reads any more (e.g. sockets that have gone) are freed
    once expired, as Channels' in-memory layer does: they cannot pile up for the server's life."""
    layer = InMemoryChannelLayer(expiry=0.1)

    for number in range(100):
        await layer.send(f"websocket.send.gone{number}", {"text": "too late"})
    await asyncio.sleep(0.2)
    for _ in range(3):  # ordinary traffic goes on elsewhere
        await layer.send("rel.live", {"n": 1})
        await layer.receive("rel.live")
    assert layer.stats() == {**REL_ZERO_STATS, "dropped": 0}


# -- 6. hostile input --

async def rel_frames_then_close(server: Server, path: str, *frames, **connect_options):
    """Send *frames* on a new socket; return (frames received, close code)."""
    async with ws_connect(server.url(path), **connect_options) as websocket:
        for frame in frames:
            await websocket.send(frame)
        return await rel_until_closed(websocket)


async def rel_invalid_utf8_text_frame(server: Server):
    """A text frame whose payload is not UTF-8, written raw: websocket clients refuse to build one."""
    async with ws_connect(server.url("/rel/echo/async/"), compression=None) as websocket:
        payload = b"\xff\xfe not utf-8"
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        websocket.transport.write(bytes([0x81, 0x80 | len(payload)]) + mask + masked)  # FIN+text, masked
        return await rel_until_closed(websocket)


rel_LONG_NAME = "a" * 200
rel_HOSTILE_ROWS = [
    # (id, scenario, expected (frames, close code), text the server log must show)
    ("binary-to-json-consumer", lambda s: rel_frames_then_close(s, "/rel/json/", b"\x00\xff"),
     ([], 1003), "rel_Json got a binary frame on /rel/json/; it takes JSON text. Closing with 1003."),
    ("invalid-json", lambda s: rel_frames_then_close(s, "/rel/json/", "{not json"),
     ([], 1007), "rel_Json got invalid JSON on /rel/json/"),
    ("json-nested-too-deep-for-python", lambda s: rel_frames_then_close(
        s, "/rel/json/", "[" * 100_000 + "]" * 100_000), ([], 1007), "rel_Json got invalid JSON on /rel/json/"),
    ("invalid-utf8-text-frame", rel_invalid_utf8_text_frame, ([], 1007),
     "Invalid UTF-8 sequence received from client."),
    ("text-over-max-message-size", lambda s: rel_frames_then_close(
        s, "/rel/echo/async/", "x" * (2**20 + 1)), ([], 1009),
     "Closing websocket /rel/echo/async/ with 1009: a frame of 1048577 bytes exceeds max_message_size=1048576."),
    ("multibyte-text-over-max-message-size", lambda s: rel_frames_then_close(
        s, "/rel/echo/async/", "é" * (2**19 + 1)), ([], 1009), "a frame of 1048578 bytes exceeds"),
    ("bytes-over-max-message-size", lambda s: rel_frames_then_close(
        s, "/rel/echo/sync/", b"\x00" * (2**20 + 1)), ([], 1009), "a frame of 1048577 bytes exceeds"),
    ("group-name-with-bang-from-url", lambda s: rel_frames_then_close(s, "/rel/named/a!b/", "group"),
     ([], 1011), "(order 1): Group name 'rel-a!b' is invalid: use fewer than 100 ASCII letters"),
    ("group-name-of-200-chars-from-url", lambda s: rel_frames_then_close(
        s, f"/rel/named/{rel_LONG_NAME}/", "group"), ([], 1011), f"Group name 'rel-{rel_LONG_NAME}' is invalid"),
    ("group-name-non-ascii-from-url", lambda s: rel_frames_then_close(s, "/rel/named/caf%C3%A9/", "group"),
     ([], 1011), "Group name 'rel-café' is invalid"),
    ("channel-name-with-two-bangs-from-url", lambda s: rel_frames_then_close(
        s, "/rel/named/a!b!c/", "channel"), ([], 1011), "Channel name 'rel.a!b!c' is invalid"),
    ("non-dict-channel-send", lambda s: rel_frames_then_close(s, "/rel/nondict/", "channel"),
     ([], 1011), "TypeError: Content must be a dict (got str 'plain text')."),
    ("non-dict-group-send", lambda s: rel_frames_then_close(s, "/rel/nondict/", "group"),
     ([], 1011), "TypeError: Content must be a dict (got list ['a', 'list'])."),
    ("non-dict-reply-send", lambda s: rel_frames_then_close(s, "/rel/nondict/", "reply"),
     ([], 1011), "TypeError: Content must be a dict (got NoneType None)."),
]


@pytest.mark.parametrize("scenario, expected, logged", [row[1:] for row in rel_HOSTILE_ROWS],
                         ids=[row[0] for row in rel_HOSTILE_ROWS])
def test_reliability_hostile_input_closes_that_socket_only(rel_server, scenario, expected, logged):
    """Each hostile frame closes its own socket with the documented code and is logged;
    the server keeps serving."""
    start = len(rel_server.log())
    assert run(scenario(rel_server)) == expected
    assert logged in rel_wait_for_log(rel_server, logged, start)
    assert run(rel_echo_works(rel_server))


@asynchronous
async def test_reliability_frame_at_max_message_size_is_accepted(rel_server):
    """Exactly max_message_size bytes (1 MiB by default) still goes through."""
    async with ws_connect(rel_server.url("/rel/echo/async/"), max_size=None) as websocket:
        await websocket.send("x" * 2**20)
        echoed = await asyncio.wait_for(websocket.recv(), 10)
    assert echoed == "x" * 2**20


def test_reliability_bad_group_name_in_connection_groups_rejects_the_handshake(rel_server):
    """A group name built from the URL that the layer refuses fails connect: 403, and one
    short WARNING line -- no traceback, and nothing more when the disconnect follows."""
    start = len(rel_server.log())
    assert rel_handshake_status(rel_server, "/rel/named-connect/a!b/") == 403
    log = rel_wait_for_log(rel_server, "Group name 'rel-a!b' is invalid", start)
    time.sleep(0.3)  # the disconnect that follows must add nothing
    log = rel_server.log()[start:]
    assert "Consumer failed on websocket.connect for /rel/named-connect/a!b/" in log
    assert "Group name 'rel-a!b' is invalid" in log
    assert "or refusing its handshake (HTTP 403) if not accepted yet." in log  # what it got
    assert log.count("\n") == 1 and "Traceback" not in log and len(log) < 600, log
    assert rel_handshake_status(rel_server, "/rel/named-connect/fine/") == 101
    assert run(rel_echo_works(rel_server))


@asynchronous
async def test_reliability_malformed_multiplexed_frames_get_an_error_and_the_socket_stays_open(rel_server):
    """Malformed frames and unknown streams are answered with {"error"}; the socket stays open."""
    streams = "['denied', 'echo', 'notes', 'open', 'pick']"
    rows = [
        ("not json", "Invalid multiplexed frame"),
        (b"\x00binary", "Invalid multiplexed frame"),
        ("[1, 2]", "Invalid multiplexed frame (received [1, 2])"),
        ('"just a string"', "Invalid multiplexed frame (received 'just a string')"),
        ('{"stream": "echo"}', "Invalid multiplexed frame (received {'stream': 'echo'})"),
        ('{"payload": {}}', "Invalid multiplexed frame (received {'payload': {}})"),
        ('{"stream": "nope", "payload": {}}', f"Unknown stream 'nope'; this socket has {streams}."),
        ('{"stream": 5, "payload": {}}', f"Unknown stream 5; this socket has {streams}."),
        ('{"stream": null, "payload": {}}', f"Unknown stream None; this socket has {streams}."),
        ('{"stream": "echo", "payload": [1]}', "Payload of stream 'echo' must be a JSON object (received [1])."),
        ('{"stream": "echo", "payload": "x"}', "Payload of stream 'echo' must be a JSON object (received 'x')."),
    ]

    answers = []
    async with ws_connect(rel_server.url("/rel/demux/")) as websocket:
        for frame, _ in rows:
            await websocket.send(frame)
            answers.append(json.loads(await asyncio.wait_for(websocket.recv(), 5)))
        await websocket.send('{"stream": "echo", "payload": {"still": "open"}}')
        answers.append(json.loads(await asyncio.wait_for(websocket.recv(), 5)))
    for (frame, expected), answer in zip(rows, answers):
        assert set(answer) == {"error"} and expected in answer["error"], (frame, answer)
    assert answers[-1] == {"stream": "echo", "payload": {"echo": {"still": "open"}}}
    assert await rel_echo_works(rel_server)


def rel_note_rows() -> list:
    return list(rel_Note.objects.order_by("pk").values_list("pk", "title", "count", "owner_id"))


def rel_fuzz_rows() -> list:
    return list(rel_FuzzNote.objects.order_by("pk").values_list("pk", "title", "count", "when", "owner_id"))


rel_INVALID = re.compile(r"Invalid data: .+", re.S)
rel_ANY_ERROR = re.compile(r".+", re.S)  # SPEC: {"error": "<why>"}
rel_BINDING_ROWS = [
    # (id, stream, request, expected error: exact text or a pattern)
    ("unknown-action", "notes", {"action": "explode", "pk": "{mine}", "data": {}},
     "Unknown action 'explode'; use one of ['create', 'update', 'delete']."),
    ("missing-action", "notes", {"pk": "{mine}", "data": {"title": "x"}},
     "Unknown action None; use one of ['create', 'update', 'delete']."),
    ("update-without-pk", "notes", {"action": "update", "data": {"title": "x"}}, "Action 'update' needs a 'pk'."),
    ("delete-without-pk", "notes", {"action": "delete"}, "Action 'delete' needs a 'pk'."),
    ("unknown-field", "notes", {"action": "update", "pk": "{mine}", "data": {"nope": 1}},
     "Unknown field(s) ['nope']; this binding accepts ['count', 'owner', 'title']."),
    ("primary-key-as-field", "notes", {"action": "update", "pk": "{mine}", "data": {"id": "{theirs}"}},
     "Unknown field(s) ['id']; this binding accepts ['count', 'owner', 'title']."),
    ("wrong-type", "notes", {"action": "update", "pk": "{mine}", "data": {"count": "many"}}, rel_INVALID),
    ("too-long", "notes", {"action": "update", "pk": "{mine}", "data": {"title": "x" * 50}},
     "Invalid data: {'title': ['Ensure this value has at most 20 characters (it has 50).']}."),
    ("data-not-an-object", "notes", {"action": "update", "pk": "{mine}", "data": ["title"]},
     "'data' must be a JSON object of field values (received ['title'])."),
    ("owner-that-does-not-exist", "notes", {"action": "create", "data": {"title": "x", "owner": 10**9}},
     rel_INVALID),
    ("update-other-users-object", "notes", {"action": "update", "pk": "{theirs}", "data": {"title": "mine now"}},
     "Permission denied: update on pk {theirs}."),
    ("delete-other-users-object", "notes", {"action": "delete", "pk": "{theirs}"},
     "Permission denied: delete on pk {theirs}."),
    ("denied-by-default-create", "denied", {"action": "create", "data": {"title": "nope"}},
     "Permission denied: create on pk None."),
    ("denied-by-default-update-own", "denied", {"action": "update", "pk": "{mine}", "data": {"title": "nope"}},
     "Permission denied: update on pk {mine}."),
    ("null-for-a-not-null-field", "open", {"action": "create", "data": {"title": None}}, rel_ANY_ERROR),
    ("pk-of-wrong-type", "open", {"action": "update", "pk": "abc", "data": {"title": "x"}},
     "Invalid pk 'abc': “abc” value must be an integer."),
    ("pk-list", "open", {"action": "delete", "pk": [1]},
     "Invalid pk [1]: “[1]” value must be an integer."),
    ("pk-too-large-for-the-database", "open", {"action": "update", "pk": 10**30, "data": {"title": "x"}},
     re.compile(r"(Invalid data: .+|\S+\.rel_fuzznote with pk 10{30} does not exist\.)")),
]


def rel_fill(value, names: dict):
    """Replace "{mine}"/"{theirs}" in a request with those notes' primary keys."""
    if isinstance(value, dict):
        return {key: rel_fill(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [rel_fill(item, names) for item in value]
    if isinstance(value, str) and value in ("{mine}", "{theirs}"):
        return names[value[1:-1]]
    return value


@pytest.mark.parametrize("stream, request_payload, expected", [row[1:] for row in rel_BINDING_ROWS],
                         ids=[row[0] for row in rel_BINDING_ROWS])
def test_reliability_hostile_binding_request_answers_an_error_and_saves_nothing(
        rel_server, stream, request_payload, expected):
    """A refused or invalid inbound binding request saves nothing and answers with an error
    payload on its stream; the socket stays open (real server, signed-in user's cookie)."""
    owner, cookie = rel_login("owner")
    other, _ = rel_login("other")
    names = {"mine": rel_Note.objects.create(title="mine", count=1, owner=owner).pk,
             "theirs": rel_Note.objects.create(title="theirs", count=2, owner=other).pk}
    rel_FuzzNote.objects.get_or_create(pk=1, defaults={"title": "one"})
    request_payload = rel_fill(request_payload, names)
    before = (rel_note_rows(), rel_fuzz_rows())

    async def scenario():
        async with ws_connect(rel_server.url("/rel/demux/"), additional_headers={"Cookie": cookie}) as websocket:
            await websocket.send(json.dumps({"stream": stream, "payload": request_payload}))
            answer = json.loads(await asyncio.wait_for(websocket.recv(), 10))
            await websocket.send('{"stream": "echo", "payload": {"still": "open"}}')
            return answer, json.loads(await asyncio.wait_for(websocket.recv(), 10))

    answer, still_open = run(scenario())
    assert answer["stream"] == stream and set(answer["payload"]) == {"error", "action", "pk"}, answer
    assert (answer["payload"]["action"], answer["payload"]["pk"]) == \
        (request_payload.get("action"), request_payload.get("pk"))
    error = answer["payload"]["error"]
    if isinstance(expected, re.Pattern):
        assert expected.fullmatch(error), error
    else:
        assert error == expected.replace("{mine}", str(names["mine"])).replace("{theirs}", str(names["theirs"]))
    assert still_open == {"stream": "echo", "payload": {"echo": {"still": "open"}}}
    assert (rel_note_rows(), rel_fuzz_rows()) == before
    assert run(rel_echo_works(rel_server))


def test_reliability_valid_binding_request_by_the_owner_is_applied(rel_server):
    """The control for the rows above: the owner's valid update is saved (and answers nothing)."""
    owner, cookie = rel_login("owner")
    mine = rel_Note.objects.create(title="mine", count=1, owner=owner)

    async def scenario():
        async with ws_connect(rel_server.url("/rel/demux/"), additional_headers={"Cookie": cookie}) as websocket:
            await websocket.send(json.dumps({"stream": "notes", "payload": {
                "action": "update", "pk": mine.pk, "data": {"title": "renamed", "count": 7}}}))
            await websocket.send('{"stream": "echo", "payload": {"done": true}}')
            return json.loads(await asyncio.wait_for(websocket.recv(), 10))

    assert run(scenario()) == {"stream": "echo", "payload": {"echo": {"done": True}}}
    mine.refresh_from_db()
    assert (mine.title, mine.count) == ("renamed", 7)


def test_reliability_inbound_create_cannot_choose_the_primary_key(rel_server):
    """A client's create never picks the new row's primary key (Channels 1.x ignored it): it
    cannot overwrite an existing row, and one at the top of the id range would make every
    later insert into the table fail."""
    ensure_database()
    existing = rel_PkNote.objects.create(title="existing")
    top = 2**63 - 1

    async def scenario():
        async with ws_connect(rel_server.url("/rel/demux/")) as websocket:
            for payload in ({"action": "create", "pk": existing.pk, "data": {"title": "overwritten"}},
                            {"action": "create", "pk": top, "data": {"title": "top"}},
                            {"action": "create", "data": {"title": "next"}}):
                await websocket.send(json.dumps({"stream": "pick", "payload": payload}))
            await websocket.send('{"stream": "echo", "payload": {"done": true}}')
            replies = []
            for _ in range(4):
                reply = json.loads(await asyncio.wait_for(websocket.recv(), 10))
                if reply["stream"] == "echo":
                    return replies
                replies.append(reply)
        raise AssertionError(replies)

    replies = run(scenario())
    assert rel_PkNote.objects.get(pk=existing.pk).title == "existing", replies
    assert not rel_PkNote.objects.filter(pk=top).exists(), replies
    assert rel_PkNote.objects.filter(title="next").exists(), replies  # the table still takes rows
    assert all(reply["payload"]["action"] == "create" and "error" in reply["payload"]
               for reply in replies), replies


def test_reliability_infinity_nan_and_out_of_range_numbers_get_an_error_payload(rel_server):
    """JSON's Infinity and NaN (which Python reads as floats) and numbers beyond a column's
    range, as a pk, an integer or a foreign key: each gets an error payload that is valid
    JSON, nothing is saved, and the socket stays open."""
    rel_FuzzNote.objects.get_or_create(pk=1, defaults={"title": "one"})
    before = rel_fuzz_rows()
    not_finite = "Invalid data: field(s) [{!r}] hold Infinity or NaN; send finite numbers."
    requests = [  # (raw JSON payload, expected error: exact text or a pattern)
        ('{"action": "update", "pk": Infinity, "data": {"title": "x"}}',
         "Invalid pk inf: no row has it; send the pk as the server sent it."),
        ('{"action": "delete", "pk": NaN}', "Invalid pk nan: no row has it; send the pk as the server sent it."),
        ('{"action": "update", "pk": -Infinity, "data": {}}',
         "Invalid pk -inf: no row has it; send the pk as the server sent it."),
        ('{"action": "create", "data": {"count": Infinity}}', not_finite.format("count")),
        ('{"action": "create", "data": {"count": NaN}}', not_finite.format("count")),
        ('{"action": "create", "data": {"owner": Infinity}}', not_finite.format("owner")),
        ('{"action": "create", "data": {"title": -Infinity}}', not_finite.format("title")),
        ('{"action": "create", "data": {"count": 1e400}}', not_finite.format("count")),
        ('{"action": "create", "data": {"count": 100000000000000000000000000000}}',
         "Invalid data: {'count': ['Ensure this value is less than or equal to 9223372036854775807.']}."),
        ('{"action": "create", "data": {"owner": 100000000000000000000000000000}}', rel_INVALID),
        ('{"action": "update", "pk": 100000000000000000000000000000, "data": {"title": "x"}}',
         re.compile(r"\S+\.rel_fuzznote with pk 10{29} does not exist\.")),
    ]

    async def scenario():
        async with ws_connect(rel_server.url("/rel/demux/")) as websocket:
            answers = []
            for payload, _ in requests:
                await websocket.send(f'{{"stream": "open", "payload": {payload}}}')
                answers.append(await asyncio.wait_for(websocket.recv(), 10))
            await websocket.send('{"stream": "echo", "payload": {"still": "open"}}')
            return answers, json.loads(await asyncio.wait_for(websocket.recv(), 10))

    answers, still_open = run(scenario())
    for (payload, expected), answer in zip(requests, answers):
        reply = json.loads(answer, parse_constant=lambda name: pytest.fail(f"{name} in {answer}"))
        error = reply["payload"]["error"]
        assert expected.fullmatch(error) if isinstance(expected, re.Pattern) else error == expected, \
            (payload, error)
    assert still_open == {"stream": "echo", "payload": {"echo": {"still": "open"}}}
    assert rel_fuzz_rows() == before


# -- 7. origins and auth --

def test_reliability_foreign_origin_with_session_cookie_is_rejected_before_any_consumer(rel_server):
    """Cross-site websocket hijacking: a valid session cookie from a foreign Origin gets 403,
    and the consumer never runs; from the site's own origin the same cookie works."""
    user, cookie = rel_login("victim")
    foreign, own = uuid.uuid4().hex, uuid.uuid4().hex
    start = len(rel_server.log())
    status = rel_handshake_status(rel_server, f"/rel/cswsh/{foreign}/", origin="http://evil.example",
                                  additional_headers={"Cookie": cookie})
    assert status == 403

    async def own_origin():
        async with ws_connect(rel_server.url(f"/rel/cswsh/{own}/"), origin=f"http://127.0.0.1:{rel_server.port}",
                              additional_headers={"Cookie": cookie}) as websocket:
            return await asyncio.wait_for(websocket.recv(), 5)

    assert run(own_origin()) == f"hello {user.get_username()}"
    markers = os.listdir(rel_server.markers)
    assert f"cswsh-{own}" in markers  # the consumer writes it whenever it runs ...
    assert f"cswsh-{foreign}" not in markers  # ... and never ran for the foreign origin
    assert (f"Rejected websocket to /rel/cswsh/{foreign}/ from origin 'http://evil.example'"
            in rel_wait_for_log(rel_server, "http://evil.example", start))


@pytest.mark.parametrize("origin, status", [
    ("http://evil.example", 403),
    ("http://127.0.0.1.evil.example", 403),
    ("http://evil-localhost", 403),
    ("http://localhost.evil.example:8000", 403),
    ("null", 403),
    ("", 403),
    ("not a url", 403),
    ("http://localhost:3000", 101),
    ("https://127.0.0.1", 101),
    ("http://TESTSERVER", 101),
    (None, 101),
])
def test_reliability_origin_check_on_a_real_server(rel_server, origin, status):
    """Default policy (settings.ALLOWED_HOSTS = 127.0.0.1, localhost, testserver) through uvicorn."""
    assert rel_handshake_status(rel_server, "/rel/echo/async/", origin=origin) == status


rel_connected_paths: list[str] = []


class rel_Recorder(WebsocketConsumer):
    async def connect(self, message, **kwargs):
        rel_connected_paths.append(self.path)
        message.reply_channel.send({"accept": True})


rel_ORIGIN_CASES = [
    # (patterns, Origin header or None for none, allowed?)
    ([".example.com"], "http://example.com", True),
    ([".example.com"], "https://www.example.com", True),
    ([".example.com"], "http://a.b.example.com:8080", True),
    ([".example.com"], "http://WWW.EXAMPLE.COM", True),
    ([".example.com"], "http://evilexample.com", False),
    ([".example.com"], "http://example.com.evil.net", False),
    (["example.com"], "http://example.com:8000", True),
    (["example.com"], "https://example.com", True),
    (["example.com"], "http://www.example.com", False),
    (["example.com:8000"], "http://example.com:8000", True),
    (["example.com:8000"], "http://example.com:9000", False),
    (["example.com:8000"], "http://example.com", False),
    (["*"], "http://anything.test:1234", True),
    (["*"], "null", False),
    (["*"], "", False),
    (["null"], "null", True),
    (["null"], "http://example.com", False),
    (["example.com", "null"], "null", True),
    ([], "http://example.com", False),
    (["example.com"], "", False),
    (["example.com"], None, True),
]


def rel_origin_allowed(app: Application, origin: str | None) -> tuple[bool, list]:
    rel_connected_paths.clear()

    async def attempt():
        headers = [] if origin is None else [("origin", origin)]
        client = WebsocketCommunicator(app, "/origin/", headers=headers)
        connected, _ = await client.connect()
        await client.disconnect()
        return connected

    return run(attempt()), list(rel_connected_paths)


@pytest.mark.parametrize("patterns, origin, allowed", rel_ORIGIN_CASES)
def test_reliability_origin_patterns_via_allowed_origins(patterns, origin, allowed):
    """Application(allowed_origins=...) takes ALLOWED_HOSTS patterns; refused handshakes run no consumer."""
    app = Application([rel_Recorder.as_route(path=r"^/origin/$")], allowed_origins=patterns,
                      channel_layer=InMemoryChannelLayer())
    assert rel_origin_allowed(app, origin) == (allowed, ["/origin/"] if allowed else [])


@pytest.mark.parametrize("patterns, origin, allowed", rel_ORIGIN_CASES)
def test_reliability_origin_patterns_via_allowed_hosts_setting(patterns, origin, allowed):
    """Without allowed_origins, settings.ALLOWED_HOSTS decides, with the same results."""
    from django.test import override_settings

    app = Application([rel_Recorder.as_route(path=r"^/origin/$")], channel_layer=InMemoryChannelLayer())
    with override_settings(ALLOWED_HOSTS=patterns):
        assert rel_origin_allowed(app, origin) == (allowed, ["/origin/"] if allowed else [])


@pytest.mark.parametrize("debug, origin, allowed", [
    (True, "http://localhost:3000", True),
    (True, "http://127.0.0.1:8000", True),
    (True, "http://app.localhost", True),
    (True, "http://example.com", False),
    (True, "null", False),
    (False, "http://localhost:3000", False),
])
def test_reliability_empty_allowed_hosts_allows_only_local_origins_in_debug(debug, origin, allowed):
    """As Django: with ALLOWED_HOSTS empty, DEBUG allows local hosts only, and production none."""
    from django.test import override_settings

    app = Application([rel_Recorder.as_route(path=r"^/origin/$")], channel_layer=InMemoryChannelLayer())
    with override_settings(ALLOWED_HOSTS=[], DEBUG=debug):
        assert rel_origin_allowed(app, origin)[0] is allowed


# -- 8. property-based tests --

rel_PROPERTY_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])


def rel_make_consumer(number: int):
    def consumer(message, **kwargs):
        pass
    consumer.__name__ = consumer.__qualname__ = f"rel_consumer_{number}"
    return consumer


rel_CONSUMERS = [rel_make_consumer(number) for number in range(8)]
# Channels of the test's own: their messages may carry any key (a filter on `room` over
# websocket.* messages is refused when the route is made, as no such message has one).
rel_ROUTE_CHANNELS = ["rel.connect", "rel.receive", "rel.other"]
rel_FILTER_PATTERNS = {  # each key's patterns use their own group names
    "path": [r"^/chat/(?P<room>\w+)/$", r"/chat", r"^/(?P<first>[a-z]+)", r".*", r"^$",
             r"^/chat/(?P<room>[a-z]+)", r"(?:/room)+"],
    "text": [r"(?P<word>[a-z]+)", r"^hi$", r"\d"],
    "room": [r"(?P<digits>\d+)$", r"[a-z]"],
}
rel_PREFIX_PATTERNS = {  # `room`/`word` may clash with inner names: the inner ones win
    "path": [r"^/chat", r"^/(?P<room>[a-z]+)", r"/", r""],
    "text": [r"h", r"(?P<word>[a-z])"],
}
rel_ALPHABET = "/chatromi19é!"
rel_message_values = st.one_of(
    st.text(alphabet=rel_ALPHABET, max_size=12),
    st.text(alphabet=rel_ALPHABET, max_size=12).map(lambda text: text.encode("utf-8")),  # é: not ASCII
    st.sampled_from(["/chat/lobby/", "/chat/", "hi", b"/chat/abc/", "/room/room", "42"]),
    st.none(), st.integers(), st.floats(allow_nan=False), st.lists(st.text(max_size=2), max_size=2),
)
rel_messages = st.tuples(st.sampled_from(rel_ROUTE_CHANNELS + ["rel.unrouted"]),
                         st.dictionaries(st.sampled_from(["path", "text", "room"]), rel_message_values))


@st.composite
def rel_filters(draw, table: dict) -> dict:
    keys = draw(st.lists(st.sampled_from(sorted(table)), unique=True, max_size=2))
    return {key: draw(st.sampled_from(table[key])) for key in keys}


@st.composite
def rel_route_specs(draw, nested: bool = False):
    """("route", channels, filters, consumer) or ("include", prefixes, [inner specs])."""
    if not nested and draw(st.integers(0, 3)) == 0:
        return ("include", draw(rel_filters(rel_PREFIX_PATTERNS)),
                draw(st.lists(rel_route_specs(nested=True), min_size=1, max_size=3)))
    channels = draw(st.lists(st.sampled_from(rel_ROUTE_CHANNELS), min_size=1, max_size=2, unique=True))
    return ("route", channels, draw(rel_filters(rel_FILTER_PATTERNS)), draw(st.sampled_from(rel_CONSUMERS)))


def rel_build_route(spec):
    if spec[0] == "route":
        return route(spec[1], spec[3], **spec[2])
    return include([rel_build_route(inner) for inner in spec[2]], **spec[1])


def rel_model_filters(filters: dict, content: dict):
    """SPEC 3 as plainly as possible: (kwargs, content with matched prefixes cut) or None."""
    kwargs, rest = {}, dict(content)
    for key, pattern in filters.items():
        if key not in content:
            return None
        value = content[key]
        if isinstance(value, bytes):
            if any(byte > 127 for byte in value):
                return None
            value = value.decode("ascii")
        if not isinstance(value, str):
            return None
        found = re.match(pattern, value)
        if found is None:
            return None
        kwargs.update(found.groupdict())
        rest[key] = value[found.end():]
    return kwargs, rest


def rel_model_match(specs: list, channel: str, content: dict):
    """The reference router: the first route whose channel and filters all match wins."""
    for spec in specs:
        if spec[0] == "route":
            if channel in spec[1]:
                matched = rel_model_filters(spec[2], content)
                if matched is not None:
                    return spec[3], matched[0]
        else:
            matched = rel_model_filters(spec[1], content)
            if matched is not None:
                inner = rel_model_match(spec[2], channel, matched[1])
                if inner is not None:
                    return inner[0], {**matched[0], **inner[1]}
    return None


def rel_model_channels(specs: list) -> set:
    return set().union(*(set(spec[1]) if spec[0] == "route" else rel_model_channels(spec[2])
                         for spec in specs))


@hypothesis_settings(max_examples=400, **rel_PROPERTY_SETTINGS)
@given(specs=st.lists(rel_route_specs(), min_size=1, max_size=5), messages=st.lists(rel_messages, min_size=1, max_size=6))
def test_reliability_router_agrees_with_the_reference_model(specs, messages):
    """Router.match equals a plain model of SPEC 3: channels and regex filters, missing or
    non-string keys never match, bytes are read as ASCII, include() cuts prefixes, first match wins."""
    router = Router([rel_build_route(spec) for spec in specs])
    assert router.channels == rel_model_channels(specs)
    for channel, content in messages:
        original = json.dumps(content, default=repr, sort_keys=True)
        assert router.match(Message(content, channel, None)) == rel_model_match(specs, channel, content)
        assert json.dumps(content, default=repr, sort_keys=True) == original  # the message is untouched


class rel_LayerMachine(RuleBasedStateMachine):
    """InMemoryChannelLayer against a reference model: FIFO queues with capacities, groups,
    skipped-and-counted group sends, isolation of received copies, sends from other threads."""

    CHANNELS = ["rel.a", "rel.b", "wide.c", "rel.local!x1"]
    GROUPS = ["g1", "g2"]
    channel = st.sampled_from(CHANNELS)
    group = st.sampled_from(GROUPS)

    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.layer = InMemoryChannelLayer(capacity=2, channel_capacity={"wide.*": 4})
        self.queues: dict[str, list] = {name: [] for name in self.CHANNELS}
        self.members: dict[str, set] = {name: set() for name in self.GROUPS}
        self.dropped = 0
        self.sequence = 0

    def teardown(self):
        self.loop.close()

    def run(self, coroutine, timeout: float = 5):
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, timeout))

    def capacity(self, channel: str) -> int:
        return 4 if channel.startswith("wide.") else 2

    def next_message(self) -> dict:
        self.sequence += 1
        return {"n": self.sequence, "text": f"message {self.sequence}"}

    def full(self, channel: str) -> bool:
        return len(self.queues[channel]) >= self.capacity(channel)

    @rule(channel=channel)
    def send(self, channel):
        message = self.next_message()
        if self.full(channel):
            with pytest.raises(ChannelFull):
                self.run(self.layer.send(channel, message))
        else:
            self.run(self.layer.send(channel, message))
            self.queues[channel].append(dict(message))
        message["n"] = -1  # the sender reuses its dict: the queued copy must not change

    @rule(channel=channel)
    def send_from_another_thread(self, channel):
        message, outcome = self.next_message(), []

        def sender():
            try:
                asyncio.run(self.layer.send(channel, message))
                outcome.append("sent")
            except ChannelFull:
                outcome.append("full")

        expected = "full" if self.full(channel) else "sent"
        thread = threading.Thread(target=sender)
        thread.start()
        thread.join(5)
        assert outcome == [expected]
        if expected == "sent":
            self.queues[channel].append(message)

    @rule(channel=channel)
    def receive(self, channel):
        if self.queues[channel]:
            received = self.run(self.layer.receive(channel))
            assert received == self.queues[channel].pop(0)
            received["n"], received["mutated"] = 0, True  # must not reach other receivers' copies
        else:
            with pytest.raises(asyncio.TimeoutError):
                self.run(self.layer.receive(channel), timeout=0.005)

    @precondition(lambda self: not all(self.queues.values()))
    @rule(data=st.data())
    def receive_woken_by_another_thread(self, data):
        channel = data.draw(st.sampled_from([name for name, queue in self.queues.items() if not queue]))
        message = self.next_message()

        async def scenario():
            waiting = asyncio.ensure_future(self.layer.receive(channel))
            await asyncio.sleep(0.001)  # the receiver now waits on this loop
            thread = threading.Thread(target=lambda: asyncio.run(self.layer.send(channel, message)))
            thread.start()
            try:
                return await asyncio.wait_for(waiting, 5)
            finally:
                thread.join(5)

        assert self.run(scenario(), timeout=10) == message

    @rule(group=group, channel=channel)
    def group_add(self, group, channel):
        self.run(self.layer.group_add(group, channel))
        self.members[group].add(channel)

    @rule(group=group, channel=channel)
    def group_discard(self, group, channel):
        self.run(self.layer.group_discard(group, channel))
        self.members[group].discard(channel)

    @rule(group=group)
    def group_send(self, group):
        message = self.next_message()
        self.run(self.layer.group_send(group, message))  # never raises, full members or not
        for channel in self.members[group]:
            if self.full(channel):
                self.dropped += 1
            else:
                self.queues[channel].append(dict(message))

    @rule(channel=channel)
    def discard_channel(self, channel):
        self.layer.discard_channel(channel)
        self.queues[channel].clear()
        for members in self.members.values():
            members.discard(channel)

    @rule()
    def flush(self):
        self.run(self.layer.flush())
        for queue in self.queues.values():
            queue.clear()
        for members in self.members.values():
            members.clear()

    @invariant()
    def stats_agree(self):
        assert self.layer.stats() == {
            "channels": sum(1 for queue in self.queues.values() if queue),
            "groups": sum(1 for members in self.members.values() if members),
            "members": sum(len(members) for members in self.members.values()),
            "messages": sum(len(queue) for queue in self.queues.values()),
            "dropped": self.dropped,
        }


def test_reliability_layer_agrees_with_the_reference_model():
    run_state_machine_as_test(rel_LayerMachine, settings=hypothesis_settings(
        max_examples=60, stateful_step_count=40, **rel_PROPERTY_SETTINGS))


# Random frames into JSON, demultiplexer and binding consumers, in-process.

rel_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12)
rel_deep_json = st.sampled_from([10, 900, 5_000, 100_000]).map(lambda depth: "[" * depth + "]" * depth)
rel_text_frames = st.one_of(st.text(max_size=40), rel_json_values.map(json.dumps), rel_deep_json)
rel_wild_pks = st.one_of(st.none(), st.integers(), st.integers(2**63 - 2, 2**80), st.text(max_size=6),
                         st.floats(), st.booleans(), st.lists(st.integers(0, 9), max_size=2),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
rel_pks = st.one_of(st.integers(1, 3), st.integers(-1, 5), rel_wild_pks)  # 1-3 are seeded rows
rel_field_values = st.one_of(st.none(), rel_json_values, st.integers(), st.text(max_size=30),
                             st.sampled_from(["2024-01-01T00:00:00Z", "not a date", "2024-13-45", ""]))
rel_binding_requests = st.one_of(
    st.fixed_dictionaries({"action": st.sampled_from(["create", "update", "delete"])}, optional={
        "pk": rel_pks,
        "data": st.dictionaries(st.sampled_from(["title", "count", "when", "owner"]), rel_field_values,
                                max_size=3)}),
    st.fixed_dictionaries({}, optional={
        "action": st.one_of(st.sampled_from(["create", "update", "delete"]), st.text(max_size=6),
                            st.integers(), st.none()),
        "pk": rel_pks,
        "data": st.one_of(st.dictionaries(st.sampled_from(["title", "count", "when", "owner", "id", "nope"]),
                                          rel_field_values, max_size=4), rel_json_values)}),
)
rel_multiplexed_frames = st.one_of(
    st.fixed_dictionaries({"stream": st.one_of(st.sampled_from(["echo", "open", "notes", "denied", "nope"]),
                                               st.integers(), st.none()),
                           "payload": st.one_of(rel_json_values, rel_binding_requests)}).map(json.dumps),
    st.dictionaries(st.sampled_from(["stream", "payload", "extra"]), rel_json_values).map(json.dumps),
)
rel_fuzz_routing = [rel_Json.as_route(path=r"^/json/$"), rel_Demux.as_route(path=r"^/demux/$")]


async def rel_exchange(app, path: str, frame, sentinel: str, sentinel_reply: str):
    """Send *frame* then a *sentinel*; (replies before the sentinel's, close code or None)."""
    client = WebsocketCommunicator(app, path)
    connected, _ = await client.connect()
    assert connected
    if isinstance(frame, bytes):
        await client.send_to(bytes_data=frame)
    else:
        await client.send_to(text_data=frame)
    await client.send_to(text_data=sentinel)
    replies = []
    for _ in range(20):
        event = await client.receive_output(timeout=10)
        if event["type"] == "websocket.close":
            await client.disconnect()
            return replies, event["code"]
        reply = event.get("text") if event.get("text") is not None else event.get("bytes")
        if reply == sentinel_reply:
            await client.disconnect()
            return replies, None
        replies.append(reply)
    raise AssertionError(f"no sentinel reply after {replies!r}")


def rel_fuzz(path: str, frame, sentinel: str, sentinel_reply: str):
    app = Application(rel_fuzz_routing, channel_layer=InMemoryChannelLayer())
    with rel_captured_logs(logging.ERROR) as errors:
        replies, code = run(rel_exchange(app, path, frame, sentinel, sentinel_reply))
    assert [record.getMessage() for record in errors] == []  # nothing escaped as an exception
    assert code != 1011
    return replies, code


@hypothesis_settings(max_examples=150, **rel_PROPERTY_SETTINGS)
@given(frame=st.one_of(st.binary(max_size=40), rel_text_frames))
def test_reliability_random_frames_into_a_json_consumer(frame):
    """Binary: 1003. Undecodable text: 1007. Anything else is echoed and the socket stays open."""
    replies, code = rel_fuzz("/json/", frame, '{"sentinel": 1}', '{"echo": {"sentinel": 1}}')
    if isinstance(frame, bytes):
        assert (replies, code) == ([], 1003)
        return
    try:
        content = json.loads(frame)
    except (ValueError, RecursionError):
        assert (replies, code) == ([], 1007)
    else:
        assert (replies, code) == ([json.dumps({"echo": content})], None)


@hypothesis_settings(max_examples=150, **rel_PROPERTY_SETTINGS)
@given(frame=st.one_of(st.binary(max_size=40), rel_text_frames, rel_multiplexed_frames))
def test_reliability_random_frames_into_a_demultiplexer(frame):
    """Whatever arrives, the demultiplexer answers (or forwards) and the socket stays open."""
    ensure_database()
    replies, code = rel_fuzz("/demux/", frame, '{"stream": "echo", "payload": {"sentinel": 1}}',
                             '{"stream": "echo", "payload": {"echo": {"sentinel": 1}}}')
    assert code is None
    for reply in replies:
        assert isinstance(json.loads(reply), dict)


@hypothesis_settings(max_examples=200, **rel_PROPERTY_SETTINGS)
@given(request_payload=rel_binding_requests)
def test_reliability_random_requests_into_a_binding(request_payload):
    """A binding that allows every write: any request is applied or answered with an error
    (and then saves nothing); the socket stays open."""
    ensure_database()
    for number in range(1, 4):
        rel_FuzzNote.objects.get_or_create(pk=number, defaults={"title": f"seed {number}"})
    before = rel_fuzz_rows()
    frame = json.dumps({"stream": "open", "payload": request_payload})
    replies, code = rel_fuzz("/demux/", frame, '{"stream": "echo", "payload": {"sentinel": 1}}',
                             '{"stream": "echo", "payload": {"echo": {"sentinel": 1}}}')
    assert code is None
    assert len(replies) <= 1
    if replies:
        answer = json.loads(replies[0])
        assert answer["stream"] == "open" and set(answer["payload"]) == {"error", "action", "pk"}, answer
        assert rel_fuzz_rows() == before


# === Part II: extensions ===


# === 10. JSON, streams and writes from clients ===

# -- the multiplexer, as Channels 1.1.8 has it --

class streams_Fan(WebsocketConsumer):
    groups = ["streams-fans"]


def test_streams_multiplexer_encode_returns_the_message_written_with_djangos_encoder():
    """``encode`` returns the reply-channel message ``{"text": ...}``, its JSON written by
    ``encode_json`` with Django's encoder: datetimes, Decimals and UUIDs pass."""
    import datetime
    from decimal import Decimal

    payload = {"at": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
               "price": Decimal("2.50"), "uid": uuid.UUID(int=7)}
    message = WebsocketMultiplexer.encode("items", payload)
    assert set(message) == {"text"}
    assert json.loads(message["text"]) == {"stream": "items", "payload": {
        "at": "2024-05-06T07:08:09Z", "price": "2.50", "uid": "00000000-0000-0000-0000-000000000007"}}
    assert WebsocketMultiplexer.encode_json(payload["price"]) == '"2.50"'


@asynchronous
async def test_streams_multiplexer_group_send_with_close_closes_every_socket_after_the_frame():
    app, _ = app_setup([streams_Fan.as_route(path=r"^/fans/$")])
    fans = [WebsocketCommunicator(app, "/fans/") for _ in range(2)]
    for fan in fans:
        assert await fan.connect(timeout=5) == (True, None)
    WebsocketMultiplexer.group_send("streams-fans", "news", {"n": 1})
    WebsocketMultiplexer.group_send("streams-fans", "news", {"n": 2}, close=True)
    for fan in fans:
        assert await fan.receive_json_from(timeout=5) == {"stream": "news", "payload": {"n": 1}}
        assert await fan.receive_json_from(timeout=5) == {"stream": "news", "payload": {"n": 2}}
        assert await app_close_code(fan) == 1000
        await fan.disconnect()


# -- inbound --

def bind_items_frame(action: str, pk=None, data=None, stream: str = "items") -> dict:
    payload = {"action": action, "pk": pk}
    if data is not None:
        payload["data"] = data
    return {"stream": stream, "payload": payload}


async def bind_exchange(headers: list, frames: list[dict], replies: int) -> list[dict]:
    """Open a demultiplexed socket, send *frames*, collect *replies* frames, close."""
    application = Application([bind_Demultiplexer.as_route(path=r"^/bind/$")])
    communicator = WebsocketCommunicator(application, "/bind/", headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    for frame in frames:
        await communicator.send_json_to(frame)
    received = [await communicator.receive_json_from(timeout=5) for _ in range(replies)]
    assert await communicator.receive_nothing(timeout=0.3)
    await communicator.disconnect(timeout=5)
    return received


def test_binding_inbound_create_update_delete_when_allowed():
    from decimal import Decimal
    ensure_database()
    user = bind_user()
    headers = bind_cookie_headers(user)

    [created] = run(bind_exchange(headers, [bind_items_frame("create", data={
        "name": "from client", "price": "4.50", "team": "inbound", "owner": user.pk})], 1))
    item = Item.objects.get(team="inbound")
    assert (item.name, item.price, item.owner_id) == ("from client", Decimal("4.50"), user.pk)
    assert created["stream"] == "items"  # the socket hears its own change through the group
    assert (created["payload"]["action"], created["payload"]["pk"]) == ("create", item.pk)

    [updated] = run(bind_exchange(headers, [
        bind_items_frame("update", item.pk, {"name": "renamed"})], 1))
    assert Item.objects.get(pk=item.pk).name == "renamed"
    assert (updated["payload"]["action"], updated["payload"]["data"]["name"]) == \
        ("update", "renamed")

    [deleted] = run(bind_exchange(headers, [bind_items_frame("delete", item.pk)], 1))
    assert not Item.objects.filter(pk=item.pk).exists()
    assert (deleted["payload"]["action"], deleted["payload"]["pk"]) == ("delete", item.pk)


def test_binding_inbound_update_changes_only_the_fields_sent():
    import datetime
    from decimal import Decimal
    ensure_database()
    user = bind_user()
    when = datetime.datetime(2023, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    item = Item.objects.create(name="before", price=Decimal("9.99"), when=when, team="partial",
                               owner=user)
    before = Item.objects.get(pk=item.pk)

    [updated] = run(bind_exchange(bind_cookie_headers(user), [
        bind_items_frame("update", item.pk, {"price": "1.25"})], 1))

    after = Item.objects.get(pk=item.pk)
    assert after.price == Decimal("1.25")
    assert (after.name, after.when, after.uid, after.owner_id, after.team) == \
        (before.name, before.when, before.uid, before.owner_id, before.team)
    assert updated["payload"]["data"]["price"] == "1.25"


def bind_error(action, pk, error: str, stream: str = "items") -> dict:
    return {"stream": stream, "payload": {"error": error, "action": action, "pk": pk}}


def bind_check_refused(headers: list, frame: dict, expected_error: dict) -> None:
    """*frame* is answered with *expected_error*, and a valid create after it still works."""
    marker = f"after-{uuid.uuid4().hex[:8]}"
    count_before = Item.objects.count()
    rows_before = list(Item.objects.order_by("pk").values())
    error, created = run(bind_exchange(headers, [
        frame, bind_items_frame("create", data={"name": marker, "team": "refused"})], 2))

    assert error == expected_error
    assert (created["payload"]["action"], created["payload"]["data"]["name"]) == ("create", marker)
    marked = Item.objects.get(name=marker)
    assert Item.objects.count() == count_before + 1  # only the valid create was saved
    assert list(Item.objects.exclude(pk=marked.pk).order_by("pk").values()) == rows_before


def test_binding_inbound_denied_by_default_has_permission():
    ensure_database()
    headers = bind_cookie_headers(bind_user())
    bind_check_refused(headers, bind_items_frame("create", data={"name": "nope"}, stream="deny"),
                       bind_error("create", None, "Permission denied: create on pk None.",
                                  stream="deny"))


def test_binding_inbound_refused_for_an_anonymous_user():
    ensure_database()
    item = Item.objects.create(name="keep", team="anon")
    errors = run(bind_exchange([], [bind_items_frame("update", item.pk, {"name": "changed"}),
                                    bind_items_frame("create", data={"name": "anon"})], 2))
    assert errors == [
        bind_error("update", item.pk, f"Permission denied: update on pk {item.pk!r}."),
        bind_error("create", None, "Permission denied: create on pk None.")]
    assert Item.objects.get(pk=item.pk).name == "keep"
    assert not Item.objects.filter(name="anon").exists()


def test_binding_inbound_refuses_an_unknown_action():
    ensure_database()
    item = Item.objects.create(name="stay", team="refused")
    bind_check_refused(bind_cookie_headers(bind_user()),
                       bind_items_frame("rename", item.pk, {"name": "x"}),
                       bind_error("rename", item.pk, "Unknown action 'rename'; use one of "
                                  "['create', 'update', 'delete']."))


@pytest.mark.parametrize("action", ["update", "delete"])
def test_binding_inbound_refuses_a_missing_pk(action):
    ensure_database()
    Item.objects.create(name="stay", team="refused")
    bind_check_refused(bind_cookie_headers(bind_user()),
                       {"stream": "items", "payload": {"action": action, "data": {"name": "x"}}},
                       bind_error(action, None, f"Action {action!r} needs a 'pk'."))


def test_binding_inbound_refuses_an_unknown_field():
    ensure_database()
    bind_check_refused(bind_cookie_headers(bind_user()),
                       bind_items_frame("create", data={"name": "x", "colour": "red"}),
                       bind_error("create", None, "Unknown field(s) ['colour']; this binding "
                                  "accepts ['name', 'owner', 'price', 'team', 'uid', 'when']."))


def test_binding_inbound_refuses_a_too_long_name():
    ensure_database()
    bind_check_refused(bind_cookie_headers(bind_user()),
                       bind_items_frame("create", data={"name": "n" * 60}),
                       bind_error("create", None, "Invalid data: {'name': ['Ensure this value "
                                  "has at most 50 characters (it has 60).']}."))


def test_binding_inbound_refuses_a_non_numeric_price():
    ensure_database()
    user = bind_user()
    item = Item.objects.create(name="priced", team="refused", owner=user)
    bind_check_refused(bind_cookie_headers(user),
                       bind_items_frame("update", item.pk, {"price": "abc"}),
                       bind_error("update", item.pk, "Invalid data: {'price': "
                                  "['“abc” value must be a decimal number.']}."))
    assert Item.objects.get(pk=item.pk).price == 0


def test_binding_inbound_answers_not_found():
    ensure_database()
    missing = (Item.objects.order_by("-pk").values_list("pk", flat=True).first() or 0) + 1000
    bind_check_refused(bind_cookie_headers(bind_user()),
                       bind_items_frame("update", missing, {"name": "x"}),
                       bind_error("update", missing,
                                  f"{bind_label()} with pk {missing!r} does not exist."))


@pytest.mark.parametrize("action", ["update", "delete"])
def test_binding_inbound_refuses_another_users_object(action):
    ensure_database()
    item = Item.objects.create(name="theirs", team="refused", owner=bind_user("owner"))
    bind_check_refused(bind_cookie_headers(bind_user("intruder")),
                       bind_items_frame(action, item.pk, {"name": "mine"}),
                       bind_error(action, item.pk,
                                  f"Permission denied: {action} on pk {item.pk!r}."))
    assert Item.objects.get(pk=item.pk).name == "theirs"


class writes_UserBinding(WebsocketBinding):
    """Usernames only; anyone may rename (a test's binding, not a policy)."""

    model = "auth.User"
    stream = "users"
    fields = ["username"]

    def has_permission(self, user, action, pk):
        return action == "update"


class writes_UserDemultiplexer(WebsocketDemultiplexer):
    consumers = {"users": writes_UserBinding.consumer}


@asynchronous
async def test_writes_update_checks_only_the_fields_the_binding_exposes():
    """A stored user with a blank password (a field the binding does not expose) can still be
    renamed; what the binding does expose is still checked."""
    from django.contrib.auth.models import User

    def make_user():
        ensure_database()
        return User.objects.create(username=f"nopass-{uuid.uuid4().hex[:8]}", password="")

    user = await asyncio.to_thread(make_user)
    app = Application([writes_UserDemultiplexer.as_route(path=r"^/users/$")])
    socket = WebsocketCommunicator(app, "/users/")
    assert (await socket.connect(timeout=5))[0]
    renamed = f"renamed-{user.pk}"
    for request_id, name in ((1, renamed), (2, "")):
        await socket.send_json_to({"stream": "users", "payload": {
            "action": "update", "pk": user.pk, "data": {"username": name}, "request_id": request_id}})
    answers = [(await socket.receive_json_from(timeout=5))["payload"] for _ in range(2)]
    await socket.disconnect()
    stored = await asyncio.to_thread(lambda: User.objects.get(pk=user.pk).username)
    assert answers[0] == {"action": "update", "pk": user.pk, "request_id": 1}
    assert answers[1]["error"].startswith("Invalid data: {'username': ['This field cannot be blank.']}")
    assert stored == renamed


# === 11. Sessions and logins ===

# -- Channels 1.x sessions, decorators and exceptions (issue 13) --
# 1.x code as written: function consumers wrapped in the session decorators, the 1.1 class
# attributes, `message.channel_session` as a Django session keyed by the reply channel,
# `Message` items and the socket exceptions. Each consumer below exists in both flavours:
# `app_flavoured` wraps a plain body in an `async def` for the async run.

APP_COLOR = "teal"  # what the logged-in user's HTTP session holds, to see which session a consumer got


def app_flavoured(flavour: str, body):
    """*body* as a sync function consumer, or wrapped in an ``async def`` one."""
    if flavour == "sync":
        return functools.wraps(body)(lambda message, **kwargs: body(message, **kwargs))

    async def handler(message, **kwargs):
        return body(message, **kwargs)
    return functools.wraps(body)(handler)


def app_login(username: str, color: str | None = APP_COLOR):
    """A user and the Cookie header of a session logged in for it, with ``color`` in the session."""
    from django.contrib.sessions.backends.db import SessionStore

    user, cookie = rel_login(username)
    if color is not None:
        session = SessionStore(cookie.split("=", 1)[1])
        session["color"] = color
        session.save()
    return user, cookie


def app_seen(message, on: str, **more) -> dict:
    """What a decorated consumer was given: ``user`` (None if not set) and the HTTP session's color."""
    user, session = message.user, message.http_session
    return {"on": on, "user": None if user is None else (user.get_username() or "anonymous"),
            "http": None if session is None else session.get("color", "no color"), **more}


def app_channel_session_items(message) -> dict:
    """The channel session's own keys (not the user the module keeps in it)."""
    return {key: value for key, value in message.channel_session.items()
            if not key.startswith(("_", "channels_mini."))}


def app_decorator_routing(flavour: str) -> list:
    """Every 1.x decorator on a function consumer of *flavour*; each reports what it was given."""
    from django.contrib.auth import SESSION_KEY

    def connect(message, **kwargs):
        message.channel_session["count"] = 0
        # The user is copied for channel_session_user, never as a Django login (SECURITY)
        app_report(**app_seen(message, "connect", django_login=SESSION_KEY in message.channel_session))
        message.reply_channel.send({"accept": True})

    def count(message, **kwargs):
        message.channel_session["count"] += 1
        app_report(**app_seen(message, "channel_session", **app_channel_session_items(message)))

    def relay(message, **kwargs):  # stores the cookie's key in the channel session, then forwards
        app_report(**app_seen(message, "relay", key_kept=settings.SESSION_COOKIE_NAME in message.channel_session))
        for ask in ("channel_and_http_session", "channel_and_http_session_user_from_http"):
            Channel("app.deco.background").send({"reply_channel": message["reply_channel"], "ask": ask})

    def report(message, **kwargs):
        app_report(**app_seen(message, message.get("ask") or message["text"]))

    def disconnect(message, **kwargs):
        app_report(**app_seen(message, "disconnect", **app_channel_session_items(message)))

    def consumer(decorator, body):
        return decorator(app_flavoured(flavour, body))

    receive = functools.partial(route, "websocket.receive")
    return [
        route("websocket.connect", consumer(channel_session_user_from_http, connect)),
        receive(consumer(channel_session, count), text="^channel_session$"),
        receive(consumer(channel_session_user, report), text="^channel_session_user$"),
        receive(consumer(http_session, report), text="^http_session$"),
        receive(consumer(http_session_user, report), text="^http_session_user$"),
        receive(consumer(channel_and_http_session, relay), text="^relay$"),
        route("app.deco.background", consumer(channel_and_http_session, report),
              ask="^channel_and_http_session$"),
        route("app.deco.background", consumer(channel_and_http_session_user_from_http, report),
              ask="^channel_and_http_session_user_from_http$"),
        # enforce_ordering and allowed_hosts_only are accepted, bare or called, and change nothing
        route("websocket.disconnect", enforce_ordering(allowed_hosts_only(
            enforce_ordering()(consumer(channel_session, disconnect))))),
    ]


@pytest.mark.parametrize("flavour", ["sync", "async"])
@asynchronous
async def test_consumers_1x_session_decorators_on_function_consumers(flavour):
    """Each 1.x decorator gives what it gave in 1.x, on sync and async function consumers: the
    user comes from the handshake's cookie (copied into the channel session on connect), the
    channel session lasts across messages, and a message on another channel that carries the
    reply channel finds the HTTP session again through it."""
    user, cookie = await asyncio.to_thread(app_login, "deco")
    app, layer = app_setup(app_decorator_routing(flavour))
    frames = ["channel_session", "channel_session_user", "http_session", "http_session_user", "relay"]

    async def scenario(headers):
        communicator = WebsocketCommunicator(app, "/deco/", headers=headers)
        assert await communicator.connect(timeout=5) == (True, None)
        reports = [await app_observed(layer)]
        for frame in frames:
            await communicator.send_to(text_data=frame)
            reports.append(await app_observed(layer))
        reports += [await app_observed(layer), await app_observed(layer)]  # the background two
        await communicator.disconnect()
        reports.append(await app_observed(layer))
        return {report.pop("on"): report for report in reports}

    name = user.username
    assert await scenario([("cookie", cookie)]) == {
        "connect": {"user": name, "http": APP_COLOR, "django_login": False},
        "channel_session": {"user": None, "http": None, "count": 1},
        "channel_session_user": {"user": name, "http": None},
        "http_session": {"user": None, "http": APP_COLOR},
        "http_session_user": {"user": name, "http": APP_COLOR},
        "relay": {"user": None, "http": APP_COLOR, "key_kept": True},
        "channel_and_http_session": {"user": None, "http": APP_COLOR},
        "channel_and_http_session_user_from_http": {"user": name, "http": APP_COLOR},
        # channel_and_http_session kept the handshake's session key there, as in 1.x
        "disconnect": {"user": None, "http": None, "count": 1,
                       settings.SESSION_COOKIE_NAME: cookie.split("=", 1)[1]},
    }
    assert await scenario([]) == {  # no cookie: no HTTP session, and AnonymousUser as 1.x set it
        "connect": {"user": "anonymous", "http": None, "django_login": False},
        "channel_session": {"user": None, "http": None, "count": 1},
        "channel_session_user": {"user": "anonymous", "http": None},
        "http_session": {"user": None, "http": None},
        "http_session_user": {"user": "anonymous", "http": None},
        "relay": {"user": None, "http": None, "key_kept": False},
        "channel_and_http_session": {"user": None, "http": None},
        "channel_and_http_session_user_from_http": {"user": "anonymous", "http": None},
        "disconnect": {"user": None, "http": None, "count": 1},
    }


def test_consumers_1x_decorator_errors_say_what_to_do():
    with pytest.raises(ValueError, match=re.escape(
            "Slight ordering is gone (as in Channels 1.1): remove slight=True; ordering is always "
            "strict here.")):
        enforce_ordering(slight=True)

    @channel_session
    def needs_a_message(message):
        return "ran"

    with pytest.raises(ValueError, match=re.escape(
            "channel_session called without Message instance: @channel_session needs a consumer "
            "called with the message first (a method: after self); got ('not a message',).")):
        needs_a_message("not a message")
    no_reply_channel = Message({"text": "hi"}, "app.deco.background", get_channel_layer())
    with pytest.raises(ValueError, match=re.escape(
            "A message on 'app.deco.background' has no reply_channel, so it has no channel session: "
            "use the session decorators on consumers of messages that carry one.")):
        needs_a_message(no_reply_channel)
    assert (channel_session.__name__, channel_session_user_from_http.__name__) == (
        "channel_session", "channel_session_user_from_http")
    assert needs_a_message.__name__ == "needs_a_message"  # functools.wraps, as in 1.x


# The 1.1 class attributes, on sync and async methods. The socket forwards each frame to
# a background channel with its reply channel, as 1.x projects did; the background class
# finds the socket's user through the channel session.

class AppAttrSocket(WebsocketConsumer):
    http_user = True

    def connect(self, message, **kwargs):
        app_report(**app_seen(message, "connect"))
        super().connect(message, **kwargs)

    def receive(self, text=None, bytes=None, **kwargs):
        app_report(**app_seen(self.message, "receive"))
        Channel("app.attr.background").send({"reply_channel": self.message["reply_channel"]})


class AppAttrSocketAsync(AppAttrSocket):
    async def connect(self, message, **kwargs):
        app_report(**app_seen(message, "connect"))
        message.reply_channel.send({"accept": True})

    async def receive(self, text=None, bytes=None, **kwargs):
        AppAttrSocket.receive(self, text)


class AppAttrBackground(BaseConsumer):
    method_mapping = {"app.attr.background": "handle"}
    channel_session_user = True

    def handle(self, message, **kwargs):
        message.channel_session["handled"] = message.channel_session.get("handled", 0) + 1
        app_report(**app_seen(message, "background", **app_channel_session_items(message)))


class AppAttrBackgroundAsync(AppAttrBackground):
    async def handle(self, message, **kwargs):
        AppAttrBackground.handle(self, message)


@pytest.mark.parametrize("socket_class, background_class, attribute", [
    (AppAttrSocket, AppAttrBackground, "http_user"),
    (AppAttrSocketAsync, AppAttrBackgroundAsync, "http_user"),
    (AppAttrSocket, AppAttrBackground, "http_user_and_session"),
    (AppAttrSocketAsync, AppAttrBackgroundAsync, "http_user_and_session"),
], ids=["http_user-sync", "http_user-async", "http_user_and_session-sync", "http_user_and_session-async"])
@asynchronous
async def test_consumers_1x_class_attributes_mean_what_they_meant_in_1_1(socket_class, background_class,
                                                                         attribute):
    """``http_user`` / ``http_user_and_session``: ``message.user`` on every message of the
    socket, the user copied into the channel session on connect, where a class with
    ``channel_session_user`` finds it; ``channel_session_user`` implies ``channel_session``
    (loaded before the method, so async methods use it too). ``http_user_and_session`` also
    finds the HTTP session again on a message without cookies."""
    user, cookie = await asyncio.to_thread(app_login, "attr")
    attrs = {"http_user": False, attribute: True}
    background_attrs = {} if attribute == "http_user" else {"http_user_and_session": True}
    app, layer = app_setup([socket_class.as_route(attrs, path=r"^/attr/$"),
                            background_class.as_route(background_attrs)])
    communicator = WebsocketCommunicator(app, "/attr/", headers=[("cookie", cookie)])
    assert await communicator.connect(timeout=5) == (True, None)
    reports = [await app_observed(layer)]
    for _ in range(2):
        await communicator.send_to(text_data="hello")
        reports += [await app_observed(layer), await app_observed(layer)]
    await communicator.disconnect()
    name = user.username
    # the background message has no cookie: http_user_and_session finds the HTTP session
    # through the key it kept in the channel session (as 1.x did); http_user does not
    background = ({"http": APP_COLOR, settings.SESSION_COOKIE_NAME: cookie.split("=", 1)[1]}
                  if attribute == "http_user_and_session" else {"http": None})
    by_place = sorted(reports, key=lambda report: (report["on"], report.get("handled", 0)))
    assert by_place == [
        {"on": "background", "user": name, **background, "handled": 1},
        {"on": "background", "user": name, **background, "handled": 2},
        {"on": "connect", "user": name, "http": APP_COLOR},
        {"on": "receive", "user": name, "http": APP_COLOR},
        {"on": "receive", "user": name, "http": APP_COLOR},
    ]


class AppAttrChannelSession(WebsocketConsumer):
    channel_session = True  # loaded before every method: async ones may use it on the loop

    async def connect(self, message, **kwargs):
        message.channel_session["frames"] = []
        message.reply_channel.send({"accept": True})

    async def receive(self, text=None, bytes=None, **kwargs):
        session = self.message.channel_session
        session["frames"] = [*session["frames"], text]
        self.send(text=json.dumps(session["frames"]))


@asynchronous
async def test_consumers_1x_channel_session_attribute_loads_it_for_async_methods():
    await asyncio.to_thread(ensure_database)
    app, _ = app_setup([AppAttrChannelSession.as_route(path=r"^/frames/$")])
    communicator = WebsocketCommunicator(app, "/frames/")
    assert await communicator.connect(timeout=5) == (True, None)
    replies = []
    for text in ("a", "b"):
        await communicator.send_to(text_data=text)
        replies.append(json.loads(await communicator.receive_from(timeout=5)))
    await communicator.disconnect()
    assert replies == [["a"], ["a", "b"]]


def app_session_rows() -> set[str]:
    """The keys of the channel sessions stored in the database (1.x's 'chn...' keys)."""
    from django.contrib.sessions.models import Session
    return set(Session.objects.filter(session_key__startswith="chn").values_list("session_key", flat=True))


class AppSessionUntouched(WebsocketConsumer):
    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=text)


class AppSessionReader(AppSessionUntouched):
    def receive(self, text=None, bytes=None, **kwargs):
        session = self.message.channel_session
        if text == "write":
            session["written"] = session.get("written", 0) + 1
        self.send(text=json.dumps(dict(session)))


def test_consumers_channel_session_saved_when_modified_deleted_on_close_untouched_costs_nothing(monkeypatch):
    """The channel session is a row of the session store (the database engine here): a
    consumer that never touches it costs no session I/O at all; one that reads it loads it
    and saves it only after a handler that changed it; the row goes when the socket closes."""
    from django.contrib.sessions.backends.db import SessionStore

    ensure_database()
    calls: list[str] = []
    for name in ("load", "save", "delete", "exists", "create"):
        original = getattr(SessionStore, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(SessionStore, name, counted)
    before = app_session_rows()
    app, _ = app_setup([AppSessionUntouched.as_route(path=r"^/untouched/$"),
                        AppSessionReader.as_route(path=r"^/reader/$")])

    async def exchange(path, frames):
        communicator = WebsocketCommunicator(app, path)
        assert await communicator.connect(timeout=5) == (True, None)
        replies, rows_open = [], []
        for frame in frames:
            calls.clear()
            await communicator.send_to(text_data=frame)
            replies.append(await communicator.receive_from(timeout=5))
            rows_open.append(await asyncio.to_thread(app_session_rows))
            replies.append(list(calls))
        await communicator.disconnect()
        return replies, rows_open

    replies, rows_open = run(exchange("/untouched/", ["one", "two"]))
    assert replies == ["one", [], "two", []]
    assert rows_open == [before, before]
    calls.clear()
    replies, rows_open = run(exchange("/reader/", ["read", "write", "read", "write"]))
    assert replies == ['{}', ["load"], '{"written": 1}', ["load", "save", "save"],  # update, then create
                       '{"written": 1}', ["load"], '{"written": 2}', ["load", "save"]]
    assert rows_open[0] == before and len(rows_open[1] - before) == 1 == len(rows_open[3] - before)
    assert calls[-1:] == ["delete"] and app_session_rows() == before  # gone with its socket


def test_consumers_1x_message_items_and_deep_copy():
    message = Message({"text": "hi", "meta": {"tags": ["a"]}, "reply_channel": "websocket.send!x"},
                      "websocket.receive", get_channel_layer())
    message["room"] = "lobby"  # as 1.x projects did before re-sending a message
    del message["text"]
    assert message.content == {"meta": {"tags": ["a"]}, "reply_channel": "websocket.send!x",
                               "room": "lobby"}
    clone = message.copy()
    clone["meta"]["tags"].append("b")
    clone["room"] = "kitchen"
    assert (message["meta"], message["room"]) == ({"tags": ["a"]}, "lobby")  # independent, deeply
    assert (clone.channel_name, clone.reply_channel.name) == ("websocket.receive", "websocket.send!x")
    assert dict(message.copy(room="hall")) == {**message.content, "room": "hall"}


class AppSocketAction(ChannelSocketException):
    """A 1.x-style socket action: tell the client why, then close with 4003."""

    def run(self, message):
        message.reply_channel.send({"text": "not allowed", "close": 4003})


def app_exception_routing(flavour: str) -> list:
    def raising(message, **kwargs):
        text = message.get("text", "")
        if text == "close":
            raise WebsocketCloseException(4005)
        if text == "close-normal":
            raise WebsocketCloseException()
        if text == "action":
            raise AppSocketAction()
        if text == "later":
            Channel("app.exc.background").send({"reply_channel": message["reply_channel"]})
        return None

    def background(message, **kwargs):
        raise WebsocketCloseException(4010)

    return [route("websocket.receive", app_flavoured(flavour, raising)),
            route("app.exc.background", app_flavoured(flavour, background))]


@pytest.mark.parametrize("flavour", ["sync", "async"])
@asynchronous
async def test_consumers_1x_socket_exceptions_run_their_action(flavour, caplog):
    """Raised in a consumer -- also one of a background channel that holds the reply
    channel -- a ChannelSocketException runs its action instead of failing the socket:
    WebsocketCloseException(code) closes with that code (1000 without one)."""
    app, _ = app_setup(app_exception_routing(flavour))

    async def outcome(frame):
        communicator = WebsocketCommunicator(app, "/exc/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(text_data=frame)
        event = await communicator.receive_output(timeout=5)
        if event["type"] == "websocket.send":
            return event["text"], await app_close_code(communicator)
        assert event["type"] == "websocket.close", event
        return event["code"]

    assert [await outcome(frame) for frame in ("close", "close-normal", "action", "later")] == [
        4005, 1000, ("not allowed", 4003), 4010]
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    with pytest.raises(ValueError, match=re.escape(
            "Invalid close code 1011: use 1000 or one from 3000 to 4999.")):
        WebsocketCloseException(1011)


# A 1.x multi-room chat, written as the Channels 1.x "multichat" example is: function
# consumers, the session decorators, and a custom channel routed by a `command` filter.
# Every answer names the process that ran the `chat.receive` consumer (`pid`).

def app_chat_answer(message, **content) -> None:
    message.reply_channel.send({"text": json.dumps({**content, "pid": os.getpid()})})


@channel_session_user_from_http
def app_chat_ws_connect(message):
    message.reply_channel.send({"accept": True})
    message.channel_session["rooms"] = []


def app_chat_ws_receive(message):
    payload = json.loads(message["text"])
    payload["reply_channel"] = message.content["reply_channel"]
    Channel("chat.receive").send(payload)


@channel_session_user
def app_chat_ws_disconnect(message):
    for room in message.channel_session.get("rooms", []):
        Group(f"chat-{room}").discard(message.reply_channel)


@channel_session_user
def app_chat_join(message):
    room = message["room"]
    if room.startswith("staff") and not message.user.is_staff:
        return app_chat_answer(message, error="ROOM_ACCESS_DENIED", room=room)
    Group(f"chat-{room}").add(message.reply_channel)
    message.channel_session["rooms"] = sorted({*message.channel_session["rooms"], room})
    app_chat_answer(message, join=room, user=message.user.username)


@channel_session_user
async def app_chat_leave(message):  # an async consumer, in the same routing
    room = message["room"]
    await Group(f"chat-{room}").adiscard(message.reply_channel)
    message.channel_session["rooms"] = [name for name in message.channel_session["rooms"] if name != room]
    app_chat_answer(message, leave=room)


@channel_session_user
def app_chat_send(message):
    room = message["room"]
    if room not in message.channel_session["rooms"]:
        return app_chat_answer(message, error="ROOM_NOT_JOINED", room=room)
    Group(f"chat-{room}").send({"text": json.dumps({
        "room": room, "user": message.user.username, "message": message["message"], "pid": os.getpid()})})


app_chat_socket_routing = [
    route("websocket.connect", app_chat_ws_connect, path=r"^/chat/$"),
    route("websocket.receive", app_chat_ws_receive, path=r"^/chat/$"),
    route("websocket.disconnect", app_chat_ws_disconnect, path=r"^/chat/$"),
]
app_chat_routing = app_chat_socket_routing + [
    route("chat.receive", app_chat_join, command="^join$"),
    route("chat.receive", app_chat_leave, command="^leave$"),
    route("chat.receive", app_chat_send, command="^send$"),
]
app_chat_app = Application(app_chat_routing)
app_chat_socket_app = Application(app_chat_socket_routing)  # no chat.receive consumer here


def app_chat_users() -> dict:
    """A staff user and a plain one, with passwords, for the login view."""
    from django.contrib.auth.models import User

    ensure_database()
    users = {}
    for role, staff in (("staff", True), ("plain", False)):
        name, password = f"chat-{role}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        User.objects.create_user(name, password=password, is_staff=staff)
        users[role] = (name, password)
    return users


def app_log_in(server, username: str, password: str) -> str:
    """POST the test project's login view (Django's AuthenticationForm and login()) with a real
    HTTP client; the Cookie header value a browser would send from then on."""
    from http.cookies import SimpleCookie
    from urllib.parse import urlencode

    data = urlencode({"username": username, "password": password}).encode()
    with urllib.request.urlopen(server.url("/login/", "http"), data=data, timeout=10) as response:
        assert response.read() == b"logged in"
        jar = SimpleCookie()
        for header in response.headers.get_all("Set-Cookie"):
            jar.load(header)
    return f"{settings.SESSION_COOKIE_NAME}={jar[settings.SESSION_COOKIE_NAME].value}"


async def app_chat_recv(websocket, timeout: float = 10) -> dict:
    return json.loads(await asyncio.wait_for(websocket.recv(), timeout))


async def app_chat_silent(websocket, timeout: float = 0.5) -> bool:
    try:
        await asyncio.wait_for(websocket.recv(), timeout)
    except asyncio.TimeoutError:
        return True
    return False


async def app_chat_session(staff_url: str, plain_url: str, staff_cookie: str, plain_cookie: str,
                           users: dict, chat_pid: int) -> set[str]:
    """The chat, end to end: joins, a staff-only room refused, messages to a room, a leave.
    Every `chat.receive` answer must come from the process *chat_pid*. Returns the channel
    session rows stored while both sockets were open."""
    staff_name, plain_name = users["staff"][0], users["plain"][0]

    async def ask(websocket, **payload) -> dict:
        await websocket.send(json.dumps(payload))
        return await app_chat_recv(websocket)

    async with ws_connect(staff_url, additional_headers=[("Cookie", staff_cookie)]) as staff, \
            ws_connect(plain_url, additional_headers=[("Cookie", plain_cookie)]) as plain:
        answers = [await ask(staff, command="join", room="lobby"),
                   await ask(staff, command="join", room="staff-room"),
                   await ask(plain, command="join", room="lobby"),
                   await ask(plain, command="join", room="staff-room"),
                   await ask(plain, command="send", room="staff-room", message="let me in")]
        assert answers == [
            {"join": "lobby", "user": staff_name, "pid": chat_pid},
            {"join": "staff-room", "user": staff_name, "pid": chat_pid},
            {"join": "lobby", "user": plain_name, "pid": chat_pid},
            {"error": "ROOM_ACCESS_DENIED", "room": "staff-room", "pid": chat_pid},
            {"error": "ROOM_NOT_JOINED", "room": "staff-room", "pid": chat_pid},
        ]
        await plain.send(json.dumps({"command": "send", "room": "lobby", "message": "hello"}))
        hello = {"room": "lobby", "user": plain_name, "message": "hello", "pid": chat_pid}
        assert [await app_chat_recv(plain), await app_chat_recv(staff)] == [hello, hello]
        await staff.send(json.dumps({"command": "send", "room": "staff-room", "message": "staff only"}))
        assert (await app_chat_recv(staff))["message"] == "staff only"
        assert await app_chat_silent(plain)
        assert await ask(plain, command="leave", room="lobby") == {"leave": "lobby", "pid": chat_pid}
        await staff.send(json.dumps({"command": "send", "room": "lobby", "message": "anyone?"}))
        assert (await app_chat_recv(staff))["message"] == "anyone?"
        assert await app_chat_silent(plain)
        assert await ask(plain, command="send", room="lobby", message="x") == {
            "error": "ROOM_NOT_JOINED", "room": "lobby", "pid": chat_pid}
        return await asyncio.to_thread(app_session_rows)


def app_chat_rows_settle(before: set[str], timeout: float = 10) -> set[str]:
    """The channel-session rows once the closed sockets' rows are gone (bounded wait)."""
    deadline = time.monotonic() + timeout
    while app_session_rows() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    return app_session_rows()


def test_consumers_1x_multi_room_chat_under_uvicorn_with_users_logged_in_through_django():
    """The 1.x multi-room chat above, unchanged but for its imports, under a real uvicorn with
    the in-memory layer: users log in through Django's AuthenticationForm and login() (the
    test project's CSRF-exempt login view, POSTed with a real HTTP client), `ws_connect` copies
    the user into the channel session, and the `chat.receive` consumers -- routed by the
    `command` filter -- find `message.user` and `channel_session["rooms"]` there. Staff-only
    rooms are refused to others. The channel sessions are deleted when the sockets close."""
    users = app_chat_users()
    before = app_session_rows()
    with running_server(app=f"{__name__}:app_chat_app") as server:
        cookies = [app_log_in(server, *users[role]) for role in ("staff", "plain")]
        url = server.url("/chat/")
        rows_open = run(app_chat_session(url, url, *cookies, users, chat_pid=server.process.pid),
                        timeout=60)
        assert len(rows_open - before) == 2  # one per socket ...
        assert app_chat_rows_settle(before) == before  # ... deleted when it closed


# -- logins and secrets (issue 19) --
# The attacks of issue 19, each through a real uvicorn with real clients: a channel session
# key used as a login cookie, reply channel names in frames, logins that end while their
# connections stay open (also across two processes sharing Redis, with Redis down), binding
# writes by a user whose login ended, and HTTP requests held past their timeout.

#: A process-local channel name (every reply channel is one): a "!" between name characters.
SEC_REPLY_CHANNEL = re.compile(r"[A-Za-z0-9_.-]+![A-Za-z0-9_.-]+")


@channel_session_user_from_http
def sec_room_connect(message, **kwargs):
    """The README's function consumer: it tracks its socket in the room without a key."""
    message.reply_channel.send({"accept": True})
    Group("sec-room").track(message.reply_channel, meta={"name": message.user.get_username()})


@channel_session_user
def sec_room_receive(message, **kwargs):
    """"who": the user, from the channel session; "presence": the room's presence; "secret":
    what an attacker wants (told here for the test only): the channel session key and the
    reply channel name."""
    text = message["text"]
    if text == "who":
        answer = message.user.get_username() or "anonymous"
    elif text == "presence":
        answer = json.dumps(Group("sec-room").presence())
    else:
        answer = json.dumps({"key": message.channel_session.session_key,
                             "reply_channel": message["reply_channel"]})
    message.reply_channel.send({"text": answer})


class sec_WhoAmI(WebsocketConsumer):
    """``http_user``: says who it is on connect and on every frame."""

    http_user = True

    def connect(self, message, **kwargs):
        self.send(text=message.user.get_username() or "anonymous")

    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=self.message.user.get_username() or "anonymous")


@http_session_user
def sec_stream(message):
    """An event stream of the user's private group, opened with ``@http_session_user``."""
    message.reply_channel.send({"status": 200, "headers": SSE_HEADERS, "more_content": True,
                                "content": sse_event(comment=message.user.get_username())})
    Group(f"sec-private-{message.user.pk}").add(message.reply_channel)


@http_session_user
def sec_poll(message):
    """A long-poll on the user's private group, opened with ``@http_session_user``."""
    Group(f"sec-private-{message.user.pk}").add(message.reply_channel)


def sec_slow(message):
    """A consumer busy for 3 s: longer than the quick app's http_timeout."""
    time.sleep(3)
    message.reply_channel.send({"status": 200, "headers": [], "content": b"late"})


def sec_never(message):
    """Never answers: the request gets 504."""


def sec_body_length(message):
    message.reply_channel.send({"status": 200, "headers": [],
                                "content": str(len(message["body"])).encode()})


class sec_NoteBinding(WebsocketBinding):
    """Signed-in users create notes; every note is announced to the group "sec-notes"."""

    model = rel_Note
    stream = "notes"
    fields = ["title", "count"]

    @classmethod
    def group_names(cls, instance):
        return ["sec-notes"]

    def has_permission(self, user, action, pk):
        return user.is_authenticated and action == "create"


class sec_Demux(WebsocketDemultiplexer):
    groups = ["sec-notes"]
    consumers = {"notes": sec_NoteBinding.consumer}


class sec_Lobby(WebsocketConsumer):
    """Declared presence with the default key and meta."""

    presence = ["sec-lobby"]


sec_routing = [
    route("websocket.connect", sec_room_connect, path=r"^/sec/room/$"),
    route("websocket.receive", sec_room_receive, path=r"^/sec/room/$"),
    sec_WhoAmI.as_route(path=r"^/sec/whoami/$"),
    sec_Demux.as_route(path=r"^/sec/notes/$"),
    sec_Lobby.as_route(path=r"^/sec/lobby/$"),
    route("http.request", sec_stream, path=r"^/sec/stream/$"),
    route("http.request", sec_poll, path=r"^/sec/poll/$"),
]
sec_app = Application(sec_routing, http_timeout=30)
sec_quick_app = Application([
    route("http.request", sec_slow, path=r"^/sec/slow/$"),
    route("http.request", sec_never, path=r"^/sec/never/$"),
    route("http.request", sec_body_length, path=r"^/sec/body/$"),
], http_timeout=1.5)


def sec_whoami(server: Server, cookie: str) -> str:
    """What a Django view says the request with this cookie is: a username or "anonymous"."""
    status, body, _ = http_request(server.url("/whoami/", "http"), headers={"Cookie": cookie})
    assert status == 200, body
    return body.decode()


async def sec_until_closed(websocket, timeout: float = 10) -> tuple[int | None, float]:
    """Wait for the server to close *websocket*: (close code, seconds waited)."""
    start = time.monotonic()
    _, code = await rel_until_closed(websocket, timeout)
    return code, time.monotonic() - start


def sec_open_stream(server: Server, cookie: str):
    """An event stream with *cookie*, once its first event (the user's name) arrived."""
    import http.client
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
    connection.request("GET", "/sec/stream/", headers={"Cookie": cookie})
    response = connection.getresponse()
    assert response.status == 200
    first = response.readline() + response.readline()
    return connection, response, first


def sec_stream_end(response) -> float:
    """Read the stream to its end; the time it ended (monotonic)."""
    response.read()
    return time.monotonic()


def test_sessions_1x_dict_headers_are_read_as_pairs_are():
    """Channels 1.1 still took ``headers`` as a dict: the session decorators and AsgiRequest
    read it as they read ASGI pairs (it used to raise 'too many values to unpack')."""
    user, cookie = rel_login("dict-headers")

    @http_session_user
    def consumer(message):
        return message.user

    headers = {"cookie": cookie.encode(), "X-Test": "yes"}
    found = consumer(Message({"path": "/", "headers": headers}, "app.dict", None))
    request = AsgiRequest(Message({"method": "GET", "path": "/x", "query_string": b"",
                                   "headers": headers}, "http.request", None))
    assert found == user
    assert request.COOKIES == {settings.SESSION_COOKIE_NAME: cookie.split("=", 1)[1]}
    assert request.headers["X-Test"] == "yes"


def test_security_a_channel_session_is_never_a_login_and_presence_tells_no_reply_channel():
    """The takeover of issue 19 fails: an anonymous member of a room hears a logged-in
    member's presence key, which is opaque (1.x's sha1 of it is no session of anyone); and
    even the real key of that member's channel session, sent as a session cookie, is an
    anonymous request, to a Django view and to an ``http_user`` websocket."""
    import hashlib

    victim, cookie = rel_login("victim")
    with running_server(app=f"{__name__}:sec_app") as server:

        async def scenario():
            async with ws_connect(server.url("/sec/room/")) as attacker:
                heard = [await recv(attacker)]  # its own join
                async with ws_connect(server.url("/sec/room/"),
                                      additional_headers=[("Cookie", cookie)]) as member:
                    heard.append(await recv(attacker))  # the member's join
                    await attacker.send("presence")
                    heard.append(await recv(attacker))
                    await member.send("secret")
                    await recv(member)  # its own join first
                    secret = json.loads(await recv(member))
                    await member.send("who")
                    member_is = await recv(member)
                    forged = []
                    for name in secret["key"], "chn" + hashlib.sha1(
                            secret["reply_channel"].encode()).hexdigest()[:29]:
                        async with ws_connect(server.url("/sec/whoami/"), additional_headers=[
                                ("Cookie", f"{settings.SESSION_COOKIE_NAME}={name}")]) as forger:
                            forged.append(await recv(forger))
                    return heard, secret, member_is, forged

        heard, secret, member_is, forged_sockets = run(scenario())
        [member_key] = json.loads(heard[1])["joins"]
        legacy_keys = {"chn" + hashlib.sha1(name.encode()).hexdigest()[:29]
                       for name in (member_key.partition(".")[2], secret["reply_channel"])}
        as_views = {name: sec_whoami(server, f"{settings.SESSION_COOKIE_NAME}={name}")
                    for name in {secret["key"], *legacy_keys}}
        own = sec_whoami(server, cookie)
    assert SEC_REPLY_CHANNEL.fullmatch(secret["reply_channel"])  # what the check below looks for
    assert not any(SEC_REPLY_CHANNEL.search(frame) for frame in heard), heard
    assert re.fullmatch(r"anonymous\.[0-9a-f]{24}", member_key), member_key
    assert json.loads(heard[2])[member_key] == [{"name": victim.username}]
    assert secret["key"] not in legacy_keys  # keyed with SECRET_KEY, not computable from names
    assert (own, member_is) == (victim.username, victim.username)  # the member is logged in
    assert as_views == {name: "anonymous" for name in as_views}
    assert forged_sockets == ["anonymous", "anonymous"]


def test_security_no_frame_the_module_composes_carries_a_reply_channel_name():
    """Presence diffs and snapshots (keyed and anonymous), binding frames (outbound, answers,
    refusals) and multiplexer errors: none holds a reply channel name."""
    user, cookie = rel_login("frames")
    with running_server(app=f"{__name__}:sec_app") as server:

        async def scenario():
            frames = []
            async with ws_connect(server.url("/sec/lobby/")) as lobby, \
                    ws_connect(server.url("/sec/room/"), additional_headers=[("Cookie", cookie)]) as room, \
                    ws_connect(server.url("/sec/notes/")) as anonymous, \
                    ws_connect(server.url("/sec/notes/"), additional_headers=[("Cookie", cookie)]) as notes:
                frames.append(await recv(lobby))
                frames.append(await recv(room))
                await room.send("presence")
                frames.append(await recv(room))
                for text in ('{"stream": "notes", "payload": {"action": "create", "data": {"title": "a"}}}',
                             '{"stream": "nope", "payload": {}}', "not json", '{"stream": 1}'):
                    await anonymous.send(text)
                    frames.append(await recv(anonymous))
                await anonymous.send(b"binary")
                frames.append(await recv(anonymous))
                await notes.send(json.dumps({"stream": "notes", "payload": {
                    "action": "create", "data": {"title": "frames"}, "request_id": 7}}))
                frames += [await recv(notes), await recv(notes), await recv(anonymous)]
            return frames

        frames = run(scenario())
    kinds = [json.loads(frame).get("type") or "stream" if frame.startswith("{") else frame
             for frame in frames]
    assert kinds.count("presence_diff") == 2 and len(frames) == 11, frames
    assert any('"request_id": 7' in frame for frame in frames), frames
    assert any('"action": "create"' in frame and '"frames"' in frame for frame in frames), frames
    assert not [frame for frame in frames if SEC_REPLY_CHANNEL.search(frame)], frames


SEC_ENDINGS = ["logout", "another_login", "password_changed_here", "password_changed_elsewhere",
               "deactivated"]


def sec_end_login(ending: str, server: Server, user, cookie: str) -> str | None:
    """End *user*'s login the way *ending* says; the session cookie that is now valid, if any."""
    from django.contrib.auth.models import User

    if ending == "logout":
        assert http_request(server.url("/logout/", "http"), headers={"Cookie": cookie})[:2] == \
            (200, b"logged out")
    elif ending == "another_login":  # someone else signs in on the same browser
        other = User.objects.create_user(f"other-{uuid.uuid4().hex[:8]}", password="x")
        answer = http_request(server.url("/login/", "http"), headers={"Cookie": cookie},
                              data=f"username={other.username}&password=x".encode())
        assert answer[:2] == (200, b"logged in")
    elif ending == "password_changed_here":  # the session key is cycled, the user stays in
        status, body, headers = http_request(server.url("/password/", "http"), data=b"password=y",
                                             headers={"Cookie": cookie})
        assert (status, body) == (200, b"password changed")
        return headers["Set-Cookie"].split(";")[0]
    elif ending == "password_changed_elsewhere":
        user.set_password("changed elsewhere")
        user.save()
    else:
        User.objects.filter(pk=user.pk).update(is_active=False)
    return None


@pytest.mark.parametrize("ending", SEC_ENDINGS)
def test_security_every_ending_of_a_login_ends_its_connections_within_5_seconds(ending):
    """Websockets (``http_user``, 1.x decorators), an event stream and a long-poll opened with
    a login end with it -- 4401, the stream ended, the poll refused -- within 5 s (logout: at
    once); another user's socket stays open; a session that still holds the user (the
    password changed here) reconnects as that user."""
    user, cookie = rel_login("ending")
    bystander, bystander_cookie = rel_login("bystander")
    with running_server(app=f"{__name__}:sec_app") as server:
        connection, stream, first = sec_open_stream(server, cookie)

        async def scenario():
            headers = [("Cookie", cookie)]
            sockets = [await ws_connect(server.url(path), additional_headers=headers).__aenter__()
                       for path in ("/sec/whoami/", "/sec/room/")]
            other = await ws_connect(server.url("/sec/whoami/"), additional_headers=[
                ("Cookie", bystander_cookie)]).__aenter__()
            try:
                greeted = [await recv(sockets[0]), await recv(other)]
                poll = asyncio.create_task(asyncio.to_thread(
                    http_request, server.url("/sec/poll/", "http"), None, {"Cookie": cookie}, 20))
                stream_end = asyncio.create_task(asyncio.to_thread(sec_stream_end, stream))
                await asyncio.sleep(0.5)  # the poll waits in its group
                ended_at = time.monotonic()
                new_cookie = await asyncio.to_thread(sec_end_login, ending, server, user, cookie)
                closes = [await sec_until_closed(socket) for socket in sockets]
                polled = await poll
                polled_after = time.monotonic() - ended_at
                stream_after = await stream_end - ended_at
                await other.send("still here?")
                still = await recv(other)
                again = None
                if new_cookie:
                    async with ws_connect(server.url("/sec/whoami/"),
                                          additional_headers=[("Cookie", new_cookie)]) as socket:
                        again = await recv(socket)
                return greeted, closes, polled, polled_after, stream_after, still, again, new_cookie
            finally:
                for socket in [*sockets, other]:
                    await socket.close()

        try:
            greeted, closes, polled, polled_after, stream_after, still, again, new_cookie = \
                run(scenario(), timeout=60)
        finally:
            connection.close()
        view_says = sec_whoami(server, cookie)
    assert first == f": {user.username}\n\n".encode()
    assert greeted == [user.username, bystander.username]
    bound = 1.0 if ending == "logout" else 5.0
    assert [code for code, _ in closes] == [4401, 4401], closes
    assert closes[0][1] < bound and sum(seconds for _, seconds in closes) < bound, closes
    assert polled[:2] == (403, b"The login this request was made with has ended."), polled
    assert polled_after < bound + 0.5 and stream_after < bound + 0.5, (polled_after, stream_after)
    assert still == bystander.username
    assert view_says == "anonymous"  # Django agrees: the old session is nobody's login
    if ending == "password_changed_here":
        assert again == user.username


def test_security_logout_with_redis_down_completes_and_closes_in_both_processes():
    """Two uvicorn processes share Redis; Redis stops; a logout on the first answers as Django
    does and flushes the session; that session's sockets close with 4401 at once there and
    within 5 s on the second, whose event stream ends too; another user's socket stays open."""
    user, cookie = rel_login("redis-down")
    bystander, bystander_cookie = rel_login("redis-bystander")
    with running_redis() as url, running_server(app=f"{__name__}:sec_app", env=redis_server_env(url)) as first, \
            running_server(app=f"{__name__}:sec_app", env=redis_server_env(url)) as second:
        connection, stream, _ = sec_open_stream(second, cookie)

        async def scenario():
            sockets = [await ws_connect(server.url("/sec/whoami/"), additional_headers=[
                ("Cookie", value)]).__aenter__() for server, value in (
                (first, cookie), (second, cookie), (second, bystander_cookie))]
            try:
                greeted = [await recv(socket) for socket in sockets]
                stream_end = asyncio.create_task(asyncio.to_thread(sec_stream_end, stream))
                await asyncio.to_thread(redis_shutdown, url)
                started = time.monotonic()
                logout = await asyncio.to_thread(http_request, first.url("/logout/", "http"), None,
                                                 {"Cookie": cookie})
                logout_took = time.monotonic() - started
                closes = [await sec_until_closed(socket) for socket in sockets[:2]]
                stream_after = await stream_end - started
                await sockets[2].send("still here?")
                return greeted, logout[:2], logout_took, closes, stream_after, await recv(sockets[2])
            finally:
                for socket in sockets:
                    await socket.close()

        try:
            greeted, logout, logout_took, closes, stream_after, still = run(scenario(), timeout=60)
        finally:
            connection.close()
        after = [sec_whoami(server, cookie) for server in (first, second)]
    assert greeted == [user.username, user.username, bystander.username]
    assert logout == (200, b"logged out") and logout_took < 2, logout_took
    assert after == ["anonymous", "anonymous"]  # the session was flushed
    assert [code for code, _ in closes] == [4401, 4401]
    assert closes[0][1] < 1.0 and closes[0][1] + closes[1][1] < 5.0, closes
    assert stream_after < 5.5, stream_after
    assert still == bystander.username


def test_security_a_rotated_secret_key_ends_no_login():
    """SECRET_KEY rotated, the old one in SECRET_KEY_FALLBACKS: a session made under the old
    key stays logged in on a socket through several login checks, and the browser's session
    is not cycled away under it (Django's get_user would give it a new key)."""
    from django.contrib.sessions.models import Session

    user, cookie = rel_login("rotated")
    env = {"CHANNELS_MINI_TEST_SECRET_ROTATED": "1", "CHANNELS_MINI_TEST_LOGIN_CHECK": "0.5"}
    with running_server(app=f"{__name__}:sec_app", env=env) as server:

        async def scenario():
            async with ws_connect(server.url("/sec/whoami/"),
                                  additional_headers=[("Cookie", cookie)]) as socket:
                greeted = await recv(socket)
                await asyncio.sleep(2)  # four login checks
                await socket.send("who")
                return greeted, await recv(socket), socket.close_code

        greeted, again, code = run(scenario())
    assert (greeted, again, code) == (user.username, user.username, None)
    assert Session.objects.filter(session_key=cookie.split("=", 1)[1]).exists()


@pytest.mark.parametrize("ending", ["deactivated", "password_changed_elsewhere"])
def test_security_a_binding_write_rechecks_the_user_before_it_saves(ending):
    """A socket whose user was deactivated (or whose password changed on another device) --
    before any login check closed it -- cannot write through a binding: the write is
    refused, nothing is saved, and the socket closes with 4401."""
    user, cookie = rel_login("writer")
    before_title, after_title = f"b-{user.pk}", f"a-{user.pk}"
    env = {"CHANNELS_MINI_TEST_LOGIN_CHECK": "60"}  # so that only the write's own check runs
    with running_server(app=f"{__name__}:sec_app", env=env) as server:

        def write(title):
            return json.dumps({"stream": "notes", "payload": {
                "action": "create", "data": {"title": title}, "request_id": title}})

        async def scenario():
            async with ws_connect(server.url("/sec/notes/"),
                                  additional_headers=[("Cookie", cookie)]) as socket:
                await socket.send(write(before_title))
                before = [json.loads(await recv(socket)) for _ in range(2)]
                await asyncio.to_thread(sec_end_login, ending, server, user, cookie)
                await socket.send(write(after_title))
                frames, code = await rel_until_closed(socket)
                return before, frames, code

        before, frames, code = run(scenario())
    answers = [frame["payload"] for frame in before]
    assert {"action": "create", "pk": answers[0].get("pk") or answers[1].get("pk"),
            "request_id": before_title} in answers
    assert [json.loads(frame)["payload"] for frame in frames] == [
        {"error": "Your login has ended: log in again.", "action": "create", "pk": None,
         "request_id": after_title}]
    assert code == 4401
    assert list(rel_Note.objects.filter(title__in=[before_title, after_title]).values_list(
        "title", flat=True)) == [before_title]


@pytest.mark.parametrize("kind", ["uvicorn", "daphne", "hypercorn"])
def test_security_http_timeout_counts_from_arrival_whatever_the_consumer_does(kind):
    """A consumer busy for 3 s behind http_timeout=1.5: the client gets 504 at 1.5 s, and
    the consumer's late answer goes nowhere; the server keeps answering."""
    with running_server(kind, app=f"{__name__}:sec_quick_app") as server:
        start = time.monotonic()
        answer = http_request(server.url("/sec/slow/", "http"))
        waited = time.monotonic() - start
        time.sleep(2)  # the consumer finishes and answers, too late
        fine = http_request(server.url("/sec/body/", "http"), data=b"12345")
    assert answer[:2] == (504, b"Nobody answered this request in time.")
    assert 1.3 <= waited < 2.8, waited
    assert fine[:2] == (200, b"5")


def sec_trickle(port: int, seconds: float = 8) -> tuple[bytes, float]:
    """POST a 100-byte body one byte every 0.5 s; what the server answered and when."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"POST /sec/body/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
        raw.settimeout(0.5)
        start = time.monotonic()
        answer = b""
        while time.monotonic() - start < seconds:
            try:
                chunk = raw.recv(4096)
            except socket.timeout:
                with contextlib.suppress(OSError):
                    raw.sendall(b"x")
                continue
            if not chunk:
                break
            answer += chunk
            if answer.endswith(b"\r\n0\r\n\r\n"):  # the end of a chunked body
                break
        return answer, time.monotonic() - start


@pytest.mark.parametrize("kind", ["uvicorn", "hypercorn"])  # daphne reads bodies itself first
def test_security_a_body_that_does_not_arrive_in_time_gets_408(kind):
    """A body trickled a byte every 0.5 s gets 408 once http_timeout (1.5 s) has passed since
    the request arrived; the consumer never runs and nothing stays behind."""
    with running_server(kind, app=f"{__name__}:sec_quick_app") as server:
        before = json.loads(http_request(server.url("/http/stats/", "http"))[1])
        answer, waited = sec_trickle(server.port)
        time.sleep(0.3)
        after = json.loads(http_request(server.url("/http/stats/", "http"))[1])
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"\r\nThe request body did not arrive in time.\r\n" in answer, answer
    assert 1.3 <= waited < 3, waited
    assert {key: after[key] for key in ("channels", "groups", "members")} == \
        {key: before[key] for key in ("channels", "groups", "members")}


async def sec_status_of_get(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        return int((await reader.readline()).split()[1])
    finally:
        writer.close()


def test_security_6000_unanswered_polls_log_at_most_ten_lines_a_second():
    """6,000 long-polls nobody answers, 1,000 at a time: each gets its 504, and the log holds
    at most ten 504 lines a second, each counting those left out since the one before."""
    with running_server(app=f"{__name__}:sec_quick_app") as server:

        async def scenario():
            statuses = []
            for _ in range(6):
                statuses += await asyncio.gather(*(sec_status_of_get(server.port, "/sec/never/")
                                                   for _ in range(1000)))
            return statuses

        start = time.monotonic()
        statuses = run(scenario(), timeout=120)
        elapsed = time.monotonic() - start
        lines = [line for line in server.log().splitlines() if "Nobody answered" in line]
    assert statuses == [504] * 6000
    assert len(lines) <= 10 * (elapsed + 1), (len(lines), elapsed)
    counted = sum(int(m.group(1)) for line in lines
                  for m in [re.search(r"\((\d+) more like it", line)] if m)
    # Those after the last line wait for the next one: at most the last round.
    assert 5000 <= counted + len(lines) <= 6000, (counted, len(lines))



# -- a 1.x project and its tests, as written for Channels 1.1.8 (issue 22) --
# The consumers, routing and test cases below are a small Channels 1.x project -- function
# consumers with the session decorators, a class consumer, an outbound and an inbound
# binding, an HTTP consumer -- and its tests against `channels.test`. Only the import lines
# would differ from 1.1.8 (they name this module). Django's TestCase runs them: the test DB
# file is migrated before the first test (`_onex_database` below plays the test runner's part).

@pytest.fixture(autouse=True, scope="session")
def _onex_database():
    ensure_database()


@channel_session_user_from_http
def onex_chat_connect(message, room):
    message.reply_channel.send({"accept": True})
    message.channel_session["room"] = room
    Group("onex-chat-%s" % room).add(message.reply_channel)


@channel_session_user
def onex_chat_message(message, room):
    Group("onex-chat-%s" % message.channel_session["room"]).send({"text": json.dumps({
        "user": message.user.username, "text": message["text"]})})


@channel_session_user
def onex_chat_disconnect(message, room):
    Group("onex-chat-%s" % message.channel_session["room"]).discard(message.reply_channel)


class onex_Echo(JsonWebsocketConsumer):
    http_user = True

    def receive(self, content, **kwargs):
        self.send({"echo": content, "user": self.message.user.username})


class onex_ItemBinding(WebsocketBinding):
    model = f"{__name__}.Item"
    stream = "items"
    fields = ["name", "team"]

    @classmethod
    def group_names(cls, instance):
        return ["onex-items"] if instance.name.startswith("onex-") else []

    def has_permission(self, user, action, pk):
        return user.is_authenticated


class onex_Items(WebsocketDemultiplexer):
    consumers = {"items": onex_ItemBinding.consumer}
    groups = ["onex-items"]


def onex_hello(message):
    from django.http import HttpResponse
    response = HttpResponse("Hello, %s" % message.content["path"], content_type="text/plain")
    for chunk in AsgiHandler.encode_response(response):
        message.reply_channel.send(chunk)


onex_routing = [
    route("websocket.connect", onex_chat_connect, path=r"^/chat/(?P<room>\w+)/$"),
    route("websocket.receive", onex_chat_message, path=r"^/chat/(?P<room>\w+)/$"),
    route("websocket.disconnect", onex_chat_disconnect, path=r"^/chat/(?P<room>\w+)/$"),
    onex_Echo.as_route(path=r"^/echo/$"),
    onex_Items.as_route(path=r"^/items/$"),
    route("http.request", onex_hello, path=r"^/hello/"),
]


@apply_routes(onex_routing)
class OneXProjectTests(ChannelTestCase):

    def test_chat_carries_the_logged_in_user_to_the_room(self):
        from django.contrib.auth.models import User
        ada = User.objects.create_user("onex-ada", password="pw")
        client, other = WSClient(), WSClient()
        self.assertTrue(client.login(username="onex-ada", password="pw"))
        client.send_and_consume("websocket.connect", path="/chat/lobby/")
        other.send_and_consume("websocket.connect", path="/chat/lobby/")
        client.send_and_consume("websocket.receive", path="/chat/lobby/", text="hi")
        self.assertEqual(other.receive(), {"user": ada.username, "text": "hi"})
        self.assertEqual(client.receive(), {"user": ada.username, "text": "hi"})
        client.send_and_consume("websocket.disconnect", path="/chat/lobby/")
        other.send_and_consume("websocket.receive", path="/chat/lobby/", text="anyone?")
        self.assertEqual(other.receive(), {"user": "", "text": "anyone?"})
        self.assertIsNone(client.receive())

    def test_class_consumer_answers_json_with_its_user(self):
        from django.contrib.auth.models import User
        client = WSClient()
        client.force_login(User.objects.create_user("onex-bob"))
        client.send_and_consume("websocket.connect", path="/echo/")
        consumer = client.send_and_consume("websocket.receive", path="/echo/", text={"n": 1})
        self.assertIsInstance(consumer, onex_Echo)
        self.assertEqual(client.receive(), {"echo": {"n": 1}, "user": "onex-bob"})

    def test_outbound_binding_reaches_the_group_inside_the_test(self):
        client = WSClient()
        client.join_group("onex-items")
        item = Item.objects.create(name="onex-lamp")
        received = client.receive()
        self.assertEqual(received["stream"], "items")
        self.assertEqual(received["payload"]["action"], CREATE)
        self.assertEqual(received["payload"]["pk"], item.pk)
        self.assertEqual(received["payload"]["data"], {"name": "onex-lamp", "team": "red"})
        item.delete()
        self.assertEqual(client.receive()["payload"]["action"], DELETE)
        self.assertIsNone(client.receive())

    def test_inbound_binding_saves_for_a_user_and_refuses_anonymous(self):
        from django.contrib.auth.models import User
        anonymous, client = WSClient(), WSClient()
        client.force_login(User.objects.create_user("onex-cy"))
        for someone in (anonymous, client):
            someone.send_and_consume("websocket.connect", path="/items/")
        request = {"stream": "items", "payload": {"action": CREATE, "data": {"name": "onex-desk"}}}
        anonymous.send_and_consume("websocket.receive", path="/items/", text=request)
        self.assertFalse(Item.objects.filter(name="onex-desk").exists())
        client.send_and_consume("websocket.receive", path="/items/", text=request)
        item = Item.objects.get(name="onex-desk")
        update = {"stream": "items", "payload": {"action": UPDATE, "pk": item.pk, "data": {"team": "blue"}}}
        client.send_and_consume("websocket.receive", path="/items/", text=update)
        item.refresh_from_db()
        self.assertEqual(item.team, "blue")

    def test_http_consumer_answers_on_the_reply_channel(self):
        client = Client()
        client.send_and_consume("http.request", {"path": "/hello/world", "method": "GET"})
        reply = client.receive()
        self.assertEqual(reply["status"], 200)
        self.assertEqual(reply["content"], b"Hello, /hello/world")
        self.assertEqual(self.get_next_message(client.reply_channel), None)

    def test_unrouted_and_missing_messages_fail_the_test(self):
        client = Client()
        with self.assertRaisesRegex(AssertionError, "No message for channel websocket.connect"):
            client.consume("websocket.connect")
        client.send("nobody.listens", {"x": 1})
        with self.assertRaisesRegex(AssertionError, "Can't find consumer"):
            client.consume("nobody.listens")
        with self.assertRaisesRegex(AssertionError, "Expected a message on channel nowhere"):
            self.get_next_message("nowhere", require=True)


class OneXSessionTests(ChannelTestCase):
    """Channels 1.1.8's session tests, in its words: decorated consumers called directly keep
    what they stored; the channel session is found again by reply channel."""

    def test_channel_session_called_directly_is_saved(self):
        message = Message({"reply_channel": "onex-reply"}, None, None)

        @channel_session
        def inner(message):
            message.channel_session["num_ponies"] = -1

        inner(message)
        self.assertEqual(session_for_reply_channel("onex-reply")["num_ponies"], -1)

    def test_channel_session_without_a_message_says_so(self):
        @channel_session
        def inner(message):
            pass

        with self.assertRaisesRegex(ValueError, "channel_session called without Message instance"):
            inner(None, "not a message", "nor this")



def test_onex_allowed_hosts_only_refuses_origins_outside_allowed_hosts_as_1x_did():
    from django.test import override_settings
    """1.x's check: the handshake's Origin must be an ASCII URL whose host is in ALLOWED_HOSTS;
    a missing, empty or non-ASCII one is refused too. Other channels pass."""
    @allowed_hosts_only
    def connect(message):
        return True

    def handshake(*headers):
        return Message({"headers": [list(header) for header in headers]}, "websocket.connect", None)

    assert connect(handshake((b"origin", b"http://localhost")))
    with override_settings(ALLOWED_HOSTS=["[::1]"]):
        assert connect(handshake((b"origin", b"http://[::1]:8000")))
    assert connect(Message({"headers": {"origin": b"http://testserver"}}, "websocket.connect", None))
    for refused in [handshake((b"origin", b"http://example.org")), handshake(), handshake((b"origin", b"")),
                    handshake((b"origin", b"\xc3\xa4")), handshake((b"origin",))]:
        with pytest.raises(DenyConnection):
            connect(refused)
    assert connect(Message({}, "websocket.receive", None))


def test_onex_names_that_thing_and_adds_routes():
    assert name_that_thing(onex_hello) == f"{__name__}.onex_hello"
    assert name_that_thing(onex_Echo) == f"{__name__}.onex_Echo"
    assert name_that_thing(onex_Echo.as_route) == f"{__name__}.onex_Echo"  # a classmethod: its class
    assert name_that_thing(Client()) == "channels_mini.Client"
    router = Router([])
    router.add_route(route("onex.added", onex_hello))
    assert router.channels == {"onex.added"}
    assert router.match(Message({}, "onex.added", None)) == (onex_hello, {})


def test_onex_asgi_handler_runs_a_request_through_django_and_chunks_the_reply():
    from django.http import HttpResponse, StreamingHttpResponse

    class Fixed(AsgiHandler):
        chunk_size = 4

        def __init__(self, response):
            self.response = response
            super().__init__()

        def get_response(self, request):
            assert request.path == "/here/" and request.GET["q"] == "1"
            return self.response

    message = Message({"reply_channel": "r", "method": "GET", "path": b"/here/", "query_string": b"q=1",
                       "headers": [], "body": b""}, "http.request", None)
    replies = list(Fixed(HttpResponse(b"0123456789", content_type="text/plain"))(message))
    assert [reply["content"] for reply in replies] == [b"0123", b"4567", b"89"]
    assert [reply["more_content"] for reply in replies] == [True, True, False]
    assert replies[0]["status"] == 200 and (b"Content-Type", b"text/plain") in replies[0]["headers"]
    streamed = list(Fixed(StreamingHttpResponse(iter([b"ab", b"cdefg"])))(message))
    assert b"".join(reply["content"] for reply in streamed) == b"abcdefg"
    assert streamed[-1]["more_content"] is False
    assert list(AsgiHandler.chunk_bytes(b"")) == [(b"", True)]


def test_onex_asgi_request_reads_a_body_sent_in_chunks_or_times_out_or_aborts():
    layer = InMemoryChannelLayer()
    head = {"reply_channel": "r", "method": "POST", "path": "/p/", "body": b"a=1",
            "body_channel": "onex-body", "headers": {"content-type": b"application/x-www-form-urlencoded"}}
    for chunk in ({"content": b"&b=", "more_content": True}, {"content": b"2"}):
        layer.send_now("onex-body", chunk)
    request = AsgiRequest(Message(dict(head), "http.request", layer))
    assert request.body == b"a=1&b=2" and request.POST["b"] == "2"

    class Impatient(AsgiRequest):
        body_receive_timeout = 0.2

    layer.send_now("onex-body", {"content": b"&b=", "more_content": True})
    with pytest.raises(RequestTimeout, match="did not arrive on 'onex-body' within 0.2 s"):
        Impatient(Message(dict(head), "http.request", layer))
    layer.send_now("onex-body", {"closed": True})
    with pytest.raises(RequestAborted):
        AsgiRequest(Message(dict(head), "http.request", layer))


@asynchronous
async def test_onex_demultiplexer_uses_its_multiplexer_class():
    class Tagged(WebsocketMultiplexer):
        def send(self, payload):
            super().send({**payload, "tagged": True})

    def answer(message, multiplexer=None, **kwargs):
        if message.channel_name == "websocket.receive":
            multiplexer.send({"got": json.loads(message["text"])})

    class Demux(WebsocketDemultiplexer):
        consumers = {"s": answer}
        multiplexer_class = Tagged

    app = Application([Demux.as_route(path=r"^/d/$")], channel_layer=InMemoryChannelLayer())
    socket = WebsocketCommunicator(app, "/d/")
    assert (await socket.connect())[0]
    await socket.send_json_to({"stream": "s", "payload": {"n": 1}})
    assert await socket.receive_json_from() == {"stream": "s", "payload": {"got": {"n": 1}, "tagged": True}}
    await socket.disconnect()


class onex_AsyncCounter(WebsocketConsumer):
    """An async def handler using message.channel_session without a decorator (database engine)."""

    async def receive(self, text=None, bytes=None, **kwargs):
        session = self.message.channel_session
        session["count"] = session.get("count", 0) + 1
        self.send(text=str(session["count"]))


@asynchronous
async def test_onex_async_handler_reads_the_channel_session_from_the_database_engine():
    """It closed the socket with 1011 (SynchronousOnlyOperation); a sync handler worked."""
    from django.conf import settings as django_settings
    assert django_settings.SESSION_ENGINE == "django.contrib.sessions.backends.db"
    await asyncio.to_thread(ensure_database)
    app = Application([onex_AsyncCounter.as_route(path=r"^/count/$")], channel_layer=InMemoryChannelLayer())
    socket = WebsocketCommunicator(app, "/count/")
    assert (await socket.connect())[0]
    for expected in ("1", "2", "3"):
        await socket.send_to(text_data="+")
        assert await socket.receive_from(timeout=5) == expected
    await socket.disconnect()


@asynchronous
async def test_onex_a_handshake_nobody_accepts_is_logged(caplog, monkeypatch):
    """A connect consumer that sends no accept left the client waiting with nothing logged."""
    monkeypatch.setattr(channels_mini, "_UNANSWERED_HANDSHAKE", 0.2)

    def silent(message, **kwargs):
        pass

    app = Application([route("websocket.connect", silent, path=r"^/silent/$")],
                      channel_layer=InMemoryChannelLayer())
    socket = WebsocketCommunicator(app, "/silent/")
    with pytest.raises(asyncio.TimeoutError):
        await socket.connect(timeout=0.6)
    await socket.disconnect(timeout=2)
    assert "Websocket /silent/: no consumer accepted or refused its handshake" in caplog.text
    assert "Send {'accept': True}" in caplog.text


# === 12. HTTP consumers and event streams ===

# -- HTTP consumers (Channels 1.x's http.request) --

def http_hello(message):
    """Channels 1.x's Getting Started consumer, as written there (imports aside)."""
    from django.http import HttpResponse
    response = HttpResponse("Hello world! You asked for %s" % message.content["path"])
    for chunk in AsgiHandler.encode_response(response):
        message.reply_channel.send(chunk)


async def http_echo(message, name):
    """Answers with what the 1.x message holds (the body, the request line, the peers)."""
    headers = {key.decode(): value.decode() for key, value in message["headers"]}
    answer = {"name": name, "method": message["method"], "path": message["path"],
              "query_string": message["query_string"].decode(), "body": message["body"].decode(),
              "scheme": message["scheme"], "http_version": message["http_version"],
              "has_client": bool(message["client"]), "has_server": bool(message["server"]),
              "header": headers.get("x-test"), "reply_channel": message["reply_channel"]}
    message.reply_channel.send({"status": 201, "headers": [("content-type", "application/json")],
                                "content": json.dumps(answer).encode()})


def http_form(message):
    """Reads a posted form through AsgiRequest, as a 1.x consumer would."""
    request = AsgiRequest(message)
    text = f"{request.method} {request.path} said={request.POST.get('said')} q={request.GET.get('q')}"
    message.reply_channel.send({"status": 200, "headers": [], "content": text.encode()})


def http_poll(message, topic):
    """A long-poll: the reply channel waits in a group until something is published."""
    Group(f"http-poll-{topic}").add(message.reply_channel)


def http_stream(message):
    """Server-sent events: headers and a first comment now, then whatever the group gets."""
    message.reply_channel.send({"status": 200, "headers": SSE_HEADERS,
                                "content": sse_event(comment="hello"), "more_content": True})
    Group("http-stream").add(message.reply_channel)


http_disconnects: list[str] = []


def http_gone(message):
    http_disconnects.append(message["path"])


def http_never(message):
    """Routed, and never answered: the request gets 504 after http_timeout."""


def http_counting(message):
    http_disconnects.append("counted " + message["path"])
    message.reply_channel.send({"status": 200, "headers": [], "content": b"ok"})


def _view_http_publish(request, topic):
    """A Django view answers the long-polls of *topic* and feeds the event streams."""
    from django.http import HttpResponse
    text = request.GET.get("text", "news")
    Group(f"http-poll-{topic}").send({"status": 200, "headers": [("content-type", "text/plain")],
                                      "content": f"{topic}: {text}".encode()})
    Group("http-stream").send({"content": sse_event(text, id=request.GET.get("id")),
                               "more_content": True})
    return HttpResponse("published")


def _view_http_stats(request):
    from django.http import JsonResponse
    layer = get_channel_layer()
    return JsonResponse({**layer.stats(), "late": getattr(layer, "late", 0),
                         "disconnects": http_disconnects})


def _http_url_patterns():
    from django.urls import path
    return [path("http/publish/<str:topic>/", _view_http_publish), path("http/stats/", _view_http_stats)]


urlpatterns += _http_url_patterns()

http_routing = [
    route("http.request", http_hello, path=r"^/hello/"),
    route("http.request", http_echo, path=r"^/http/echo/(?P<name>\w+)/$", method="^(?:GET|POST)$"),
    route("http.request", http_form, path=r"^/http/form/$", method=b"^POST$"),
    route("http.request", http_poll, path=r"^/http/poll/(?P<topic>\w+)/$", method="^GET$"),
    route("http.request", http_stream, path=r"^/http/stream/$"),
    route("http.request", http_never, path=r"^/http/never/$"),
    route("http.request", http_counting, path=r"^/http/counting/$"),
    route("http.disconnect", http_gone),
]
http_app = Application(http_routing, http_timeout=2)


def http_request(url: str, data: bytes | None = None, headers: dict | None = None,
                 timeout: float = 10) -> tuple:
    """A real HTTP request: status, body and the (case-insensitive) response headers."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


@pytest.mark.parametrize("kind", ["uvicorn", "daphne", "hypercorn"])
def test_app_http_consumers_get_post_and_django_under_each_server(kind):
    """Routed GET and POST (with a body) reach their consumers with the 1.x message; the 1.x
    Getting Started consumer answers; unrouted requests still reach Django's views."""
    with running_server(kind, app=f"{__name__}:http_app") as server:
        status, body, headers = http_request(server.url("/http/echo/bob/?q=1", "http"),
                                             data=b"payload", headers={"X-Test": "yes"})
        got = json.loads(body)
        get_status, get_body, _ = http_request(server.url("/http/echo/ann/", "http"))
        hello = http_request(server.url("/hello/there/", "http"))
        form = http_request(server.url("/http/form/?q=2", "http"), data=b"said=hi+there")
        django_page = http_get(server.url("/page/", "http"))
    assert status == 201 and headers["content-type"] == "application/json"
    assert {key: got[key] for key in ("name", "method", "path", "query_string", "body", "scheme",
                                      "header", "has_client", "has_server")} == {
        "name": "bob", "method": "POST", "path": "/http/echo/bob/", "query_string": "q=1",
        "body": "payload", "scheme": "http", "header": "yes", "has_client": True, "has_server": True}
    assert got["http_version"] in ("1.0", "1.1") and got["reply_channel"].startswith("http.response")
    assert get_status == 201 and json.loads(get_body)["method"] == "GET"
    assert hello[:2] == (200, b"Hello world! You asked for /hello/there/")
    assert form[:2] == (200, b"POST /http/form/ said=hi there q=2")
    assert django_page == (200, "django page ok")


@pytest.mark.parametrize("kind", ["uvicorn", "daphne", "hypercorn"])
def test_app_http_long_poll_is_answered_by_a_django_view_in_the_same_process(kind):
    """A long-poll waits in a group; a Django view's Group.send answers it (and only its topic)."""
    with running_server(kind, app=f"{__name__}:http_app") as server:

        async def scenario():
            waiting = asyncio.create_task(asyncio.to_thread(
                http_request, server.url("/http/poll/alpha/", "http")))
            other = asyncio.create_task(asyncio.to_thread(
                http_request, server.url("/http/poll/beta/", "http"), None, None, 8))
            await asyncio.sleep(0.5)  # both wait in their groups
            published = await asyncio.to_thread(
                http_request, server.url("/http/publish/alpha/?text=hello", "http"))
            return published, await waiting, await other

        published, answered, unanswered = run(scenario())
    assert published[:2] == (200, b"published")
    assert answered[:2] == (200, b"alpha: hello")
    assert unanswered[0] == 504  # beta's topic heard nothing: its request timed out


@pytest.mark.parametrize("kind", ["uvicorn", "daphne", "hypercorn"])
def test_app_http_server_sent_events_receive_group_sends_in_order(kind):
    """An event stream joined to a group gets every Group.send, in order, as SSE events."""
    import http.client
    with running_server(kind, app=f"{__name__}:http_app") as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            connection.request("GET", "/http/stream/")
            response = connection.getresponse()
            first = response.readline() + response.readline()
            for number in range(20):
                assert http_request(server.url(f"/http/publish/x/?text=n{number}&id={number}",
                                               "http"))[:2] == (200, b"published")
            events = []
            for _ in range(20):
                lines = [response.readline() for _ in range(3)]  # id:, data:, blank
                events.append(b"".join(lines))
            content_type = response.getheader("content-type")
        finally:
            connection.close()
    assert response.status == 200 and content_type == "text/event-stream"
    assert first == b": hello\n\n"
    assert events == [f"id: {n}\ndata: n{n}\n\n".encode() for n in range(20)]


@pytest.mark.parametrize("kind", ["uvicorn", "daphne", "hypercorn"])
def test_app_http_client_leaving_mid_wait_leaves_its_groups_and_late_replies_are_dropped(kind):
    """A long-poll client that disconnects produces http.disconnect; its reply channel leaves
    every group and nothing stays behind; a late answer is dropped quietly and counted."""
    with running_server(kind, app=f"{__name__}:http_app") as server:
        before = json.loads(http_request(server.url("/http/stats/", "http"))[1])
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(b"GET /http/poll/gone/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # until it waits in its group
                waiting = json.loads(http_request(server.url("/http/stats/", "http"))[1])
                if waiting["members"] > before["members"]:
                    break
                time.sleep(0.05)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the server saw the client leave
            after = json.loads(http_request(server.url("/http/stats/", "http"))[1])
            if "/http/poll/gone/" in after["disconnects"]:
                break
            time.sleep(0.05)
        http_request(server.url("/http/publish/gone/", "http"))  # nobody waits any more
        final = json.loads(http_request(server.url("/http/stats/", "http"))[1])
    assert waiting["members"] == before["members"] + 1
    assert "/http/poll/gone/" in after["disconnects"]
    assert {key: after[key] for key in ("channels", "groups", "members", "messages")} == \
        {key: before[key] for key in ("channels", "groups", "members", "messages")}
    assert final["messages"] == before["messages"]


@pytest.mark.parametrize("kind", ["uvicorn", "daphne", "hypercorn"])
def test_app_http_413_over_the_body_limit_and_504_when_nobody_answers(kind):
    """A body over DATA_UPLOAD_MAX_MEMORY_SIZE gets 413 and the consumer never runs; a
    request nobody answers gets 504 after http_timeout (2 s here), not a socket held forever."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    with running_server(kind, app=f"{__name__}:http_app") as server:
        too_big = http_request(server.url("/http/counting/", "http"), data=b"x" * (limit + 1))
        fits = http_request(server.url("/http/counting/", "http"), data=b"x" * 10)
        start = time.monotonic()
        never = http_request(server.url("/http/never/", "http"))
        waited = time.monotonic() - start
        stats = json.loads(http_request(server.url("/http/stats/", "http"))[1])
    assert too_big[0] == 413 and f"over {limit} bytes".encode() in too_big[1]
    assert fits[:2] == (200, b"ok")
    assert [entry for entry in stats["disconnects"] if entry.startswith("counted")] == \
        ["counted /http/counting/"]  # only the request that fitted ran the consumer
    assert never[:2] == (504, b"Nobody answered this request in time.")
    assert 1.5 <= waited < 6, waited


def test_app_http_long_poll_answered_from_another_process_through_redis():
    """Two servers share Redis: a long-poll waiting on one is answered by a view on the other."""
    with running_redis() as url:
        env = redis_server_env(url)
        with running_server(app=f"{__name__}:http_app", env=env) as first, \
                running_server(app=f"{__name__}:http_app", env=env) as second:

            async def scenario():
                waiting = asyncio.create_task(asyncio.to_thread(
                    http_request, first.url("/http/poll/cross/", "http")))
                await asyncio.sleep(1.0)
                published = await asyncio.to_thread(
                    http_request, second.url("/http/publish/cross/?text=from-b", "http"))
                return published, await waiting

            published, answered = run(scenario())
    assert published[:2] == (200, b"published")
    assert answered[:2] == (200, b"cross: from-b")



# === 13. Presence ===

# -- presence (issue 15) --
# A socket tracked in a group under a key (its user's pk with `http_user`, else one
# anonymous key per socket); `Group(name).presence()` reads `{key: [meta, ...]}`; keys that
# come and go reach the group as one `presence_diff` text frame. One process, no settings:
# the default cache (locmem) holds the entries.

class presence_Room(WebsocketConsumer):
    """Listed in its room's presence with the meta from `?tab=`; "who" answers the room's
    presence, read from inside a handler as an app would on every connect."""

    http_user = True

    def presence_groups(self, room, **kwargs):
        return [f"presence-{room}"]

    def presence_meta(self, **kwargs):
        return {"tab": self.message.scope["query_string"].decode().partition("tab=")[2] or "main"}

    def receive(self, text=None, bytes=None, room=None, **kwargs):
        self.send(text=json.dumps(Group(f"presence-{room}").presence()))


class presence_Lobby(WebsocketConsumer):
    """The declarative form: `presence = [...]`, the default meta, no `http_user`."""

    presence = ["presence-lobby"]


def presence_track_by_hand(message, **kwargs):
    """A function consumer tracking its socket itself, under a key it chooses."""
    if message.channel_name == "websocket.connect":
        message.reply_channel.send({"accept": True})
        Group("presence-by-hand").track(message.reply_channel, key="desk-7", meta={"by": "hand"})


presence_routing = [
    presence_Room.as_route(path=r"^/presence/room/(?P<room>[\w-]+)/$"),
    presence_Lobby.as_route(path=r"^/presence/lobby/$"),
    route(["websocket.connect"], presence_track_by_hand, path=r"^/presence/by-hand/$"),
]


def presence_diff(group: str, joins: dict | None = None, leaves: dict | None = None) -> dict:
    """The frame a group hears when keys join or leave (the documented contract)."""
    return {"type": "presence_diff", "group": group, "joins": joins or {}, "leaves": leaves or {}}


async def presence_open(app, path: str, cookie: str | None = None) -> WebsocketCommunicator:
    socket = WebsocketCommunicator(app, path, headers=[("cookie", cookie)] if cookie else None)
    assert await socket.connect(timeout=5) == (True, None)
    return socket


async def presence_who(socket: WebsocketCommunicator) -> dict:
    await socket.send_to(text_data="who")
    return await socket.receive_json_from(timeout=5)


@asynchronous
async def test_messages_presence_tracks_sockets_and_announces_joins_and_leaves():
    app = Application(presence_routing)
    room = f"presence-{uuid.uuid4().hex[:8]}"
    first = await presence_open(app, f"/presence/room/{room[9:]}/?tab=one")
    [first_key] = await Group(room).apresence()
    assert re.fullmatch(r"anonymous\.[0-9a-f]{24}", first_key), first_key  # opaque
    assert await first.receive_json_from(timeout=5) == presence_diff(
        room, joins={first_key: [{"tab": "one"}]})  # a socket hears its own join

    second = await presence_open(app, f"/presence/room/{room[9:]}/?tab=two")
    [second_key] = set(await Group(room).apresence()) - {first_key}
    joined = presence_diff(room, joins={second_key: [{"tab": "two"}]})
    assert await first.receive_json_from(timeout=5) == joined
    assert await second.receive_json_from(timeout=5) == joined
    assert await presence_who(second) == {first_key: [{"tab": "one"}], second_key: [{"tab": "two"}]}

    await first.disconnect()
    assert await second.receive_json_from(timeout=5) == presence_diff(
        room, leaves={first_key: [{"tab": "one"}]})
    assert await presence_who(second) == {second_key: [{"tab": "two"}]}
    await second.disconnect()
    assert await Group(room).apresence() == {}


@asynchronous
async def test_messages_presence_same_user_in_two_tabs_is_one_member_with_two_metas():
    user, cookie = await asyncio.to_thread(rel_login, "tabs")
    key = str(user.pk)
    app = Application(presence_routing)
    room = f"presence-{uuid.uuid4().hex[:8]}"
    path = f"/presence/room/{room[9:]}/"
    watcher = await presence_open(app, path + "?tab=watcher")  # anonymous, hears the diffs
    [watcher_key] = await Group(room).apresence()
    await watcher.receive_json_from(timeout=5)  # its own join

    tab_one = await presence_open(app, path + "?tab=one", cookie)
    joined = presence_diff(room, joins={key: [{"tab": "one"}]})
    assert await watcher.receive_json_from(timeout=5) == joined
    assert await tab_one.receive_json_from(timeout=5) == joined
    tab_two = await presence_open(app, path + "?tab=two", cookie)
    assert await presence_who(watcher) == {watcher_key: [{"tab": "watcher"}],
                                           key: [{"tab": "one"}, {"tab": "two"}]}
    # The key was already present: the second tab is no join.
    assert await tab_two.receive_nothing(timeout=0.3) and await watcher.receive_nothing(timeout=0.1)

    await tab_one.disconnect()  # the user still has a tab: no leave
    assert await watcher.receive_nothing(timeout=0.3) and await tab_two.receive_nothing(timeout=0.1)
    assert await presence_who(tab_two) == {watcher_key: [{"tab": "watcher"}], key: [{"tab": "two"}]}

    await tab_two.disconnect()  # the last tab: the user leaves, with that tab's meta
    assert await watcher.receive_json_from(timeout=5) == presence_diff(
        room, leaves={key: [{"tab": "two"}]})
    assert await presence_who(watcher) == {watcher_key: [{"tab": "watcher"}]}
    await watcher.disconnect()


@asynchronous
async def test_messages_presence_declared_on_the_class_with_the_default_meta():
    app = Application(presence_routing)
    socket = await presence_open(app, "/presence/lobby/")
    frame = await socket.receive_json_from(timeout=5)
    [(key, [meta])] = frame["joins"].items()
    assert frame == presence_diff("presence-lobby", joins={key: [meta]})
    assert re.fullmatch(r"anonymous\.[0-9a-f]{24}", key), key
    assert meta["name"] == "anonymous"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["joined_at"]), meta
    assert await Group("presence-lobby").apresence() == {key: [meta]}
    await socket.disconnect()
    assert await Group("presence-lobby").apresence() == {}


@asynchronous
async def test_messages_presence_function_consumer_tracks_by_hand_and_leaves_on_disconnect():
    app = Application(presence_routing)
    socket = await presence_open(app, "/presence/by-hand/")
    assert await socket.receive_json_from(timeout=5) == presence_diff(
        "presence-by-hand", joins={"desk-7": [{"by": "hand"}]})
    assert await Group("presence-by-hand").apresence() == {"desk-7": [{"by": "hand"}]}
    await socket.disconnect()
    assert await Group("presence-by-hand").apresence() == {}


def test_messages_presence_of_plain_channels_track_untrack_and_meta_checks():
    layer = InMemoryChannelLayer()
    group = Group(f"presence-{uuid.uuid4().hex[:8]}", channel_layer=layer)
    with pytest.raises(TypeError, match=re.escape("Object of type object is not JSON serializable")):
        group.track("a", meta={"when": object()})
    assert group.presence() == {}
    group.track("a", key="ada", meta={"n": 1})
    group.track(Channel("b", channel_layer=layer))  # default key: one of its own
    group.track("c", key="ada", meta={"n": 2})
    anonymous_b = (set(group.presence()) - {"ada"}).pop()
    assert re.fullmatch(r"anonymous\.[0-9a-f]{24}", anonymous_b), anonymous_b  # opaque
    assert group.presence() == {"ada": [{"n": 1}, {"n": 2}], anonymous_b: [{}]}
    group.untrack("a")
    group.untrack("a")  # not listed any more: nothing happens
    group.untrack("b")
    assert group.presence() == {"ada": [{"n": 2}]}
    # "a" and "b" stay in the group (untrack only stops listing them; Group.discard leaves),
    # so they hear the diffs sent after they joined; "c" joined when "ada" was already present, and hears only the leave.
    heard_by_a = [json.loads(run(layer.receive("a"))["text"]) for _ in range(3)]
    heard_by_c = json.loads(run(layer.receive("c"))["text"])
    assert heard_by_a == [presence_diff(group.name, joins={"ada": [{"n": 1}]}),
                          presence_diff(group.name, joins={anonymous_b: [{}]}),
                          presence_diff(group.name, leaves={anonymous_b: [{}]})]
    assert heard_by_c == presence_diff(group.name, leaves={anonymous_b: [{}]})
    heard_by_b = [json.loads(run(layer.receive("b"))["text"]) for _ in range(2)]
    assert heard_by_b == heard_by_a[1:]
    assert layer.stats()["messages"] == 0



def test_messages_presence_of_1000_members_read_and_left_with_one_diff_each(caplog):
    """1,000 keys (plain channels, as a function consumer would track reply channels): the
    presence lists all of them, each join and each leave reaches the group once, and the
    group is empty again afterwards. (The members themselves do not read: their diffs are
    dropped at capacity, counted and logged, which is what the layer does for slow readers.)"""
    layer = InMemoryChannelLayer(channel_capacity={"observer": 2_500})
    group = Group(f"presence-{uuid.uuid4().hex[:8]}", channel_layer=layer)
    group.add("observer")  # a listener that is not itself listed
    for number in range(1_000):
        group.track(f"member.{number}", key=f"user-{number}", meta={"n": number})
    members = group.presence()
    for number in range(1_000):
        group.untrack(f"member.{number}")
    left = group.presence()

    async def observed():
        return [json.loads((await layer.receive("observer"))["text"]) for _ in range(2_000)]

    frames = run(observed())
    assert members == {f"user-{number}": [{"n": number}] for number in range(1_000)}
    assert left == {}
    assert frames == (
        [presence_diff(group.name, joins={f"user-{n}": [{"n": n}]}) for n in range(1_000)]
        + [presence_diff(group.name, leaves={f"user-{n}": [{"n": n}]}) for n in range(1_000)])
    assert layer.stats()["messages"] == 1_000 * 100  # what the members' channels hold


@asynchronous
async def test_messages_presence_heartbeat_keeps_a_servers_members_past_the_timeout():
    """Entries expire TIMEOUT seconds after they were written: a server's heartbeat
    rewrites them every HEARTBEAT seconds, so its sockets stay listed."""
    from django.test import override_settings

    with override_settings(CHANNELS_MINI_PRESENCE={"HEARTBEAT": 0.2, "TIMEOUT": 1.0}):
        app = Application(presence_routing)
        room = f"presence-{uuid.uuid4().hex[:8]}"
        socket = await presence_open(app, f"/presence/room/{room[9:]}/")
        [key] = await Group(room).apresence()
        assert await socket.receive_json_from(timeout=5) == presence_diff(
            room, joins={key: [{"tab": "main"}]})
        assert await socket.receive_nothing(timeout=2.5)  # more than twice the TIMEOUT: no diff
        assert await presence_who(socket) == {key: [{"tab": "main"}]}
        await socket.disconnect()
        assert await Group(room).apresence() == {}


presence_GHOST = """
import sys
import django
from django.conf import settings
settings.configure(CACHES={"default": {
    "BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": sys.argv[1]}},
    CHANNELS_MINI_PRESENCE={"CACHE": "default", "TIMEOUT": 1.5})
django.setup()
from channels_mini import Group
Group(sys.argv[2]).track("ghost.channel", key="ghost", meta={"from": "a process that died"})
"""  # and it exits without untracking, as a killed process would


@asynchronous
async def test_messages_presence_members_of_a_process_that_died_leave_on_a_heartbeat(tmp_path):
    """Two processes sharing a cache (a file-based one here; Redis in section 8): another
    process tracks a member and dies; its entry expires after TIMEOUT and this process's
    heartbeat announces the member's leave, on the app's own layer."""
    from django.test import override_settings

    shared = {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
              "LOCATION": str(tmp_path / "cache")}
    with override_settings(CACHES={"default": shared},
                           CHANNELS_MINI_PRESENCE={"CACHE": "default", "HEARTBEAT": 0.2, "TIMEOUT": 1.5}):
        app = Application(presence_routing, channel_layer=InMemoryChannelLayer())
        room = f"presence-{uuid.uuid4().hex[:8]}"
        socket = await presence_open(app, f"/presence/room/{room[9:]}/")
        [key] = await Group(room).apresence()
        await socket.receive_json_from(timeout=5)  # its own join
        await asyncio.to_thread(subprocess.run, [sys.executable, "-c", presence_GHOST,
                                                 shared["LOCATION"], room],
                                check=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
        died = time.monotonic()
        listed = await presence_who(socket)
        diff = await socket.receive_json_from(timeout=10)
        waited = time.monotonic() - died
        after = await presence_who(socket)
        await socket.disconnect()
    assert listed == {key: [{"tab": "main"}], "ghost": [{"from": "a process that died"}]}
    assert diff == presence_diff(room, leaves={"ghost": [{"from": "a process that died"}]})
    assert after == {key: [{"tab": "main"}]}
    assert waited < 1.5 + 2 * 0.2 + 1, waited  # TIMEOUT + 2 HEARTBEATs, and some slack


def test_messages_presence_tracked_where_nothing_heartbeats_expires_after_the_timeout():
    """A script (no server in the process, so no heartbeat) may track a channel, but its
    entry lasts only TIMEOUT seconds: presence lists what live servers keep alive."""
    from django.test import override_settings

    group = Group(f"presence-{uuid.uuid4().hex[:8]}", channel_layer=InMemoryChannelLayer())
    with override_settings(CHANNELS_MINI_PRESENCE={"HEARTBEAT": 0.2, "TIMEOUT": 1.0}):
        group.track("script.channel", key="scripted")
        listed = group.presence()
        time.sleep(1.5)
        expired = group.presence()
        group.untrack("script.channel")
    assert (listed, expired) == ({"scripted": [{}]}, {})


@asynchronous(timeout=60)
async def test_messages_presence_by_default_never_evicts_the_applications_cache_entries():
    """Django's default cache (LocMemCache) holds 300 entries: presence kept its entries there
    with no timeout, and an anonymous client opening sockets in 600 rooms evicted the
    application's values (and cache-backed sessions). By default presence now keeps its own
    storage; the application's entry and a live room's presence both survive."""
    from django.core.cache import cache

    app = Application(presence_routing, channel_layer=InMemoryChannelLayer())
    cache.set("presence-test-app-value", "kept", None)
    room = uuid.uuid4().hex[:8]
    live = await presence_open(app, f"/presence/room/{room}/")
    [live_key] = await Group(f"presence-{room}").apresence()
    sockets = [await presence_open(app, f"/presence/room/{room}-{n}/") for n in range(600)]
    value = cache.get("presence-test-app-value")
    listed = await Group(f"presence-{room}").apresence()
    for socket in sockets + [live]:
        await socket.disconnect()
    assert value == "kept"
    assert listed == {live_key: [{"tab": "main"}]}


@pytest.mark.parametrize("backend", ["locmem", "redis"])
def test_messages_presence_joins_leaves_and_reads_are_exact_under_a_burst(backend):
    """60 anonymous sockets and 12 tabs of one user open at once, then all close at once, in
    one process. With RedisCache (cache I/O lets threads interleave) presence listed 59/60,
    leave diffs were lost and one user joined and left twice: now each key joins once and
    leaves once, and every read is exact, with either backend."""
    from django.test import override_settings

    user, cookie = rel_login("tabs")
    with contextlib.ExitStack() as stack:
        if backend == "redis":
            url = stack.enter_context(running_redis())
            stack.enter_context(override_settings(
                CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
                        "presence": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                     "LOCATION": url}},
                CHANNELS_MINI_PRESENCE={"CACHE": "presence"}))

        async def diffs(watcher) -> list[dict]:
            frames = []
            while not await watcher.receive_nothing(timeout=1):
                frames.append(await watcher.receive_json_from())
            return frames

        async def scenario():
            app = Application(presence_routing, channel_layer=InMemoryChannelLayer())
            room = uuid.uuid4().hex[:8]
            path = f"/presence/room/{room}/"
            watcher = await presence_open(app, path + "?tab=watcher")
            [watcher_key] = await Group(f"presence-{room}").apresence()
            await watcher.receive_json_from(timeout=5)  # its own join
            sockets = list(await asyncio.gather(
                *(presence_open(app, path) for _ in range(60)),
                *(presence_open(app, f"{path}?tab=t{n}", cookie) for n in range(12))))
            listed = await Group(f"presence-{room}").apresence()
            joined = await diffs(watcher)
            await asyncio.gather(*(socket.disconnect() for socket in sockets))
            left = await diffs(watcher)
            after = await Group(f"presence-{room}").apresence()
            await watcher.disconnect()
            return watcher_key, listed, joined, left, after

        watcher_key, listed, joined, left, after = run(scenario(), timeout=60)
    joins = [key for frame in joined for key in frame["joins"]]
    leaves = [key for frame in left for key in frame["leaves"]]
    assert not any(frame["leaves"] for frame in joined) and not any(frame["joins"] for frame in left)
    assert len(listed) == 62 and len(listed[str(user.pk)]) == 12, {k: len(v) for k, v in listed.items()}
    assert sorted(joins) == sorted(set(joins)) == sorted(set(listed) - {watcher_key})
    assert sorted(leaves) == sorted(set(leaves)) == sorted(set(listed) - {watcher_key})
    assert after == {watcher_key: [{"tab": "watcher"}]}


def test_messages_presence_keys_all_expire_and_are_deleted_when_empty():
    """On RedisCache, 2,000 rooms left 2,002 keys, nearly all without expiry: now every key
    presence writes has a timeout (the heartbeat refreshes live ones) and none is left once
    the sockets are gone."""
    import redis
    from django.test import override_settings

    with running_redis() as url, override_settings(
            CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
                    "presence": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                 "LOCATION": url}},
            CHANNELS_MINI_PRESENCE={"CACHE": "presence"}):
        client = redis.Redis.from_url(url)
        try:
            async def scenario():
                app = Application(presence_routing, channel_layer=InMemoryChannelLayer())
                sockets = [await presence_open(app, f"/presence/room/ttl-{n}/") for n in range(50)]
                keys = client.keys("*channels_mini.presence*")
                ttls = [client.ttl(key) for key in keys]
                for socket in sockets:
                    await socket.disconnect()
                return keys, ttls

            keys, ttls = run(scenario(), timeout=60)
            left = client.keys("*channels_mini.presence*")
        finally:
            client.close()
    assert len(keys) == 100  # an entry and an index per room
    assert all(0 < ttl <= 20 for ttl in ttls), sorted(set(ttls))
    assert left == []


# -- presence across processes (issue 15) --
# Both servers keep their members in the same RedisCache: each reads every process's
# entries, diffs travel through the Redis layer, and the members of a process killed
# with SIGKILL leave once its entry expires (TIMEOUT) and a survivor's heartbeat notices.

redis_PRESENCE_SETTINGS = {"HEARTBEAT": 0.5, "TIMEOUT": 3}


def redis_presence_who(metas_by_key: dict) -> dict:
    """A presence with each key's metas in a fixed order (processes are read in any order)."""
    return {key: sorted(metas, key=json.dumps) for key, metas in metas_by_key.items()}


async def redis_presence_open(server: Server, room: str, cookie: str):
    """An open socket in *room*'s presence, logged in with *cookie*; close it yourself."""
    return await ws_connect(server.url(f"/redis/presence/{room}/"),
                            additional_headers=[("Cookie", cookie)]).__aenter__()


async def redis_presence_ask(socket) -> dict:
    await socket.send("who")
    return redis_presence_who(json.loads(await recv(socket)))


async def redis_silent(socket, timeout: float) -> bool:
    """True if *socket* receives nothing within *timeout* seconds."""
    try:
        await asyncio.wait_for(socket.recv(), timeout)
    except asyncio.TimeoutError:
        return True
    return False


def test_command_line_redis_presence_is_the_same_from_two_servers():
    """alice on server A and (a second tab) on server B, bob on B: both servers list the
    same members; a join crosses processes; alice's second tab (another process) is no
    join, and closing one of her tabs is no leave; closing the last one is."""
    room = uuid.uuid4().hex[:8]
    group = f"redis-presence-{room}"
    alice, alice_cookie = rel_login("alice")
    bob, bob_cookie = rel_login("bob")
    with running_redis() as url, redis_two_servers(url) as (server_a, server_b):
        pid_a, pid_b = server_a.process.pid, server_b.process.pid
        alice_a = {"name": alice.username, "pid": pid_a}
        alice_b, bob_b = {"name": alice.username, "pid": pid_b}, {"name": bob.username, "pid": pid_b}

        async def scenario():
            sockets = []
            try:
                sockets.append(first := await redis_presence_open(server_a, room, alice_cookie))
                assert json.loads(await recv(first)) == presence_diff(
                    group, joins={str(alice.pk): [alice_a]})
                sockets.append(bob_socket := await redis_presence_open(server_b, room, bob_cookie))
                bob_joined = presence_diff(group, joins={str(bob.pk): [bob_b]})
                assert json.loads(await recv(first)) == bob_joined  # from the other process
                assert json.loads(await recv(bob_socket)) == bob_joined
                sockets.append(second := await redis_presence_open(server_b, room, alice_cookie))
                assert await redis_silent(first, 0.5) and await redis_silent(bob_socket, 0.1)
                assert await redis_silent(second, 0.1)
                seen = [await redis_presence_ask(socket) for socket in (first, bob_socket)]

                await first.close()  # alice keeps her tab on server B
                assert await redis_silent(bob_socket, 0.5)
                seen.append(await redis_presence_ask(bob_socket))
                await second.close()
                left = json.loads(await recv(bob_socket))
                seen.append(await redis_presence_ask(bob_socket))
                return seen, left
            finally:
                for socket in sockets:
                    await socket.close()

        seen, left = run(scenario(), timeout=60)
    both = redis_presence_who({str(alice.pk): [alice_a, alice_b], str(bob.pk): [bob_b]})
    assert seen == [both, both, {str(alice.pk): [alice_b], str(bob.pk): [bob_b]},
                    {str(bob.pk): [bob_b]}]
    assert left == presence_diff(group, leaves={str(alice.pk): [alice_b]})


def test_command_line_redis_presence_members_of_a_killed_server_leave_within_the_bound():
    """`kill -9` of server A: its members leave with one diff, heard on server B within
    TIMEOUT + 2 HEARTBEATs (3 + 1 here; 30 s with the defaults), and not before its entry could
    have expired and stayed gone for a heartbeat. alice, who also has a tab on B, stays; carol, only on A, leaves."""
    room = uuid.uuid4().hex[:8]
    group = f"redis-presence-{room}"
    (alice, alice_cookie), (bob, bob_cookie), (carol, carol_cookie) = (
        rel_login(name) for name in ("alice", "bob", "carol"))
    heartbeat, timeout = redis_PRESENCE_SETTINGS["HEARTBEAT"], redis_PRESENCE_SETTINGS["TIMEOUT"]
    with running_redis() as url, redis_two_servers(
            url, presence=redis_PRESENCE_SETTINGS) as (server_a, server_b):
        pid_a, pid_b = server_a.process.pid, server_b.process.pid

        async def scenario():
            on_a = [await redis_presence_open(server_a, room, cookie)
                    for cookie in (carol_cookie, alice_cookie)]
            on_b = [await redis_presence_open(server_b, room, cookie)
                    for cookie in (alice_cookie, bob_cookie)]
            try:
                watcher = on_b[1]  # bob
                joins = [json.loads(await recv(watcher))]  # his own
                before = await redis_presence_ask(watcher)
                await asyncio.sleep(2 * heartbeat)  # server B's heartbeat has seen A's entry
                server_a.process.kill()
                await asyncio.to_thread(server_a.process.wait, 10)
                killed = time.monotonic()
                diff = json.loads(await recv(watcher, timeout + 2 * heartbeat + 10))
                waited = time.monotonic() - killed
                assert await redis_silent(watcher, 2 * heartbeat)  # one diff, not repeated
                after = await redis_presence_ask(watcher)
                return joins, before, diff, waited, after
            finally:
                for socket in on_a + on_b:
                    with contextlib.suppress(Exception):
                        await socket.close()

        joins, before, diff, waited, after = run(scenario(), timeout=90)
    carol_a = {"name": carol.username, "pid": pid_a}
    alice_a, alice_b = {"name": alice.username, "pid": pid_a}, {"name": alice.username, "pid": pid_b}
    bob_b = {"name": bob.username, "pid": pid_b}
    assert joins == [presence_diff(group, joins={str(bob.pk): [bob_b]})]
    assert before == redis_presence_who({str(carol.pk): [carol_a], str(alice.pk): [alice_a, alice_b],
                                         str(bob.pk): [bob_b]})
    assert diff == presence_diff(group, leaves={str(carol.pk): [carol_a]})
    assert after == {str(alice.pk): [alice_b], str(bob.pk): [bob_b]}
    print(f"\nmembers of a killed server left after {waited:.2f} s "
          f"(bound {timeout + 2 * heartbeat} s)")
    assert timeout - 0.5 < waited < timeout + 2 * heartbeat + 1.5, waited


def test_command_line_redis_presence_cache_outage_closes_nothing_and_announces_no_live_member_gone():
    """The presence cache (a Redis of its own) is down for 5 s and comes back empty. Before,
    every presence socket opened meanwhile was closed with 1011, live members were announced
    as gone with no re-join, and a server killed later was never announced (its claim marker
    lasted an hour). Now: the socket opened during the outage stays open and is announced when
    the cache is back, nobody live is announced gone, and a server killed afterwards has its
    members announced within TIMEOUT + 2 HEARTBEATs."""
    room = uuid.uuid4().hex[:8]
    group = f"redis-presence-{room}"
    (alice, alice_cookie), (bob, bob_cookie), (carol, carol_cookie) = (
        rel_login(name) for name in ("alice", "bob", "carol"))
    heartbeat, timeout = redis_PRESENCE_SETTINGS["HEARTBEAT"], redis_PRESENCE_SETTINGS["TIMEOUT"]
    with running_redis() as url, running_redis() as cache_url:
        env = {**redis_server_env(url, presence=redis_PRESENCE_SETTINGS),
               "CHANNELS_MINI_TEST_PRESENCE_CACHE": cache_url}
        with running_server(app=f"{__name__}:redis_app", env=env) as server_a, \
                running_server(app=f"{__name__}:redis_app", env=env) as server_b:
            pid_a, pid_b = server_a.process.pid, server_b.process.pid

            async def frames(socket, seconds: float) -> list[dict]:
                got, deadline = [], time.monotonic() + seconds
                with contextlib.suppress(asyncio.TimeoutError):
                    while True:
                        got.append(json.loads(await recv(socket, max(0.01, deadline - time.monotonic()))))
                return got

            async def scenario():
                sockets = [await redis_presence_open(server_a, room, alice_cookie)]
                watcher = await redis_presence_open(server_b, room, bob_cookie)
                sockets.append(watcher)
                try:
                    await frames(watcher, 2 * heartbeat)  # bob's own join
                    redis_shutdown(cache_url)
                    during = await redis_presence_open(server_a, room, carol_cookie)  # in the outage
                    sockets.append(during)
                    asked_during = await redis_presence_ask(during)
                    await asyncio.sleep(5)
                    with redis_server_on(cache_url):  # back, and empty
                        after_outage = await frames(watcher, timeout + 4 * heartbeat)
                        listed = await redis_presence_ask(watcher)
                        server_a.process.kill()
                        await asyncio.to_thread(server_a.process.wait, 10)
                        killed = time.monotonic()
                        gone = json.loads(await recv(watcher, timeout + 2 * heartbeat + 10))
                        waited = time.monotonic() - killed
                    return (asked_during, after_outage, listed, gone, waited,
                            during.close_code if server_a.process.poll() is None else None)
                finally:
                    for socket in sockets:
                        with contextlib.suppress(Exception):
                            await socket.close()

            asked_during, after_outage, listed, gone, waited, _ = run(scenario(), timeout=120)
            log_a = server_a.log()
    alice_a, carol_a = {"name": alice.username, "pid": pid_a}, {"name": carol.username, "pid": pid_a}
    bob_b = {"name": bob.username, "pid": pid_b}
    assert asked_during == redis_presence_who({str(alice.pk): [alice_a], str(carol.pk): [carol_a]})
    assert after_outage == [presence_diff(group, joins={str(carol.pk): [carol_a]})], after_outage
    assert listed == redis_presence_who({str(alice.pk): [alice_a], str(bob.pk): [bob_b],
                                         str(carol.pk): [carol_a]})
    assert gone == presence_diff(group, leaves={str(alice.pk): [alice_a], str(carol.pk): [carol_a]})
    assert waited < timeout + 2 * heartbeat + 1.5, waited
    assert log_a.count("Cannot read or write the presence") <= 2, log_a[-3000:]


# === 14. Several processes: shared layers ===
# More than one process: servers sharing one real redis-server through channels_redis. The
# servers run `redis_app` (below) with CHANNELS_MINI_TEST_REDIS set, so the header puts
# CHANNEL_LAYERS on Redis there.

class redis_RoomConsumer(WebsocketConsumer):
    """Joins the room's group; every frame is broadcast to the room."""

    def connection_groups(self, room, **kwargs):
        return [f"redis-room-{room}"]

    def receive(self, text=None, bytes=None, room=None, **kwargs):
        self.group_send(f"redis-room-{room}", text=text)


class redis_SpeakerConsumer(WebsocketConsumer):
    """Broadcasts to a room without joining it (so it hears nothing back)."""

    def receive(self, text=None, bytes=None, room=None, **kwargs):
        self.group_send(f"redis-room-{room}", text=text)


class redis_EchoConsumer(WebsocketConsumer):
    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=text)


class redis_PidConsumer(redis_RoomConsumer):
    """Joins the room and answers with the server process's id: which worker holds it."""

    def connect(self, message, **kwargs):
        self.send(text=str(os.getpid()))


class redis_ItemBinding(WebsocketBinding):
    model = f"{__name__}.Item"
    stream = "redis-items"
    fields = ["name", "team"]

    @classmethod
    def group_names(cls, instance):
        return ["redis-items"] if instance.name.startswith("redis-") else []


class redis_ItemsDemultiplexer(WebsocketDemultiplexer):
    consumers = {"redis-items": redis_ItemBinding.consumer}
    groups = ["redis-items"]


class redis_JoinerConsumer(WebsocketConsumer):
    """Joins a group by hand, 1.x style, from receive(): left by itself when the socket goes."""

    def receive(self, text=None, bytes=None, group=None, **kwargs):
        Group(f"redis-join-{group}").add(self.message.reply_channel)
        self.send(text="joined")


class redis_WhoAmIConsumer(WebsocketConsumer):
    """Answers with the session's user: logging that session out closes the socket."""

    http_user = True

    def connect(self, message, **kwargs):
        self.send(text=message.user.get_username() or "anonymous")


class redis_BurstConsumer(WebsocketConsumer):
    """Joins group redis-burst-<name>; a frame {"groups": [...], "text": t} sends t to each
    of those groups from one handler, then answers with this server's stats() as JSON."""

    def connection_groups(self, name, **kwargs):
        return [f"redis-burst-{name}"]

    def receive(self, text=None, bytes=None, name=None, **kwargs):
        order = json.loads(text)
        for group in order["groups"]:
            Group(group).send({"text": order["text"]})
        self.send(text=json.dumps(redis_app.stats()))


class redis_PresenceConsumer(WebsocketConsumer):
    """Listed in its room's presence under its user, with the server's pid in its meta;
    "who" answers the room's presence as this server process reads it."""

    http_user = True

    def presence_groups(self, room, **kwargs):
        return [f"redis-presence-{room}"]

    def presence_meta(self, **kwargs):
        return {"name": self.message.user.get_username(), "pid": os.getpid()}

    def receive(self, text=None, bytes=None, room=None, **kwargs):
        self.send(text=json.dumps(Group(f"redis-presence-{room}").presence()))


redis_routing = [
    redis_PresenceConsumer.as_route(path=r"^/redis/presence/(?P<room>[\w-]+)/$"),
    redis_RoomConsumer.as_route(path=r"^/redis/room/(?P<room>[\w-]+)/$"),
    redis_JoinerConsumer.as_route(path=r"^/redis/join/(?P<group>\w+)/$"),
    redis_WhoAmIConsumer.as_route(path=r"^/redis/whoami/$"),
    redis_BurstConsumer.as_route(path=r"^/redis/burst/(?P<name>[\w-]+)/$"),
    redis_SpeakerConsumer.as_route(path=r"^/redis/say/(?P<room>[\w-]+)/$"),
    redis_EchoConsumer.as_route(path=r"^/redis/echo/$"),
    redis_PidConsumer.as_route(path=r"^/redis/pid/(?P<room>[\w-]+)/$"),
    redis_ItemsDemultiplexer.as_route(path=r"^/redis/items/$"),
]
redis_app = Application(redis_routing)


def redis_server_env(url: str, backend: str = redis_CORE, presence: dict | None = None) -> dict:
    """The env of a server on the Redis at *url* (layer and cache); *presence* becomes its
    CHANNELS_MINI_PRESENCE setting."""
    env = {"CHANNELS_MINI_TEST_REDIS": url, "CHANNELS_MINI_TEST_REDIS_BACKEND": backend}
    if presence is not None:
        env["CHANNELS_MINI_TEST_PRESENCE"] = json.dumps(presence)
    return env


@contextlib.contextmanager
def redis_two_servers(url: str, backend: str = redis_CORE, presence: dict | None = None):
    """Two uvicorn processes on different ports, sharing the Redis at *url*."""
    env = redis_server_env(url, backend, presence)
    with running_server(app=f"{__name__}:redis_app", env=env) as first, \
            running_server(app=f"{__name__}:redis_app", env=env) as second:
        assert first.port != second.port
        yield first, second


def redis_group_size(url: str, group: str) -> int:
    """Members of *group* as channels_redis.core stores them (a sorted set per group)."""
    import redis
    client = redis.Redis.from_url(url)
    try:
        return client.zcard(f"asgi:group:{group}")
    finally:
        client.close()


@pytest.mark.parametrize("backend", [redis_CORE, redis_PUBSUB], ids=["core", "pubsub"])
def test_command_line_redis_layers_carry_echo_and_groups_across_two_servers(backend):
    import statistics

    room = f"r{uuid.uuid4().hex[:8]}"
    with running_redis() as url, redis_two_servers(url, backend) as (server_a, server_b):

        async def scenario():
            async with ws_connect(server_a.url("/redis/echo/")) as echo:
                await echo.send("echo through redis")
                assert await recv(echo) == "echo through redis"
            async with ws_connect(server_a.url(f"/redis/room/{room}/")) as listener_a, \
                    ws_connect(server_b.url(f"/redis/room/{room}/")) as listener_b, \
                    ws_connect(server_a.url(f"/redis/say/{room}/")) as speaker:
                latencies = []
                for number in range(50):
                    started = time.perf_counter()
                    await speaker.send(f"message {number}")
                    assert await recv(listener_b) == f"message {number}"
                    latencies.append(time.perf_counter() - started)
                    assert await recv(listener_a) == f"message {number}"
                # A frame from server B's socket reaches server A's socket too.
                await listener_b.send("from B")
                assert await recv(listener_a) == "from B"
                assert await recv(listener_b) == "from B"
            return latencies

        latencies = run(scenario(), timeout=120)
    median = statistics.median(latencies)
    print(f"\n[{backend}] cross-process group broadcast, server A -> server B: median "
          f"{median * 1000:.2f} ms, max {max(latencies) * 1000:.2f} ms over {len(latencies)}")
    assert median < 1.0, latencies  # generous: a 2-core machine shared with other jobs


def test_command_line_redis_uvicorn_workers_share_groups():
    """`uvicorn --workers 2`: sockets land in different processes, yet a broadcast from
    any of them reaches all of them."""
    room = f"r{uuid.uuid4().hex[:8]}"
    with running_redis() as url, running_server(
            app=f"{__name__}:redis_app", env=redis_server_env(url),
            extra_args=["--workers", "2"]) as server:

        async def scenario():
            async with contextlib.AsyncExitStack() as stack:
                listeners, pids = [], set()
                for _ in range(60):  # until both workers hold a listener (the 2nd may start late)
                    listener = await stack.enter_async_context(
                        ws_connect(server.url(f"/redis/pid/{room}/")))
                    listeners.append(listener)
                    pids.add(await recv(listener))
                    if len(pids) == 2 and len(listeners) >= 4:
                        break
                    await asyncio.sleep(0.1)
                speaker = await stack.enter_async_context(ws_connect(server.url(f"/redis/say/{room}/")))
                await speaker.send("to every worker")
                heard = [await recv(listener, 5) for listener in listeners]
            return pids, heard

        pids, heard = run(scenario(), timeout=60)
    assert len(pids) == 2, f"all sockets landed in one worker: {pids}"
    assert heard == ["to every worker"] * len(heard)


def test_command_line_redis_connection_groups_are_left_across_servers():
    room = f"r{uuid.uuid4().hex[:8]}"
    group = f"redis-room-{room}"
    with running_redis() as url, redis_two_servers(url) as (server_a, server_b):

        async def scenario():
            async with ws_connect(server_a.url(f"/redis/room/{room}/")) as listener_a, \
                    ws_connect(server_a.url(f"/redis/say/{room}/")) as speaker:
                async with ws_connect(server_b.url(f"/redis/room/{room}/")) as listener_b:
                    assert redis_group_size(url, group) == 2
                    await speaker.send("both")
                    assert await recv(listener_a) == "both"
                    assert await recv(listener_b) == "both"
                # B's socket is gone: server B's disconnect handling removed it from Redis.
                await asyncio.to_thread(wait_until, lambda: redis_group_size(url, group) == 1,
                                        10, "group shrinking to 1 member")
                await speaker.send("only A")
                assert await recv(listener_a) == "only A"
                # A new socket on B joins afresh and hears only what comes after it.
                async with ws_connect(server_b.url(f"/redis/room/{room}/")) as again_b:
                    assert redis_group_size(url, group) == 2
                    await speaker.send("after rejoin")
                    assert await recv(again_b) == "after rejoin"
                    assert await recv(listener_a) == "after rejoin"
            await asyncio.to_thread(wait_until, lambda: redis_group_size(url, group) == 0,
                                    10, "group emptied")

        run(scenario(), timeout=60)


def test_command_line_redis_model_saved_in_another_process_reaches_both_servers(tmp_path):
    script = tmp_path / "redis_save_item.py"
    script.write_text(
        "import importlib, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        f"module = importlib.import_module({__name__!r})\n"
        "item = module.Item.objects.create(name='redis-from-script', team='blue')\n"
        "print(item.pk)\n")
    ensure_database()
    with running_redis() as url, redis_two_servers(url) as (server_a, server_b):

        async def scenario():
            async with ws_connect(server_a.url("/redis/items/")) as socket_a, \
                    ws_connect(server_b.url("/redis/items/")) as socket_b:
                saved = await asyncio.to_thread(
                    subprocess.run, [sys.executable, str(script)], cwd=str(tmp_path),
                    env={**os.environ, **redis_server_env(url)}, capture_output=True,
                    text=True, timeout=60)
                assert saved.returncode == 0, saved.stderr
                pk = int(saved.stdout.strip().splitlines()[-1])
                frames = [json.loads(await recv(socket_a)), json.loads(await recv(socket_b))]
                # A sync Django view on server B saves too (its on_commit send runs in
                # the view's thread and crosses to B's loop): both servers hear it.
                status, body = await asyncio.to_thread(
                    http_get, server_b.url("/items/create/?name=redis-from-view&team=green", "http"))
                assert status == 200, body
                view_pk = json.loads(body)["pk"]
                frames += [json.loads(await recv(socket_a)), json.loads(await recv(socket_b))]
            return pk, view_pk, frames

        pk, view_pk, frames = run(scenario(), timeout=90)
    label = f"{__name__}.item".lower()
    from_script = {"stream": "redis-items", "payload": {
        "action": "create", "pk": pk, "data": {"name": "redis-from-script", "team": "blue"},
        "model": label}}
    from_view = {"stream": "redis-items", "payload": {
        "action": "create", "pk": view_pk, "data": {"name": "redis-from-view", "team": "green"},
        "model": label}}
    assert frames == [from_script, from_script, from_view, from_view]


def test_command_line_redis_1x_chat_across_two_servers_sharing_redis_and_the_session_database():
    """Section 4's 1.x multi-room chat on two uvicorn processes sharing Redis and the database
    session backend: server A has only the websocket routes, server B also the `chat.receive`
    ones. A socket on A joins through a consumer that runs on B (every answer carries B's pid),
    which finds the user and the rooms in the channel session A's `ws_connect` saved; room
    messages reach sockets on both servers; both channel sessions go when the sockets close."""
    users = app_chat_users()
    before = app_session_rows()
    with running_redis() as url:
        env = redis_server_env(url)
        with running_server(app=f"{__name__}:app_chat_socket_app", env=env) as server_a, \
                running_server(app=f"{__name__}:app_chat_app", env=env) as server_b:
            cookies = [app_log_in(server_a, *users[role]) for role in ("staff", "plain")]
            rows_open = run(app_chat_session(server_a.url("/chat/"), server_b.url("/chat/"), *cookies,
                                             users, chat_pid=server_b.process.pid), timeout=60)
            assert server_a.process.pid != server_b.process.pid
            assert len(rows_open - before) == 2
            assert app_chat_rows_settle(before) == before


# -- Redis going away --

def redis_server_on(url: str, workdir: str | None = None):
    """Start redis-server again on *url*'s port (after a shutdown), from *workdir*'s dump if
    given, else empty; always stopped on exit."""
    return running_redis(int(url.rsplit(":", 1)[1]), workdir)


def redis_shutdown(url: str) -> None:
    import redis
    client = redis.Redis.from_url(url)
    try:
        client.shutdown(nosave=True)
    finally:
        client.close()


def test_command_line_redis_outage_is_logged_the_server_survives_and_recovers():
    """Redis goes away: sockets whose handlers only answer themselves keep working (their
    replies never cross Redis); a handler that needs Redis fails and closes its socket."""
    import redis
    from websockets.exceptions import ConnectionClosedError, InvalidStatus

    with running_redis() as url, running_server(app=f"{__name__}:redis_app",
                                                env=redis_server_env(url)) as server:

        async def during_outage():
            async with ws_connect(server.url("/redis/echo/")) as socket, \
                    ws_connect(server.url("/redis/say/r1/")) as speaker:
                await socket.send("before")
                assert await recv(socket) == "before"
                redis_shutdown(url)
                await asyncio.to_thread(
                    wait_until, lambda: "Cannot receive messages for websocket /redis/echo/ "
                                              "from the channel layer; retrying in 1 s." in server.log(),
                    10, "the listener's error in the server log")
                await socket.send("while down")
                assert await recv(socket) == "while down"
                # A group send needs Redis: that handler fails, its socket closes with 1011.
                await speaker.send("lost")
                with pytest.raises(ConnectionClosedError):
                    await recv(speaker)
                assert speaker.close_code == 1011
            # Joining a group needs Redis too: the handshake fails (HTTP 403).
            with pytest.raises(InvalidStatus) as rejected:
                async with ws_connect(server.url("/redis/room/r1/")):
                    pass
            assert rejected.value.response.status_code == 403
            async with ws_connect(server.url("/redis/echo/")) as fresh:  # echo needs no Redis
                await fresh.send("new socket")
                assert await recv(fresh) == "new socket"

        run(during_outage(), timeout=60)
        assert server.process.poll() is None
        assert http_get(server.url("/page/", "http")) == (200, "django page ok")
        log = server.log()
        assert "Consumer failed on websocket.receive for /redis/say/r1/ (order 1); closing that " \
               "socket with 1011." in log
        assert "Consumer failed on websocket.connect for /redis/room/r1/ (order 0)" in log
        assert "redis.exceptions.ConnectionError" in log
        # Sends from outside the server fail loudly too.
        with pytest.raises(redis.exceptions.ConnectionError):
            Channel("redis-down.direct", channel_layer=redis_layer(url)).send({"lost": True})
        with pytest.raises(redis.exceptions.ConnectionError):
            Group("redis-down-group", channel_layer=redis_layer(url)).send({"lost": True})

        with redis_server_on(url):  # Redis is back, on the same address

            async def after_outage():
                # The server's pool may still hold a connection to the old redis-server:
                # its first use fails once ("Connection closed by server", that socket
                # closes with 1011), then the pool reconnects. So allow a few sockets.
                for attempt in range(5):
                    with contextlib.suppress(ConnectionClosedError, InvalidStatus):
                        async with ws_connect(server.url("/redis/echo/")) as socket:
                            await socket.send("after")
                            return attempt, await recv(socket)
                    await asyncio.sleep(0.2)
                return None, server.log()[-3000:]

            attempt, echoed = run(after_outage())
            assert echoed == "after"
            assert attempt <= 2
        assert server.process.poll() is None


def test_command_line_redis_restart_puts_open_sockets_back_in_their_groups():
    """Redis dies for 5 s and comes back empty: the server joins its open sockets to their
    groups again within a few seconds, so they hear broadcasts again (never open and deaf)."""
    room = f"r{uuid.uuid4().hex[:8]}"
    with running_redis() as url, running_server(app=f"{__name__}:redis_app",
                                                env=redis_server_env(url)) as server:

        async def before_and_during():
            listener = await ws_connect(server.url(f"/redis/room/{room}/")).__aenter__()
            speaker = await ws_connect(server.url(f"/redis/say/{room}/")).__aenter__()
            await speaker.send("before")
            assert await recv(listener) == "before"
            redis_shutdown(url)
            await asyncio.sleep(5)
            return listener, speaker

        async def scenario():
            listener, speaker = await before_and_during()
            try:
                with redis_server_on(url):  # back on the same address, with no data
                    restarted = time.monotonic()
                    for attempt in range(40):  # a broadcast every 0.5 s until one is heard
                        with contextlib.suppress(Exception):
                            if speaker.close_code is not None:  # a send during the reconnect failed
                                speaker = await ws_connect(server.url(f"/redis/say/{room}/")).__aenter__()
                            await speaker.send(f"after {attempt}")
                        with contextlib.suppress(asyncio.TimeoutError):
                            heard = await recv(listener, timeout=0.5)
                            return heard, time.monotonic() - restarted, listener.close_code
                    return None, time.monotonic() - restarted, listener.close_code
            finally:
                await listener.close()
                await speaker.close()

        heard, seconds, close_code = run(scenario(), timeout=60)
    print(f"\nRedis back (empty): the listener heard its room again after {seconds:.2f} s")
    assert close_code is None  # the listener stayed open
    assert heard is not None and heard.startswith("after "), heard
    assert seconds < 10, seconds


async def redis_open_sockets(server: Server, paths: list[str], stack: contextlib.AsyncExitStack,
                             at_once: bool = False) -> list:
    """Real websocket clients on *paths*, closed with *stack*; *at_once*: all handshakes together."""
    if at_once:
        sockets = await asyncio.gather(*(ws_connect(server.url(path)).__aenter__() for path in paths))
        for socket in sockets:
            stack.push_async_callback(socket.close)
        return list(sockets)
    return [await stack.enter_async_context(ws_connect(server.url(path))) for path in paths]


async def redis_who_hears(sockets: list, text: str, timeout: float) -> list[bool]:
    """For each socket, whether *text* arrives within *timeout* seconds (waited for together)."""
    async def hears(socket) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await recv(socket, timeout=deadline - time.monotonic()) == text:
                    return True
            except (asyncio.TimeoutError, Exception):
                return False
        return False

    return list(await asyncio.gather(*(hears(socket) for socket in sockets)))


async def redis_count_frames(sockets: list, each: int, timeout: float) -> int:
    """How many frames the *sockets* get within *timeout* s, waiting for *each* per socket."""
    async def count(socket) -> int:
        got, deadline = 0, time.monotonic() + timeout
        while got < each and time.monotonic() < deadline:
            try:
                await recv(socket, timeout=deadline - time.monotonic())
            except asyncio.TimeoutError:
                break
            got += 1
        return got

    return sum(await asyncio.gather(*(count(socket) for socket in sockets)))


@pytest.mark.parametrize("inbox", [None, 5], ids=["default", "inbox-of-5"])
def test_command_line_redis_a_burst_to_300_single_member_groups_arrives_or_drops_are_counted(inbox):
    """Four handlers at once each send a message to each of 300 groups of one socket, all in
    one server process. channels_redis keeps that process's messages under one Redis key, capped
    at 100 by default, and dropped the rest, saying so only at INFO: now all 1,200 arrive; with
    a small inbox configured, every drop is counted in stats() and logged as a rate-limited
    warning naming the setting."""
    name = uuid.uuid4().hex[:6]
    with running_redis() as url:
        env = redis_server_env(url)
        if inbox:
            env["CHANNELS_MINI_TEST_REDIS_CONFIG"] = json.dumps(
                {"channel_capacity": {"websocket.send.*!*": inbox}})
        with running_server(app=f"{__name__}:redis_app", env=env) as server:

            async def scenario():
                async with contextlib.AsyncExitStack() as stack:
                    listeners = await redis_open_sockets(
                        server, [f"/redis/burst/{name}-{n}/" for n in range(300)], stack)
                    senders = await redis_open_sockets(server, [f"/redis/burst/{name}/"] * 4, stack)
                    groups = [f"redis-burst-{name}-{n}" for n in range(300)]
                    await asyncio.gather(*(sender.send(json.dumps({"groups": groups, "text": "burst"}))
                                           for sender in senders))
                    for sender in senders:
                        await recv(sender)
                    heard = await redis_count_frames(listeners, 4, timeout=10)
                    await senders[0].send(json.dumps({"groups": [], "text": ""}))
                    return heard, json.loads(await recv(senders[0]))["dropped"]

            heard, dropped = run(scenario(), timeout=90)
            log = server.log()
    assert "Traceback" not in log, log[-3000:]
    if inbox is None:
        assert (heard, dropped) == (1200, 0)
        assert "dropped" not in log, log[-2000:]
    else:
        # Every lost frame is counted; the server's own canary (every 2 s, into the same full
        # inbox) may be dropped and counted too.
        assert heard < 1200 and 1200 - heard <= dropped <= 1200 - heard + 10, (heard, dropped)
        assert "'channel_capacity': {'websocket.send.*!*': N}" in log, log[-2000:]
        assert log.count("The Redis channel layer dropped") <= 3  # rate-limited, not one per drop


def test_command_line_redis_600_simultaneous_handshakes_are_all_accepted_and_leave_their_group():
    """A reconnect storm: 600 handshakes at once. redis-py's pool (100 connections) raised
    MaxConnectionsError and 501 were refused; now every one is accepted within 5 s, nothing
    is raised, and every membership is left when the sockets close."""
    room = f"storm{uuid.uuid4().hex[:6]}"
    with running_redis() as url, running_server(app=f"{__name__}:redis_app",
                                                env=redis_server_env(url)) as server:

        async def scenario():
            async with contextlib.AsyncExitStack() as stack:
                started = time.monotonic()
                sockets = await redis_open_sockets(
                    server, [f"/redis/room/{room}/"] * 600, stack, at_once=True)
                seconds = time.monotonic() - started
                members = redis_group_size(url, f"redis-room-{room}")
                await sockets[0].send("all there?")
                heard = await redis_who_hears(sockets, "all there?", timeout=10)
            return len(sockets), seconds, members, sum(heard)

        opened, seconds, members, heard = run(scenario(), timeout=90)
        print(f"\n600 simultaneous handshakes: {opened} accepted in {seconds:.2f} s")
        wait_until(lambda: redis_group_size(url, f"redis-room-{room}") == 0, 15,
                   "every membership left")
        log = server.log()
    assert (opened, members, heard) == (600, 600, 600)
    assert seconds < 5, seconds
    assert "MaxConnectionsError" not in log and "Traceback" not in log, log[-3000:]


class RedisProxy:
    """A TCP proxy on a free 127.0.0.1 port in front of a Redis, which a test can switch to
    another Redis: a failover as its clients see it (their connections drop, new ones reach
    the new primary)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.writers: set = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader, writer) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, upstream_writer}

        async def pump(source, sink):
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))

    def switch(self, target_port: int) -> None:
        """Send new connections to *target_port* and drop the current ones."""
        async def switch():
            self.target_port = target_port
            for writer in self.writers:
                writer.close()
            self.writers.clear()
        asyncio.run_coroutine_threadsafe(switch(), self.loop).result(10)

    def close(self) -> None:
        async def close():
            self.server.close()
            for writer in self.writers:
                writer.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def redis_command(url: str, *command: str):
    import redis
    client = redis.Redis.from_url(url)
    try:
        return client.execute_command(*command)
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["snapshot", "failover"])
def test_command_line_redis_restart_with_older_data_puts_every_socket_back_in_its_group(kind):
    """Redis comes back holding older data: restarted from a snapshot taken after the first 10
    sockets joined, or replaced by a replica promoted before the next 10 joined. The old
    canary is in that data, so it used to go unnoticed and the last 10 stayed open and deaf;
    now the server sees the new run id and all 20 hear the room again within 10 s."""
    room = f"r{uuid.uuid4().hex[:8]}"
    workdir = tempfile.mkdtemp(prefix="channels-mini-redis-")
    with contextlib.ExitStack() as servers:
        primary = servers.enter_context(running_redis(None, workdir))
        primary_port = int(primary.rsplit(":", 1)[1])
        if kind == "failover":
            replica_port = free_port()
            replica = servers.enter_context(running_redis(replica_port, None, "--replicaof",
                                                          "127.0.0.1", str(primary_port)))
            proxy = RedisProxy(primary_port)
            servers.callback(proxy.close)
            url = proxy.url
        else:
            url = primary
        server = servers.enter_context(running_server(app=f"{__name__}:redis_app",
                                                      env=redis_server_env(url)))

        def older_data() -> None:
            """What Redis will hold after the restart: the state now."""
            if kind == "snapshot":
                redis_command(primary, "SAVE")
            else:
                wait_until(lambda: redis_group_size(replica, f"redis-room-{room}") == 10, 10,
                           "the replica holds the first 10 members")
                redis_command(replica, "REPLICAOF", "NO", "ONE")  # promoted early: it misses what follows

        def restart() -> None:
            redis_shutdown(primary)
            if kind == "snapshot":
                servers.enter_context(redis_server_on(primary, workdir))  # loads the dump
            else:
                proxy.switch(replica_port)

        async def scenario():
            async with contextlib.AsyncExitStack() as stack:
                first = await redis_open_sockets(server, [f"/redis/room/{room}/"] * 10, stack)
                await asyncio.to_thread(older_data)
                later = await redis_open_sockets(server, [f"/redis/room/{room}/"] * 10, stack)
                assert redis_group_size(url, f"redis-room-{room}") == 20
                await asyncio.to_thread(restart)
                restarted = time.monotonic()
                heard: set[int] = set()
                for attempt in range(40):  # a broadcast every 0.5 s until all 20 heard one
                    with contextlib.suppress(Exception):
                        async with ws_connect(server.url(f"/redis/say/{room}/")) as speaker:
                            await speaker.send(f"after {attempt}")
                    for index, socket in enumerate(first + later):
                        with contextlib.suppress(asyncio.TimeoutError):
                            while True:  # drain what arrived; any "after" counts
                                if (await recv(socket, timeout=0.01)).startswith("after "):
                                    heard.add(index)
                    if len(heard) == 20:
                        break
                    await asyncio.sleep(0.5)
                return len(heard), time.monotonic() - restarted, [s.close_code for s in first + later]

        heard, seconds, close_codes = run(scenario(), timeout=90)
    print(f"\nRedis back ({kind}): {heard}/20 sockets heard their room again after {seconds:.2f} s")
    assert close_codes == [None] * 20  # every socket stayed open
    assert heard == 20, heard
    assert seconds < 10, seconds


def test_command_line_redis_a_user_without_info_still_gets_its_sockets_back_after_a_restart():
    """A hardened Redis user (+@all -@dangerous) may not run INFO, so run ids are unknown: the
    server says so once and the canary still puts the sockets back in their groups."""
    room = f"r{uuid.uuid4().hex[:8]}"
    acl = ("--user", "default", "on", ">admin", "+@all", "~*", "&*",
           "--user", "app", "on", ">secret", "+@all", "-@dangerous", "~*", "&*")
    with running_redis(None, None, *acl) as plain_url:
        port = int(plain_url.rsplit(":", 1)[1])
        url, admin = f"redis://app:secret@127.0.0.1:{port}", f"redis://default:admin@127.0.0.1:{port}"
        with running_server(app=f"{__name__}:redis_app", env=redis_server_env(url)) as server:

            async def scenario():
                async with contextlib.AsyncExitStack() as stack:
                    [listener] = await redis_open_sockets(server, [f"/redis/room/{room}/"], stack)
                    await asyncio.sleep(3)  # a check has run: INFO refused
                    redis_command(admin, "FLUSHALL")  # the memberships are gone, as after a restart
                    restarted = time.monotonic()
                    for attempt in range(40):
                        async with ws_connect(server.url(f"/redis/say/{room}/")) as speaker:
                            await speaker.send(f"after {attempt}")
                        with contextlib.suppress(asyncio.TimeoutError):
                            return await recv(listener, timeout=0.5), time.monotonic() - restarted
                    return None, time.monotonic() - restarted

            heard, seconds = run(scenario(), timeout=60)
            log = server.log()
    assert heard is not None and heard.startswith("after "), heard
    assert seconds < 10, seconds
    assert log.count("The Redis user may not run INFO") == 1, log[-2000:]


def test_command_line_redis_group_add_from_receive_is_left_when_the_socket_goes():
    """A membership added by hand with Group.add(reply_channel) is removed from Redis when
    that socket disconnects, as the in-memory layer does."""
    group = uuid.uuid4().hex[:8]
    with running_redis() as url, running_server(app=f"{__name__}:redis_app",
                                                env=redis_server_env(url)) as server:

        async def scenario():
            async with ws_connect(server.url(f"/redis/join/{group}/")) as socket:
                await socket.send("join")
                assert await recv(socket) == "joined"
                return redis_group_size(url, f"redis-join-{group}")

        assert run(scenario()) == 1
        wait_until(lambda: redis_group_size(url, f"redis-join-{group}") == 0, 10,
                         "the hand-made membership removed")


def test_command_line_logout_closes_that_sessions_sockets_in_every_process():
    """Django's logout (user_logged_out) closes the sockets of that session with 4401, on
    both servers sharing Redis; another user's socket stays open."""
    from websockets.exceptions import ConnectionClosed

    user, cookie = rel_login("leaving")
    other, other_cookie = rel_login("staying")
    with running_redis() as url, redis_two_servers(url) as (server_a, server_b):

        async def scenario():
            sockets = [await ws_connect(server.url("/redis/whoami/"), additional_headers=[
                ("Cookie", value)]).__aenter__() for server, value in (
                (server_a, cookie), (server_b, cookie), (server_b, other_cookie))]
            try:
                names = [await recv(socket) for socket in sockets]
                request = urllib.request.Request(server_a.url("/logout/", "http"),
                                                 headers={"Cookie": cookie})
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert response.read() == b"logged out"
                codes = []
                for socket in sockets[:2]:
                    with pytest.raises(ConnectionClosed):
                        await recv(socket)
                    codes.append(socket.close_code)
                await sockets[2].send("still here?")  # the other user's socket is open
                return names, codes, sockets[2].close_code
            finally:
                for socket in sockets:
                    await socket.close()

        names, codes, other_code = run(scenario(), timeout=60)
    assert names == [user.username, user.username, other.username]
    assert codes == [4401, 4401]
    assert other_code is None


def test_command_line_redis_sockets_closing_right_after_a_reply_leave_no_error_behind():
    """Hundreds of short sockets (echo once, close): every handshake and reply arrives,
    a closed socket's reply relay stops quietly, and the server then stops promptly.
    With channels_redis on redis-py 8, stopping relays by cancellation goes wrong in
    this churn: a lost cancel leaves a bogus 'Cannot receive replies' error and a 5 s
    shutdown; cancelling again can drop another socket's reply (all reply channels of a
    process share one Redis key), so its handshake never completes."""
    with running_redis() as url, running_server(app=f"{__name__}:redis_app",
                                                env=redis_server_env(url)) as server:

        async def churn():
            for number in range(300):
                async with ws_connect(server.url("/redis/echo/")) as socket:
                    await socket.send(f"n{number}")
                    assert await recv(socket) == f"n{number}"

        run(churn(), timeout=120)
        time.sleep(1)  # let the last disconnects finish
        started = time.monotonic()
        stop_process(server.process, timeout=20)
        stopped_after = time.monotonic() - started
        log = server.log()
    assert server.process.returncode == 0
    bogus = [line for line in log.splitlines() if "Cannot receive replies" in line]
    assert bogus == [], f"{len(bogus)} error(s) for closed sockets, e.g. {bogus[0]!r}"
    assert stopped_after < 3, f"{stopped_after:.1f} s to stop"


# === 15. History and resume ===
# Groups named hist-* (SIZE 200), hsmall-* (SIZE 10) and hshort-* (TTL 1.5 s) keep history
# (CHANNELS_MINI_HISTORY in the settings above). `hist_Client` is a resuming client as the JS
# client is: it keeps the last position of each group and sends them when it reconnects.

class hist_Room(WebsocketConsumer):
    """A resumable socket in one group; a frame it receives goes to the group ("!drop": the
    server closes the socket, as a restart or a balancer would)."""
    resumable = True

    def connection_groups(self, group, **kwargs):
        return [group]

    def receive(self, text=None, bytes=None, group=None, **kwargs):
        if text == "!drop":
            self.close(4000)
        else:
            Group(group).send({"text": text} if text is not None else {"bytes": bytes})


class hist_Plain(hist_Room):
    """The same socket, not resumable: its frames must stay exactly as sent."""
    resumable = False


class hist_Speaker(WebsocketConsumer):
    """Not in the group: each frame it receives is sent to the group ("n*K": K messages)."""

    def receive(self, text=None, bytes=None, group=None, **kwargs):
        if text == "!sync":  # the frames before it are handled, their sends gone
            self.send(text="synced")
        elif text is not None and text.startswith("n*"):
            for number in range(int(text[2:])):
                Group(group).send({"text": f"n{number}"})
        else:
            Group(group).send({"text": text} if text is not None else {"bytes": bytes})


class hist_Member(hist_Room):
    """A members-only room: an anonymous handshake is refused."""
    http_user = True

    def connect(self, message, **kwargs):
        if not message.user.is_authenticated:
            raise DenyConnection
        super().connect(message, **kwargs)


hist_routing = [
    hist_Room.as_route(path=r"^/hist/(?P<group>[\w-]+)/$"),
    hist_Plain.as_route(path=r"^/hist-plain/(?P<group>[\w-]+)/$"),
    hist_Speaker.as_route(path=r"^/hist-say/(?P<group>[\w-]+)/$"),
    hist_Member.as_route(path=r"^/hist-member/(?P<group>[\w-]+)/$"),
]
hist_app = Application(hist_routing)  # the layer from settings: in memory, or Redis in its env


def hist_group(prefix: str = "hist") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class hist_Client:
    """A resuming client over real websockets: frames unwrapped, positions kept."""

    def __init__(self, url: str, headers: list | None = None):
        self.url, self.headers = url, headers or []
        self.positions: dict[str, list] = {}
        self.seen: list[tuple[str, str, int, str]] = []  # (key, epoch, offset, text), all connections
        self.outcomes: list[dict] = []  # each "$resume" and "$lost"
        self.socket = None

    def resume_url(self, url: str | None = None) -> str:
        from urllib.parse import quote
        url = url or self.url
        return url + ("?resume=" + quote(json.dumps(self.positions)) if self.positions else "")

    async def connect(self, url: str | None = None, timeout: float = 10) -> list[tuple]:
        """Open (resuming), read up to the "$resume" frame; the messages read before it."""
        self.socket = await ws_connect(self.resume_url(url), additional_headers=self.headers).__aenter__()
        before = len(self.seen)
        while True:
            frame = await self.next(timeout)
            if isinstance(frame, dict) and "$resume" in frame:
                return self.seen[before:]

    async def next(self, timeout: float = 10):
        """The next frame: a message as (key, epoch, offset, text), else the decoded frame."""
        text = await recv(self.socket, timeout)
        frame = json.loads(text) if isinstance(text, str) and text.startswith("{") else text
        if isinstance(frame, dict) and "$pos" in frame:
            key, epoch, offset = frame["$pos"]
            self.positions[key] = [epoch, offset]
            self.seen.append((key, epoch, offset, frame.get("text", frame.get("bytes"))))
            return self.seen[-1]
        if isinstance(frame, dict) and ("$resume" in frame or "$lost" in frame):
            outcome = frame.get("$resume") or frame["$lost"]
            self.outcomes.append(frame)
            if "$resume" in frame:
                self.positions = dict(outcome["positions"])
            else:
                self.positions.update(outcome["positions"])
        return frame

    async def messages(self, count: int, timeout: float = 10) -> list[tuple]:
        got = []
        while len(got) < count:
            frame = await self.next(timeout)
            if isinstance(frame, tuple):
                got.append(frame)
        return got

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()


def hist_texts(messages: list[tuple]) -> list[str]:
    return [message[3] for message in messages]


def hist_consecutive(messages: list[tuple]) -> bool:
    offsets = [message[2] for message in messages]
    return offsets == list(range(offsets[0], offsets[0] + len(offsets))) if offsets else True


async def hist_say(server: Server, group: str, texts: list[str], pause: float = 0.0) -> None:
    async with ws_connect(server.url(f"/hist-say/{group}/")) as speaker:
        for text in texts:
            await speaker.send(text)
            if pause:
                await asyncio.sleep(pause)
        await speaker.send("!sync")  # a socket's frames are handled in order
        assert await recv(speaker) == "synced"


async def hist_hear_then_leave(client: hist_Client, server: Server, group: str, texts: list[str]) -> None:
    """The client connects, hears *texts* said to the group, and leaves."""
    await client.connect()
    await hist_say(server, group, texts)
    await client.messages(len(texts))
    await client.close()


async def hist_resume_after(client: hist_Client, server: Server, group: str, texts: list[str]) -> list:
    """*texts* are said on *server*; the client then resumes there: what it replayed."""
    await hist_say(server, group, texts)
    replayed = await client.connect(server.url(f"/hist/{group}/"))
    await client.close()
    return replayed


async def hist_drop_and_miss(client: hist_Client, server: Server, group: str, texts: list[str],
                             seconds: float) -> None:
    """The client's socket closes; *texts* are said over *seconds* while it is away."""
    await client.close()
    await hist_say(server, group, texts, pause=seconds / len(texts))


@pytest.mark.parametrize("where", ["memory", "redis_core", "redis_pubsub"])
def test_history_a_3_s_drop_with_50_sends_is_replayed_once_in_order_then_resumed(where):
    """The socket drops for 3 s while 50 messages are said: reconnecting (in memory: to the
    same server; on Redis, either channels_redis layer: to the other of two), it gets the 50,
    once each, in order, each with the next offset, then "resumed" -- and what is said after, live."""
    group = hist_group()

    def scenario(first: Server, second: Server):
        async def steps():
            client = hist_Client(first.url(f"/hist/{group}/"))
            assert await client.connect() == []
            fresh = client.outcomes[-1]["$resume"]
            await hist_say(first, group, ["a0", "a1"])
            before = await client.messages(2)
            missed = [f"m{n}" for n in range(50)]
            await hist_drop_and_miss(client, first, group, missed, 3.0)
            replayed = await client.connect(second.url(f"/hist/{group}/"))
            outcome = client.outcomes[-1]["$resume"]
            await hist_say(first, group, ["after"])
            after = await client.messages(1)
            await client.close()
            return fresh, before, replayed, outcome, after
        return run(steps(), timeout=60)

    if where == "memory":
        with running_server(app=f"{__name__}:hist_app") as server:
            fresh, before, replayed, outcome, after = scenario(server, server)
    else:
        with running_redis() as url:
            env = redis_server_env(url, redis_CORE if where == "redis_core" else redis_PUBSUB)
            with running_server(app=f"{__name__}:hist_app", env=env) as first, \
                    running_server(app=f"{__name__}:hist_app", env=env) as second:
                fresh, before, replayed, outcome, after = scenario(first, second)
    key = next(iter(fresh["positions"]))
    assert fresh == {"positions": {key: [fresh["positions"][key][0], 0]}, "resumed": [], "lost": []}
    assert hist_texts(before) == ["a0", "a1"] and [m[2] for m in before] == [1, 2]
    assert hist_texts(replayed) == [f"m{n}" for n in range(50)]
    assert [m[2] for m in replayed] == list(range(3, 53))
    assert outcome["resumed"] == [key] and outcome["lost"] == [] and outcome["positions"][key][1] == 52
    assert hist_texts(after) == ["after"] and after[0][2] == 53
    assert len({m[1] for m in before + replayed + after}) == 1  # one epoch throughout


def test_history_drops_at_random_moments_under_500_sends_a_second_keep_offsets_consecutive():
    """A speaker says ~500 messages a second while the client's socket drops at a random
    moment 100 times, each time resuming: across all its connections it sees every message
    once, in order, the offsets strictly consecutive -- and every resume says "resumed"."""
    import random
    group = hist_group()
    rng = random.Random(23)
    with running_server(app=f"{__name__}:hist_app") as server:
        async def steps():
            client = hist_Client(server.url(f"/hist/{group}/"))
            await client.connect()
            said = 0
            stop = asyncio.Event()

            async def speak():
                nonlocal said
                async with ws_connect(server.url(f"/hist-say/{group}/")) as speaker:
                    began = time.monotonic()
                    while not stop.is_set():
                        while said < 500 * (time.monotonic() - began):  # paced at 500 a second
                            await speaker.send(f"f{said}")
                            said += 1
                        await asyncio.sleep(0.002)
                    await speaker.send("!sync")
                    assert await recv(speaker) == "synced"

            speaker = asyncio.create_task(speak())
            started = time.monotonic()
            for _ in range(100):
                deadline = time.monotonic() + rng.uniform(0, 0.05)
                with contextlib.suppress(asyncio.TimeoutError):
                    while time.monotonic() < deadline:
                        await client.next(timeout=max(0.001, deadline - time.monotonic()))
                await client.close()
                await client.connect()
            rate = said / (time.monotonic() - started)
            stop.set()
            await asyncio.wait_for(speaker, 20)
            await client.messages(said - len(client.seen), timeout=10)
            await client.close()
            return client, said, rate
        client, said, rate = run(steps(), timeout=120)
    print(f"\n100 drops under {rate:.0f} sends/s: {said} messages, each seen once, in order")
    assert rate > 400, rate
    assert [m[2] for m in client.seen] == list(range(1, said + 1))
    assert hist_texts(client.seen) == [f"f{n}" for n in range(said)]
    resumes = [frame["$resume"] for frame in client.outcomes[1:]]
    assert len(resumes) == 100 and all(r["resumed"] and not r["lost"] for r in resumes)


def test_history_two_processes_sending_to_one_group_every_socket_sees_offsets_in_order():
    """Two uvicorn processes on one Redis both say 200 messages to one group at once: a
    resumable socket on each sees all 400, offsets 1..400 in order, each speaker's in its order."""
    group = hist_group()
    with running_redis() as url:
        env = redis_server_env(url)
        with running_server(app=f"{__name__}:hist_app", env=env) as first, \
                running_server(app=f"{__name__}:hist_app", env=env) as second:
            async def steps():
                clients = [hist_Client(server.url(f"/hist/{group}/")) for server in (first, second)]
                for client in clients:
                    await client.connect()
                await asyncio.gather(hist_say(first, group, [f"a{n}" for n in range(200)]),
                                     hist_say(second, group, [f"b{n}" for n in range(200)]))
                heard = [await client.messages(400, timeout=20) for client in clients]
                for client in clients:
                    await client.close()
                return heard
            heard = run(steps(), timeout=90)
    for messages in heard:
        assert [m[2] for m in messages] == list(range(1, 401))
        texts = hist_texts(messages)
        assert [t for t in texts if t[0] == "a"] == [f"a{n}" for n in range(200)]
        assert [t for t in texts if t[0] == "b"] == [f"b{n}" for n in range(200)]
    assert hist_texts(heard[0]) == hist_texts(heard[1])  # one order for everyone: the offsets'


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_history_a_restarted_in_memory_server_says_lost_never_resumed(how):
    """The only in-memory process restarts while the client is away (stopped, or killed):
    its history is gone, so the client is told "lost" -- never a false "resumed" -- and gets
    the new epoch's position; nothing is replayed."""
    group = hist_group()
    with running_server(app=f"{__name__}:hist_app") as server:
        client = hist_Client(server.url(f"/hist/{group}/"))

        run(hist_hear_then_leave(client, server, group, ["one", "two"]))
        if how == "sigkill":
            server.process.kill()
        stop_process(server.process)
    with running_server(app=f"{__name__}:hist_app") as server:
        replayed = run(hist_resume_after(client, server, group, ["three"]))
    first, last = client.outcomes[0]["$resume"], client.outcomes[-1]["$resume"]
    key = next(iter(first["positions"]))
    assert replayed == [] and last["resumed"] == [] and last["lost"] == [key]
    assert last["positions"][key][0] != first["positions"][key][0]  # a new epoch
    assert last["positions"][key][1] == 1  # where the new history stands: "three"


def test_history_a_server_restarted_on_redis_resumes_without_losing_a_line():
    """The only server, on Redis, is killed while the client is away and started again; a
    message is said on the new one: the client resumes with the line it missed."""
    group = hist_group()
    with running_redis() as url:
        env = redis_server_env(url)
        with running_server(app=f"{__name__}:hist_app", env=env) as server:
            client = hist_Client(server.url(f"/hist/{group}/"))
            run(hist_hear_then_leave(client, server, group, ["one", "two"]))
            server.process.kill()
            stop_process(server.process)
        with running_server(app=f"{__name__}:hist_app", env=env) as server:
            replayed = run(hist_resume_after(client, server, group, ["three"]))
    assert hist_texts(replayed) == ["three"] and replayed[0][2] == 3
    assert client.outcomes[-1]["$resume"]["resumed"] and not client.outcomes[-1]["$resume"]["lost"]


def test_history_one_of_two_processes_killed_the_client_resumes_on_the_other():
    """Two uvicorns share Redis; the client's process is killed (kill -9) and 20 messages are
    said on the other meanwhile: the client reconnects there and resumes all 20."""
    group = hist_group()
    with running_redis() as url:
        env = redis_server_env(url)
        with running_server(app=f"{__name__}:hist_app", env=env) as doomed, \
                running_server(app=f"{__name__}:hist_app", env=env) as survivor:
            client = hist_Client(doomed.url(f"/hist/{group}/"))

            async def steps():
                await client.connect()
                await hist_say(survivor, group, ["before"])
                await client.messages(1)
                doomed.process.kill()
                with contextlib.suppress(Exception):
                    while True:  # the socket ends with its process
                        await client.next(timeout=5)
                await hist_say(survivor, group, [f"m{n}" for n in range(20)])
                replayed = await client.connect(survivor.url(f"/hist/{group}/"))
                await client.close()
                return replayed
            replayed = run(steps(), timeout=60)
    outcome = client.outcomes[-1]["$resume"]
    assert hist_texts(replayed) == [f"m{n}" for n in range(20)]
    assert [m[2] for m in replayed] == list(range(2, 22))
    assert outcome["resumed"] and not outcome["lost"]


@pytest.mark.parametrize("restart", ["empty", "older_snapshot"])
def test_history_redis_restarted_empty_or_from_an_older_snapshot_says_lost(restart):
    """Redis restarts while the client is away -- empty, or from a snapshot taken before the
    messages it missed (those offsets are then said again, with other texts): the client is
    told "lost", never "resumed" with messages that are not the ones it missed."""
    import redis
    group = hist_group()
    workdir = tempfile.mkdtemp(prefix="channels-mini-redis-")
    with running_redis(None, workdir) as url:
        env = redis_server_env(url)
        with running_server(app=f"{__name__}:hist_app", env=env) as server:
            client = hist_Client(server.url(f"/hist/{group}/"))

            async def before():
                await hist_hear_then_leave(client, server, group, ["one", "two"])
                if restart == "older_snapshot":
                    redis.Redis.from_url(url).save()
                await hist_say(server, group, ["missed three", "missed four"])
            run(before())
            redis_shutdown(url)
            with redis_server_on(url, workdir if restart == "older_snapshot" else None):
                async def after():
                    for attempt in range(40):  # until the server's Redis clients reconnect
                        try:
                            await hist_say(server, group, ["new three", "new four"])
                            break
                        except Exception:
                            await asyncio.sleep(0.25)
                    replayed = await client.connect()
                    await client.close()
                    return replayed
                replayed = run(after(), timeout=60)
    outcome = client.outcomes[-1]["$resume"]
    assert replayed == [] and outcome["resumed"] == [] and len(outcome["lost"]) == 1


@pytest.mark.parametrize("gap", ["within_size", "longer_than_size", "longer_than_ttl"])
def test_history_a_gap_longer_than_size_or_ttl_is_lost_never_a_partial_replay(gap):
    """A group keeps 10 messages (hsmall) or 1.5 s of them (hshort): 10 missed messages are
    replayed; 15, or any older than the TTL, are "lost" with nothing replayed."""
    group = hist_group("hshort" if gap == "longer_than_ttl" else "hsmall")
    with running_server(app=f"{__name__}:hist_app") as server:
        async def steps():
            client = hist_Client(server.url(f"/hist/{group}/"))
            await client.connect()
            await client.close()
            count = 15 if gap == "longer_than_size" else 10 if gap == "within_size" else 3
            await hist_say(server, group, [f"m{n}" for n in range(count)])
            if gap == "longer_than_ttl":
                await asyncio.sleep(2.0)
            replayed = await client.connect()
            await client.close()
            return client, replayed, count
        client, replayed, count = run(steps())
    outcome = client.outcomes[-1]["$resume"]
    key = next(iter(outcome["positions"]))
    if gap == "within_size":
        assert hist_texts(replayed) == [f"m{n}" for n in range(10)] and outcome["resumed"] == [key]
    else:
        assert replayed == [] and outcome["lost"] == [key] and outcome["resumed"] == []
    assert outcome["positions"][key][1] == count


def test_history_hostile_positions_get_one_warning_each_and_never_more_than_history_holds():
    """Positions a client can forge -- another epoch, negative, huge, malformed, not JSON,
    another group's key, 100 unknown keys: the handshake goes on, each connection logs one warning
    line at most, nothing of another group arrives, and no replay is longer than SIZE."""
    from urllib.parse import quote
    group, other = hist_group("hsmall"), hist_group("hsmall")
    with running_server(app=f"{__name__}:hist_app") as server:
        async def steps():
            own, theirs = hist_Client(server.url(f"/hist/{group}/")), hist_Client(server.url(f"/hist/{other}/"))
            await own.connect()
            await theirs.connect()
            await hist_say(server, other, ["secret"])
            await theirs.messages(1)
            await hist_say(server, group, [f"m{n}" for n in range(15)])
            await own.messages(15)
            await own.close()
            await theirs.close()
            key, (epoch, top) = next(iter(own.positions.items()))
            other_key = next(iter(theirs.positions))
            many = {uuid.uuid4().hex[:16]: [epoch, 0] for _ in range(100)}  # servers cap URLs
            hostile = {
                "forged_epoch": json.dumps({key: ["forged", 10]}),
                "negative": json.dumps({key: [epoch, -1]}),
                "huge": json.dumps({key: [epoch, 10**30]}),
                "malformed": json.dumps({key: {"epoch": epoch}}),
                "not_json": "{not json",
                "a_list": json.dumps([[key, epoch, 1]]),
                "other_group": json.dumps({other_key: [theirs.positions[other_key][0], 0]}),
                "a_hundred": json.dumps({**many, key: [epoch, 5]}),
            }
            results = {}
            for name, text in hostile.items():
                lines_before = server.log().count("\n")
                async with ws_connect(server.url(f"/hist/{group}/?resume={quote(text)}")) as socket:
                    frames = []
                    while True:
                        frame = json.loads(await recv(socket))
                        frames.append(frame)
                        if "$resume" in frame:
                            break
                await asyncio.sleep(0.2)
                results[name] = frames, server.log().count("\n") - lines_before
            return key, top, results
        key, top, results = run(steps(), timeout=60)
        log = server.log()
    assert "Traceback" not in log, log
    for name, (frames, new_lines) in results.items():
        replayed = [frame for frame in frames if "$pos" in frame]
        outcome = frames[-1]["$resume"]
        assert new_lines <= 1, (name, log)
        assert list(outcome["positions"]) == [key], (name, outcome)  # only its own group
        assert all(frame["$pos"][0] == key for frame in replayed) and len(replayed) <= 10, name
        assert "secret" not in json.dumps(frames) and "hsmall-" not in json.dumps(frames), name
    assert results["forged_epoch"][0][-1]["$resume"]["lost"] == [key]
    assert results["huge"][0][-1]["$resume"]["lost"] == [key]
    for name in ("negative", "malformed", "not_json", "a_list", "other_group", "a_hundred"):
        assert results[name][1] == 1, (name, log)  # the one warning line
    assert [f["$pos"][2] for f in results["a_hundred"][0][:-1]] == list(range(6, top + 1))


@asynchronous
async def test_history_10000_resume_keys_cost_one_warning_and_a_bounded_handshake(caplog):
    """uvicorn refuses a URL that long (400), but if a server passed one: 10,000
    keys in the resume parameter are ignored with one warning, and the handshake stays quick."""
    from urllib.parse import quote
    app = Application(hist_routing, channel_layer=InMemoryChannelLayer())
    group = hist_group()
    many = json.dumps({uuid.uuid4().hex[:16]: ["e", 0] for _ in range(10_000)})
    assert len(many) < 512_000
    socket = WebsocketCommunicator(app, f"/hist/{group}/?resume={quote(many)}")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        assert (await socket.connect())[0]
        frame = await socket.receive_json_from()
    seconds = time.monotonic() - started
    await socket.disconnect()
    assert frame["$resume"]["resumed"] == [] and frame["$resume"]["lost"] == []
    assert len([r for r in caplog.records if "resume positions" in r.getMessage()]) == 1
    assert seconds < 1, seconds


def test_history_a_logout_during_the_gap_refuses_the_reconnect_and_replays_nothing():
    """A members-only resumable room: its user logs out while the socket is away; the
    reconnect with the same cookie and positions is refused (403) and nothing is replayed."""
    from websockets.exceptions import InvalidStatus
    user, cookie = rel_login("resumer")
    group = hist_group()
    with running_server(app=f"{__name__}:hist_app") as server:
        async def steps():
            client = hist_Client(server.url(f"/hist-member/{group}/"), headers=[("Cookie", cookie)])
            await client.connect()
            await hist_say(server, group, ["before"])
            await client.messages(1)
            await client.close()
            await asyncio.to_thread(http_request, server.url("/logout/", "http"), None, {"Cookie": cookie})
            await hist_say(server, group, ["said after the logout"])
            with pytest.raises(InvalidStatus) as refused:
                await client.connect()
            return client, refused.value.response.status_code
        client, status = run(steps())
    assert status == 403
    assert hist_texts(client.seen) == ["before"]


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_history_1000_clients_resuming_within_2_seconds_all_resume(where):
    """1,000 resumable sockets drop; 5 messages are said; all 1,000 reconnect within 2 s and
    each resumes with the 5 (history in memory, or on Redis). The handshake-to-"resumed" time
    and the server's memory are printed."""
    import statistics
    group = hist_group()
    count = 1000
    with contextlib.ExitStack() as stack:
        env = redis_server_env(stack.enter_context(running_redis())) if where == "redis" else None
        server = stack.enter_context(running_server(app=f"{__name__}:hist_app", env=env))
        server_process = psutil.Process(server.process.pid)

        async def steps():
            clients = [hist_Client(server.url(f"/hist/{group}/")) for _ in range(count)]
            for start in range(0, count, 100):
                await asyncio.gather(*(client.connect(timeout=30) for client in clients[start:start + 100]))
            await asyncio.gather(*(client.close() for client in clients))
            rss_before = server_process.memory_info().rss
            await hist_say(server, group, [f"m{n}" for n in range(5)])
            began = time.monotonic()

            async def resume(client, delay):
                await asyncio.sleep(delay)
                started = time.monotonic()
                replayed = await client.connect(timeout=30)
                return time.monotonic() - started, replayed, client.outcomes[-1]["$resume"]

            results = await asyncio.gather(*(resume(client, 2.0 * n / count) for n, client in enumerate(clients)))
            spread = time.monotonic() - began
            rss_after = server_process.memory_info().rss
            await asyncio.gather(*(client.close() for client in clients))
            return results, spread, rss_before, rss_after
        results, spread, rss_before, rss_after = run(steps(), timeout=180)
    seconds = sorted(result[0] for result in results)
    p99 = seconds[int(0.99 * len(seconds)) - 1]
    print(f"\n{where}: {count} resumes within {spread:.2f} s: handshake to 'resumed' median "
          f"{statistics.median(seconds) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms; server RSS "
          f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MB")
    assert all(hist_texts(result[1]) == [f"m{n}" for n in range(5)] for result in results)
    assert all(result[2]["resumed"] and not result[2]["lost"] for result in results)


@asynchronous
async def test_history_a_client_that_never_returns_leaves_nothing_and_history_goes_after_its_ttl():
    """Sockets that close and never come back leave nothing behind per socket; the messages
    of a group kept for 1.5 s (hshort) are freed then (``Application.stats()``)."""
    app = Application(hist_routing, channel_layer=InMemoryChannelLayer())
    group = hist_group("hshort")
    sockets = [WebsocketCommunicator(app, f"/hist/{group}/") for _ in range(20)]
    for socket in sockets:
        assert (await socket.connect())[0]
        assert "$resume" in await socket.receive_json_from()
    assert app.stats()["resumable"] == 20
    for n in range(5):
        await Group(group, channel_layer=app.channel_layer).asend({"text": f"m{n}"})
    for socket in sockets:
        await socket.disconnect()
    stats = app.stats()
    assert (stats["resumable"], stats["history_groups"], stats["history_messages"]) == (0, 1, 5)
    await asyncio.sleep(1.6)
    stats = app.stats()
    assert (stats["history_groups"], stats["history_messages"]) == (0, 0)


def test_history_on_redis_messages_expire_after_the_ttl_and_the_position_stays_small():
    """On Redis a group's messages live in one stream that expires TTL after the last send;
    only its position (a small hash) outlives it, for a day, so a late client is told "lost"
    exactly; a position a handshake only read lasts the TTL."""
    import redis
    group = hist_group("hshort")
    from django.test import override_settings
    with running_redis() as url, override_settings(CHANNEL_LAYERS={"default": {
            "BACKEND": redis_CORE, "CONFIG": {"hosts": [url]}}}):
        reset_channel_layers()
        layer = get_channel_layer()  # a layer from settings: section 15 stores its history sends
        run(layer.group_send(group, {"text": "one"}))
        quiet = hist_group("hshort")  # a group a handshake reads but nobody sends to

        async def handshake():
            socket = WebsocketCommunicator(Application(hist_routing, channel_layer=layer), f"/hist/{quiet}/")
            assert (await socket.connect())[0]
            await socket.receive_json_from()
            await socket.disconnect()
        run(handshake())
        client = redis.Redis.from_url(url)
        try:
            keys = sorted(key.decode() for key in client.keys(f"*{group}*"))
            ttl_ms = client.pttl(f"asgi:history:{{{group}}}:messages")
            quiet_ttl_ms = client.pttl(f"asgi:history:{{{quiet}}}:position")
            position_ttl = client.ttl(f"asgi:history:{{{group}}}:position")
            time.sleep(1.7)
            left = sorted(key.decode() for key in client.keys(f"*{group}*"))
        finally:
            client.close()
    assert keys == [f"asgi:history:{{{group}}}:messages", f"asgi:history:{{{group}}}:position"]
    assert 0 < ttl_ms <= 1500
    assert 0 < quiet_ttl_ms <= 2000  # a position only read lasts the TTL (rounded up), not a day
    assert 86_000 < position_ttl <= 86_400
    assert left == [f"asgi:history:{{{group}}}:position"]



@asynchronous
async def test_history_frames_of_sockets_not_resumable_and_of_groups_without_history_are_unchanged():
    """A socket that did not opt in gets a history group's frames exactly as sent (text and
    bytes); a resumable socket gets a group without history's frames exactly as sent, and a
    history group's in the documented envelope (bytes as base64)."""
    import base64
    app = Application(hist_routing + [hist_Room.as_route(path=r"^/two/(?P<group>[\w-]+)/$",
                                                         attrs={"connection_groups": lambda self, group, **kw: [group, "plain-x"]})],
                      channel_layer=InMemoryChannelLayer())
    group = hist_group()
    plain, resumable = WebsocketCommunicator(app, f"/hist-plain/{group}/"), WebsocketCommunicator(app, f"/two/{group}/")
    for socket in (plain, resumable):
        assert (await socket.connect())[0]
    start = await resumable.receive_json_from()
    key = next(iter(start["$resume"]["positions"]))
    epoch = start["$resume"]["positions"][key][0]
    layer = app.channel_layer
    await Group(group, channel_layer=layer).asend({"text": "héllo"})
    await Group(group, channel_layer=layer).asend({"bytes": b"\x00\xff"})
    await Group("plain-x", channel_layer=layer).asend({"text": "unchanged"})
    assert await plain.receive_output() == {"type": "websocket.send", "text": "héllo"}
    assert await plain.receive_output() == {"type": "websocket.send", "bytes": b"\x00\xff"}
    assert json.loads(await resumable.receive_from()) == {"$pos": [key, epoch, 1], "text": "héllo"}
    assert json.loads(await resumable.receive_from()) == {
        "$pos": [key, epoch, 2], "bytes": base64.b64encode(b"\x00\xff").decode()}
    assert await resumable.receive_output() == {"type": "websocket.send", "text": "unchanged"}
    assert group not in json.dumps(start) and len(key) == 16
    for socket in (plain, resumable):
        await socket.disconnect()


@asynchronous
async def test_history_a_stamp_in_a_message_is_only_ever_the_stores_own():
    """A message that arrives with a position of its own (say, a client's JSON forwarded as a
    group message) has it replaced in a group with history and removed in one without."""
    layer = InMemoryChannelLayer()
    group = hist_group()
    await layer.group_add(group, "watcher.one")
    await layer.group_add("plain-y", "watcher.one")
    forged = {"text": "x", "__history__": [group, "forged", 999]}
    await layer.group_send(group, forged)
    await layer.group_send("plain-y", forged)
    stored, passed = await layer.receive("watcher.one"), await layer.receive("watcher.one")
    assert stored["__history__"][0] == group and stored["__history__"][1:] != ["forged", 999]
    assert stored["__history__"][2] == 1 and passed == {"text": "x"}


@asynchronous
async def test_history_messages_a_full_outbox_dropped_are_filled_in_from_history():
    """A burst overflows a resumable socket's outbox (capacity 5): the drops leave a gap that
    the next message reveals, and the way out fills it from history -- every message arrives,
    in order (a socket that did not opt in loses them, as it always did)."""
    app = Application(hist_routing, channel_layer=InMemoryChannelLayer(capacity=5))
    group = hist_group()
    socket = WebsocketCommunicator(app, f"/hist/{group}/")
    assert (await socket.connect())[0]
    await socket.receive_json_from()
    for number in range(30):  # no await between them: the writer cannot drain
        app.channel_layer.group_send_now(group, {"text": f"m{number}"})
    await asyncio.sleep(0.05)
    app.channel_layer.group_send_now(group, {"text": "last"})
    frames = [json.loads(await socket.receive_from()) for _ in range(31)]
    assert [frame["$pos"][2] for frame in frames] == list(range(1, 32))
    assert [frame["text"] for frame in frames] == [f"m{n}" for n in range(30)] + ["last"]
    assert app.channel_layer.dropped > 0
    await socket.disconnect()


@pytest.mark.parametrize("setting, wrong", [
    (["chat-*"], "must map group-name patterns"),
    ({"chat-*": {"SIZE": 0, "TTL": 10}}, "positive integer SIZE"),
    ({"chat-*": {"SIZE": 10}}, "positive TTL"),
    ({"chat-*": 200}, "e.g. {'chat-*': {'SIZE': 200, 'TTL': 300}}"),
])
def test_history_a_wrong_setting_is_refused_with_what_to_write(setting, wrong):
    from django.test import override_settings
    layer = InMemoryChannelLayer()
    with override_settings(CHANNELS_MINI_HISTORY=setting):
        reset_channel_layers()
        with pytest.raises(ImproperlyConfigured, match=re.escape(wrong)):
            run(layer.group_send("chat-1", {"text": "x"}))
    reset_channel_layers()


def test_history_the_js_client_is_served_by_the_application():
    """``GET /channels_mini.js`` from any ``Application``: the client, as JavaScript, with an
    ETag (a 304 when unchanged); vendoring the one file brings it along."""
    with running_server(app=f"{__name__}:hist_app") as server:
        status, body, headers = http_request(server.url("/channels_mini.js", "http"))
        etag = headers["ETag"]
        again = http_request(server.url("/channels_mini.js", "http"), headers={"If-None-Match": etag})
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"class Bridge" in body and b"window.channels.WebSocketBridge" in body
    assert again[0] == 304 and again[1] == b""



class hist_SlowRoom(hist_Room):
    """A resumable room whose connect() takes 0.3 s (a database, say) and may refuse."""

    async def connect(self, message, **kwargs):
        await asyncio.sleep(0.3)
        if "refuse" in message["path"]:
            raise DenyConnection
        await message.reply_channel.asend({"accept": True})

    async def receive(self, text=None, bytes=None, group=None, **kwargs):
        if text == "!leave":
            await Group(group).adiscard(self.message.reply_channel)
        elif text == "!join":
            await Group(group).aadd(self.message.reply_channel)
        elif text == "!forge":  # a relay that copies what a client sent into a direct reply
            await self.message.reply_channel.asend({"text": "forged", "__history__": [group, "e", 10**9]})
        await self.message.reply_channel.asend({"text": f"done {text}"})


def hist_slow_app() -> Application:
    return Application([hist_SlowRoom.as_route(path=r"^/slow/(?P<group>[\w-]+)/(?:refuse/)?$")],
                       channel_layer=InMemoryChannelLayer())


@asynchronous
async def test_history_a_message_during_the_handshake_waits_for_its_position():
    """A message said while the socket's connect() still runs (its groups already joined):
    a resuming socket gets the messages it missed, then that one, each once, in order, all in
    their envelopes; a socket whose connect() refuses hears none of them."""
    from urllib.parse import quote
    app = hist_slow_app()
    group = hist_group()
    say = functools.partial(Group(group, channel_layer=app.channel_layer).asend)
    first = WebsocketCommunicator(app, f"/slow/{group}/")
    assert (await first.connect())[0]
    start = (await first.receive_json_from())["$resume"]["positions"]
    await say({"text": "m1"})
    seen = json.loads(await first.receive_from())
    await first.disconnect()
    await say({"text": "m2"})  # missed
    key = next(iter(start))
    again = WebsocketCommunicator(app, f"/slow/{group}/?resume={quote(json.dumps({key: [seen['$pos'][1], 1]}))}")
    refused = WebsocketCommunicator(app, f"/slow/{group}/refuse/")
    connecting = asyncio.gather(again.connect(timeout=3), refused.connect(timeout=3))
    await asyncio.sleep(0.15)
    await say({"text": "m3"})  # while both handshakes run
    (accepted, _), (refused_accepted, code) = await connecting
    frames = [json.loads(await again.receive_from()) for _ in range(3)]
    assert accepted and not refused_accepted
    assert [(f.get("$pos") or [None, None, None])[2] for f in frames[:2]] == [2, 3]
    assert [f["text"] for f in frames[:2]] == ["m2", "m3"] and frames[2]["$resume"]["resumed"] == [key]
    assert await refused.receive_nothing(0.2)
    await again.disconnect()


@asynchronous
async def test_history_a_socket_that_leaves_and_joins_again_is_not_sent_what_it_missed_outside():
    """A socket that leaves a group and joins it again later starts afresh: what was said
    while it was out is not sent to it."""
    app = hist_slow_app()
    group = hist_group()
    say = functools.partial(Group(group, channel_layer=app.channel_layer).asend)
    socket = WebsocketCommunicator(app, f"/slow/{group}/")
    assert (await socket.connect())[0]
    await socket.receive_json_from()
    await say({"text": "before"})
    assert json.loads(await socket.receive_from())["text"] == "before"
    await socket.send_to("!leave")
    assert await socket.receive_from() == "done !leave"
    for number in range(3):
        await say({"text": f"private {number}"})
    await socket.send_to("!join")
    assert await socket.receive_from() == "done !join"
    await say({"text": "after"})
    frame = json.loads(await socket.receive_from())
    assert (frame["text"], frame["$pos"][2]) == ("after", 5)
    assert await socket.receive_nothing(0.2)
    await socket.disconnect()


@asynchronous
async def test_history_a_stamp_copied_into_a_direct_reply_moves_nothing():
    """A direct reply that carries a stamp (an app relaying what a client sent) goes out as
    sent, and the socket's position does not move: the next group message arrives as usual."""
    app = hist_slow_app()
    group = hist_group()
    socket = WebsocketCommunicator(app, f"/slow/{group}/")
    assert (await socket.connect())[0]
    await socket.receive_json_from()
    await socket.send_to("!forge")
    assert await socket.receive_from() == "forged"
    assert await socket.receive_from() == "done !forge"
    await Group(group, channel_layer=app.channel_layer).asend({"text": "real"})
    frame = json.loads(await socket.receive_from())
    assert (frame["text"], frame["$pos"][2]) == ("real", 1)
    await socket.disconnect()


@asynchronous
async def test_history_a_malformed_group_message_is_logged_and_never_closes_resumable_sockets(caplog):
    """A message with bytes that are not bytes in a group with history: logged, not sent; the
    socket stays open, and so does a resume that replays it."""
    from urllib.parse import quote
    app = Application(hist_routing, channel_layer=InMemoryChannelLayer())
    group = hist_group()
    say = functools.partial(Group(group, channel_layer=app.channel_layer).asend)
    socket = WebsocketCommunicator(app, f"/hist/{group}/")
    assert (await socket.connect())[0]
    positions = (await socket.receive_json_from())["$resume"]["positions"]
    with caplog.at_level(logging.ERROR, logger="channels_mini"):
        await say({"bytes": "not bytes"})
        await say({"text": "fine"})
        assert json.loads(await socket.receive_from())["$pos"][2] == 2
    await socket.disconnect()
    again = WebsocketCommunicator(app, f"/hist/{group}/?resume={quote(json.dumps(positions))}")
    assert (await again.connect())[0]
    assert json.loads(await again.receive_from())["text"] == "fine"
    assert json.loads(await again.receive_from())["$resume"]["resumed"]
    await again.disconnect()
    assert len([r for r in caplog.records if "wrong type" in r.getMessage()]) == 2


@asynchronous
async def test_history_positions_only_read_by_handshakes_last_the_ttl_not_a_day():
    """Handshakes to 50 groups nobody sends to give each a position; they are freed after the
    group's TTL (hshort: 1.5 s), so clients cannot fill memory with them."""
    app = Application(hist_routing, channel_layer=InMemoryChannelLayer())
    for _ in range(50):
        socket = WebsocketCommunicator(app, f"/hist/{hist_group('hshort')}/")
        assert (await socket.connect())[0]
        await socket.receive_json_from()
        await socket.disconnect()
    assert app.stats()["history_positions"] == 50
    await asyncio.sleep(1.6)
    assert app.stats()["history_positions"] == 0



# === Documentation ===
# The README's and the docs' code is run, not just shown.

README = os.path.join(ROOT, "README.md")
DOCS = [README] + sorted(os.path.join(ROOT, "docs", name)
                         for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))


def docs_text() -> str:
    """The README and every page of docs/, one after the other (each section a '## ' heading)."""
    texts = []
    for path in DOCS:
        with open(path, encoding="utf-8") as handle:
            texts.append(handle.read())
    return "\n".join(texts)


def test_readme_is_short_and_links_every_docs_page():
    with open(README, encoding="utf-8") as handle:
        readme = handle.read()
    assert readme.count("\n") <= 450
    assert [path for path in DOCS[1:] if f"(docs/{os.path.basename(path)})" not in readme] == []
    assert "runserver` serves no websockets" in readme or "runserver`\nserves no websockets" in readme


def test_readme_and_demo_limit_frames_in_the_server_too():
    """The server refuses frames over max_message_size before buffering them: the README's
    serving commands and the demo's run.sh pass uvicorn --ws-max-size with the same limit."""
    import inspect
    limit = inspect.signature(Application).parameters["max_message_size"].default
    readme = docs_text()
    deployment = readme.split("## Running on more than one process", 1)[1].split("\n## ", 1)[0]
    serving = [line for line in deployment.splitlines() if line.startswith("uvicorn mysite.asgi")]
    assert serving and all(f"--ws-max-size {limit}" in line for line in serving), serving
    assert f"--websocket-max-message-size {limit}" in readme  # daphne
    assert f"websocket_max_message_size = {limit}" in readme  # hypercorn
    run_sh = open(os.path.join(ROOT, "example", "run.sh"), encoding="utf-8").read()
    assert f"--ws-max-size {limit}" in run_sh


def readme_python_blocks() -> list[str]:
    """Every Python block of the README and the docs."""
    return re.findall(r"```python\n(.*?)```", docs_text(), flags=re.S)


def test_readme_python_blocks_compile():
    blocks = readme_python_blocks()
    assert len(blocks) >= 4
    for block in blocks:
        compile(block, "README.md", "exec")


def test_readme_standalone_blocks_run(tmp_path):
    standalone = [b for b in readme_python_blocks() if not b.startswith(("# mysite/", "# shop/"))]
    assert standalone
    for block in standalone:
        result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                                timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT})
        assert result.returncode == 0, f"README block failed:\n{block}\n{result.stderr}"


def readme_tutorial_steps() -> dict[int, dict[str, list[str]]]:
    """The chat tutorial's code blocks, by step number and then language, in README order."""
    with open(README, encoding="utf-8") as handle:
        section = handle.read().split("\n## A chat from zero", 1)[1].split("\n## ", 1)[0]
    steps: dict[int, dict[str, list[str]]] = {}
    for number, body in re.findall(r"^\*\*(\d+)\. (.*?)(?=^\*\*\d+\. |\Z)", section,
                                   flags=re.S | re.M):
        blocks = steps.setdefault(int(number), {})
        for language, code in re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S):
            blocks.setdefault(language, []).append(code)
    return steps


def readme_tutorial_files(last_step: int) -> dict[str, str]:
    """The files of steps 1 to *last_step*, by the path in their first line; later steps win."""
    files = {}
    for number, blocks in sorted(readme_tutorial_steps().items()):
        if number <= last_step:
            files.update((code.split("\n", 1)[0][2:].strip(), code) for code in blocks.get("python", []))
    return files


def write_tutorial_project(tmp_path, last_step: int):
    """`startproject mysite` with this environment's Django, then the tutorial's files."""
    files = readme_tutorial_files(last_step)
    assert set(files) == {"mysite/consumers.py", "mysite/routing.py", "mysite/asgi.py"}
    subprocess.run([sys.executable, "-m", "django", "startproject", "mysite"], cwd=tmp_path,
                   check=True, timeout=60)
    project = tmp_path / "mysite"
    for name, code in files.items():
        (project / name).write_text(code)
    return project


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
    if not os.path.exists(path):  # a skip would read as a pass
        raise FileNotFoundError(f"No Chromium at {path}: apt-get install -y chromium, "
                                f"or set CHROMIUM_PATH.")
    return path


async def tutorial_chat(server) -> list[str]:
    """Two clients in #lobby and one in #other: what the lobby hears of alice's hello."""
    async with ws_connect(server.url("/chat/lobby/")) as alice, \
            ws_connect(server.url("/chat/lobby/")) as bob, \
            ws_connect(server.url("/chat/other/")) as carol:
        await alice.send("hello")
        heard = [await asyncio.wait_for(bob.recv(), 5), await asyncio.wait_for(alice.recv(), 5)]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(carol.recv(), 0.3)
        return heard


def test_readme_chat_tutorial_runs_under_uvicorn(tmp_path):
    from playwright.sync_api import sync_playwright

    project = write_tutorial_project(tmp_path, last_step=5)
    (snippet,) = readme_tutorial_steps()[5]["js"]
    with running_server(app="mysite.asgi:application", cwd=str(project),
                        env={"DJANGO_SETTINGS_MODULE": "mysite.settings"}) as server:
        assert run(tutorial_chat(server)) == ["hello", "hello"]
        # the page step 5 opens, and the rest of the site: startproject's admin, with its CSS
        status, page = http_get(server.url("/", scheme="http"))
        assert status == 200 and "The install worked successfully!" in page
        assert http_get(server.url("/admin/login/", scheme="http"))[0] == 200
        status, css = http_get(server.url("/static/admin/css/base.css", scheme="http"))
        assert status == 200 and "body" in css

        # The console snippet, pasted as one block into two real tabs on the start page.
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path(), timeout=30_000,
                                                 args=["--headless", "--no-sandbox", "--disable-gpu"])
            try:
                errors: list[str] = []
                first, second = (browser.new_page() for _ in range(2))
                for tab in (first, second):
                    tab.on("pageerror", lambda error: errors.append(str(error)))
                    tab.goto(server.url("/", scheme="http"))

                def heard(text):
                    return {"predicate": lambda message: message.text == text, "timeout": 10_000}

                with first.expect_console_message(**heard("hello")):
                    first.add_script_tag(content=snippet)  # runs as a console paste does
                with first.expect_console_message(**heard("hello")), \
                        second.expect_console_message(**heard("hello")):
                    second.add_script_tag(content=snippet)
                with first.expect_console_message(**heard("hi")), \
                        second.expect_console_message(**heard("hi")):
                    second.evaluate('ws.send("hi")')
                assert errors == []
            finally:
                browser.close()


def test_readme_tutorial_step_6_shows_who_is_talking(tmp_path):
    import http.cookiejar
    import shlex
    import urllib.parse

    project = write_tutorial_project(tmp_path, last_step=6)
    env = {**os.environ, "PYTHONPATH": ROOT, "DJANGO_SETTINGS_MODULE": "mysite.settings",
           "DJANGO_SUPERUSER_PASSWORD": "tutorial-pw-6"}
    (commands,) = readme_tutorial_steps()[6]["sh"]
    for line in commands.splitlines():
        command = shlex.split(line, comments=True)
        assert command[:2] == ["python", "manage.py"], line
        if command[2] == "createsuperuser":  # it asks its questions only on a terminal
            command += ["--noinput", "--username", "admin", "--email", "admin@example.com"]
        subprocess.run([sys.executable, *command[1:]], cwd=project, env=env, check=True,
                       capture_output=True, timeout=120)

    with running_server(app="mysite.asgi:application", cwd=str(project),
                        env={"DJANGO_SETTINGS_MODULE": "mysite.settings"}) as server:
        # Log in through the admin's form, as a browser does.
        jar = http.cookiejar.CookieJar()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        login = server.url("/admin/login/?next=/admin/", scheme="http")
        form = browser.open(login, timeout=10).read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
        fields = {"csrfmiddlewaretoken": token, "username": "admin", "password": "tutorial-pw-6"}
        with browser.open(login, urllib.parse.urlencode(fields).encode(), timeout=10) as answer:
            assert answer.url.endswith("/admin/")  # logged in: the admin's index, not the form
        session = next(cookie.value for cookie in jar if cookie.name == "sessionid")

        async def chat():
            async with ws_connect(server.url("/chat/lobby/"),
                                  additional_headers=[("Cookie", f"sessionid={session}")]) as admin, \
                    ws_connect(server.url("/chat/lobby/")) as visitor:
                await admin.send("hello")
                heard = [await asyncio.wait_for(visitor.recv(), 5)]
                await visitor.send("hi")
                heard += [await asyncio.wait_for(admin.recv(), 5) for _ in range(2)]
                return heard

        assert run(chat()) == ["admin: hello", "admin: hello", "anonymous: hi"]


FRESH_VENV_LEFT_OUT = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                             ".hypothesis", "example", "bench")


def test_readme_tutorial_in_a_fresh_virtualenv(tmp_path):
    """Steps 1 to 5 word for word, in a new virtualenv that has only what step 1 installs.

    The clone that the tutorial starts from is a copy of this checkout, so nothing from this
    test environment (its uvicorn, its websockets) can stand in for a dependency the README
    leaves out. Only the chat clients are this environment's.
    """
    import shlex

    steps = readme_tutorial_steps()
    (setup,), (serve,) = steps[1]["sh"], steps[5]["sh"]
    assert "./channels_mini" in setup and "python3 -m venv .venv" in setup, setup

    # 1. The folder the tutorial starts in: a copy of this checkout as `channels_mini/`, and
    #    `python3` meaning the interpreter that runs these tests.
    shutil.copytree(ROOT, tmp_path / "channels_mini", ignore=FRESH_VENV_LEFT_OUT)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3").symlink_to(sys.executable)
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "DJANGO_SETTINGS_MODULE")
           and not name.startswith("CHANNELS_MINI_")}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"

    # 2. Step 1's block as written: venv, install line, startproject.
    result = subprocess.run(["bash", "-e", "-c", setup], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"step 1 failed:\n{result.stdout}\n{result.stderr}"
    venv = tmp_path / ".venv"
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    (command,) = [shlex.split(line) for line in serve.splitlines() if line.strip()]
    assert shutil.which(command[0], path=env["PATH"]) == str(venv / "bin" / command[0])

    # 3. Steps 2 to 4: the files as the README shows them.
    project = tmp_path / "mysite"
    files = readme_tutorial_files(last_step=5)
    assert set(files) == {"mysite/consumers.py", "mysite/routing.py", "mysite/asgi.py"}
    for name, code in files.items():
        (project / name).write_text(code)

    # 4. Step 5: the server, on a free port instead of 8000; two clients chat.
    port = free_port()
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(command + ["--port", str(port)], cwd=project, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    server = Server(port, process, str(tmp_path / "server.log"))
    try:
        wait_for_port(port, process, timeout=30)
        try:
            assert run(tutorial_chat(server)) == ["hello", "hello"]
        except Exception as error:
            raise AssertionError(f"the tutorial's chat failed ({error}); server log:\n"
                                 f"{server.log()}") from error
        status, css = http_get(server.url("/static/admin/css/base.css", scheme="http"))
        assert status == 200 and "body" in css
    finally:
        stop_process(process)
    assert "Traceback" not in server.log(), server.log()


def docs_page_blocks(name: str) -> dict[str, str]:
    """The Python blocks of docs/*name*, by the file their first line names."""
    with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)
    return {block.split("\n", 1)[0][2:].split(" -- ")[0].strip(): block for block in blocks}


def test_docs_http_consumers_drop_into_the_tutorial(tmp_path):
    """docs/http-consumers.md's three files, added to the tutorial's project as the page says,
    served by uvicorn: the 1.x Getting Started answer, a long-poll answered by the page's view,
    an event stream fed by the same view, and the tutorial's chat still working."""
    import http.client

    blocks = docs_page_blocks("http-consumers.md")
    assert set(blocks) == {"mysite/consumers.py", "mysite/routing.py", "mysite/urls.py"}
    project = write_tutorial_project(tmp_path, last_step=5)
    consumers = project / "mysite" / "consumers.py"
    consumers.write_text(consumers.read_text() + "\n\n" + blocks["mysite/consumers.py"])
    for name in ("mysite/routing.py", "mysite/urls.py"):
        (project / name).write_text(blocks[name])
    with running_server(app="mysite.asgi:application", cwd=str(project),
                        env={"DJANGO_SETTINGS_MODULE": "mysite.settings"}) as server:
        hello = http_request(server.url("/hello/there/", "http"))
        stream = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            stream.request("GET", "/events/")
            events = stream.getresponse()
            retry = events.readline() + events.readline()

            async def scenario():
                waiting = asyncio.create_task(asyncio.to_thread(
                    http_request, server.url("/poll/sport/", "http")))
                await asyncio.sleep(0.5)  # the poll waits in its group
                published = await asyncio.to_thread(http_request, server.url("/publish/sport/", "http"))
                return published, await waiting

            published, polled = run(scenario())
            news = events.readline() + events.readline()
        finally:
            stream.close()
        chat = run(tutorial_chat(server))
    assert hello[:2] == (200, b"Hello world! You asked for /hello/there/")
    assert (events.status, retry) == (200, b"retry: 2000\n\n")
    assert published[:2] == (200, b"sent") and polled[:2] == (200, b"news!")
    assert news == b"data: news on sport\n\n"
    assert chat == ["hello", "hello"]


def test_readme_presence_example_runs():
    """The Presence section's consumer: a socket gets the room's presence on connect, then
    the diffs; the same user in a second tab is no join; the last tab closing is a leave."""
    block = next(b for b in readme_python_blocks()
                 if b.startswith("# mysite/consumers.py") and "presence_groups" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    app = Application([namespace["ChatRoom"].as_route(path=r"^/chat/(?P<room>[\w-]+)/$")])
    room = f"readme-{uuid.uuid4().hex[:8]}"
    user, cookie = rel_login("readme-presence")
    ada = {str(user.pk): [{"name": user.username}]}

    async def scenario():
        first = await presence_open(app, f"/chat/{room}/", cookie)
        frames = [await first.receive_json_from(timeout=5) for _ in range(2)]
        second = await presence_open(app, f"/chat/{room}/", cookie)
        frames.append(await second.receive_json_from(timeout=5))
        quiet = await first.receive_nothing(timeout=0.3)
        watcher = await presence_open(app, f"/chat/{room}/")
        frames.append((await watcher.receive_json_from(timeout=5))["members"])
        await first.disconnect()
        await second.disconnect()
        leave = [frame for frame in [await watcher.receive_json_from(timeout=5) for _ in range(2)]
                 if frame["leaves"]]
        await watcher.disconnect()
        return frames, quiet, leave

    frames, quiet, leave = run(scenario())
    assert frames[:3] == [{"type": "presence_state", "members": {}},
                      presence_diff(f"chat-{room}", joins=ada),
                      {"type": "presence_state", "members": ada}]
    assert quiet  # the second tab: no join
    assert frames[3] == {str(user.pk): [{"name": user.username}] * 2}
    assert leave == [presence_diff(f"chat-{room}", leaves=ada)]


def test_readme_binding_example_runs():
    import types

    from django.contrib.auth.models import User
    from django.test import Client

    ensure_database()
    block = next(b for b in readme_python_blocks() if b.startswith("# shop/bindings.py"))
    shop = types.ModuleType("shop")
    shop.models = types.ModuleType("shop.models")
    shop.models.Item = Item  # the README's model is this file's Item
    namespace: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "shop", shop)
        patch.setitem(sys.modules, "shop.models", shop.models)
        exec(compile(block, "README.md", "exec"), namespace)
    user, _ = User.objects.get_or_create(username="readme-binding")
    other, _ = User.objects.get_or_create(username="readme-binding-other")
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"

    async def scenario():
        communicator = WebsocketCommunicator(namespace["application"], "/items/ws/",
                                             headers=[(b"cookie", cookie.encode())])
        assert (await communicator.connect())[0]
        await communicator.send_json_to({"stream": "items", "payload": {
            "action": "create", "data": {"name": "from readme", "team": "green", "owner": user.pk}}})
        created = await communicator.receive_json_from(timeout=5)
        await communicator.send_json_to({"stream": "items", "payload": {
            "action": "rename", "pk": created["payload"]["pk"], "data": {}}})
        refused = await communicator.receive_json_from(timeout=5)
        await communicator.send_json_to({"stream": "items", "payload": {
            "action": "update", "pk": created["payload"]["pk"], "data": {"owner": other.pk}}})
        given_away = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return created, refused, given_away

    created, refused, given_away = run(scenario())
    assert created["stream"] == "items"
    assert created["payload"]["action"] == "create" and created["payload"]["data"]["name"] == "from readme"
    assert Item.objects.filter(pk=created["payload"]["pk"], name="from readme").exists()
    assert refused["payload"]["error"] == "Unknown action 'rename'; use one of ['create', 'update', 'delete']."
    assert given_away["payload"]["error"] == \
        "Invalid data: {'owner': ['You can only assign items to yourself.']}."
    assert Item.objects.get(pk=created["payload"]["pk"]).owner_id == user.pk


# -- "reached nobody": the in-memory layer of a process that has no consumers --

NOBODY_LISTENS_PROCESS = """
import asyncio, logging, sys
import django
from django.conf import settings
settings.configure(INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
                   DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                                          "NAME": sys.argv[1]}},
                   USE_TZ=True, LOGGING_CONFIG=None)
django.setup()
logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.auth.models import Group as Team
from channels_mini import (Application, Group, WebsocketBinding, WebsocketCommunicator,
                           WebsocketConsumer)

class TeamBinding(WebsocketBinding):
    model = "auth.Group"
    stream = "teams"
    fields = ["name"]

    @classmethod
    def group_names(cls, instance):
        return ["teams"]

class Room(WebsocketConsumer):
    groups = ["room"]

async def with_a_socket_open(scene):
    communicator = WebsocketCommunicator(Application([Room.as_route()]), "/room/")
    assert (await communicator.connect())[0]
    await asyncio.to_thread(scene)
    await communicator.disconnect()

def scene():
    print("-- save")
    Team.objects.create(name=f"red{Team.objects.count()}")  # a bound save, as in manage.py shell
    print("-- save again")
    Team.objects.create(name=f"blue{Team.objects.count()}")
    print("-- group send")
    Group("chat-lobby").send({"text": "hi"})

if sys.argv[2] == "socket":
    asyncio.run(with_a_socket_open(scene))
    print("-- after the socket closed")
scene()
"""

NOBODY_LISTENS_WARNING = (
    "WARNING channels_mini: Group 'teams' has no members and nothing in this process receives "
    "from its in-memory channel layer, so the message reached nobody. The in-memory layer lives "
    "inside one process: a send from 'manage.py shell', a script or another server process never "
    "reaches the sockets of your server. To reach them, configure a shared layer (channels_redis) "
    "in CHANNEL_LAYERS. (Logged once per process.)")


def run_nobody_listens_process(tmp_path, mode: str) -> str:
    result = subprocess.run([sys.executable, "-c", NOBODY_LISTENS_PROCESS,
                             str(tmp_path / "db.sqlite3"), mode],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_readme_a_bound_save_from_a_process_without_consumers_warns_once(tmp_path):
    output = run_nobody_listens_process(tmp_path, "alone")
    assert output.splitlines() == [
        "-- save", NOBODY_LISTENS_WARNING, "-- save again", "-- group send"]


def test_readme_no_reached_nobody_warning_while_a_consumer_runs_in_the_process(tmp_path):
    output = run_nobody_listens_process(tmp_path, "socket")
    # While the socket is open, an empty group is only an empty room; once it has closed,
    # nothing in the process listens any more.
    assert output.splitlines() == [
        "-- save", "-- save again", "-- group send",
        "-- after the socket closed", "-- save", NOBODY_LISTENS_WARNING, "-- save again",
        "-- group send"]


def test_readme_guarantees_name_tests_that_exist():
    table = docs_text().split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)`", table))
    assert len(named) >= 20
    missing = sorted(name for name in named if not callable(globals().get(name)))
    assert missing == []


def test_readme_api_reference_lists_every_public_name():
    with open(README, encoding="utf-8") as handle:
        table = handle.read().split("## API reference", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([A-Za-z_]+)[(`]", table))
    assert sorted(set(channels_mini.__all__) - listed) == []
    assert all(hasattr(channels_mini, name) for name in channels_mini.__all__)


def test_readme_porting_changes_only_the_imports():
    """"Coming from Channels 1.x": each before/after pair differs only in its import lines, and
    the imports after name only public channels_mini names."""
    section = docs_text().split("\n## Coming from Channels 1.x", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(# (mysite/\w+\.py) -- (.*?)\n.*?)```", section, flags=re.S)
    pairs: dict[str, dict[str, str]] = {}
    for code, path, label in blocks:
        pairs.setdefault(path, {})["before" if "(before)" in label else "after"] = code
    assert {path for path, pair in pairs.items() if set(pair) == {"before", "after"}} == {
        "mysite/consumers.py", "mysite/routing.py"}

    def split(code: str) -> tuple[list[str], list[str]]:
        lines = code.splitlines()[1:]  # below the "# mysite/... -- ..." line
        imports = [line for line in lines if line.startswith(("import ", "from "))]
        return imports, [line for line in lines if line not in imports]

    for path in ("mysite/consumers.py", "mysite/routing.py"):
        (old_imports, old_body), (new_imports, new_body) = split(pairs[path]["before"]), split(pairs[path]["after"])
        assert old_body == new_body, path
        assert old_imports != new_imports
        for line in new_imports:
            if line.startswith("from channels_mini import "):
                names = line.split(" import ", 1)[1].split(", ")
                assert set(names) <= set(channels_mini.__all__), line
            assert not line.startswith(("from channels ", "from channels.")), line
    assert "channels_redis.core.RedisChannelLayer" in section and "asgiref.inmemory.ChannelLayer" in section
    assert "no decorator" not in section and "there are no" not in section


# -- the shape of the module: the core, then the extensions --
# Read from channels_mini.py's source with `ast`: the banners (`# === ...` lines) cut it into
# sections, and a section may use only what the sections above it define (STYLE.md §1).

MODULE_SOURCE = os.path.join(ROOT, "channels_mini.py")
PART_I_LAST_LINE = 2400


def module_banners(source: str) -> list[tuple[int, str]]:
    """The module's banners in order: (line number, banner)."""
    return [(number, line) for number, line in enumerate(source.splitlines(), 1)
            if line.startswith("# === ")]


def names_bound_by(function) -> set[str]:
    """The names a function (or lambda) binds for itself: parameters, assignments, imports,
    loop and ``with`` targets, nested definitions, minus what it declares ``global``."""
    import ast
    arguments = function.args
    bound = {argument.arg for argument in (*arguments.posonlyargs, *arguments.args,
                                           *arguments.kwonlyargs, arguments.vararg, arguments.kwarg)
             if argument is not None}
    declared_global: set[str] = set()
    pending = list(function.body) if isinstance(function.body, list) else [function.body]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)  # its body is a scope of its own
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.Global):
            declared_global.update(node.names)
        pending.extend(ast.iter_child_nodes(node))
    return bound - declared_global


def module_names_loaded(node, own: frozenset = frozenset()):
    """(name, line) for each name *node* loads that no enclosing function binds itself: the
    module-level names it uses. (A parameter called ``application`` is not the module's.)"""
    import ast
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        own = own | names_bound_by(node)
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in own:
        yield node.id, node.lineno
    for child in ast.iter_child_nodes(node):
        yield from module_names_loaded(child, own)


def module_level_names(statement) -> set[str]:
    """The module-level names a top-level statement defines."""
    import ast
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    names, pending = set(), [statement]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue  # what those bind is their own
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return names


def module_forward_uses(source: str) -> list[str]:
    """Each use, by a top-level statement, of a module-level name that a later section defines."""
    import ast
    starts = [number for number, _ in module_banners(source)]

    def section_of(line: int) -> int:
        return sum(1 for start in starts if start <= line)  # 0: the header, above every banner

    tree = ast.parse(source)
    defined_in: dict[str, int] = {}
    for statement in tree.body:
        for name in module_level_names(statement):
            defined_in.setdefault(name, section_of(statement.lineno))
    banners = ["(header)"] + [banner for _, banner in module_banners(source)]
    found = []
    for statement in tree.body:
        section = section_of(statement.lineno)
        for name, line in module_names_loaded(statement):
            if defined_in.get(name, section) > section:
                found.append(f"line {line}: {name!r} of {banners[defined_in[name]]} used in "
                             f"{banners[section]}")
    return found


def test_docs_module_part_i_ends_by_line_2400_and_sections_use_only_earlier_ones():
    """Part I, the core, ends by line 2,400; no section (the core above all) names a
    module-level definition of a later section, Part II included."""
    with open(MODULE_SOURCE, encoding="utf-8") as handle:
        source = handle.read()
    part_two = [number for number, banner in module_banners(source)
                if banner == "# === Part II: extensions ==="]
    assert len(part_two) == 1 and part_two[0] <= PART_I_LAST_LINE, part_two
    assert module_forward_uses(source) == []


def test_docs_module_shape_check_finds_forward_uses_and_ignores_parameters():
    """The check above, on a module of three sections: a use of a later section's name is
    found (in a body, a default, an annotation); a parameter or local of the same name is not."""
    source = (
        "# === 1. First ===\n"
        "def early(application, x=later):\n"
        "    helper = 1\n"
        "    return application, helper, [later for _ in ()]\n"
        "def early_annotated(y: Later = None):\n"
        "    global counter\n"
        "    counter = y\n"
        "    return counter\n"
        "# === 2. Second ===\n"
        "def later(): return early\n"
        "class Later: pass\n"
        "application = counter = helper = None\n")
    assert module_forward_uses(source) == [
        "line 2: 'later' of # === 2. Second === used in # === 1. First ===",
        "line 4: 'later' of # === 2. Second === used in # === 1. First ===",
        "line 5: 'Later' of # === 2. Second === used in # === 1. First ===",
        "line 8: 'counter' of # === 2. Second === used in # === 1. First ===",
    ]
