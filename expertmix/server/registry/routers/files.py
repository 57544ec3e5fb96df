"""Hub protocol, download side: ``HEAD``/``GET /{repo}/resolve/{revision}/{path}`` with ranges.

Answers carry ``X-Repo-Commit``, an ``ETag`` / ``X-Linked-Etag`` that is the file's sha256 and its size.
A whole-file download is hashed as it streams; its last chunk is held back until the hash matches, so a
corrupt blob is never delivered complete.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..auth import Principal
from ..deps import CurrentPrincipal, DbSession, RegistryState, State
from ..errors import HubError, entry_not_found
from ..models import CommitFile
from ..naming import check_path
from ..repos import resolve, visible_repo
from ..storage import BlobStorage

router = APIRouter()
log = logging.getLogger("expertmix.registry")
CHUNK = 1 << 20
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]")


class CorruptBlob(RuntimeError):
    """A stored blob whose bytes no longer hash to its sha256."""


def _unsatisfiable(message: str, size: int) -> HubError:
    return HubError(416, message, headers={"Content-Range": f"bytes */{size}"})


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a ``Range`` header asks for; None for the whole file; 416 if unsatisfiable.

    As RFC 9110 has it, a header in another unit, a malformed one, one whose last byte comes before its first, and
    several ranges at once are ignored (the whole file, 200); only a range that starts past the end is refused.
    """
    if not header:
        return None
    m = RANGE_RE.match(header.strip())
    if m is None:
        return None
    first, last = m.groups()
    if first == "" and last == "" or first and last and int(last) < int(first):
        return None
    if first == "":
        if int(last) == 0:
            raise _unsatisfiable(f"range {header!r} asks for no bytes of the file ({size} bytes)", size)
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), (min(int(last), size - 1) if last else size - 1)
    if start >= size:
        raise _unsatisfiable(f"range {header!r} is outside the file ({size} bytes)", size)
    return start, end


def _version(storage: BlobStorage, sha: str) -> str:
    """A key that changes when a local blob file is rewritten (so a verified blob is verified again)."""
    path = storage.local_path(sha)
    if path is None:
        return sha
    st = path.stat()
    return f"{sha}:{st.st_size}:{st.st_mtime_ns}"


def ensure_verified(state: RegistryState, sha: str) -> None:
    """Hash a whole blob once before serving parts of it; 500 if it no longer matches its sha256."""
    key = _version(state.storage, sha)
    if key in state.verified:
        return
    h = hashlib.sha256()
    with state.storage.open(sha) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    if h.hexdigest() != sha:
        log.error("blob %s is corrupt (hashes to %s): refusing to serve it", sha, h.hexdigest())
        raise HubError(500, f"blob {sha} on the server does not match its sha256; the registry operator must "
                            f"restore it from a backup")
    state.verified.add(key)


def stream_blob(storage: BlobStorage, sha: str, start: int, length: int, verify: bool,
                on_verified: Callable[[], None] | None = None) -> Iterator[bytes]:
    """Yield ``length`` bytes from ``start``; ``verify`` (whole file) holds the last chunk until it hashes."""
    h = hashlib.sha256() if verify else None
    held: bytes | None = None
    with storage.open(sha) as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise CorruptBlob(f"blob {sha} ended {left} bytes early")
            left -= len(chunk)
            if h is None:
                yield chunk
                continue
            h.update(chunk)
            if held is not None:
                yield held
            held = chunk
    if h is not None:
        if h.hexdigest() != sha:
            log.error("blob %s is corrupt (hashes to %s): download cut short", sha, h.hexdigest())
            raise CorruptBlob(f"blob {sha} does not match its sha256")
        if on_verified is not None:
            on_verified()
        if held is not None:
            yield held


def _lookup(namespace: str, name: str, revision: str, path: str, db: Session, principal: Principal | None):
    repo = visible_repo(db, namespace, name, principal)
    commit = resolve(db, repo, revision)
    path = check_path(path)
    match = db.scalar(select(CommitFile).where(CommitFile.commit_oid == commit.oid, CommitFile.path == path))
    if match is None:
        raise entry_not_found(repo.repo_id, path, commit.oid)
    return commit.oid, match.sha256, match.size


@router.api_route("/{namespace}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
def resolve_file(namespace: str, name: str, revision: str, path: str, request: Request,
                 db: DbSession, principal: CurrentPrincipal, state: State) -> Response:
    commit, sha, size = _lookup(namespace, name, revision, path, db, principal)
    db.close()  # release the connection before a long stream
    if not state.storage.exists(sha):
        log.error("blob %s of %s/%s@%s (%s) is missing from storage %s", sha, namespace, name, commit, path,
                  state.storage.describe())
        raise HubError(500, f"{namespace}/{name}@{commit}: the stored bytes of {path!r} (blob {sha}) are missing "
                            f"from the registry's storage; the registry operator must restore them from a backup")
    headers = {"X-Repo-Commit": commit, "ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"',
               "X-Linked-Size": str(size), "Accept-Ranges": "bytes", "Cache-Control": "no-transform",
               "Content-Disposition": f'attachment; filename="{SAFE_NAME_RE.sub("_", path.rsplit("/")[-1])}"'}
    byte_range = parse_range(request.headers.get("range"), size) if size else None
    if request.method == "HEAD":
        return Response(status_code=200, headers={**headers, "Content-Length": str(size)},
                        media_type="application/octet-stream")
    storage, verify = state.storage, state.settings.verify_downloads
    if byte_range is None:
        # Hashed on the first whole download of each blob version since the server started (and on any
        # range request before that); clients hash every download themselves (expertmix pull does).
        key = _version(storage, sha)
        body = stream_blob(storage, sha, 0, size, verify=verify and key not in state.verified,
                           on_verified=lambda: state.verified.add(key))
        return StreamingResponse(body, status_code=200, media_type="application/octet-stream",
                                 headers={**headers, "Content-Length": str(size)})
    start, end = byte_range
    if verify:
        ensure_verified(state, sha)
    body = stream_blob(storage, sha, start, end - start + 1, verify=False)
    return StreamingResponse(body, status_code=206, media_type="application/octet-stream",
                             headers={**headers, "Content-Length": str(end - start + 1),
                                      "Content-Range": f"bytes {start}-{end}/{size}"})
