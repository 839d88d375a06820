"""Data binding: keeps every open /items/ page in step with the Item table.

Outbound, ItemBinding listens to Item's post_save / post_delete signals. Each
save, wherever it happens (the admin, a view, a consumer, `manage.py shell`),
sends a frame like this to the "items" group once the transaction commits:

    {"stream": "items",
     "payload": {"action": "update", "pk": 3, "model": "chat.item",
                 "data": {"name": "milk", "done": true}}}

Every /live/ socket is in that group, and so is every /live/events/ stream
(chat.consumers.live_events), which gets the same JSON text as one
server-sent event: the page's EventSource fallback when there is no
WebSocket.

Inbound, `ItemBinding.consumer` sits in the /live/ demultiplexer (see
chat/consumers.py) and applies the same shape coming from the browser:

    {"stream": "items",
     "payload": {"action": "create", "data": {"name": "milk", "done": false}}}
"""
from channels_mini import WebsocketBinding


class ItemBinding(WebsocketBinding):
    model = "chat.Item"
    stream = "items"
    # Only these fields travel to and from the browser; `created` stays on
    # the server.
    fields = ["name", "done"]

    @classmethod
    def group_names(cls, instance):
        # Every item goes to one group that every /live/ socket and every
        # /live/events/ stream joins. A per-user list would return e.g.
        # [f"items-{instance.owner_id}"].
        return ["items"]

    def has_permission(self, user, action, pk):
        # The demo lets any visitor create, edit and delete items, logged in
        # or not, so you can try it from two browser windows at once. The
        # default denies everything; a real app checks here, for example
        #     return user.has_perm(f"chat.{action}_item")  # "add" for create
        # or that `user` owns the row with this pk.
        return action in {"create", "update", "delete"}
