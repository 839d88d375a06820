"""Channels 4 side: WebsocketConsumer / AsyncWebsocketConsumer behind URLRouter.

Everything is Channels' defaults: settings_ch4 configures its InMemoryChannelLayer without
options (capacity 100, expiry 60 s).
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.apps.settings_ch4")

import django  # noqa: E402

django.setup()

from asgiref.sync import async_to_sync  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer, WebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from bench.apps.common import BROADCAST_SENDS, not_found  # noqa: E402


class Echo(WebsocketConsumer):
    def receive(self, text_data=None, bytes_data=None):
        self.send(text_data=text_data)


class AsyncEcho(AsyncWebsocketConsumer):
    async def receive(self, text_data=None, bytes_data=None):
        await self.send(text_data=text_data)


class Broadcast(WebsocketConsumer):
    groups = ["all"]

    def receive(self, text_data=None, bytes_data=None):
        if text_data == "go":
            group_send = async_to_sync(self.channel_layer.group_send)
            for i in range(BROADCAST_SENDS):
                group_send("all", {"type": "bcast.message", "text": f"{i}"})

    def bcast_message(self, event):
        self.send(text_data=event["text"])


class AsyncBroadcast(AsyncWebsocketConsumer):
    groups = ["all_async"]

    async def receive(self, text_data=None, bytes_data=None):
        if text_data == "go":
            for i in range(BROADCAST_SENDS):
                await self.channel_layer.group_send(
                    "all_async", {"type": "bcast.message", "text": f"{i}"})

    async def bcast_message(self, event):
        await self.send(text_data=event["text"])


application = ProtocolTypeRouter({
    "http": not_found,
    "websocket": URLRouter([
        re_path(r"^sync/$", Echo.as_asgi()),
        re_path(r"^async/$", AsyncEcho.as_asgi()),
        re_path(r"^broadcast/$", Broadcast.as_asgi()),
        re_path(r"^broadcast-async/$", AsyncBroadcast.as_asgi()),
    ]),
})
