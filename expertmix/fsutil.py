"""Atomic file writes and hashing: every file expertmix writes appears whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ExpertmixError, OutputExistsError

try:
    import fcntl
except ImportError:  # not on Windows: temporary folders go unlocked there
    fcntl = None

CHUNK = 1 << 20


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import (setting it to read it is not thread-safe). mkstemp and mkdtemp make their files 0600 and
# folders 0700 whatever the umask; what expertmix writes gets the modes `cp` or save_pretrained would give it.
UMASK = _read_umask()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The file ends with ``mode`` (default: what the umask gives a new file, 0644 typically) whatever the writer
    left: writers that go through a temporary file of their own (safetensors' ``save_file``) leave it 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~UMASK if mode is None else mode
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically, pretty-printed and ending with a newline."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def flock_nowait(fd: int) -> bool | None:
    """A non-blocking exclusive flock on ``fd``: True held, False held by another process, None where the
    platform or filesystem has no locks (some network mounts)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _lock(folder: Path) -> tuple[int, bool | None]:
    """Try a non-blocking flock on ``folder``: ``(descriptor, True)`` held, ``(-1, False)`` held by another process,
    ``(descriptor or -1, None)`` where the platform or filesystem has no locks."""
    if fcntl is None:
        return -1, None
    fd = os.open(folder, os.O_RDONLY)
    held = flock_nowait(fd)
    if held is False:
        os.close(fd)
        return -1, False
    return fd, held


@contextmanager
def atomic_dir(path: str | os.PathLike, exclusive: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only if the block succeeds.

    ``path`` must not exist yet: an existing folder is never replaced. The temporary folder is locked while its
    process lives, so temporary folders for ``path`` left by a killed run are removed here, and (``exclusive``)
    a second process writing ``path`` at the same time is refused at once rather than after all its work.
    """
    path = Path(path)
    if path.exists():
        raise OutputExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    for other in path.parent.glob(f".{path.name}.*.tmp"):
        if not other.is_dir():
            continue
        fd, held = _lock(other)
        if held is False and exclusive:
            raise OutputExistsError(f"{path} is being written by another expertmix process right now (its temporary "
                                    f"folder {other} is in use); wait for it to end or choose another output")
        if held:
            shutil.rmtree(other, ignore_errors=True)  # left by a run that was killed
        if fd >= 0:
            os.close(fd)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~UMASK)
    fd, _ = _lock(tmp)
    try:
        yield tmp
        _readable_as_umask_allows(tmp)
        try:
            os.rename(tmp, path)
        except OSError as exc:
            if not path.exists():
                raise
            raise OutputExistsError(f"{path} was written by another process meanwhile; this run's result was "
                                    f"discarded") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if fd >= 0:
            os.close(fd)


def _readable_as_umask_allows(folder: Path) -> None:
    """Give what a temporary folder holds the read (and folder search) bits the umask allows: writers that go
    through temporary files of their own (transformers' save_pretrained) leave them 0600. Write bits are never
    added, so read-only files (store blobs linked in) stay read-only."""
    read_file, read_dir = 0o444 & ~UMASK, 0o555 & ~UMASK
    for root, dirs, files in os.walk(folder):
        for name, extra in [*((d, read_dir) for d in dirs), *((f, read_file) for f in files)]:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) | extra != stat.S_IMODE(st.st_mode):
                os.chmod(p, stat.S_IMODE(st.st_mode) | extra)


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a folder so that it is gone at once: renamed aside first, then deleted. A process killed meanwhile
    leaves a hidden ``.NAME.removed-*`` folder, never a half-deleted ``NAME`` that looks like work to resume."""
    path = Path(path)
    if not path.exists():
        return
    aside = path.with_name(f".{path.name}.removed-{uuid.uuid4().hex[:8]}")
    os.rename(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    path = Path(path)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# Folders this process holds, each with the open descriptor of its locked ``.lock`` file (-1: held without a lock,
# where the platform or filesystem has none).
_HELD_FOLDERS: dict[Path, int] = {}
LOCK_FILE = ".lock"


def lock_folder(folder: Path) -> None:
    """Hold ``folder`` exclusively until :func:`release_folder` (or the process's end): a second process working in
    the same folder (a command started twice, a scheduler's retry while the first run lives) would overwrite the
    first one's checkpoints. The lock is the kernel's, so a killed process leaves none behind."""
    key = folder.resolve()
    if key in _HELD_FOLDERS:
        return
    if fcntl is None:  # no flock on this platform
        _HELD_FOLDERS[key] = -1
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    held = flock_nowait(fd)
    if held is False:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        raise ExpertmixError(f"{folder} is in use by another expertmix process{f' (pid {holder})' if holder else ''}; "
                             f"wait for it to end or stop it, then rerun")
    if held is None:  # a filesystem without locks: go on unlocked
        os.close(fd)
        _HELD_FOLDERS[key] = -1
        return
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD_FOLDERS[key] = fd


def holds_folder(folder: Path) -> bool:
    """Whether this process holds ``folder`` (see :func:`lock_folder`)."""
    return folder.resolve() in _HELD_FOLDERS


def release_folder(folder: Path) -> None:
    """Let go of ``folder`` if this process holds it."""
    fd = _HELD_FOLDERS.pop(folder.resolve(), None)
    if fd is not None and fd >= 0:
        os.close(fd)
