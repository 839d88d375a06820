"""Consumers: the code that runs when a message arrives on a channel.

demo/routing.py decides which consumer gets which message:

- ChatConsumer       websocket.* on /chat/<room>/   (a chat room, with its
                                                     "Here now" list)
- LiveDemultiplexer  websocket.* on /live/          (the live item list)
- live_events        http.request on /live/events/  (the same list, for
                                                     EventSource: no WebSocket)
- run_job            jobs.run                       (a slow background job)

All four are plain sync code. channels_mini runs sync consumers in worker
threads, so they may use the ORM and sleep without stalling other sockets.
"""
import json
import logging
import time

from channels_mini import (
    SSE_HEADERS, Group, WebsocketConsumer, WebsocketDemultiplexer, sse_event,
)

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
    """A chat room: every text frame is broadcast to everyone in the room.

    It also keeps the room's "Here now" list (channels_mini's presence): every
    socket is tracked in the room's group, and the page gets

        {"type": "presence_state", "group": ..., "presence": {key: [meta, ...]}}

    once, right after the accept (who was there before this socket), then a

        {"type": "presence_diff", "group": ..., "joins": {...}, "leaves": {...}}

    frame whenever someone arrives or leaves -- its own arrival included.
    Chat frames never have a "type", so the page tells the two apart by it.

    The key of an entry is channels_mini's default: the user's pk for a
    signed-in user (http_user = True; e.g. admin, signed in at /admin/: all
    of their tabs are one entry), otherwise one key per socket (the names
    picked on the index page are not accounts, so two tabs of "alice" are two
    entries). The meta carries the name picked on the index page.

    The room resumes: its group keeps a short history (CHANNELS_MINI_HISTORY
    in demo/settings.py) and the socket is `resumable`, so a page that drops
    for a few seconds and reconnects with the served client
    (/channels_mini.js) first gets every group message it missed, in order
    and once each, then a "$resume" frame; the client unwraps all of that,
    the page only hears "resumed" or "lost" (see room.html). Everything sent
    to the room's group is in that history: chat lines, join/leave events,
    job results and presence diffs alike. The presence_state snapshot is a
    direct reply to this socket, not a group message, so it is never
    replayed: each connection gets a fresh one.

    The text "/drop" makes the server close the socket (code 4000): the
    page's "Drop connection" button, to watch a reconnect and its catch-up.
    """

    # Load the Django session and user from the handshake's cookies, and keep
    # them on every message of this socket (message.http_session,
    # message.user).
    http_user = True

    # The room's group has history (demo/settings.py): replay what this socket
    # missed when it comes back, and say so when that history is gone.
    resumable = True

    #: The close code of a socket closed on request ("/drop"). Any code but
    #: 4401 and 1008 makes the client reconnect; 4000-4999 are the app's own.
    DROP_CODE = 4000

    def connection_groups(self, room, **kwargs):
        # Joined on connect and left on disconnect, automatically. `room`
        # comes from the route's path filter.
        return [room_group(room)]

    def presence_groups(self, room, **kwargs):
        # Tracked after connect() returns, untracked when the socket closes:
        # both send a presence_diff to the group. A tracked socket is also a
        # member of the group, so it hears the diffs.
        return [room_group(room)]

    def presence_meta(self, **kwargs):
        # What every page shows for this socket: the chosen name, not the
        # default ("anonymous" for visitors who did not sign in).
        return {"name": display_name(self.message),
                "joined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def connect(self, message, **kwargs):
        super().connect(message, **kwargs)  # accepts the socket
        # Who is here already: sent after the accept (sends are deferred until
        # the handler returns), followed by the diff of this socket's own join.
        # The socket is in the room's group already, so a join or leave that
        # happens after this read reaches it as a diff; the page applies the
        # diffs that arrive before this snapshot on top of it.
        group = room_group(kwargs["room"])
        snapshot = {"type": "presence_state", "group": group,
                    "presence": Group(group).presence()}
        self.send(text=json.dumps(snapshot))
        self.announce(kwargs["room"], f"{display_name(message)} joined")

    def receive(self, text=None, bytes=None, **kwargs):
        text = (text or "").strip()[:MAX_TEXT_LENGTH]
        if not text:
            return
        if text == "/drop":
            # A teaching aid: the server closes this socket, as a flaky network
            # or a restart would. The page reconnects and catches up; the others
            # see "<name> left", then "<name> joined".
            self.close(self.DROP_CODE)
            return
        payload = {"user": display_name(self.message), "text": text}
        # Sent to the group when this handler returns, like every send a
        # consumer makes (unless it passes immediately=True).
        self.group_send(room_group(kwargs["room"]), text=json.dumps(payload))

    def disconnect(self, message, **kwargs):
        # The socket has left the presence list already; the others got the
        # leave diff.
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


#: How long, in milliseconds, an EventSource waits before it reconnects after
#: losing the stream (server restart, or a proxy that cut an idle stream).
EVENTS_RETRY_MS = 2000

#: Response headers of the event stream: SSE_HEADERS (text/event-stream,
#: no-cache) plus "X-Accel-Buffering: no", which tells nginx not to buffer
#: the stream (events would reach the browser late, in batches).
EVENTS_HEADERS = SSE_HEADERS + [(b"x-accel-buffering", b"no")]


def live_events(message):
    """The live list as server-sent events, for pages without a WebSocket.

    An HTTP consumer (Channels 1.x's http.request): it starts a streaming
    response on message.reply_channel and joins that channel to the same
    groups as the /live/ sockets. From then on every frame ItemBinding sends
    to those groups -- {"text": '{"stream": "items", "payload": ...}'} --
    reaches this stream as one event, "data: <that JSON text>", so the page
    applies exactly what a socket would get. The stream is read-only: writes
    need the socket.

    What the browser receives, in order:

        : live list             a comment: headers and first bytes out at once
        retry: 2000             EventSource reconnects 2 s after a drop
        event: ready            sent after the groups are joined: the page
        data: items             loads the full list only then, so no change
                                can fall between the load and the stream
        data: {"stream": ...}   one event per change, as long as it listens

    There is no periodic keep-alive: a proxy that closes an idle stream costs
    one reconnect (after `retry`) and one reload of the list, and the page
    reloads the whole list on every "ready" anyway. When the browser leaves,
    channels_mini removes the channel from its groups.
    """
    if message["method"] != "GET":
        message.reply_channel.send({
            "status": 405, "headers": [(b"allow", b"GET"), (b"content-type", b"text/plain")],
            "content": b"GET only: this is an EventSource stream.",
        })
        return
    # Sends and Group.add from a consumer happen in call order once it
    # returns: the response starts, then the channel joins the groups, then
    # "ready" goes out. (A group frame must not come first: the response
    # has to start with a status and headers.)
    message.reply_channel.send({
        "status": 200, "headers": EVENTS_HEADERS,
        "content": sse_event(comment="live list", retry=EVENTS_RETRY_MS),
        "more_content": True,
    })
    for group in LiveDemultiplexer.groups:
        Group(group).add(message.reply_channel)
    message.reply_channel.send({"content": sse_event("items", event="ready"),
                                "more_content": True})


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
