"""HTTP errors in the Hub's shape: a status, ``X-Error-Code`` / ``X-Error-Message`` and ``{"error": ...}``."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...errors import ExpertmixError


class HubError(Exception):
    """An error answered to the client; ``code`` is one the huggingface_hub client understands."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}  # more fields of the JSON body


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository {repo_id} not found (or it is private and the token does not cover it)",
                    "RepoNotFound")


def revision_not_found(repo_id: str, revision: str) -> HubError:
    return HubError(404, f"Revision {revision!r} not found in {repo_id}", "RevisionNotFound")


def entry_not_found(repo_id: str, path: str, commit: str | None = None) -> HubError:
    return HubError(404, f"File {path!r} not found in {repo_id}", "EntryNotFound",
                    {"X-Repo-Commit": commit} if commit else None)


def _header_safe(text: str) -> str:
    return " ".join(text.encode("ascii", "replace").decode("ascii").split())[:1000]


def error_response(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                   extra: dict | None = None) -> JSONResponse:
    out = {"X-Error-Message": _header_safe(message), **(headers or {})}
    if code:
        out["X-Error-Code"] = code
    return JSONResponse({**(extra or {}), "error": message}, status_code=status, headers=out)


async def hub_error_handler(_request: Request, exc: HubError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.code, exc.headers, exc.extra)


async def validation_error_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'payload'}: {err.get('msg')}")
    return error_response(400, "malformed request: " + "; ".join(parts))


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, method not allowed) in the Hub's shape rather than ``{"detail"}``."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message = f"{where}: no such endpoint on this registry"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        message = f"{where}: method {request.method} is not allowed here" + (f" (allowed: {allowed})" if allowed
                                                                              else "")
    else:
        message = f"{where}: {exc.detail}"
    return error_response(exc.status_code, message, headers=dict(exc.headers or {}))


DB_UNAVAILABLE = "database unavailable"


def database_unavailable(exc: Exception, extra: dict | None = None) -> JSONResponse:
    """503 for a database that cannot be reached or answer in time (the client may retry), one log line."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:300] if str(exc).strip() else \
        type(exc).__name__
    logging.getLogger("expertmix.registry").warning("%s: %s", DB_UNAVAILABLE, reason)
    return error_response(503, f"{DB_UNAVAILABLE}: the registry cannot reach its database right now; retry later",
                          headers={"Retry-After": "5"}, extra=extra)


async def database_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    return database_unavailable(exc)


async def expertmix_error_handler(_request: Request, exc: ExpertmixError) -> JSONResponse:
    return error_response(400, str(exc))
