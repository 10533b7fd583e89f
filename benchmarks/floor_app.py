"""The HTTP floor: an ASGI app that reads the upload and answers a constant, no model.

``bench_service`` times it with the same client to show what uvicorn and the client cost
before any framework, parsing or model work.
"""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    body = b'{"ok": true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
