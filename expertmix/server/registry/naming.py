"""Checks on everything a client names: repo ids, revisions and file paths (no traversal, no pickles)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import unquote

from ...errors import StoreError
from ...hub.repo import COMMIT_LIKE_RE, FORBIDDEN_SUFFIXES, RESERVED_NAMESPACES, validate_name
from .errors import HubError

REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
MAX_PATH = 1000


def check_repo_id(namespace: str, name: str) -> str:
    """``NAMESPACE/NAME`` of letters, digits, '.', '_', '-'; 400 otherwise."""
    repo_id = f"{namespace}/{name}"
    try:
        validate_name(repo_id)
    except StoreError as exc:
        raise HubError(400, f"invalid repo id {repo_id!r}: use NAMESPACE/NAME with letters, digits, "
                            f"'.', '_' and '-'") from exc
    if namespace.lower() in RESERVED_NAMESPACES:
        raise HubError(400, f"invalid repo id {repo_id!r}: namespace {namespace!r} is reserved")
    return repo_id


def check_namespace(namespace: str) -> str:
    """A namespace (an organisation) is one segment of letters, digits, '.', '_' and '-'."""
    try:
        check_repo_id(namespace, "x")
    except HubError as exc:
        raise HubError(400, f"invalid namespace {namespace!r}: use letters, digits, '.', '_' and '-' "
                            f"(not {', '.join(sorted(RESERVED_NAMESPACES))})") from exc
    return namespace


FULL_REF_RE = re.compile(r"^refs/(heads|tags|pr)/(.*)$")


def strip_full_ref(revision: str) -> str:
    """``refs/heads/NAME`` and ``refs/tags/NAME`` name NAME, as on the Hub; ``refs/pr/N`` is refused (400)."""
    m = FULL_REF_RE.match(revision)
    if m is None:
        return revision
    if m.group(1) == "pr":
        raise HubError(400, f"revision {revision!r}: pull-request refs are not supported by this registry")
    return m.group(2)


def check_revision(revision: str) -> str:
    """A branch, tag or commit id (``refs/heads/NAME`` and ``refs/tags/NAME`` name NAME): no slashes, no '..'."""
    revision = strip_full_ref(revision)
    if not REVISION_RE.match(revision) or ".." in revision:
        raise HubError(400, f"invalid revision {revision!r}: use a branch, a tag or a commit id")
    return revision


def check_ref_name(name: str, kind: str) -> str:
    """A new branch or tag name: a revision without '/' that does not look like a commit id (refs resolve first,
    so it would hide the commits it names)."""
    if "/" in name:
        raise HubError(400, f"invalid {kind} name {name!r}: this registry's {kind} names hold no '/'")
    if name == "refs":
        raise HubError(400, f"invalid {kind} name 'refs': it would read as the start of a full ref (refs/heads/...)")
    check_revision(name)
    if COMMIT_LIKE_RE.match(name):
        raise HubError(400, f"{kind} name {name!r} looks like a commit id (or a prefix of one); choose another")
    return name


def check_path(path: object, field: str = "path") -> str:
    """A relative POSIX path inside a repo: no absolute path, '..', '.git', backslash or control character."""
    if not isinstance(path, str) or not path:
        raise HubError(400, f"field {field!r}: expected a non-empty file path, got {path!r}")
    if len(path) > MAX_PATH:
        raise HubError(400, f"field {field!r}: path longer than {MAX_PATH} characters")
    if path.startswith("/") or "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise HubError(400, f"field {field!r}: {path!r} must be a relative path without backslashes "
                            f"or control characters")
    for part in path.split("/"):
        decoded = unquote(part)
        if "/" in decoded:
            raise HubError(400, f"field {field!r}: {path!r} holds an encoded '/' (%2F) in the name {part!r}; "
                                f"name the file without it")
        if part in ("", ".", "..") or decoded in (".", "..") or decoded == ".git":
            raise HubError(400, f"field {field!r}: {path!r} is not a plain path inside the repo "
                                f"(empty, '.', '..' or '.git' segment)")
    if PurePosixPath(path).suffix.lower() in FORBIDDEN_SUFFIXES:
        raise HubError(400, f"{path}: pickled weight files are refused; weights must be safetensors")
    return path
