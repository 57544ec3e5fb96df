"""A cap on request bodies, so no route can be made to buffer an unbounded upload in memory.

Streaming routes (the LFS upload, the commit) enforce their own limits from the settings; every
other route gets at most ``JSON_BODY_LIMIT`` bytes, whether the body declares its length or not.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response

JSON_BODY_LIMIT = 8 << 20
# The LFS upload and the commit route, exactly: a path that only contains '/commit/' (a repo named 'commit') is
# not one of them.
OWN_LIMITS = re.compile(r"^/api/lfs/upload/[^/]+$|^/api/models/[^/]+/[^/]+/commit/[^/]+$")


class BodyLimitMiddleware:
    """413 for a request body over the limit: at once if Content-Length says so, else when it gets there."""

    def __init__(self, app: ASGIApp, limit: int = JSON_BODY_LIMIT):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or OWN_LIMITS.match(path):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await error_response(413, f"request body of {int(declared)} bytes is over the limit of "
                                      f"{self.limit} bytes")(scope, receive, send)
            return
        if declared is not None:
            await self.app(scope, receive, send)  # the server stops at the declared length
            return
        # No declared length (chunked): read up to the limit here, then hand the body on in one piece.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.limit:
                await error_response(413, f"request body is over the limit of {self.limit} bytes")(scope, receive,
                                                                                                    send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
