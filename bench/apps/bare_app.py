"""Bare ASGI floor: echo on any path except /broadcast/, which fans out to every socket.

No framework, no channel layer: the cheapest correct thing uvicorn can run.
"""

from bench.apps.common import BROADCAST_SENDS, not_found

_broadcast_sockets: set = set()


async def _echo(receive, send):
    while True:
        event = await receive()
        if event["type"] == "websocket.receive":
            if event.get("text") is not None:
                await send({"type": "websocket.send", "text": event["text"]})
            else:
                await send({"type": "websocket.send", "bytes": event.get("bytes")})
        elif event["type"] == "websocket.disconnect":
            return


async def _broadcast(receive, send):
    _broadcast_sockets.add(send)
    try:
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            if event["type"] == "websocket.receive" and event.get("text") == "go":
                for i in range(BROADCAST_SENDS):
                    text = str(i)
                    for other in list(_broadcast_sockets):
                        try:
                            await other({"type": "websocket.send", "text": text})
                        except Exception:  # a peer went away mid-broadcast
                            _broadcast_sockets.discard(other)
    finally:
        _broadcast_sockets.discard(send)


async def application(scope, receive, send):
    if scope["type"] != "websocket":
        return await not_found(scope, receive, send)
    event = await receive()
    if event["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    if scope["path"].rstrip("/") == "/broadcast":
        await _broadcast(receive, send)
    else:
        await _echo(receive, send)
