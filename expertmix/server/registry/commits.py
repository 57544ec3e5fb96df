"""Commits: parse the Hub's NDJSON commit payload and apply it atomically (all files or none).

Every added file is a blob verified against its sha256 before the commit is written; the commit row,
its file list, the expert index row and the branch move happen in one database transaction, and the
branch moves only if it still points at the commit the payload was built on (its row is locked while the
commit is built, where the database can lock rows). The payload arrives spooled to a file, never whole in
memory; inline files are staged to files of their own and placed in storage only when the commit lands.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import BinaryIO

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .content import check_blob, check_safetensors, check_staged
from .errors import HubError, entry_not_found, repo_not_found, revision_not_found
from .index import TreeFile, build_expert_record
from .models import Blob, Commit, CommitFile, Ref, Repo
from .naming import COMMIT_RE, check_path
from .repos import DEFAULT_BRANCH, commit_files, git_blob_oid, lfs_pointer, may_use_blob
from .storage import BlobStorage, StagedBlob, check_sha, read_range

OPERATION_KEYS = ("file", "lfsFile", "deletedFile", "deletedFolder")


@dataclass
class Operation:
    """One line of the payload; an inline file's bytes are in ``staged`` (a staging file), not in memory."""

    key: str
    path: str
    staged: StagedBlob | None = None
    git_oid: str | None = None
    oid: str | None = None
    size: int | None = None


@dataclass
class CommitRequest:
    summary: str
    description: str
    parent: str | None
    operations: list[Operation]


def _bad(line: int, message: str) -> HubError:
    return HubError(400, f"malformed commit payload, line {line}: {message}")


def _lines(body: BinaryIO, max_line_bytes: int):
    """(number, line) for each non-empty line of the spooled payload; 413 for a line over ``max_line_bytes``."""
    n = 0
    while raw := body.readline(max_line_bytes + 2):
        line = raw.rstrip(b"\r\n")
        if len(line) > max_line_bytes:
            raise HubError(413, f"commit payload line {n + 1} is over the limit of {max_line_bytes} bytes per "
                                f"line: send files this large through the LFS upload (preupload says 'lfs')")
        if line.strip():
            n += 1
            yield n, line


