"""Commits: parse the Hub's NDJSON commit payload and apply it atomically (all files or none).

Every added file is a blob verified against its sha256 before the commit is written; the commit row,
its file list, the expert index row and the branch move happen in one database transaction, and the
branch moves only if it still points at the commit the payload was built on.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .content import check_blob, check_bytes
from .errors import HubError, entry_not_found, revision_not_found
from .index import TreeFile, build_expert_record
from .models import Blob, Commit, CommitFile, Ref, Repo
from .naming import COMMIT_RE, check_path
from .repos import DEFAULT_BRANCH, commit_files, get_ref, git_blob_oid, lfs_pointer, may_use_blob
from .storage import BlobStorage, check_sha, read_range

OPERATION_KEYS = ("file", "lfsFile", "deletedFile", "deletedFolder")


@dataclass
class Operation:
    key: str
    path: str
    content: bytes | None = None
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


def parse_payload(body: bytes, max_file_bytes: int) -> CommitRequest:
    """Parse NDJSON lines (a ``header`` then ``file`` / ``lfsFile`` / ``deletedFile`` / ``deletedFolder``)."""
    header = None
    ops: list[Operation] = []
    lines = [ln for ln in body.split(b"\n") if ln.strip()]
    if not lines:
        raise HubError(400, "malformed commit payload: empty body (expected NDJSON lines)")
    for n, raw in enumerate(lines, start=1):
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
            ops.append(Operation(key, path, content=data))
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
    if header is None:
        raise HubError(400, "malformed commit payload: no header line")
    if not ops:
        raise HubError(400, "malformed commit payload: no file operations after the header")
    return CommitRequest(summary=header[0], description=header[1], parent=header[2], operations=ops)


def _store_inline(db: Session, storage: BlobStorage, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    if db.get(Blob, sha) is None or not storage.exists(sha):
        with storage.staged(len(data)) as staged:
            staged.write(data)
            staged.verify(sha, len(data))
            storage.place(staged, sha)
        _record_blob(db, sha, len(data))
    return sha


def _record_blob(db: Session, sha: str, size: int) -> None:
    if db.get(Blob, sha) is None:
        db.add(Blob(sha256=sha, size=size))
        try:
            db.commit()
        except IntegrityError:  # the same blob arrived concurrently
            db.rollback()


def _apply(tree: dict[str, TreeFile], op: Operation, db: Session, storage: BlobStorage, repo_id: str,
           head: str | None, pending: dict[str, bytes], writer: str) -> None:
    if op.key == "file":
        data = op.content or b""
        check_bytes(op.path, data)
        sha = hashlib.sha256(data).hexdigest()
        pending[sha] = data  # stored only once the whole commit has been checked
        tree[op.path] = TreeFile(sha, len(data), git_blob_oid(data), lfs=False)
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


class _BranchMoved(Exception):
    """Another commit moved the branch between reading its head and moving it."""


def apply_commit(db: Session, storage: BlobStorage, repo: Repo, branch: str, req: CommitRequest,
                 author: str) -> Commit:
    """Build the new tree from the branch head and the operations, check it, write it in one transaction.

    A payload without ``parentCommit`` applies to the head as it is when it lands, as on the Hub: when a
    concurrent commit moves the branch first, the operations are applied again on the new head. With a
    ``parentCommit``, that head is no longer its parent: 412.
    """
    for _ in range(COMMIT_ATTEMPTS):
        try:
            return _commit_once(db, storage, repo, branch, req, author)
        except _BranchMoved:
            db.rollback()
    raise HubError(409, f"branch {branch!r} of {repo.repo_id} kept moving under concurrent commits; retry")


def _commit_once(db: Session, storage: BlobStorage, repo: Repo, branch: str, req: CommitRequest,
                 author: str) -> Commit:
    ref = get_ref(db, repo, branch)
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
    pending: dict[str, bytes] = {}
    for op in req.operations:
        _apply(tree, op, db, storage, repo.repo_id, head_oid, pending, author)
    _check_layout(tree)
    if head is not None and tree == before:
        return head  # nothing changed: no empty commit

    def read_blob(sha: str) -> bytes:
        return pending[sha] if sha in pending else read_range(storage, sha)

    record = build_expert_record(repo.repo_id, tree, read_blob)
    for data in pending.values():
        _store_inline(db, storage, data)
    when = datetime.now(UTC)
    oid = commit_oid(repo.repo_id, head_oid, tree, req, author, when)
    commit = Commit(oid=oid, repo_id=repo.id, parent_oid=head_oid, title=req.summary, message=req.description,
                    author=author, created_at=when)
    commit.files = [CommitFile(path=p, sha256=f.sha256, size=f.size, git_oid=f.git_oid, lfs=f.lfs)
                    for p, f in sorted(tree.items())]
    db.add(commit)
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
        db.commit()
    except IntegrityError as exc:  # the branch was created by a concurrent first commit
        raise _BranchMoved from exc
    except HubError:
        db.rollback()
        raise
    return commit
