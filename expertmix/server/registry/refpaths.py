"""Full git refs in URL paths: ``refs/heads/NAME`` and ``refs/tags/NAME`` (slashes sent as ``%2F`` or not) stand
for NAME, as on the Hub, so routes see one path segment; ``refs/pr/N`` is answered 400."""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

# Where a revision sits in a path: after the repo's action segment, or after /resolve/ in a download URL.
FULL_REF_IN_PATH = re.compile(
    r"^(?P<pre>/api/models/[^/]+/[^/]+/(?:revision|tree|commits|commit|preupload|paths-info|tag|branch)/"
    r"|/[^/]+/[^/]+/resolve/)"
    r"refs(?:/|%2[fF])(?P<kind>heads|tags|pr)(?:/|%2[fF])(?P<name>[^/]+)(?P<rest>/.*)?$")


class FullRefMiddleware:
    """Rewrite a full ref in the path to its short name before routing; 400 for pull-request refs."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else scope.get("path", "")
        m = FULL_REF_IN_PATH.match(path)
        if m is None:
            await self.app(scope, receive, send)
            return
        if m["kind"] == "pr":
            ref = f"refs/pr/{unquote(m['name'])}"
            await error_response(400, f"revision {ref!r}: pull-request refs are not supported by this registry")(
                scope, receive, send)
            return
        new_raw = f"{m['pre']}{m['name']}{m['rest'] or ''}"
        await self.app({**scope, "raw_path": new_raw.encode("latin-1"), "path": unquote(new_raw)}, receive, send)
