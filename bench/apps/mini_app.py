"""channels_mini side: the same four consumers, written the Channels 1.x way.

settings_mini sets no CHANNEL_LAYERS, so the Application uses channels_mini's default
process-wide InMemoryChannelLayer (default capacity).
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.apps.settings_mini")

import django  # noqa: E402

django.setup()

from channels_mini import Application, WebsocketConsumer  # noqa: E402

from bench.apps.common import BROADCAST_SENDS, not_found  # noqa: E402


class Echo(WebsocketConsumer):
    def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=text)


class AsyncEcho(WebsocketConsumer):
    async def receive(self, text=None, bytes=None, **kwargs):
        self.send(text=text)


class Broadcast(WebsocketConsumer):
    groups = ["all"]

    def receive(self, text=None, bytes=None, **kwargs):
        if text == "go":
            for i in range(BROADCAST_SENDS):
                self.group_send("all", text=f"{i}")


class AsyncBroadcast(WebsocketConsumer):
    groups = ["all_async"]

    async def receive(self, text=None, bytes=None, **kwargs):
        if text == "go":
            for i in range(BROADCAST_SENDS):
                self.group_send("all_async", text=f"{i}")


application = Application(
    [
        Echo.as_route(path=r"^/sync/$"),
        AsyncEcho.as_route(path=r"^/async/$"),
        Broadcast.as_route(path=r"^/broadcast/$"),
        AsyncBroadcast.as_route(path=r"^/broadcast-async/$"),
    ],
    http=not_found,
)
