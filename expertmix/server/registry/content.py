"""HTTP face of the content checks in ``expertmix.hub.content``: a refused file is a 400 that names it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath

from ...hub import content
from ...hub.content import HEAD_BYTES, MAX_SAFETENSORS_HEADER, ContentError
from .errors import HubError
from .storage import BlobStorage, StagedBlob, read_range

Reader = Callable[[int, int], bytes]  # (start, length) -> bytes


def refuse_pickle(path: str, head: bytes) -> None:
    """Refuse the first bytes of a file (an upload's sample or head) that already show a pickle importing and
    calling code, plain, compressed or in a torch.save archive, whatever the file is named."""
    problem = content.head_problem(head[:HEAD_BYTES])
    if problem:
        raise HubError(400, f"{path}: {problem}")


def check_staged(label: str, staged: StagedBlob) -> None:
    """Whole-file content check of an upload on disk, before it is placed at its content address."""
    staged.close()  # flushed; placing it closes it again harmlessly
    check_path(label, staged.path)


def check_path(label: str, path: Path) -> None:
    """Whole-file content check of a file on the server's disk."""
    try:
        content.check_file(path, name=label)
    except ContentError as exc:
        raise HubError(400, str(exc)) from exc


def check_safetensors(path: str, read: Reader, size: int) -> None:
    """Check a .safetensors blob's header: length, JSON, dtypes, shapes and offsets that fit the file."""
    problem = content.safetensors_problem(read, size)
    if problem:
        raise HubError(400, f"{path}: {problem}")


def check_bytes(path: str, data: bytes) -> None:
    """All content checks for a committed file held in memory."""
    try:
        content.check_bytes(path, data)
    except ContentError as exc:
        raise HubError(400, str(exc)) from exc
    if PurePosixPath(path).suffix.lower() == ".safetensors":
        check_safetensors(path, lambda start, length: data[start:start + length], len(data))


def check_blob(path: str, storage: BlobStorage, sha: str, size: int) -> None:
    """All content checks for a committed file stored as a blob, read forward from storage."""
    with storage.open(sha) as f:
        problem = content.pickle_problem(f)
    if problem:
        raise HubError(400, f"{path}: {problem}")
    if PurePosixPath(path).suffix.lower() == ".safetensors":
        check_safetensors(path, lambda start, length: read_range(storage, sha, start, length), size)


__all__ = ["HEAD_BYTES", "MAX_SAFETENSORS_HEADER", "check_blob", "check_bytes", "check_path", "check_safetensors",
           "check_staged", "refuse_pickle"]
