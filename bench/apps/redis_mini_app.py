"""channels_mini side of the redis burst rows: one consumer on the channels_redis layer.

``/burst/<name>/`` joins the group ``burst-<name>`` (``connection_groups``). A frame holding
a JSON list of group names makes its (sync) handler do ``Group(g).send({"text": "x"})`` for
each, then answer ``"sent"``; the frame ``stats`` answers ``json.dumps(application.stats())``.
settings_redis points CHANNEL_LAYERS at the bench's redis-server.
"""

import json
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.apps.settings_redis")

import django  # noqa: E402

django.setup()

from channels_mini import Application, Group, WebsocketConsumer  # noqa: E402

from bench.apps.common import not_found  # noqa: E402


class Burst(WebsocketConsumer):
    def connection_groups(self, name, **kwargs):
        return [f"burst-{name}"]

    def receive(self, text=None, bytes=None, **kwargs):
        if text == "stats":  # {} from a channels_mini older than Application.stats()
            stats = getattr(application, "stats", None)
            self.send(text=json.dumps(stats() if stats else {}))
            return
        for group in json.loads(text):
            Group(group).send({"text": "x"})
        self.send(text="sent")


application = Application([Burst.as_route(path=r"^/burst/(?P<name>[\w.-]+)/$")],
                          http=not_found)
