"""Pieces shared by the benchmark ASGI apps."""

#: Messages each broadcast trigger asks for, and the group names used.
BROADCAST_SENDS = 200


async def not_found(scope, receive, send):
    """Answer every HTTP request with 404 and the lifespan protocol with success."""
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    await drain_body(receive)
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"not found"})


async def drain_body(receive):
    """Read an HTTP request's body to its end (the benches' requests carry none they need)."""
    while True:
        event = await receive()
        if not event.get("more_body"):
            break
