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
    settings.configure(
        DEBUG=False,
        SECRET_KEY="channels-mini-tests-only",
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
            "CONFIG": {"hosts": [_redis_url]}}} if _redis_url else {}),
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        LOGGING_CONFIG=None,
    )

import django  # noqa: E402

django.setup()

import channels_mini  # noqa: E402
from channels_mini import (  # noqa: E402
    Application, BaseConsumer, Binding, Channel, ChannelFull, DenyConnection, Group,
    Include, InMemoryChannelLayer, JsonWebsocketConsumer, Message, Route, RouteClass, Router,
    SendNotAvailableOnDemultiplexer, WebsocketBinding, WebsocketCommunicator,
    WebsocketConsumer, WebsocketDemultiplexer, WebsocketMultiplexer, consumer_context,
    get_channel_layer, include, reset_channel_layers, route, route_class,
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


def _url_patterns():
    from django.urls import path
    return [path("page/", _view_page), path("items/create/", _view_create_item)]


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


@contextlib.contextmanager
def running_redis():
    """A real redis-server on a free port, no persistence; always stopped on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: .ci/run installs it "
                           "(apt-get install -y redis-server).")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="channels-mini-redis-")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", workdir],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, process)
        yield f"redis://127.0.0.1:{port}"
    finally:
        stop_process(process)


# --- end of shared header ---


# === 1. Channel layer ===

def test_layer_send_then_receive_returns_the_message():
    layer = InMemoryChannelLayer()

    async def scenario():
        await layer.send("email.send", {"to": "a@example.com"})
        return await layer.receive("email.send")

    assert run(scenario()) == {"to": "a@example.com"}


def test_layer_receive_waits_for_a_later_send():
    layer = InMemoryChannelLayer()

    async def scenario():
        waiting = asyncio.ensure_future(layer.receive("jobs"))
        await asyncio.sleep(0.02)
        assert not waiting.done()
        await layer.send("jobs", {"n": 1})
        return await asyncio.wait_for(waiting, 1)

    assert run(scenario()) == {"n": 1}


def test_layer_keeps_order_within_a_channel():
    layer = InMemoryChannelLayer()

    async def scenario():
        for n in range(50):
            await layer.send("ordered", {"n": n})
        return [(await layer.receive("ordered"))["n"] for _ in range(50)]

    assert run(scenario()) == list(range(50))


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


def test_layer_allows_process_local_channel_names():
    layer = InMemoryChannelLayer()

    async def scenario():
        name = await layer.new_channel()
        other = await layer.new_channel("websocket.send")
        await layer.send(name, {"ok": True})
        return name, other, await layer.receive(name)

    name, other, message = run(scenario())
    assert name.startswith("specific.") and name.count("!") == 1
    assert other.startswith("websocket.send.") and name != other
    assert message == {"ok": True}


def test_layer_new_channel_names_are_unique():
    layer = InMemoryChannelLayer()

    async def scenario():
        return {await layer.new_channel() for _ in range(1000)}

    assert len(run(scenario())) == 1000


def test_layer_capacity_raises_channel_full_with_advice():
    layer = InMemoryChannelLayer(capacity=2)

    async def scenario():
        await layer.send("small", {"n": 1})
        await layer.send("small", {"n": 2})
        await layer.send("small", {"n": 3})

    with pytest.raises(ChannelFull, match=re.escape(
            "Channel 'small' holds 2 messages, its capacity. Its receiver is slow or gone; "
            "raise 'capacity' or 'channel_capacity' if bursts are expected.")):
        run(scenario())


def test_layer_channel_capacity_patterns_glob_and_regex():
    layer = InMemoryChannelLayer(capacity=1, channel_capacity={
        "http.response!*": 3, re.compile(r"^websocket\.send!"): 2})

    async def fill(channel):
        sent = 0
        with contextlib.suppress(ChannelFull):
            for _ in range(10):
                await layer.send(channel, {})
                sent += 1
        return sent

    assert run(fill("http.response!abc")) == 3
    assert run(fill("websocket.send!xyz")) == 2
    assert run(fill("other")) == 1


def test_layer_messages_expire():
    layer = InMemoryChannelLayer(expiry=0.05)

    async def scenario():
        await layer.send("old", {"n": 1})
        await asyncio.sleep(0.1)
        await layer.send("old", {"n": 2})
        return await layer.receive("old")

    assert run(scenario()) == {"n": 2}


def test_layer_expired_messages_free_capacity():
    layer = InMemoryChannelLayer(expiry=0.05, capacity=1)

    async def scenario():
        await layer.send("tiny", {"n": 1})
        await asyncio.sleep(0.1)
        await layer.send("tiny", {"n": 2})  # would be ChannelFull if the old one still counted
        return await layer.receive("tiny")

    assert run(scenario()) == {"n": 2}


def test_layer_group_send_reaches_every_member_once():
    layer = InMemoryChannelLayer()

    async def scenario():
        for name in ("a", "b", "c"):
            await layer.group_add("room", name)
        await layer.group_add("room", "a")  # twice: still one membership
        await layer.group_send("room", {"text": "hi"})
        received = [await layer.receive(name) for name in ("a", "b", "c")]
        extra = asyncio.ensure_future(layer.receive("a"))
        await asyncio.sleep(0.02)
        nothing = not extra.done()
        extra.cancel()
        return received, nothing

    received, nothing_more = run(scenario())
    assert received == [{"text": "hi"}] * 3
    assert nothing_more


def test_layer_group_discard_stops_delivery_and_frees_the_group():
    layer = InMemoryChannelLayer()

    async def scenario():
        await layer.group_add("room", "a")
        await layer.group_add("room", "b")
        await layer.group_discard("room", "a")
        await layer.group_discard("room", "never-joined")
        await layer.group_send("room", {"n": 1})
        stats_with_b = layer.stats()
        await layer.receive("b")
        await layer.group_discard("room", "b")
        return stats_with_b, layer.stats()

    with_b, after = run(scenario())
    assert with_b["members"] == 1 and with_b["messages"] == 1
    assert after == {"channels": 0, "groups": 0, "members": 0, "messages": 0, "dropped": 0}


def test_layer_group_send_skips_full_members_counts_and_warns_once(caplog):
    layer = InMemoryChannelLayer(capacity=1)

    async def scenario():
        await layer.group_add("room", "slow")
        await layer.group_add("room", "fast")
        for n in range(5):
            await layer.group_send("room", {"n": n})  # never raises
            await layer.receive("fast")
        return await layer.receive("slow")

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        first = run(scenario())
    assert first == {"n": 0}
    assert layer.dropped == 4 and layer.stats()["dropped"] == 4
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: one report a second, not one per drop
    assert "Group 'room': 1 message(s) dropped" in warnings[0].getMessage()


def test_layer_group_expiry_removes_stale_members():
    layer = InMemoryChannelLayer(group_expiry=0.05)

    async def scenario():
        await layer.group_add("room", "old")
        await asyncio.sleep(0.1)
        await layer.group_add("room", "new")
        await layer.group_send("room", {"n": 1})
        return layer.stats(), await layer.receive("new")

    stats, message = run(scenario())
    assert stats["members"] == 1 and stats["messages"] == 1
    assert message == {"n": 1}


def test_layer_flush_drops_everything():
    layer = InMemoryChannelLayer()

    async def scenario():
        await layer.send("a", {})
        await layer.group_add("g", "a")
        await layer.flush()
        await layer.close()
        return layer.stats()

    assert run(scenario()) == {"channels": 0, "groups": 0, "members": 0, "messages": 0, "dropped": 0}
    assert layer.extensions == ["groups", "flush"]


def test_layer_discard_channel_leaves_every_group_and_frees_the_queue():
    layer = InMemoryChannelLayer()

    async def scenario():
        await layer.group_add("g1", "sock!1")
        await layer.group_add("g2", "sock!1")
        await layer.group_add("g2", "sock!2")
        await layer.send("sock!1", {"pending": True})
        layer.discard_channel("sock!1")
        return layer.stats()

    assert run(scenario()) == {"channels": 0, "groups": 1, "members": 1, "messages": 0, "dropped": 0}


def test_layer_isolates_receivers_at_the_top_level():
    layer = InMemoryChannelLayer()
    original = {"text": "hi", "meta": "sender's"}

    async def scenario():
        await layer.group_add("g", "a")
        await layer.group_add("g", "b")
        await layer.group_send("g", original)
        first = await layer.receive("a")
        first["text"] = "changed by a"
        first["extra"] = 1
        return await layer.receive("b")

    assert run(scenario()) == {"text": "hi", "meta": "sender's"}
    assert original == {"text": "hi", "meta": "sender's"}


def test_layer_send_from_a_plain_thread_wakes_a_receiver_on_the_loop():
    layer = InMemoryChannelLayer()

    async def scenario():
        waiting = asyncio.ensure_future(layer.receive("cross"))
        await asyncio.sleep(0.02)
        thread = threading.Thread(target=Channel("cross", channel_layer=layer).send, args=({"from": "thread"},))
        thread.start()
        message = await asyncio.wait_for(waiting, 2)
        thread.join(2)
        return message

    assert run(scenario()) == {"from": "thread"}


def test_layer_send_from_another_threads_event_loop_wakes_a_receiver():
    layer = InMemoryChannelLayer()
    errors = []

    def other_thread():
        try:
            asyncio.run(layer.send("cross", {"from": "other loop"}))
            asyncio.run(layer.group_send("g", {"from": "other loop, group"}))
        except Exception as error:  # collected: the assertion below reports it
            errors.append(error)

    async def scenario():
        await layer.group_add("g", "cross")
        waiting = asyncio.ensure_future(layer.receive("cross"))
        await asyncio.sleep(0.02)
        thread = threading.Thread(target=other_thread)
        thread.start()
        first = await asyncio.wait_for(waiting, 2)
        second = await asyncio.wait_for(layer.receive("cross"), 2)
        thread.join(2)
        return [first, second]

    assert run(scenario()) == [{"from": "other loop"}, {"from": "other loop, group"}]
    assert errors == []


def test_layer_serves_receivers_on_two_loops_without_loop_errors():
    layer = InMemoryChannelLayer()
    results = {}

    def receive_in_thread():
        results["thread"] = asyncio.run(asyncio.wait_for(layer.receive("t"), 5))

    async def scenario():
        thread = threading.Thread(target=receive_in_thread)
        thread.start()
        waiting = asyncio.ensure_future(layer.receive("m"))
        await asyncio.sleep(0.05)
        await layer.send("t", {"to": "thread"})
        await layer.send("m", {"to": "main"})
        results["main"] = await asyncio.wait_for(waiting, 2)
        await asyncio.to_thread(thread.join, 5)

    run(scenario())
    assert results == {"thread": {"to": "thread"}, "main": {"to": "main"}}


def test_layer_cancelled_receiver_loses_no_message():
    layer = InMemoryChannelLayer()

    async def scenario():
        first = asyncio.ensure_future(layer.receive("c"))
        second = asyncio.ensure_future(layer.receive("c"))
        await asyncio.sleep(0.01)
        await layer.send("c", {"n": 1})
        first.cancel()  # woken, but cancelled before it could take the message
        await asyncio.sleep(0)
        return await asyncio.wait_for(second, 1), layer.stats()["channels"]

    message, channels_left = run(scenario())
    assert message == {"n": 1}
    assert channels_left == 0


def test_layer_many_threads_sending_lose_nothing():
    layer = InMemoryChannelLayer(capacity=10_000)

    def sender(base):
        for n in range(200):
            Channel("many", channel_layer=layer).send({"n": base + n})

    async def scenario():
        threads = [threading.Thread(target=sender, args=(k * 1000,)) for k in range(8)]
        for thread in threads:
            thread.start()
        got = [(await asyncio.wait_for(layer.receive("many"), 5))["n"] for _ in range(1600)]
        for thread in threads:
            thread.join(5)
        return got

    got = run(scenario())
    assert sorted(got) == sorted(k * 1000 + n for k in range(8) for n in range(200))
    for k in range(8):  # each sender's messages stay in its order
        mine = [n for n in got if k * 1000 <= n < k * 1000 + 200]
        assert mine == sorted(mine)


def test_layer_group_send_to_many_waiting_receivers():
    layer = InMemoryChannelLayer()

    async def scenario():
        names = [f"r{n}" for n in range(1000)]
        for name in names:
            await layer.group_add("all", name)
        waiting = [asyncio.ensure_future(layer.receive(name)) for name in names]
        await asyncio.sleep(0.01)
        await layer.group_send("all", {"n": 1})
        return await asyncio.wait_for(asyncio.gather(*waiting), 5)

    assert run(scenario()) == [{"n": 1}] * 1000


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


def test_messages_group_add_send_discard_sync_and_async_forms():
    layer = InMemoryChannelLayer()

    async def scenario():
        group = Group("room", channel_layer=layer)
        group.add(Channel("a", channel_layer=layer))
        await group.aadd("b")
        group.send({"n": 1})
        await group.asend({"n": 2})
        group.discard("a")
        await group.adiscard("b")
        got = [await layer.receive(name) for name in ("a", "a", "b", "b")]
        return got, layer.stats()

    got, stats = run(scenario())
    assert got == [{"n": 1}, {"n": 2}, {"n": 1}, {"n": 2}]
    assert stats["groups"] == 0


def test_messages_deferred_inside_consumer_context_in_call_order():
    layer = InMemoryChannelLayer()

    async def scenario():
        async with consumer_context(layer):
            Group("room").add("a")
            Channel("a").send({"n": 1})
            Group("room").send({"n": 2})
            Group("room").discard("a")
            Group("room").send({"n": 3})  # after the discard: reaches nobody
            queued_inside = layer.stats()["messages"]
        return queued_inside, [await layer.receive("a") for _ in range(2)], layer.stats()

    queued_inside, got, stats = run(scenario())
    assert queued_inside == 0
    assert got == [{"n": 1}, {"n": 2}]
    assert stats["messages"] == 0 and stats["groups"] == 0


def test_messages_deferred_sends_are_applied_when_the_block_raises():
    layer = InMemoryChannelLayer()

    async def scenario():
        with pytest.raises(RuntimeError, match="boom"):
            async with consumer_context(layer):
                Channel("a").send({"sent": "anyway"})
                raise RuntimeError("boom")
        return await layer.receive("a")

    assert run(scenario()) == {"sent": "anyway"}


def test_messages_immediately_and_awaited_forms_act_at_once_inside_a_consumer():
    layer = InMemoryChannelLayer()

    async def scenario():
        async with consumer_context(layer):
            Channel("a").send({"n": 1}, immediately=True)
            await Channel("a").asend({"n": 2})
            await Group("g").aadd("a")
            Group("g").send({"n": 3}, immediately=True)
            inside = layer.stats()["messages"]
        return inside

    assert run(scenario()) == 3


def test_messages_deferral_reaches_sync_code_run_in_threads():
    layer = InMemoryChannelLayer()
    from asgiref.sync import sync_to_async

    def sync_handler():
        Channel("a").send({"from": "thread"})
        return layer.stats()["messages"]

    async def scenario():
        async with consumer_context(layer):
            inside = await sync_to_async(sync_handler, thread_sensitive=False)()
        return inside, await layer.receive("a")

    assert run(scenario()) == (0, {"from": "thread"})


def test_messages_inside_a_consumer_default_names_use_the_consumer_layer():
    layer = InMemoryChannelLayer()

    async def scenario():
        async with consumer_context(layer):
            assert Channel("a").channel_layer is layer
            assert Group("g").channel_layer is layer
        return Channel("a").channel_layer

    assert run(scenario()) is get_channel_layer()


def test_messages_deferred_send_to_a_full_channel_waits_then_fails():
    layer = InMemoryChannelLayer(capacity=1)

    async def drain_later():
        await asyncio.sleep(0.2)
        return await layer.receive("full")

    async def room_appears():
        await layer.send("full", {"n": 0})
        draining = asyncio.ensure_future(drain_later())
        started = time.monotonic()
        async with consumer_context(layer):
            Channel("full").send({"n": 1})
        return time.monotonic() - started, await draining, await layer.receive("full")

    waited, first, second = run(room_appears())
    assert 0.1 < waited < 2 and first == {"n": 0} and second == {"n": 1}

    async def never_room():
        await layer.send("stuck", {"n": 0})
        started = time.monotonic()
        with pytest.raises(ChannelFull):
            async with consumer_context(layer):
                Channel("stuck").send({"n": 1})
        return time.monotonic() - started

    assert 1.9 < run(never_room()) < 4


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
def test_consumers_function_consumers_sync_and_async(consumer):
    flavour = "async" if consumer is app_async_function else "sync"
    app, layer = app_setup([route(["websocket.connect", "websocket.receive", "websocket.disconnect"],
                                  consumer, path=r"^/fn/(?P<name>\w+)/$")])

    async def scenario():
        communicator = WebsocketCommunicator(app, "/fn/ada/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(text_data="hello")
        reply = json.loads(await communicator.receive_from(timeout=5))
        await communicator.disconnect(code=4004)
        return reply, await app_observed(layer)

    reply, disconnected = run(scenario())
    on_loop = flavour == "async"  # sync consumers run in worker threads, never on the loop
    assert reply == {"flavour": flavour, "text": "hello", "kwargs": {"name": "ada"},
                     "main_thread": on_loop, "on_loop": on_loop}
    assert disconnected == {"flavour": flavour, "code": 4004, "kwargs": {"name": "ada"},
                            "main_thread": on_loop, "on_loop": on_loop}


def test_consumers_method_mapping_dispatches_to_sync_and_async_methods():
    assert AppMapped.channel_names() == {"websocket.connect", "websocket.receive"}
    app, _ = app_setup([AppMapped.as_route(path=r"^/mapped/(?P<slot>\d+)/$")])

    async def scenario():
        communicator = WebsocketCommunicator(app, "/mapped/7/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(text_data="frame")
        reply = json.loads(await communicator.receive_from(timeout=5))
        await communicator.disconnect()
        return reply

    assert run(scenario()) == {"class": "AppMapped", "kwargs": {"slot": "7"}, "text": "frame"}


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


def test_consumers_default_connect_accepts_and_class_groups_are_joined():
    app, layer = app_setup([AppPlain.as_route(path=r"^/plain/$")])

    async def scenario():
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
        return received

    assert run(scenario()) == ["news", "news"]
    assert layer.stats()["members"] == 0 and layer.stats()["groups"] == 0


def test_consumers_groups_joined_before_connect_and_left_before_disconnect():
    app, layer = app_setup([AppGroupProbe.as_route(path=r"^/probe/$")])

    async def scenario():
        communicator = WebsocketCommunicator(app, "/probe/")
        assert await communicator.connect(timeout=5) == (True, None)
        connected = await app_observed(layer)
        await communicator.disconnect()
        return connected, await app_observed(layer)

    connected, disconnected = run(scenario())
    assert (connected["event"], connected["stats"]["groups"], connected["stats"]["members"]) == (
        "connect", 1, 1)
    assert (disconnected["event"], disconnected["stats"]["groups"],
            disconnected["stats"]["members"]) == ("disconnect", 0, 0)


@pytest.mark.parametrize("consumer, async_handlers", [
    (AppRoomSync, set()),
    (AppRoomAsync, {"connect", "receive", "disconnect"}),
    (AppRoomMixed, {"connect", "disconnect"}),
], ids=["sync", "async", "mixed"])
def test_consumers_websocket_consumer_handlers_sync_or_async(consumer, async_handlers):
    app, layer = app_setup([consumer.as_route(path=r"^/room/(?P<room>\w+)/$")])

    def placed(handler):  # async def handlers run on the loop, sync ones in a worker thread
        on_loop = handler in async_handlers
        return {"main_thread": on_loop, "on_loop": on_loop}

    async def scenario():
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
        return [await app_observed(layer) for _ in range(2)]

    last = run(scenario())
    assert [(r["room"], r["code"], r["members"]) for r in last] == [("blue", 1000, 1), ("red", 1000, 0)]
    assert layer.stats() == {"channels": 0, "groups": 0, "members": 0, "messages": 0, "dropped": 0}


def test_consumers_send_close_and_close_codes():
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

    async def scenario():
        results = {c: await one(c) for c in ("close", "close 4001", "bye 4002", "bye")}
        communicator = WebsocketCommunicator(app, "/closer/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(text_data="binary")
        results["binary"] = await communicator.receive_from(timeout=5)
        assert await communicator.receive_nothing(timeout=0.2)
        await communicator.disconnect()
        return results

    assert run(scenario()) == {
        "close": ([], 1000), "close 4001": ([], 4001), "bye 4002": (["bye"], 4002),
        "bye": (["bye"], 1000), "binary": b"\x00\x01\xff",
    }


@pytest.mark.parametrize("consumer", [AppSlowSync, AppSlowAsync], ids=["sync", "async"])
def test_consumers_one_socket_in_order_and_a_slow_handler_delays_only_its_socket(consumer):
    app, _ = app_setup([consumer.as_route(path=r"^/slow/$")])
    frames = ["slow"] + [str(n) for n in range(20)]

    async def scenario():
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
        return received

    assert run(scenario()) == frames


def test_consumers_sends_are_deferred_until_the_handler_returns():
    app, _ = app_setup([AppDeferring.as_route(path=r"^/defer/$")])

    async def scenario():
        communicator = WebsocketCommunicator(app, "/defer/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(text_data="deferred")
        assert await communicator.receive_nothing(timeout=0.4)  # the handler sleeps 1 s
        deferred = [await communicator.receive_from(timeout=5) for _ in range(2)]
        await communicator.send_to(text_data="immediately")
        now = await communicator.receive_from(timeout=1.5)  # the handler sleeps 2 s
        later = await communicator.receive_from(timeout=5)
        await communicator.disconnect()
        return deferred, now, later

    assert run(scenario()) == (["sent before the pause", "sent after the pause"], "now", "later")


@pytest.mark.parametrize("consumer", [AppFailingSync, AppFailingAsync], ids=["sync", "async"])
def test_consumers_exception_logged_with_traceback_closes_1011_deferred_sends_still_go(consumer, caplog):
    app, _ = app_setup([consumer.as_route(path=r"^/fail/$"), AppWatcher.as_route(path=r"^/watch/$")])

    async def failing_socket(command):
        failing = WebsocketCommunicator(app, "/fail/")
        assert await failing.connect(timeout=5) == (True, None)
        await failing.send_to(text_data=command)
        events = [await failing.receive_output(timeout=5) for _ in range(2)]
        await failing.disconnect()
        return events

    async def scenario():
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
        return loud, quiet

    with caplog.at_level(logging.ERROR, logger="channels_mini"):
        loud, quiet = run(scenario())
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
def test_consumers_deny_connection_rejects(consumer, caplog):
    app, layer = app_setup([consumer.as_route(path=r"^/deny/$")])

    async def scenario():
        communicator = WebsocketCommunicator(app, "/deny/")
        connected, _ = await communicator.connect(timeout=5)
        await communicator.disconnect()
        return connected, await app_observed(layer)

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        assert run(scenario()) == (False, {"event": "connect"})
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_consumers_json_consumer_echo_group_send_and_close():
    app, _ = app_setup([AppJson.as_route(path=r"^/json/$")])

    async def scenario():
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

    run(scenario())


@pytest.mark.parametrize("frame, code, logged", [
    ({"bytes_data": b"\x01\x02"}, 1003, "binary frame"),
    ({"text_data": "{not json"}, 1007, "invalid JSON"),
], ids=["binary-1003", "invalid-json-1007"])
def test_consumers_json_consumer_rejects_binary_and_invalid_json(frame, code, logged, caplog):
    app, _ = app_setup([AppJson.as_route(path=r"^/json/$")])

    async def scenario():
        communicator = WebsocketCommunicator(app, "/json/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(**frame)
        closed = await app_close_code(communicator)
        await communicator.disconnect()
        return closed

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        assert run(scenario()) == code
    warnings = [r for r in caplog.records if r.name == "channels_mini" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert logged in warnings[0].getMessage() and str(code) in warnings[0].getMessage()


def test_consumers_demultiplexer_streams_connect_disconnect_and_multiplexer():
    ensure_database()  # the demultiplexer loads message.user (http_user = True)
    app, layer = app_setup([AppDemux.as_route(path=r"^/demux/$")])

    async def scenario():
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
        return connected, echo, function, group, disconnected

    connected, echo, function, group, disconnected = run(scenario())
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


def test_consumers_demultiplexer_answers_bad_frames_with_error_and_stays_open(caplog):
    ensure_database()
    app, layer = app_setup([AppDemux.as_route(path=r"^/demux/$")])
    bad_frames = [
        {"text_data": "not json"},
        {"text_data": json.dumps({"stream": "echo"})},
        {"text_data": json.dumps({"payload": {}})},
        {"text_data": json.dumps({"stream": "echo", "payload": [1, 2]})},
        {"text_data": json.dumps({"stream": "nope", "payload": {}})},
        {"bytes_data": b"\x00"},
    ]

    async def scenario():
        communicator = WebsocketCommunicator(app, "/demux/")
        assert await communicator.connect(timeout=5) == (True, None)
        answers = []
        for frame in bad_frames:
            await communicator.send_to(**frame)
            answers.append(await communicator.receive_json_from(timeout=5))
        await communicator.send_json_to({"stream": "echo", "payload": {"still": "open"}})
        last = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return answers, last

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        answers, last = run(scenario())
    assert all(list(answer) == ["error"] and isinstance(answer["error"], str) for answer in answers)
    assert "'nope'" in answers[4]["error"] and "['echo', 'func']" in answers[4]["error"]
    assert last == {"stream": "echo", "payload": {"echo": {"still": "open"}, "stream": "echo"}}


def test_consumers_channel_session_per_socket_and_scope():
    app, layer = app_setup([AppSessionCounter.as_route(path=r"^/count/$")])

    async def scenario():
        first = WebsocketCommunicator(app, "/count/?who=first")
        second = WebsocketCommunicator(app, "/count/")
        assert await first.connect(timeout=5) == (True, None)
        assert await second.connect(timeout=5) == (True, None)
        replies = []
        for communicator in (first, first, second, first):
            await communicator.send_to(text_data="tick")
            replies.append(json.loads(await communicator.receive_from(timeout=5)))
        await first.disconnect()
        return replies, await app_observed(layer), second

    replies, disconnected, second = run(scenario())
    assert replies == [
        {"count": 1, "type": "websocket", "path": "/count/", "query": "who=first"},
        {"count": 2, "type": "websocket", "path": "/count/", "query": "who=first"},
        {"count": 1, "type": "websocket", "path": "/count/", "query": ""},
        {"count": 3, "type": "websocket", "path": "/count/", "query": "who=first"},
    ]
    assert disconnected == {"event": "disconnect", "count": 3}


def test_consumers_http_user_anonymous_without_cookie():
    ensure_database()
    app, layer = app_setup([AppWhoAmI.as_route(path=r"^/me/$")])

    async def scenario():
        communicator = WebsocketCommunicator(app, "/me/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(text_data="who")
        reply = json.loads(await communicator.receive_from(timeout=5))
        await communicator.disconnect()
        return await app_observed(layer), reply

    anonymous = {"class": "AnonymousUser", "authenticated": False, "username": "", "pk": None,
                 "session_key": None, "color": None}
    assert run(scenario()) == ({"event": "connect", **anonymous}, anonymous)


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


class bind_DenyingItemBinding(WebsocketBinding):
    model = Item
    stream = "deny"
    fields = ["name"]  # has_permission left as it is: denies every write


class bind_Demultiplexer(WebsocketDemultiplexer):
    consumers = {"items": bind_ItemBinding.consumer, "deny": bind_DenyingItemBinding.consumer}
    groups = ["bind-items-all"]  # so every socket also hears the outbound frames


bind_server_app = Application([bind_Demultiplexer.as_route(path=r"^/bind/ws/$")])


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


# === 6. ASGI app ===
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


def test_app_websocket_message_keys_and_order():
    app, layer = app_setup([route(["websocket.connect", "websocket.receive", "websocket.disconnect"],
                                  app_record_message, path=r"^/keys/(?P<tag>\w+)/$")])

    async def scenario():
        communicator = WebsocketCommunicator(app, "/keys/t1/?a=1&b=2", headers=[("X-Test", "yes")],
                                             subprotocols=["p1", "p2"])
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(text_data="one")
        await communicator.send_to(bytes_data=b"two")
        reports = [await app_observed(layer) for _ in range(3)]
        await communicator.disconnect(code=4005)
        reports.append(await app_observed(layer))
        return reports, communicator.scope

    (connect, first, second, disconnect), scope = run(scenario())
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
def test_app_reply_channel_messages(reply, connected, frames, close_code):
    app, _ = app_setup([route("websocket.connect", app_connect_reply, path=r"^/reply/(?P<reply>\w+)/$")])

    async def scenario():
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
        return result, received, code

    result, received, code = run(scenario())
    if connected is False:
        assert result[0] is False  # rejected before accepting: HTTP 403 on a real server
    else:
        assert result == connected
    assert (received, code) == (frames, close_code)


def test_app_unrouted_connect_accepted_only_if_a_receive_route_matches(caplog):
    app, _ = app_setup([route("websocket.receive", app_frame_echo, path=r"^/frames/$")])

    async def scenario():
        routed = WebsocketCommunicator(app, "/frames/")
        assert await routed.connect(timeout=5) == (True, None)
        await routed.send_to(text_data="x")
        assert await routed.receive_from(timeout=5) == "echo x"
        await routed.disconnect()
        unrouted = WebsocketCommunicator(app, "/elsewhere/")
        connected, _ = await unrouted.connect(timeout=5)
        await unrouted.disconnect()
        return connected

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        assert run(scenario()) is False
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
def test_app_origin_checks_before_any_consumer_runs(allowed_origins, origin, accepted, caplog):
    app, layer = app_setup([route("websocket.connect", app_report_connect, path=r"^/o/$")],
                           allowed_origins=allowed_origins)
    headers = [] if origin is None else [("origin", origin)]

    async def scenario():
        communicator = WebsocketCommunicator(app, "/o/", headers=headers)
        connected, _ = await communicator.connect(timeout=5)
        await communicator.disconnect()
        if accepted:
            return connected, await app_observed(layer)
        return connected, await app_nothing_observed(layer)

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        connected, observed = run(scenario())
    warnings = [r for r in caplog.records if r.name == "channels_mini" and r.levelno == logging.WARNING]
    if accepted:
        assert connected is True
        assert observed == {"event": "connect", "origin": None if origin is None else origin.encode()}
        assert warnings == []
    else:
        assert connected is False and observed is True  # the consumer never ran
        assert len(warnings) == 1 and repr(origin) in warnings[0].getMessage()


def test_app_max_message_size_closes_with_1009(caplog):
    app, _ = app_setup([AppEcho.as_route(path=r"^/echo/$")], max_message_size=64)

    async def one(frame):
        communicator = WebsocketCommunicator(app, "/echo/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(**frame)
        event = await communicator.receive_output(timeout=5)
        await communicator.disconnect()
        return event

    async def scenario():
        return [await one({"text_data": "a" * 64}), await one({"text_data": "a" * 65}),
                await one({"bytes_data": b"b" * 64}), await one({"bytes_data": b"b" * 65}),
                await one({"text_data": "é" * 33})]  # 33 characters, 66 bytes of UTF-8

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        events = run(scenario())
    close = {"type": "websocket.close", "code": 1009}
    assert events == [{"type": "websocket.send", "text": "a" * 64}, close,
                      {"type": "websocket.send", "bytes": b"b" * 64}, close, close]
    assert sum("1009" in r.getMessage() for r in caplog.records if r.name == "channels_mini") == 3


def test_app_background_channel_from_a_plain_thread_reaches_its_consumer_with_kwargs(caplog):
    app, _ = app_setup(server_routing)

    async def scenario():
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
        return delivered, nothing, replied

    with caplog.at_level(logging.WARNING, logger="channels_mini"):
        delivered, nothing, replied = run(scenario())
    assert delivered == f"mail for ann: hi ({APP_IN_THREAD})"
    assert nothing is True
    assert replied == f"mail for cy: from a socket ({APP_IN_THREAD})"
    dropped = [r.getMessage() for r in caplog.records if r.name == "channels_mini"]
    assert len(dropped) == 1 and "'email.receive'" in dropped[0] and "No route matched" in dropped[0]


def test_app_module_level_application_reads_channel_routing_setting():
    import channels_mini as module

    assert settings.CHANNEL_ROUTING == f"{__name__}.server_routing"

    async def scenario():
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
        return echoed, heard

    assert run(scenario()) == ("via settings", ["room message", "room message"])


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


def test_app_no_leaks_after_1000_connect_disconnect_cycles():
    layer = InMemoryChannelLayer()
    app = Application([AppLeakProbe.as_route(path=r"^/leak/(?P<n>\d+)/$"),
                       route("websocket.connect", app_leak_manual_join, path=r"^/manual/$")],
                      channel_layer=layer)

    async def scenario():
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
        return layer.stats()

    started = time.monotonic()
    stats = run(scenario(), timeout=120)
    assert stats == {"channels": 0, "groups": 0, "members": 0, "messages": 0, "dropped": 0}
    assert time.monotonic() - started < 120


# -- real servers: the same module served by uvicorn, daphne and hypercorn --

@pytest.fixture(scope="module", params=["uvicorn", "daphne", "hypercorn"])
def app_live_server(request):
    with running_server(request.param) as server:
        yield server


async def app_recv(connection, timeout: float = 10):
    return await asyncio.wait_for(connection.recv(), timeout)


def test_app_server_echo(app_live_server):
    async def scenario():
        async with ws_connect(app_live_server.url("/echo/")) as connection:
            await connection.send("ping")
            text = await app_recv(connection)
            await connection.send(b"\x00\xffbinary")
            return text, await app_recv(connection)

    assert run(scenario()) == ("ping", b"\x00\xffbinary")


def test_app_server_group_broadcast_reaches_the_other_client(app_live_server):
    room = f"r{uuid.uuid4().hex[:8]}"

    async def scenario():
        async with ws_connect(app_live_server.url(f"/chat/{room}/")) as alice, \
                ws_connect(app_live_server.url(f"/chat/{room}/")) as bob, \
                ws_connect(app_live_server.url("/chat/elsewhere/")) as carol:
            await alice.send("hello room")
            heard = [await app_recv(bob), await app_recv(alice)]
            with pytest.raises(asyncio.TimeoutError):
                await app_recv(carol, timeout=0.5)
            return heard

    assert run(scenario()) == ["hello room", "hello room"]


def test_app_server_close_code_reaches_the_client(app_live_server):
    from websockets.exceptions import ConnectionClosed

    async def scenario():
        async with ws_connect(app_live_server.url("/close/")) as connection:
            await connection.send("please close")
            text = await app_recv(connection)
            with pytest.raises(ConnectionClosed) as closed:
                await app_recv(connection)
            return text, closed.value.rcvd.code

    assert run(scenario()) == ("bye", 4242)


def test_app_server_rejects_cross_origin_handshake_with_403(app_live_server):
    from websockets.exceptions import InvalidStatus

    async def scenario():
        with pytest.raises(InvalidStatus) as rejected:
            async with ws_connect(app_live_server.url("/echo/"), origin="http://evil.example"):
                pass
        own_origin = f"http://127.0.0.1:{app_live_server.port}"
        async with ws_connect(app_live_server.url("/echo/"), origin=own_origin) as connection:
            await connection.send("same origin")
            return rejected.value.response.status_code, await app_recv(connection)

    assert run(scenario()) == (403, "same origin")


def test_app_server_serves_django_http_through_the_same_app(app_live_server):
    assert http_get(app_live_server.url("/page/", scheme="http")) == (200, "django page ok")
    status, _ = http_get(app_live_server.url("/no-such-page/", scheme="http"))
    assert status == 404


def test_app_server_background_channel_replies_to_the_socket(app_live_server):
    async def scenario():
        async with ws_connect(app_live_server.url("/mail/")) as connection:
            await connection.send("dee@example.com")
            return await app_recv(connection)

    assert run(scenario()) == f"mail for dee: from a socket ({APP_IN_THREAD})"


def test_app_uvicorn_lifespan_on_starts_and_stops_cleanly():
    with running_server("uvicorn", extra_args=["--lifespan", "on", "--log-level", "info"]) as server:
        async def scenario():
            async with ws_connect(server.url("/mail/")) as connection:
                await connection.send("eve@example.com")
                return await app_recv(connection)

        assert run(scenario()) == f"mail for eve: from a socket ({APP_IN_THREAD})"
    assert server.process.returncode == 0
    log = server.log()
    assert "Application startup complete." in log and "Application shutdown complete." in log
    assert "Traceback" not in log and "ERROR" not in log


# === 7. Test helpers ===

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


def test_helpers_communicator_round_trip():
    app, _ = app_setup([route(["websocket.connect", "websocket.receive"], app_query_echo,
                              path=r"^/helper/")])

    async def scenario():
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

    run(scenario())


def test_helpers_connect_reports_rejection_with_close_code():
    app, _ = app_setup([AppDenySync.as_route(path=r"^/deny/$")], allowed_origins=["good.example"])

    async def scenario():
        denied = WebsocketCommunicator(app, "/deny/")
        foreign = WebsocketCommunicator(app, "/deny/", headers=[("origin", "http://bad.example")])
        results = [await denied.connect(timeout=5), await foreign.connect(timeout=5)]
        await denied.disconnect()
        await foreign.disconnect()
        return results

    for connected, code in run(scenario()):
        assert connected is False and isinstance(code, int) and 1000 <= code < 5000


def test_helpers_receive_nothing_after_the_app_closed_the_socket():
    # As in Channels: nothing more arrives from an app that closed the socket and finished.
    app, _ = app_setup([AppCloser.as_route(path=r"^/closer/$")])

    async def scenario():
        communicator = WebsocketCommunicator(app, "/closer/")
        assert await communicator.connect(timeout=5) == (True, None)
        await communicator.send_to(text_data="close 4001")
        assert await app_close_code(communicator) == 4001
        nothing = await communicator.receive_nothing(timeout=0.2)
        await communicator.disconnect()
        return nothing

    assert run(scenario()) is True


# === Documentation ===
# The README's code is run, not just shown.

README = os.path.join(ROOT, "README.md")


def readme_python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as handle:
        return re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)


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


def test_readme_chat_tutorial_runs_under_uvicorn(tmp_path):
    files = {b.split("\n", 1)[0][2:].strip(): b for b in readme_python_blocks()
             if b.startswith("# mysite/")}
    assert set(files) == {"mysite/consumers.py", "mysite/routing.py", "mysite/asgi.py"}
    subprocess.run([sys.executable, "-m", "django", "startproject", "mysite"], cwd=tmp_path,
                   check=True, timeout=60)
    project = tmp_path / "mysite"
    for name, code in files.items():
        (project / name).write_text(code)

    async def chat(server):
        async with ws_connect(server.url("/chat/lobby/")) as alice, \
                ws_connect(server.url("/chat/lobby/")) as bob, \
                ws_connect(server.url("/chat/other/")) as carol:
            await alice.send("hello")
            heard = [await asyncio.wait_for(bob.recv(), 5), await asyncio.wait_for(alice.recv(), 5)]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(carol.recv(), 0.3)
            return heard

    with running_server(app="mysite.asgi:application", cwd=str(project)) as server:
        assert run(chat(server)) == ["hello", "hello"]
        # the rest of the site is Django's: the admin that startproject set up answers
        assert http_get(server.url("/admin/login/", scheme="http"))[0] == 200


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
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"

    async def scenario():
        communicator = WebsocketCommunicator(namespace["application"], "/items/ws/",
                                             headers=[(b"cookie", cookie.encode())])
        assert (await communicator.connect())[0]
        await communicator.send_json_to({"stream": "items", "payload": {
            "action": "create", "data": {"name": "from readme", "team": "green"}}})
        created = await communicator.receive_json_from(timeout=5)
        await communicator.send_json_to({"stream": "items", "payload": {
            "action": "rename", "pk": created["payload"]["pk"], "data": {}}})
        refused = await communicator.receive_json_from(timeout=5)
        await communicator.disconnect()
        return created, refused

    created, refused = run(scenario())
    assert created["stream"] == "items"
    assert created["payload"]["action"] == "create" and created["payload"]["data"]["name"] == "from readme"
    assert Item.objects.filter(pk=created["payload"]["pk"], name="from readme").exists()
    assert refused["payload"]["error"] == "Unknown action 'rename'; use one of ['create', 'update', 'delete']."
