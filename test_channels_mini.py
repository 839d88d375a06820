"""Tests for channels_mini, in the module's section order (grep -n '^# ===').

Everything goes through the public API. End-to-end tests start real servers
(uvicorn, daphne, hypercorn, redis-server) on 127.0.0.1 in subprocesses and talk to
them with the `websockets` client; the servers import this very file as their ASGI
module (`test_channels_mini:server_app`), so one file holds the whole test project:
Django settings, models, views and routing.
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
                        "django.contrib.sessions", "test_channels_mini"],
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
                    "django.contrib.auth.middleware.AuthenticationMiddleware"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": os.environ["CHANNELS_MINI_TEST_DB"],
                               "OPTIONS": {"timeout": 30}}},
        ROOT_URLCONF="test_channels_mini",
        USE_TZ=True,
        CHANNEL_ROUTING="test_channels_mini.server_routing",
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
        app_label = "test_channels_mini"

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
        from django.core.management import call_command
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
def running_server(kind: str = "uvicorn", app: str = "test_channels_mini:server_app",
                   env: dict | None = None, extra_args: list[str] | None = None):
    """Start a real ASGI server on a free 127.0.0.1 port; always stopped on exit."""
    ensure_database()
    port = free_port()
    log_file = tempfile.NamedTemporaryFile("wb", suffix=".log", delete=False)
    process = subprocess.Popen(server_command(kind, app, port) + list(extra_args or ()),
                               cwd=ROOT, env={**os.environ, **(env or {})},
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


# === 1. Channel layer ===
