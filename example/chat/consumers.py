"""Consumers: the code that runs when a message arrives on a channel.

demo/routing.py decides which consumer gets which message:

- ChatConsumer       websocket.* on /chat/<room>/   (a chat room)
- LiveDemultiplexer  websocket.* on /live/          (the live item list)
- run_job            jobs.run                       (a slow background job)

All three are plain sync code. channels_mini runs sync consumers in worker
threads, so they may use the ORM and sleep without stalling other sockets.
"""
import json
import logging
import time

from channels_mini import Group, WebsocketConsumer, WebsocketDemultiplexer

from chat.bindings import ItemBinding

logger = logging.getLogger(__name__)

MAX_TEXT_LENGTH = 500

#: The jobs the "jobs.run" channel knows, by kind.
JOBS = {
    "reverse": lambda text: text[::-1],
    "upper": str.upper,
}


def room_group(room):
    """Return the group name for a chat room: every socket in it is a member."""
    return f"chat-{room}"


def display_name(message):
    """Return the name the visitor typed on the index page, from the session.

    With `http_user = True`, channels_mini loads the Django session named by
    the handshake's cookie, so the socket sees what views stored in
    request.session.
    """
    session = getattr(message, "http_session", None)
    name = session.get("name") if session is not None else None
    if not name and message.user.is_authenticated:
        name = message.user.get_username()
    return name or "anonymous"


# -- chat rooms --


class ChatConsumer(WebsocketConsumer):
    """A chat room: every text frame is broadcast to everyone in the room."""

    # Load the Django session and user from the handshake's cookies, and keep
    # them on every message of this socket (message.http_session,
    # message.user).
    http_user = True

    def connection_groups(self, room, **kwargs):
        # Joined on connect and left on disconnect, automatically. `room`
        # comes from the route's path filter.
        return [room_group(room)]

    def connect(self, message, **kwargs):
        super().connect(message, **kwargs)  # accepts the socket
        self.announce(kwargs["room"], f"{display_name(message)} joined")

    def receive(self, text=None, bytes=None, **kwargs):
        text = (text or "").strip()[:MAX_TEXT_LENGTH]
        if not text:
            return
        payload = {"user": display_name(self.message), "text": text}
        # Sent to the group when this handler returns, like every send a
        # consumer makes (unless it passes immediately=True).
        self.group_send(room_group(kwargs["room"]), text=json.dumps(payload))

    def disconnect(self, message, **kwargs):
        self.announce(kwargs["room"], f"{display_name(message)} left")

    def announce(self, room, text):
        event = {"user": "", "text": text, "event": True}
        self.group_send(room_group(room), text=json.dumps(event))


# -- the live item list --


class LiveDemultiplexer(WebsocketDemultiplexer):
    """One socket, several JSON streams: {"stream": ..., "payload": {...}}.

    Frames on the "items" stream go to the binding's consumer, which creates,
    updates or deletes Items. Every socket joins the "items" group, which is
    where ItemBinding sends each change.
    """

    # The binding's has_permission() receives message.user.
    http_user = True
    consumers = {"items": ItemBinding.consumer}
    groups = ["items"]


# -- a background channel --


def run_job(message, kind):
    """Run a slow job from the "jobs.run" channel and report to a chat room.

    A view sends {"kind", "text", "reply_group", "user"} with
    Channel("jobs.run").send(...) and answers the browser at once; this
    consumer runs later, in a worker thread of the server process (or in
    `python -m channels_mini runworker` with a shared channel layer).
    """
    job = JOBS.get(kind)
    time.sleep(1)  # stands in for real work: a thumbnail, an e-mail, an API call
    if job is None:
        result = {"job": kind, "error": f"unknown job kind {kind!r}"}
    else:
        result = {"job": kind, "text": message["text"], "result": job(message["text"])}
    result["user"] = message.get("user", "")
    logger.info("job %s done for %s", kind, message["reply_group"])
    # A WebSocket reply is a {"text": ...} message: sending one to a group
    # writes a frame to every socket in it.
    Group(message["reply_group"]).send({"text": json.dumps(result)})