def parse_payload(body: BinaryIO, max_file_bytes: int, max_line_bytes: int,
                  stage: Callable[[int], StagedBlob]) -> CommitRequest:
    """Parse NDJSON lines (a ``header`` then ``file`` / ``lfsFile`` / ``deletedFile`` / ``deletedFolder``).

    ``body`` is read line by line; each inline file is decoded into a staging file from ``stage(limit)`` (whose
    owner removes it unless the commit places it), so no more than one line is in memory at a time.
    """
    header = None
    ops: list[Operation] = []
    for n, raw in _lines(body, max_line_bytes):
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad(n, f"not JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from exc
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise _bad(n, "expected an object with 'key' and an object 'value'")
        key, value = item.get("key"), item["value"]
        if n == 1:
            if key != "header":
                raise _bad(n, f"the first line must be the 'header', got key {key!r}")
            summary, desc = value.get("summary"), value.get("description", "")
            parent = value.get("parentCommit")
            if not isinstance(summary, str) or not summary.strip():
                raise _bad(n, "header field 'summary' (the commit message) must be a non-empty string")
            if not isinstance(desc, str):
                raise _bad(n, "header field 'description' must be a string")
            if parent is not None and (not isinstance(parent, str) or not COMMIT_RE.match(parent)):
                raise _bad(n, f"header field 'parentCommit' must be a 40-hex commit id, got {parent!r}")
            header = (summary, desc, parent)
            continue
        if key not in OPERATION_KEYS:
            raise _bad(n, f"unknown key {key!r} (expected one of {', '.join(OPERATION_KEYS)})")
        path = value.get("path")
        if key == "deletedFolder" and isinstance(path, str):  # the client marks a folder by a trailing '/'
            path = path.rstrip("/")
        path = check_path(path, f"line {n} path")
        if key == "file":
            encoding, content = value.get("encoding", "base64"), value.get("content")
            if not isinstance(content, str):
                raise _bad(n, "field 'content' must be a string")
            if encoding == "base64":
                try:
                    data = base64.b64decode(content, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise _bad(n, f"field 'content' is not valid base64 ({exc})") from exc
            elif encoding in ("utf-8", "utf8"):
                data = content.encode()
            else:
                raise _bad(n, f"field 'encoding' must be 'base64' or 'utf-8', got {encoding!r}")
            if len(data) > max_file_bytes:
                raise HubError(413, f"{path}: {len(data)} bytes is over the upload limit of {max_file_bytes}")
            staged = stage(max_file_bytes)
            staged.write(data)
            staged.close()
            ops.append(Operation(key, path, staged=staged, git_oid=git_blob_oid(data), size=len(data)))
        elif key == "lfsFile":
            oid, size, algo = value.get("oid"), value.get("size"), value.get("algo", "sha256")
            if algo != "sha256":
                raise _bad(n, f"field 'algo' must be 'sha256', got {algo!r}")
            if not isinstance(oid, str):
                raise _bad(n, "field 'oid' must be the file's sha256")
            try:
                check_sha(oid)
            except Exception as exc:
                raise _bad(n, str(exc)) from exc
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
                raise _bad(n, f"field 'size' must be a non-negative integer, got {size!r}")
            ops.append(Operation(key, path, oid=oid, size=size))
        else:
            ops.append(Operation(key, path))
    if header is None and not ops:
        raise HubError(400, "malformed commit payload: empty body (expected NDJSON lines)")
    if header is None:
        raise HubError(400, "malformed commit payload: no header line")
    if not ops:
        raise HubError(400, "malformed commit payload: no file operations after the header")
    return CommitRequest(summary=header[0], description=header[1], parent=header[2], operations=ops)


def _staged_reader(staged: StagedBlob) -> Callable[[int, int], bytes]:
    def read(start: int, length: int) -> bytes:
        with open(staged.path, "rb") as f:
            f.seek(start)
            return f.read(length)
    return read


def _apply(tree: dict[str, TreeFile], op: Operation, db: Session, storage: BlobStorage, repo_id: str,
           head: str | None, pending: dict[str, StagedBlob], writer: str) -> None:
    if op.key == "file":
        staged = op.staged
        assert staged is not None and op.git_oid is not None
        check_staged(op.path, staged)  # the whole file, read from its staging file
        if PurePosixPath(op.path).suffix.lower() == ".safetensors":
            check_safetensors(op.path, _staged_reader(staged), staged.size)
        pending.setdefault(staged.sha256, staged)  # placed in storage only once the whole commit has been checked
        tree[op.path] = TreeFile(staged.sha256, staged.size, op.git_oid, lfs=False)
    elif op.key == "lfsFile":
        blob = db.get(Blob, op.oid)
        if blob is None or not storage.exists(op.oid) or not may_use_blob(db, op.oid, writer):
            raise HubError(400, f"{op.path}: blob {op.oid} was not uploaded (or failed verification); "
                                f"upload it through the LFS batch endpoint before committing")
        if op.size is not None and op.size != blob.size:
            raise HubError(400, f"{op.path}: declared size {op.size} differs from the uploaded blob's "
                                f"{blob.size}")
        check_blob(op.path, storage, blob.sha256, blob.size)
        pointer_oid = git_blob_oid(lfs_pointer(blob.sha256, blob.size))
        tree[op.path] = TreeFile(blob.sha256, blob.size, pointer_oid, lfs=True)
    elif op.key == "deletedFile":
        if op.path not in tree:
            raise entry_not_found(repo_id, op.path, head)
        del tree[op.path]
    else:
        prefix = op.path.rstrip("/") + "/"
        gone = [p for p in tree if p.startswith(prefix)]
        if not gone:
            raise entry_not_found(repo_id, op.path, head)
        for p in gone:
            del tree[p]


def _check_layout(tree: dict[str, TreeFile]) -> None:
    paths = set(tree)
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in paths:
                raise HubError(400, f"{p}: '{'/'.join(parts[:i])}' is a file, it cannot also be a folder")


def commit_oid(repo_id: str, parent: str | None, tree: dict[str, TreeFile], req: CommitRequest, author: str,
               when: datetime) -> str:
    doc = {"repo": repo_id, "parent": parent, "author": author, "time": when.isoformat(),
           "summary": req.summary, "description": req.description,
           "tree": sorted((p, f.sha256, f.size) for p, f in tree.items())}
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def initial_commit(db: Session, repo: Repo, author: str) -> Commit:
    """The empty first commit a new repo starts from (the Hub's repos always have one); not committed yet."""
    req = CommitRequest(summary="initial commit", description="", parent=None, operations=[])
    when = datetime.now(UTC)
    oid = commit_oid(repo.repo_id, None, {}, req, author, when)
    commit = Commit(oid=oid, repo_id=repo.id, parent_oid=None, title=req.summary, message="", author=author,
                    created_at=when)
    db.add(commit)
    db.add(Ref(repo_id=repo.id, name=DEFAULT_BRANCH, kind="branch", commit_oid=commit.oid))
    return commit


COMMIT_ATTEMPTS = 8
RETRY_BASE_S = 0.02
RETRY_MAX_S = 0.5


class _BranchMoved(Exception):
    """Another commit moved the branch (or stored the same new blob) between reading the head and moving it."""


def apply_commit(db: Session, storage: BlobStorage, repo_pk: int, repo_id: str, branch: str, req: CommitRequest,
                 author: str) -> Commit:
    """Build the new tree from the branch head and the operations, check it, write it in one transaction.

    A payload without ``parentCommit`` applies to the head as it is when it lands, as on the Hub: when a
    concurrent commit moves the branch first, the operations are applied again on the new head (a bounded
    number of times, after a jittered wait). With a ``parentCommit``, that head is no longer its parent: 412.
    """
    for attempt in range(COMMIT_ATTEMPTS):
        try:
            return _commit_once(db, storage, repo_pk, repo_id, branch, req, author)
        except _BranchMoved:
            db.rollback()
            if attempt + 1 < COMMIT_ATTEMPTS:
                time.sleep(random.uniform(0, min(RETRY_MAX_S, RETRY_BASE_S * 2 ** attempt)))
        except BaseException:
            db.rollback()
            raise
    raise HubError(409, f"branch {branch!r} of {repo_id} kept moving under "
                        f"concurrent commits ({COMMIT_ATTEMPTS} attempts); retry")


def _head_ref(db: Session, repo: Repo, branch: str) -> Ref | None:
    """The branch's ref row, locked until this transaction ends (FOR UPDATE; SQLite serialises writers itself)."""
    return db.scalar(select(Ref).where(Ref.repo_id == repo.id, Ref.name == branch).with_for_update())


def _commit_once(db: Session, storage: BlobStorage, repo_pk: int, repo_id: str, branch: str, req: CommitRequest,
                 author: str) -> Commit:
    repo = db.get(Repo, repo_pk)
    if repo is None:  # deleted while the payload streamed in
        raise repo_not_found(repo_id)
    ref = _head_ref(db, repo, branch)
    if ref is None:
        has_branch = db.scalar(select(Ref).where(Ref.repo_id == repo.id, Ref.kind == "branch").limit(1))
        if branch != DEFAULT_BRANCH or has_branch is not None:
            raise revision_not_found(repo.repo_id, branch)
        head = None
    elif ref.kind != "branch":
        raise HubError(400, f"{branch!r} is a tag of {repo.repo_id}; commits go to a branch")
    else:
        head = db.get(Commit, ref.commit_oid)
    head_oid = head.oid if head else None
    if req.parent is not None and req.parent != head_oid:
        raise HubError(412, f"parentCommit {req.parent} is not the head of {branch!r} ({head_oid}); "
                            f"the branch moved, fetch and retry")
    old_files = commit_files(db, head) if head else []
    tree = {f.path: TreeFile(f.sha256, f.size, f.git_oid, f.lfs) for f in old_files}
    before = dict(tree)
    pending: dict[str, StagedBlob] = {}
    for op in req.operations:
        _apply(tree, op, db, storage, repo.repo_id, head_oid, pending, author)
    _check_layout(tree)
    if head is not None and tree == before:
        return head  # nothing changed: no empty commit

    def read_blob(sha: str) -> bytes:
        if sha in pending:
            return pending[sha].path.read_bytes()
        return read_range(storage, sha)

    record = build_expert_record(repo.repo_id, tree, read_blob)
    when = datetime.now(UTC)
    oid = commit_oid(repo.repo_id, head_oid, tree, req, author, when)
    commit = Commit(oid=oid, repo_id=repo.id, parent_oid=head_oid, title=req.summary, message=req.description,
                    author=author, created_at=when)
    commit.files = [CommitFile(path=p, sha256=f.sha256, size=f.size, git_oid=f.git_oid, lfs=f.lfs)
                    for p, f in sorted(tree.items())]
    db.add(commit)
    for sha, staged in sorted(pending.items()):  # one order for all commits, so two cannot deadlock on blob rows
        if db.get(Blob, sha) is None:
            db.add(Blob(sha256=sha, size=staged.size))
    if record is not None:
        record.commit_oid = oid
        record.repo_id = repo.id
        db.add(record)
    try:
        db.flush()
        if head is None:
            db.add(Ref(repo_id=repo.id, name=branch, kind="branch", commit_oid=oid))
            db.flush()
        else:
            moved = db.execute(update(Ref).where(Ref.repo_id == repo.id, Ref.name == branch,
                                                 Ref.commit_oid == head_oid).values(commit_oid=oid))
            if moved.rowcount != 1:
                raise _BranchMoved
    except IntegrityError as exc:  # the branch (or one of the blobs) was created by a concurrent commit
        raise _BranchMoved from exc
    # Everything is checked and the branch row is ours: only now do inline files reach storage. A blob placed
    # here stays if the final COMMIT fails (content-addressed and unreferenced, so harmless, and another commit
    # may already rely on it).
    for sha, staged in pending.items():
        if not storage.exists(sha):
            try:
                storage.place(staged, sha)
            except OSError as exc:
                raise HubError(507, f"storing blob {sha} of this commit failed ({exc.strerror or exc}); nothing "
                                    f"was committed") from exc
    db.commit()
    return commit
