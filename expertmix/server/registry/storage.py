"""Blob storage for the registry: content-addressed by sha256, on a local folder or any fsspec URL.

A blob is first streamed into a private staging file while its sha256 is computed; only a blob whose
hash and size match what the client declared is moved to its content address. A killed upload leaves
at most a staging file, which is never visible and is swept at the next start.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

import fsspec

from ...errors import StoreError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
STAGING_MAX_AGE_S = 24 * 3600


class BlobMismatch(ValueError):
    """Uploaded bytes that do not hash (or measure) to what the client declared."""


class BlobTooLarge(ValueError):
    """An upload that grew past its declared size or the server's limit."""


def check_sha(sha: str) -> str:
    if not SHA256_RE.match(sha):
        raise StoreError(f"invalid blob id {sha!r}: expected 64 lowercase hex digits (a sha256)")
    return sha


class StagedBlob:
    """A blob being received: bytes go to a staging file and into a running sha256."""

    def __init__(self, path: Path, limit: int):
        self.path = path
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in finish()/discard()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise BlobTooLarge(f"upload is larger than {self.limit} bytes")
        self._hash.update(chunk)
        self._file.write(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def verify(self, sha256: str, size: int | None) -> None:
        if size is not None and self.size != size:
            raise BlobMismatch(f"received {self.size} bytes but {size} were declared")
        if self.sha256 != sha256:
            raise BlobMismatch(f"content has sha256 {self.sha256}, not the declared {sha256}")


class BlobStorage(Protocol):
    """Where blob bytes live; metadata (which blobs exist, verified) is in the database."""

    def exists(self, sha: str) -> bool: ...

    def size(self, sha: str) -> int | None: ...

    def open(self, sha: str) -> BinaryIO: ...

    def local_path(self, sha: str) -> Path | None: ...

    def staged(self, limit: int) -> AbstractContextManager[StagedBlob]: ...

    def place(self, staged: StagedBlob, sha: str) -> None: ...

    def sweep(self) -> int: ...

    def check_writable(self) -> None: ...

    def describe(self) -> str: ...


def read_range(storage: BlobStorage, sha: str, start: int = 0, length: int | None = None) -> bytes:
    """Read ``length`` bytes of a blob from ``start`` (all of it when None)."""
    with storage.open(sha) as f:
        f.seek(start)
        return f.read() if length is None else f.read(length)


class _StagingMixin:
    staging_dir: Path

    @contextmanager
    def staged(self, limit: int) -> Iterator[StagedBlob]:
        """A staging file that is removed unless ``place`` moved it away."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = self.staging_dir / f"{uuid.uuid4().hex}.part"
        blob = StagedBlob(path, limit)
        try:
            yield blob
        finally:
            if not blob._file.closed:
                blob._file.close()
            path.unlink(missing_ok=True)

    def _probe(self, folder: Path, what: str) -> None:
        """Create and remove a file in ``folder``; StoreError naming it when that fails."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as exc:
            raise StoreError(f"{what} {folder} is not writable ({exc.strerror or exc}): fix its permissions or "
                             f"give --blobs another folder") from exc

    def check_writable(self) -> None:
        """Fail at startup, not at the first upload, when staging files cannot be written."""
        self._probe(self.staging_dir, "the blob staging folder")

    def sweep(self) -> int:
        """Remove staging files left by killed uploads (older than a day); returns how many."""
        if not self.staging_dir.is_dir():
            return 0
        removed = 0
        for p in self.staging_dir.glob("*.part"):
            try:
                if time.time() - p.stat().st_mtime > STAGING_MAX_AGE_S:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


class LocalBlobStorage(_StagingMixin):
    """Blobs at ``ROOT/sha256/ab/<sha256>``, written once and read-only; staging in ``ROOT/.staging``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.staging_dir = self.root / ".staging"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission
            raise StoreError(f"--blobs {self.root}: cannot use it as the blob folder ({exc.strerror or exc})") \
                from exc

    def _path(self, sha: str) -> Path:
        return self.root / "sha256" / check_sha(sha)[:2] / sha

    def check_writable(self) -> None:
        """Fail at startup, not at the first upload, when the blob folder (or its staging folder) is read-only."""
        self._probe(self.root / "sha256", "the blob folder")
        self._probe(self.staging_dir, "the blob staging folder")

    def exists(self, sha: str) -> bool:
        return self._path(sha).is_file()

    def size(self, sha: str) -> int | None:
        p = self._path(sha)
        return p.stat().st_size if p.is_file() else None

    def open(self, sha: str) -> BinaryIO:
        return open(self._path(sha), "rb")

    def local_path(self, sha: str) -> Path | None:
        return self._path(sha)

    def place(self, staged: StagedBlob, sha: str) -> None:
        staged.close()
        dest = self._path(sha)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged.path, 0o444)
        os.replace(staged.path, dest)  # atomic: readers see the whole blob or none

    def describe(self) -> str:
        return str(self.root)


class FsspecBlobStorage(_StagingMixin):
    """Blobs under any fsspec URL (s3://, gs://, memory://, ...): staged locally, then put and renamed."""

    def __init__(self, url: str, staging_dir: str | Path | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.staging_dir = Path(staging_dir or Path(tempfile.gettempdir()) / "expertmix-registry-staging")

    def _key(self, sha: str) -> str:
        return f"{self.root}/sha256/{check_sha(sha)[:2]}/{sha}"

    def exists(self, sha: str) -> bool:
        return bool(self.fs.exists(self._key(sha)))

    def size(self, sha: str) -> int | None:
        key = self._key(sha)
        return int(self.fs.size(key)) if self.fs.exists(key) else None

    def open(self, sha: str) -> BinaryIO:
        return self.fs.open(self._key(sha), "rb")

    def local_path(self, sha: str) -> Path | None:
        return None

    def place(self, staged: StagedBlob, sha: str) -> None:
        staged.close()
        key = self._key(sha)
        tmp = f"{key}.{uuid.uuid4().hex}.tmp"
        self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(staged.path), tmp)
        self.fs.mv(tmp, key)

    def describe(self) -> str:
        return self.url


def open_storage(url: str) -> BlobStorage:
    """A folder path or ``file://`` URL gives local storage; any other URL goes through fsspec."""
    if url.startswith("file://"):
        return LocalBlobStorage(url[len("file://"):])
    if "://" not in url:
        return LocalBlobStorage(url)
    try:
        return FsspecBlobStorage(url)
    except (ImportError, ValueError) as exc:
        raise StoreError(f"blob storage URL {url!r}: {exc}") from exc


__all__ = ["BlobMismatch", "BlobStorage", "BlobTooLarge", "FsspecBlobStorage", "LocalBlobStorage",
           "StagedBlob", "check_sha", "open_storage", "read_range"]
