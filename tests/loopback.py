"""A small ASGI app served by uvicorn on 127.0.0.1 in a background thread, for tests that need
a server answering in ways the simulator does not (lying headers, odd usage, other models)."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn

from batcher.sim.serve import tcp_listener

#: An ASGI handler reduced to what these tests need: the request's JSON body in, an answer
#: (status, JSON body, headers) out.
Handler = Callable[[dict[str, Any]], Awaitable[tuple[int, Any, dict[str, str]]]]


async def read_body(receive: Any) -> bytes:
    """The whole body of an ASGI request."""
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


def json_app(handler: Handler) -> Callable[..., Awaitable[None]]:
    """An ASGI app that answers every POST with ``handler``'s (status, body, headers)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        status, answer, headers = await handler(json.loads(body) if body else {})
        raw = json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")]
                + [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": raw})

    return app


@contextlib.contextmanager
def serving(app: Callable[..., Awaitable[None]]) -> Iterator[str]:
    """Serve ``app`` on a free loopback port for the ``with`` block; yields its ``/v1`` URL."""
    sock = tcp_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", ws="none", log_config=None,
        timeout_graceful_shutdown=2,
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if server.started:
                break
            threading.Event().wait(0.025)
        else:
            raise RuntimeError("the test server did not start")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def chat_answer(model: str, usage: dict[str, Any] | None, content: str = "ok") -> dict[str, Any]:
    """A chat-completion body."""
    answer: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content},
             "finish_reason": "stop"}
        ],
    }  # fmt: skip
    if usage is not None:
        answer["usage"] = usage
    return answer
