"""An ASGI middleware that caps request bodies before anything parses them.

A ``Content-Length`` above the limit is refused at once; a body sent without one (chunked) is
counted while it streams and refused as soon as it passes the limit. Either way the answer is a
413 with a JSON message, and no more of the body is read.
"""

from __future__ import annotations

import json
from typing import Any


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuse bodies over ``max_bytes`` on the given paths with 413.

    Args:
        app: the ASGI app to wrap.
        max_bytes: the limit.
        paths: request paths the limit applies to.
    """

    def __init__(self, app: Any, max_bytes: int, paths: tuple[str, ...]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send, int(length))
            return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send, received)

    async def _refuse(self, send: Any, size: int) -> None:
        detail = (f"request body of {size / 2**20:.1f} MiB or more is over the limit of "
                  f"{self.max_bytes / 2**20:.0f} MiB per request; send fewer or smaller images")
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
