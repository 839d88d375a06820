"""Channel routing: which consumer handles which message.

This is the Channels 1.x routing table. Each entry matches a channel name
plus regex filters on the message's keys (for WebSockets and HTTP usually
`path`); named groups in a filter become keyword arguments of the consumer.
"""
from channels_mini import route

from chat.consumers import ChatConsumer, LiveDemultiplexer, live_events, run_job

channel_routing = [
    # /chat/<room>/ sockets: connect, receive and disconnect all go to one
    # class-based consumer; `room` reaches every handler as a kwarg. The room
    # is ASCII and short because group names must be ("chat-" + room, under
    # 100 characters); a path that does not match is refused with 403.
    ChatConsumer.as_route(path=r"^/chat/(?P<room>[-a-zA-Z0-9_]{1,50})/$"),
    # /live/ carries several JSON "streams" over one socket; today just
    # "items", the data binding of chat.Item.
    LiveDemultiplexer.as_route(path=r"^/live/$"),
    # The same list without a WebSocket: an HTTP consumer that streams the
    # "items" group as server-sent events, for EventSource. Only this path
    # is routed; every other HTTP request still goes to Django's views.
    route("http.request", live_events, path=r"^/live/events/$"),
    # A background channel: no socket behind it. Views send to it with
    # Channel("jobs.run").send(...); a worker in the server process runs
    # run_job(message, kind=...) for each message.
    route("jobs.run", run_job, kind=r"^(?P<kind>\w+)$"),
]
