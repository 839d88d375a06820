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
