"""channels_mini app for the stalled-readers rows, served by uvicorn, hypercorn and daphne.

settings_mini sets no CHANNEL_LAYERS: the default in-process layer, default capacity (100
messages per channel). The consumers are those of the reliability tests' ``rel_Flood``:

- ``/flood/`` joins the group ``stalled``; ``/producer/`` does not. On either, the frame
  ``group N SIZE`` group-sends N text frames of SIZE bytes to ``stalled`` (one async handler,
  ``self.group_send``), and ``direct N`` answers the numbers 0 .. N-1 to its own socket.
  So ``direct 1`` after the ``group`` frames answers once those group sends are applied.
- Any HTTP request: ``json.dumps(application.stats())`` (channels, groups, members, messages
  waiting, dropped), so the bench reads what the layer holds and dropped.
"""

import json
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.apps.settings_mini")

import django  # noqa: E402

django.setup()

from channels_mini import Application, WebsocketConsumer  # noqa: E402

from bench.apps.common import drain_body  # noqa: E402

#: The group of the stalled clients.
GROUP = "stalled"


class Flood(WebsocketConsumer):
    groups = [GROUP]

    async def receive(self, text=None, bytes=None, **kwargs):
        if text and text.startswith("group "):
            _, count, size = text.split()
            for number in range(int(count)):
                self.group_send(GROUP, text=f"{number:08d}".ljust(int(size), "."))
        elif text and text.startswith("direct "):
            for number in range(int(text.split()[1])):
                self.send(text=str(number))


class Producer(Flood):
    groups = []


async def stats_http(scope, receive, send):
    """Any HTTP request: the layer's stats() as JSON. (The Application answers lifespan.)"""
    if scope["type"] != "http":
        return
    await drain_body(receive)
    body = json.dumps(application.stats()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


application = Application([Flood.as_route(path=r"^/flood/$"),
                           Producer.as_route(path=r"^/producer/$")], http=stats_http)
