"""End-to-end test of the demo in a real browser.

It starts the demo under a real uvicorn process on a free 127.0.0.1 port, with
a fresh SQLite database, and drives Chromium through Playwright: two visitors
chat and see each other in the room's "Here now" list, share the live item
list, run a background job, and an edit in the admin reaches an open page.
The live list also runs on its server-sent events fallback (EventSource on
/live/events/, no WebSocket), fed by the same binding group. Pages connect
their sockets with the client the server itself serves, /channels_mini.js. A
chat page whose socket drops and stays offline for a few seconds catches up
on what the room said meanwhile; a server restart under an open page makes
it reconnect and say that it lost messages (the in-memory history is gone).
With a real redis-server as the demo's channel layer (DEMO_REDIS_URL), the
history outlives the restart: a page that comes back after it gets every
line said, before and after, and no such notice.

Run it from the repository root:

    python -m pytest example/test_browser.py

It needs uvicorn, channels_redis, Playwright for Python (the `test` extra), a Chromium
binary (/usr/bin/chromium, or set CHROMIUM_PATH) and redis-server (on the PATH, or set
REDIS_SERVER_PATH); `.ci/run` installs Debian's. Without them it fails and says what is
missing: a skipped browser test would read as a passing one.

The demo runs only in the subprocess: this file imports neither Django nor
channels_mini, so it never clashes with the settings of test_channels_mini.py.
"""
from __future__ import annotations

import contextlib
import http.client
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

if importlib.util.find_spec("playwright") is None or importlib.util.find_spec("uvicorn") is None:
    raise ImportError("The browser test needs Playwright and uvicorn: pip install -e '.[test]'.")
from playwright import sync_api  # noqa: E402

EXAMPLE_DIR = Path(__file__).resolve().parent
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
if not os.path.exists(CHROMIUM):
    raise FileNotFoundError(f"No Chromium at {CHROMIUM}: apt-get install -y chromium, "
                            f"or set CHROMIUM_PATH.")

