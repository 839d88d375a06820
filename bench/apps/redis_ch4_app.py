"""Channels 4 side of the redis burst rows: the same consumer on the same channels_redis layer.

``/burst/<name>/`` joins ``burst-<name>`` on connect (``group_add``) and leaves it on
disconnect. A frame holding a JSON list of group names makes its handler ``await
group_send(g, {"type": "burst.msg"})`` for each, then answer ``"sent"``; ``burst_msg``
sends the text ``"x"`` to its socket. settings_redis points CHANNEL_LAYERS at the bench's
redis-server, channels_redis's defaults otherwise.
"""

import json
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.apps.settings_redis")

import django  # noqa: E402

django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from bench.apps.common import not_found  # noqa: E402


class Burst(AsyncWebsocketConsumer):
    async def connect(self):
        self.group = f"burst-{self.scope['url_route']['kwargs']['name']}"
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code):
        await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive(self, text_data=None, bytes_data=None):
        for group in json.loads(text_data):
            await self.channel_layer.group_send(group, {"type": "burst.msg"})
        await self.send(text_data="sent")

    async def burst_msg(self, event):
        await self.send(text_data="x")


application = ProtocolTypeRouter({
    "http": not_found,
    "websocket": URLRouter([re_path(r"^burst/(?P<name>[\w.-]+)/$", Burst.as_asgi())]),
})
