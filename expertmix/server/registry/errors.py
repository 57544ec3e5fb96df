"""HTTP errors in the Hub's shape: a status, ``X-Error-Code`` / ``X-Error-Message`` and ``{"error": ...}``."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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


async def expertmix_error_handler(_request: Request, exc: ExpertmixError) -> JSONResponse:
    return error_response(400, str(exc))