expect = sync_api.expect
TIMEOUT_MS = 10_000
expect.set_options(timeout=TIMEOUT_MS)
REDIS_SERVER = os.environ.get("REDIS_SERVER_PATH") or shutil.which("redis-server")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# === the demo server ===


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_process(process: subprocess.Popen | None) -> None:
    """Terminate *process* and wait for it (10 s), then kill it if it is still there."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class DemoServer:
    """The demo under `python -m uvicorn`, with its own database and log file.

    *env* adds environment variables (DEMO_REDIS_URL); without it the demo
    runs on its in-memory layer, whatever the parent's environment says.
    stop() then start() restarts it on the same port, with the same database.
    """

    def __init__(self, tmp_path: Path, env: dict[str, str] | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "server.log"
        self.env = dict(
            os.environ,
            DEMO_DB_PATH=str(tmp_path / "db.sqlite3"),
            # Set, not defaulted: the parent's test run may have its own.
            DJANGO_SETTINGS_MODULE="demo.settings",
            DJANGO_SUPERUSER_PASSWORD="admin",
            PYTHONUNBUFFERED="1",
        )
        self.env.pop("DEMO_REDIS_URL", None)
        self.env.update(env or {})
        self.process: subprocess.Popen | None = None

    def manage(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "manage.py", *args], cwd=EXAMPLE_DIR, env=self.env,
            check=True, capture_output=True, timeout=120,
        )

    def start(self) -> None:
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "demo.asgi:application",
             "--app-dir", str(EXAMPLE_DIR), "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=EXAMPLE_DIR, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the demo server exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        raise RuntimeError(f"the demo server did not answer within 30 s:\n{self.log()}")

    def stop(self) -> None:
        _stop_process(self.process)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


@contextlib.contextmanager
def serving_demo(demo: DemoServer, request, superuser: bool = False):
    """Migrate *demo*'s database, start it, and always stop it; its log goes
    to stderr if a test failed meanwhile."""
    failed_before = request.session.testsfailed
    try:
        demo.manage("migrate", "--noinput")
        if superuser:
            demo.manage("createsuperuser", "--noinput", "--username", "admin",
                        "--email", "admin@example.com")
        demo.start()
        yield demo
    finally:
        demo.stop()
        if request.session.testsfailed > failed_before:
            # Past pytest's capture, so it shows next to the failure.
            sys.__stderr__.write(f"\n--- demo server log ---\n{demo.log()[-6000:]}\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    with serving_demo(DemoServer(tmp_path_factory.mktemp("demo")), request,
                      superuser=True) as demo:
        yield demo


@contextlib.contextmanager
def running_redis(workdir: Path):
    """A real redis-server on a free 127.0.0.1 port, keeping nothing on disk;
    yields its URL and always stops it."""
    if REDIS_SERVER is None or not os.path.exists(REDIS_SERVER):
        raise FileNotFoundError("No redis-server: apt-get install -y redis-server, "
                                "or set REDIS_SERVER_PATH.")
    port = _free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited early (code {process.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 20 s")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}"
    finally:
        _stop_process(process)


@pytest.fixture
def redis_demo(tmp_path, request):
    """The demo on its own database, with a fresh redis-server as its channel
    layer and presence cache (DEMO_REDIS_URL)."""
    with running_redis(tmp_path) as url:
        demo = DemoServer(tmp_path, env={"DEMO_REDIS_URL": url})
        with serving_demo(demo, request) as demo:
            yield demo


# === the browser ===


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=30_000,
        )
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def visitors_of(browser, demo: DemoServer):
    """Yield a function that opens a new browser context on *demo* and picks a
    chat name; every context closes on exit."""
    contexts = []

    def visitor(name: str):
        context = browser.new_context(base_url=demo.url)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.goto("/")
        page.fill("#name-input", name)
        page.click("#name-form button")
        expect(page.locator("#current-name")).to_contain_text(name)
        return page

    try:
        yield visitor
    finally:
        for context in contexts:
            context.close()


@pytest.fixture
def visitors(browser, server):
    with visitors_of(browser, server) as visitor:
        yield visitor


def open_online(page, path: str) -> None:
    page.goto(path)
    expect(page.locator("#status")).to_have_attribute("data-state", "online")


def here_now(page):
    """The names in a chat room's "Here now" list, in the page's (alphabetical) order."""
    return page.locator("#here-now li")


def item_row(page, name: str):
    return page.locator(f'#items li[data-name="{name}"]')


# Runs before the page's scripts: records each WebSocket and EventSource the
# page constructs (a Proxy keeps their constants, WebSocket.OPEN and the rest).
RECORD_TRANSPORTS = """
window.__transports = [];
for (const name of ["WebSocket", "EventSource"]) {
  const Real = window[name];
  if (!Real) continue;
  window[name] = new Proxy(Real, {
    construct(target, args) {
      window.__transports.push(name + " " + new URL(args[0], location.href).pathname);
      return Reflect.construct(target, args);
    },
  });
}
"""


def transports(page) -> list[str]:
    return page.evaluate("window.__transports")


# === tests ===


def test_chat_message_reaches_the_other_tab(visitors):
    alice, bob = visitors("alice"), visitors("bob")
    open_online(alice, "/chat/lobby/")
    open_online(bob, "/chat/lobby/")
    # bob's join announcement reaching alice shows bob is in the room's group.
    expect(alice.locator("#messages li.event", has_text="bob joined")).to_be_visible()

    alice.fill("#chat-input", "hello from alice")
    alice.press("#chat-input", "Enter")
    expect(bob.locator("#messages li.chat", has_text="alice: hello from alice")).to_be_visible()
    expect(alice.locator("#messages li.chat", has_text="alice: hello from alice")).to_be_visible()

    bob.fill("#chat-input", "hi alice")
    bob.click("#chat-form button")
    expect(alice.locator("#messages li.chat", has_text="bob: hi alice")).to_be_visible()


def test_here_now_shows_a_second_tab_until_it_closes(visitors):
    alice, bob = visitors("alice"), visitors("bob")
    open_online(alice, "/chat/here-now/")
    expect(here_now(alice)).to_have_text(["alice"])  # the snapshot was empty; its own join

    open_online(bob, "/chat/here-now/")
    expect(here_now(alice)).to_have_text(["alice", "bob"])  # bob's join, live
    expect(here_now(bob)).to_have_text(["alice", "bob"])  # the snapshot, then its own join
    expect(alice.locator("#here-now-title")).to_have_text("Here now (2)")

    bob.close()  # the tab goes, and its socket with it
    expect(here_now(alice)).to_have_text(["alice"])
    expect(alice.locator("#here-now-title")).to_have_text("Here now (1)")
    # presence frames never show up as chat lines
    expect(alice.locator("#messages li", has_text="presence")).to_have_count(0)


def test_here_now_lists_each_tab_of_a_visitor(visitors):
    # Names picked on the index page are not accounts: every socket is an entry.
    alice = visitors("alice")
    open_online(alice, "/chat/two-tabs/")
    second = alice.context.new_page()
    open_online(second, "/chat/two-tabs/")
    expect(here_now(alice)).to_have_text(["alice", "alice"])
    second.close()
    expect(here_now(alice)).to_have_text(["alice"])


def test_a_room_link_without_a_name_asks_for_one_then_joins(browser, server):
    context = browser.new_context(base_url=server.url)
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        page.goto("/chat/lobby/")  # a shared link, before this visitor has a name
        expect(page.locator("#join-hint")).to_have_text("Pick a name to join #lobby.")
        expect(page.locator("#status")).to_have_count(0)  # no socket here, so no badge
        page.fill("#name-input", "dora")
        page.click("#name-form button")
        expect(page).to_have_url(f"{server.url}/chat/lobby/")
        expect(page.locator("#status")).to_have_attribute("data-state", "online")
    finally:
        context.close()


def test_chat_rooms_are_separate(visitors):
    alice, bob = visitors("alice"), visitors("bob")
    open_online(alice, "/chat/room-a/")
    open_online(bob, "/chat/room-b/")
    alice.fill("#chat-input", "only in room a")
    alice.press("#chat-input", "Enter")
    expect(alice.locator("#messages li.chat", has_text="only in room a")).to_be_visible()
    bob.fill("#chat-input", "only in room b")
    bob.press("#chat-input", "Enter")
    expect(bob.locator("#messages li.chat", has_text="only in room b")).to_be_visible()
    expect(bob.locator("#messages li.chat", has_text="only in room a")).to_have_count(0)


def test_background_job_result_reaches_the_room(visitors):
    alice, bob = visitors("alice"), visitors("bob")
    open_online(alice, "/chat/jobs/")
    open_online(bob, "/chat/jobs/")
    expect(alice.locator("#messages li.event", has_text="bob joined")).to_be_visible()

    alice.select_option("#job-kind", "reverse")
    alice.fill("#job-text", "stressed")
    started = time.monotonic()
    alice.click("#job-form button")
    expect(alice.locator("#messages li.event", has_text="job queued: reverse")).to_be_visible()
    result = "reverse(stressed) = desserts"
    expect(alice.locator("#messages li.job", has_text=result)).to_be_visible()
    expect(bob.locator("#messages li.job", has_text=result)).to_be_visible()
    # The job sleeps about a second before answering: it ran in the background.
    assert time.monotonic() - started >= 0.9


def test_live_list_follows_changes_from_another_tab(visitors):
    alice, bob = visitors("alice"), visitors("bob")
    open_online(alice, "/items/")
    open_online(bob, "/items/")

    # create, in alice's tab
    alice.fill("#new-item", "milk")
    alice.press("#new-item", "Enter")
    expect(item_row(bob, "milk")).to_have_count(1)
    expect(item_row(alice, "milk")).to_have_count(1)

    # update "done", in bob's tab
    item_row(bob, "milk").locator(".done").check()
    expect(item_row(alice, "milk").locator(".done")).to_be_checked()

    # update the name, in alice's tab (change fires when the field loses focus)
    name = item_row(alice, "milk").locator(".name")
    name.fill("oat milk")
    name.press("Tab")
    expect(item_row(bob, "oat milk")).to_have_count(1)
    expect(item_row(bob, "oat milk").locator(".done")).to_be_checked()

    # the initial list comes over HTTP: a new page shows what exists
    carol = visitors("carol")
    open_online(carol, "/items/")
    expect(item_row(carol, "oat milk").locator(".done")).to_be_checked()

    # delete, in bob's tab
    item_row(bob, "oat milk").locator(".delete").click()
    expect(item_row(alice, "oat milk")).to_have_count(0)
    expect(item_row(carol, "oat milk")).to_have_count(0)


def test_live_list_shows_refused_changes(visitors):
    alice = visitors("alice")
    open_online(alice, "/items/")
    # An update of a row that does not exist comes back as an error payload.
    alice.evaluate(
        'sendItems({action: "update", pk: 999999, data: {name: "ghost", done: false}})'
    )
    expect(alice.locator("#item-error")).to_contain_text("Server refused update")
    expect(item_row(alice, "ghost")).to_have_count(0)


def test_admin_edit_reaches_an_open_page(visitors):
    admin, bob = visitors("admin"), visitors("bob")
    open_online(bob, "/items/")

    admin.goto("/admin/login/?next=/admin/chat/item/add/")
    admin.fill("#id_username", "admin")
    admin.fill("#id_password", "admin")
    admin.click("input[type=submit]")
    admin.fill("#id_name", "from the admin")
    admin.click("input[name=_save]")
    expect(admin.locator(".messagelist")).to_contain_text("was added successfully")
    expect(item_row(bob, "from the admin")).to_have_count(1)


def test_live_list_over_server_sent_events(visitors):
    alice, bob = visitors("alice"), visitors("bob")
    bob.add_init_script(RECORD_TRANSPORTS)
    open_online(bob, "/items/?transport=sse")  # online: the stream said "ready"
    expect(bob.locator("#status")).to_have_text("live (events)")
    expect(bob.locator("#read-only")).to_be_visible()
    expect(bob.locator("#item-form")).to_be_hidden()
    open_online(alice, "/items/")
    expect(alice.locator("#status")).to_have_text("live (websocket)")
    expect(alice.locator("#read-only")).to_be_hidden()

    # create, update and delete over alice's socket; bob's stream follows
    alice.fill("#new-item", "eggs")
    alice.press("#new-item", "Enter")
    expect(item_row(bob, "eggs")).to_have_count(1)
    item_row(alice, "eggs").locator(".done").check()
    expect(item_row(bob, "eggs").locator(".done")).to_be_checked()
    expect(item_row(bob, "eggs").locator(".done")).to_be_disabled()  # read-only
    item_row(alice, "eggs").locator(".delete").click()
    expect(item_row(bob, "eggs")).to_have_count(0)

    # bob's page used EventSource only, once: no WebSocket was ever made
    assert transports(bob) == ["EventSource /live/events/"]


def test_live_list_without_websocket_support_uses_events(visitors):
    alice, bob = visitors("alice"), visitors("bob")
    bob.add_init_script("delete window.WebSocket;" + RECORD_TRANSPORTS)
    open_online(bob, "/items/")  # no ?transport: the missing WebSocket decides
    expect(bob.locator("#status")).to_have_text("live (events)")
    expect(bob.locator("#read-only")).to_be_visible()

    open_online(alice, "/items/")
    alice.fill("#new-item", "bread")
    alice.press("#new-item", "Enter")
    expect(item_row(bob, "bread")).to_have_count(1)
    assert transports(bob) == ["EventSource /live/events/"]


def test_event_stream_answers_as_server_sent_events(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", "/live/events/", headers={"Accept": "text/event-stream"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("content-type") == "text/event-stream"
        assert response.getheader("cache-control") == "no-cache"
        lines = []
        while "event: ready" not in lines:  # bounded by the 10 s socket timeout
            line = response.readline()
            assert line, f"the stream ended early: {lines}"
            lines.append(line.decode().rstrip("\r\n"))
        assert "retry: 2000" in lines, lines
    finally:
        connection.close()

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("POST", "/live/events/", body=b"")
        response = connection.getresponse()
        assert response.status == 405
        assert response.getheader("allow") == "GET"
        response.read()
    finally:
        connection.close()


def chat_lines(page):
    return page.locator("#messages li.chat")


def lost_notice(page):
    return page.locator("#messages li.lost")


def test_the_served_client_is_javascript(server):
    with urllib.request.urlopen(server.url + "/channels_mini.js", timeout=10) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/javascript")
        body = response.read().decode()
    assert "class Bridge" in body and "window.ChannelsMini" in body


@pytest.mark.parametrize(("path", "socket_path", "bridge"), [
    ("/chat/client/", "/chat/client/", "bridge"),
    ("/items/", "/live/", "socket"),
])
def test_pages_connect_with_the_served_client(visitors, server, path, socket_path, bridge):
    alice = visitors("alice")
    alice.add_init_script(RECORD_TRANSPORTS)
    scripts = []
    alice.on("response", lambda response: scripts.append((response.url, response.status))
             if response.request.resource_type == "script" else None)
    open_online(alice, path)
    assert scripts == [(server.url + "/channels_mini.js", 200)]
    assert alice.evaluate("typeof window.ChannelsMini.Bridge") == "function"
    # The page's one socket is the served client's bridge ...
    assert alice.evaluate(f"{bridge} instanceof ChannelsMini.Bridge")
    assert transports(alice) == ["WebSocket " + socket_path]
    # ... and the page's own scripts hold no WebSocket code (only the
    # EventSource fallback keeps its own reconnects).
    inline = "\n".join(alice.locator("script:not([src])").all_text_contents())
    assert "new WebSocket" not in inline and ".onclose" not in inline


def test_a_tab_offline_for_3_s_catches_up(visitors):
    alice, bob = visitors("alice"), visitors("bob")
    open_online(alice, "/chat/catch-up/")
    open_online(bob, "/chat/catch-up/")
    expect(alice.locator("#messages li.event", has_text="bob joined")).to_be_visible()

    # The server closes alice's socket ("/drop"), then her network goes, so
    # every reconnect fails until she is back. (Offline first would not do:
    # Chromium holds an open socket's frames while offline, "/drop" included.)
    # Her first retry comes 0.75 to 1.5 s after the close instead of 0.25 to
    # 0.5 s, so the network is surely gone by then; the next ones as usual.
    alice.evaluate("bridge.minDelay = 1500")
    alice.click("#drop-button")
    expect(alice.locator("#status")).not_to_have_attribute("data-state", "online")
    alice.context.set_offline(True)
    offline_since = time.monotonic()
    alice.evaluate("bridge.minDelay = 500")
    expect(bob.locator("#messages li.event", has_text="alice left")).to_be_visible()

    said = [f"bob: line {n} while alice is away" for n in range(1, 6)]
    for line in said:
        bob.fill("#chat-input", line.removeprefix("bob: "))
        bob.press("#chat-input", "Enter")
        expect(bob.locator("#messages li.chat", has_text=line)).to_be_visible()
    time.sleep(max(0.0, 3.0 - (time.monotonic() - offline_since)))
    # alice stayed away: no reconnect reached the server, no line reached her
    expect(bob.locator("#messages li.event", has_text="alice joined")).to_have_count(0)
    expect(chat_lines(alice)).to_have_count(0)
    assert alice.evaluate("bridge.status") != "online"

    alice.context.set_offline(False)
    expect(alice.locator("#status")).to_have_attribute("data-state", "online")
    # "resumed" comes after the replay: by then every missed line is in.
    expect(alice.locator("#messages li.resumed")).to_have_count(1)
    expect(chat_lines(alice)).to_have_text(said)  # every line, once each, in order
    expect(lost_notice(alice)).to_have_count(0)
    expect(bob.locator("#messages li.event", has_text="alice joined")).to_have_count(1)

    # and the room goes on as usual, both ways
    bob.fill("#chat-input", "welcome back")
    bob.press("#chat-input", "Enter")
    expect(chat_lines(alice)).to_have_text([*said, "bob: welcome back"])
    alice.fill("#chat-input", "thanks")
    alice.press("#chat-input", "Enter")
    expect(bob.locator("#messages li.chat", has_text="alice: thanks")).to_be_visible()
    expect(here_now(bob)).to_have_text(["alice", "bob"])
    expect(here_now(alice)).to_have_text(["alice", "bob"])


def test_page_reconnects_after_a_server_restart(visitors, server):
    alice, bob = visitors("alice"), visitors("bob")
    open_online(alice, "/chat/restart/")
    open_online(bob, "/chat/restart/")
    expect(alice.locator("#messages li.event", has_text="bob joined")).to_be_visible()
    expect(lost_notice(alice)).to_have_count(0)

    server.stop()
    expect(alice.locator("#status")).to_have_attribute("data-state", "offline")
    server.start()
    # The first retry comes after 0.5 to 0.75 s, then 1 s, 2 s, ...
    expect(alice.locator("#status")).to_have_attribute("data-state", "online")
    expect(bob.locator("#status")).to_have_attribute("data-state", "online")

    alice.fill("#chat-input", "still here")
    alice.press("#chat-input", "Enter")
    expect(bob.locator("#messages li.chat", has_text="alice: still here")).to_be_visible()
    # the new server's presence, rebuilt from the reconnected sockets
    expect(here_now(alice)).to_have_text(["alice", "bob"])
    # The restart took the in-memory history with it: both pages say they may
    # have missed messages, once, and neither claims to have caught up.
    for page in (alice, bob):
        expect(lost_notice(page)).to_have_count(1)
        expect(lost_notice(page)).to_have_text(
            "Some messages may have been missed while you were away "
            "(the server lost its history).")
        expect(page.locator("#messages li.resumed")).to_have_count(0)


def say(page, text: str) -> None:
    page.fill("#chat-input", text)
    page.press("#chat-input", "Enter")


def test_chat_survives_a_server_restart_with_redis(browser, redis_demo):
    with visitors_of(browser, redis_demo) as visitors_here:
        alice, bob = visitors_here("alice"), visitors_here("bob")
        open_online(alice, "/chat/redis-restart/")
        open_online(bob, "/chat/redis-restart/")
        expect(alice.locator("#messages li.event", has_text="bob joined")).to_be_visible()
        said = []
        for page, name, text in [(alice, "alice", "before the restart"),
                                 (bob, "bob", "me too")]:
            say(page, text)
            said.append(f"{name}: {text}")
            expect(chat_lines(alice)).to_have_text(said)
            expect(chat_lines(bob)).to_have_text(said)

        # alice's first retry comes 2 to 4 s after the restart closes her
        # socket: time enough to take her network away, so that she comes
        # back only once bob has spoken, however long the server takes to
        # start. bob retries every 0.25 to 0.5 s.
        alice.evaluate("bridge.minDelay = 4000")
        bob.evaluate("bridge.maxDelay = 500")
        redis_demo.stop()
        expect(alice.locator("#status")).to_have_attribute("data-state", "offline")
        alice.context.set_offline(True)
        alice.evaluate("bridge.minDelay = 500; bridge.maxDelay = 2000")
        expect(bob.locator("#status")).not_to_have_attribute("data-state", "online")
        redis_demo.start()  # the same port, the same Redis

        expect(bob.locator("#status")).to_have_attribute("data-state", "online",
                                                         timeout=20_000)
        after = [f"bob: line {n} after the restart" for n in range(1, 4)]
        for line in after:
            say(bob, line.removeprefix("bob: "))
            expect(bob.locator("#messages li.chat", has_text=line)).to_be_visible()
        expect(chat_lines(bob)).to_have_text([*said, *after])
        # alice is still away: nothing said after the restart reached her live
        expect(chat_lines(alice)).to_have_text(said)
        assert alice.evaluate("bridge.status") != "online"

        alice.context.set_offline(False)
        expect(alice.locator("#status")).to_have_attribute("data-state", "online",
                                                           timeout=20_000)
        # "resumed" comes after the replay: by then every missed line is in.
        expect(alice.locator("#messages li.resumed")).to_have_count(1)
        expect(chat_lines(alice)).to_have_text([*said, *after])  # once each, in order
        # The history was in Redis: neither page lost a line to the restart.
        for page in (alice, bob):
            expect(lost_notice(page)).to_have_count(0)
            expect(page.locator("#messages li.resumed")).to_have_count(1)

        # and the room goes on, both ways, with both in "Here now"
        say(alice, "back")
        expect(chat_lines(bob)).to_have_text([*said, *after, "alice: back"])
        expect(chat_lines(alice)).to_have_text([*said, *after, "alice: back"])
        expect(here_now(alice)).to_have_text(["alice", "bob"])
        expect(here_now(bob)).to_have_text(["alice", "bob"])

    log = redis_demo.log()
    assert "Traceback" not in log, log[-6000:]
    assert " ERROR " not in log and "ERROR:" not in log, log[-6000:]


def test_server_logged_no_errors(server):
    log = server.log()
    assert "Traceback" not in log, log[-6000:]
    assert " ERROR " not in log and "ERROR:" not in log, log[-6000:]
