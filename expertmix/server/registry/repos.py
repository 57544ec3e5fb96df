"""Reading repos: visibility, revision resolution, file trees and their Hub JSON shapes."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from .auth import Principal, can_read, require_writer
from .errors import HubError, repo_not_found, revision_not_found
from .models import BlobHolder, Commit, CommitFile, Ref, Repo
from .naming import COMMIT_RE, check_repo_id, check_revision

DEFAULT_BRANCH = "main"


def git_blob_oid(data: bytes) -> str:
    """The git blob id of ``data`` (sha1 of 'blob SIZE\\0' + bytes), as the Hub gives for regular files."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands for a large file in git."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def get_repo(db: Session, namespace: str, name: str) -> Repo | None:
    """The repo ``namespace/name`` in any letter case (repo ids are case-insensitive, as on the Hub)."""
    return db.scalar(select(Repo).where(func.lower(Repo.namespace) == namespace.lower(),
                                        func.lower(Repo.name) == name.lower()))


def visible_repo(db: Session, namespace: str, name: str, principal: Principal | None) -> Repo:
    """The repo if this principal may read it; 404 otherwise, so private repos stay invisible."""
    repo_id = check_repo_id(namespace, name)
    repo = get_repo(db, namespace, name)
    if repo is None or not can_read(principal, namespace, repo.private):
        raise repo_not_found(repo_id)
    return repo


def writable_repo(db: Session, namespace: str, name: str, principal: Principal | None) -> Repo:
    """The repo to write to, in any letter case; the token must be for its namespace."""
    repo_id = check_repo_id(namespace, name)
    repo = get_repo(db, namespace, name)
    if repo is None or not can_read(principal, repo.namespace, repo.private):
        raise HubError(404, f"Repository {repo_id} not found: create it first (huggingface_hub create_repo)",
                       "RepoNotFound")
    require_writer(principal, repo.namespace)
    return repo


def may_use_blob(db: Session, sha256: str, namespace: str) -> bool:
    """Whether ``namespace`` may reference a stored blob in a commit: it uploaded the blob, or a repo it can read
    holds it. Blobs are stored once for every repo, so without this a private file's sha256 (a mix records its
    experts') would let anyone commit it to a public repo and download it."""
    if db.get(BlobHolder, (sha256, namespace)) is not None:
        return True
    readable = (select(CommitFile.id).join(Commit, CommitFile.commit_oid == Commit.oid)
                .join(Repo, Commit.repo_id == Repo.id)
                .where(CommitFile.sha256 == sha256,
                       or_(Repo.private.is_(False), func.lower(Repo.namespace) == namespace.lower()))
                .limit(1))
    return db.scalar(readable) is not None


def get_ref(db: Session, repo: Repo, name: str) -> Ref | None:
    return db.get(Ref, (repo.id, name))


def resolve(db: Session, repo: Repo, revision: str | None) -> Commit:
    """A branch, tag, full commit id or unique commit-id prefix (7+ hex digits); 404 otherwise."""
    revision = check_revision(revision or DEFAULT_BRANCH)
    ref = get_ref(db, repo, revision)
    commit = None
    if ref is not None:
        commit = db.get(Commit, ref.commit_oid)
    elif COMMIT_RE.match(revision):
        commit = db.scalar(select(Commit).where(Commit.oid == revision, Commit.repo_id == repo.id))
    elif len(revision) >= 7 and all(c in "0123456789abcdef" for c in revision):
        found = db.scalars(select(Commit).where(Commit.repo_id == repo.id, Commit.oid.startswith(revision))
                           .limit(2)).all()
        commit = found[0] if len(found) == 1 else None
    if commit is None:
        raise revision_not_found(repo.repo_id, revision)
    return commit


def commit_files(db: Session, commit: Commit) -> list[CommitFile]:
    return list(db.scalars(select(CommitFile).where(CommitFile.commit_oid == commit.oid)
                           .order_by(CommitFile.path)))


def refs_to(db: Session, repo: Repo, commit_oid: str) -> list[Ref]:
    return list(db.scalars(select(Ref).where(Ref.repo_id == repo.id, Ref.commit_oid == commit_oid)
                           .order_by(Ref.name)))


def file_entry(f: CommitFile) -> dict:
    """A ``/tree`` entry for a file."""
    entry = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
    if f.lfs:
        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(lfs_pointer(f.sha256, f.size))}
    return entry


def folder_entry(path: str, files: list[CommitFile]) -> dict:
    """A ``/tree`` entry for a folder; its oid hashes the files under it."""
    h = hashlib.sha1()
    for f in files:
        if f.path.startswith(path + "/"):
            h.update(f"{f.path}\0{f.git_oid}\n".encode())
    return {"type": "directory", "oid": h.hexdigest(), "size": 0, "path": path}


def tree_entries(files: list[CommitFile], folder: str, recursive: bool) -> list[dict]:
    """Entries under ``folder`` ('' is the root), folders first like the Hub, each level sorted by path."""
    prefix = folder.rstrip("/") + "/" if folder else ""
    inside = [f for f in files if f.path.startswith(prefix)]
    if folder and not inside:
        return []
    folders: set[str] = set()
    out_files = []
    for f in inside:
        rest = f.path[len(prefix):]
        parts = rest.split("/")
        if recursive:
            for i in range(1, len(parts)):
                folders.add(prefix + "/".join(parts[:i]))
            out_files.append(f)
        elif len(parts) > 1:
            folders.add(prefix + parts[0])
        else:
            out_files.append(f)
    entries = [folder_entry(p, inside) for p in sorted(folders)]
    return entries + [file_entry(f) for f in out_files]


def sibling(f: CommitFile) -> dict:
    s = {"rfilename": f.path, "size": f.size, "blobId": f.git_oid}
    if f.lfs:
        s["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": len(lfs_pointer(f.sha256, f.size))}
    return s
