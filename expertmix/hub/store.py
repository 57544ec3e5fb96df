"""The local expert store (the embedded default registry) and the interface every registry offers.

Layout under ``$EXPERTMIX_HOME/store`` (default ``~/.cache/expertmix/store``)::

    blobs/sha256/ab/<sha256>              file contents, content-addressed, written once
    repos/<name>/revisions/<rev>.json     an immutable manifest: path -> sha256, size
    repos/<name>/refs/<ref>               a ref ('main', tags) naming a revision
    snapshots/<name>/<rev>/...            folders handed out by ``pull`` (files linked from blobs)

A publish writes blobs, then the manifest, then moves the ref, each atomically: a killed publish
leaves at most unreferenced blobs behind, never a half-visible revision.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import StoreError
from ..fsutil import UMASK, atomic_dir, atomic_path, sha256_file, write_json_atomic, write_text_atomic
from .card import ExpertCard, ExpertInfo, parse_card
from .repo import (
    is_tag,
    load_domain_embedding,
    validate_expert_folder,
    validate_name,
    validate_publish_name,
    validate_tag,
)

if TYPE_CHECKING:  # imported lazily: the registry server and `expertmix list` start without torch
    import torch


def expertmix_home() -> Path:
    """Root folder for expertmix's local state (``$EXPERTMIX_HOME`` or ``~/.cache/expertmix``)."""
    return Path(os.environ.get("EXPERTMIX_HOME") or Path.home() / ".cache" / "expertmix")


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int


@dataclass
class ExpertEntry:
    """One revision of an expert as a registry describes it."""

    name: str
    revision: str
    card: ExpertCard
    files: list[FileEntry] = field(default_factory=list)
    created: float = 0.0
    refs: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return expert_summary(self.name, self.revision, self.card.expert)


def expert_summary(name: str, revision: str | None, e: ExpertInfo) -> dict:
    """The fields `list`, `search` and `show` print for an expert (``revision`` None: a folder not published)."""
    return {"name": name, "revision": revision, "domain": e.domain, "kind": e.kind, "languages": e.languages,
            "base_model": e.base_model, "base_fingerprint": e.base_fingerprint, "metrics": e.metrics}


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``NAME[@REV]`` into the name and the revision (None means the 'main' ref)."""
    name, _, rev = ref.partition("@")
    return validate_name(name), (rev or None)


class Registry(Protocol):
    """What the CLI and the assembler need from a registry, local or remote."""

    def publish(self, folder: str | Path, name: str | None = None, tag: str | None = None) -> ExpertEntry: ...

    def pull(self, ref: str) -> Path: ...

    def show(self, ref: str) -> ExpertEntry: ...

    def list(self) -> list[ExpertEntry]: ...

    def search(self, domain: str | None = None, language: str | None = None, kind: str | None = None,
               base_fingerprint: str | None = None, like: torch.Tensor | None = None,
               limit: int = 20) -> list[tuple[ExpertEntry, float | None]]: ...


class LocalStore:
    """A content-addressed expert registry in a local folder."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else expertmix_home() / "store"

    # -- paths -------------------------------------------------------------------------------------
    def _blob(self, sha: str) -> Path:
        return self.root / "blobs" / "sha256" / sha[:2] / sha

    def _repo(self, name: str) -> Path:
        return self.root / "repos" / name

    def _check_layout(self, name: str) -> None:
        """Refuse a name whose folder would nest with another's (an expert ``X`` beside experts ``X/...``) or that
        differs from another only in case (one folder on macOS and Windows), whatever the case of either."""
        repos = self.root / "repos"
        names = [p.parent.parent.relative_to(repos).as_posix() for p in repos.glob("**/refs/main")] \
            if repos.is_dir() else []
        key, org = name.casefold(), name.partition("/")[0].casefold()
        for other in names:
            if other == name:
                continue
            if other.casefold() == key:
                raise StoreError(f"cannot publish '{name}' to the local store {self.root}: '{other}' is already there, "
                                 f"and names that differ only in case share one folder on some systems; publish to "
                                 f"'{other}' or choose another --name")
            if "/" in name and other.casefold() == org:
                raise StoreError(f"cannot publish '{name}' to the local store {self.root}: '{other}' is already an "
                                 f"expert there, and a local name cannot be both an expert and a namespace; choose "
                                 f"another --name")
            if "/" not in name and other.partition("/")[0].casefold() == key and "/" in other:
                raise StoreError(f"cannot publish '{name}' to the local store {self.root}: it is the namespace of "
                                 f"{other}, and a local name cannot be both an expert and a namespace; choose "
                                 f"another --name (e.g. {name}/{name})")

    # -- writing -----------------------------------------------------------------------------------
    def _put_blob(self, src: Path) -> FileEntry:
        sha = sha256_file(src)
        dest = self._blob(sha)
        if not dest.exists():
            with atomic_path(dest, mode=0o444 & ~UMASK) as tmp:  # read-only: blobs are written once
                shutil.copyfile(src, tmp)
                if sha256_file(tmp) != sha:  # the source changed while we copied it
                    raise StoreError(f"{src}: file changed while it was being published")
        return FileEntry(path="", sha256=sha, size=dest.stat().st_size)

    def publish(self, folder: str | Path, name: str | None = None, tag: str | None = None) -> ExpertEntry:
        """Store a validated expert folder as a new immutable revision and point 'main' at it."""
        expert = validate_expert_folder(folder)
        name = validate_publish_name(expert.card.expert.name if name is None else name)
        if tag:
            validate_tag(tag)
            if other := next((r for r in self._refs(name) if r != tag and r.casefold() == tag.casefold()), None):
                raise StoreError(f"tag '{tag}': '{name}' already has the ref '{other}', and names that differ only in "
                                 f"case share one file on some systems; choose another --tag (nothing was published)")
        self._check_layout(name)
        files = []
        for p in expert.files:
            blob = self._put_blob(p)
            files.append(FileEntry(path=p.relative_to(expert.path).as_posix(), sha256=blob.sha256, size=blob.size))
        parent = self._read_ref(name, "main")
        manifest = {"name": name, "parent": parent,
                    "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files]}
        revision = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:40]
        tagged = self._read_ref(name, tag) if tag else None
        if tagged is not None and self._manifest(name, tagged)["files"] != manifest["files"]:
            raise StoreError(f"tag '{tag}' already names revision {tagged[:12]} of '{name}', which holds other files; "
                             f"tags do not move: choose another --tag (nothing was published)")
        if parent is not None and self._manifest(name, parent)["files"] == manifest["files"]:
            revision = parent  # republishing identical content is a no-op
        else:
            manifest.update(revision=revision, created=time.time())
            write_json_atomic(self._repo(name) / "revisions" / f"{revision}.json", manifest)
            write_text_atomic(self._repo(name) / "refs" / "main", revision)
        if tag and tagged is None:  # a tag that already names this content stays as it is
            write_text_atomic(self._repo(name) / "refs" / tag, revision)
        return self.show(f"{name}@{revision}")

    # -- reading -----------------------------------------------------------------------------------
    def _refs(self, name: str) -> list[str]:
        """The ref names of an expert, as written (by exact case)."""
        try:
            return [e.name for e in os.scandir(self._repo(name) / "refs") if e.is_file()]
        except FileNotFoundError:
            return []

    def _read_ref(self, name: str, ref: str) -> str | None:
        """The revision ``ref`` names, matched by exact case: on a case-insensitive filesystem (macOS, Windows)
        ``refs/V1`` would otherwise open ``refs/v1``."""
        if ref not in self._refs(name):
            return None
        return (self._repo(name) / "refs" / ref).read_text().strip()

    def _manifest(self, name: str, revision: str) -> dict:
        path = self._repo(name) / "revisions" / f"{revision}.json"
        return json.loads(path.read_text())

    def resolve(self, ref: str) -> tuple[str, str]:
        """Turn ``NAME[@REV|@TAG|@PREFIX]`` into (name, full revision)."""
        name, rev = parse_ref(ref)
        repo = self._repo(name)
        if not repo.is_dir():
            known = ", ".join(e.name for e in self.list()) or "none"
            raise StoreError(f"no expert named '{name}' in the local store {self.root} (known: {known})")
        rev = rev or "main"
        by_ref = self._read_ref(name, rev) if is_tag(rev) else None
        if by_ref:
            return name, by_ref
        revisions = [p.stem for p in (repo / "revisions").glob("*.json")]
        matches = [r for r in revisions if r.startswith(rev)] if len(rev) >= 7 else []
        if len(matches) != 1:
            why = "is ambiguous" if len(matches) > 1 else "is not a revision or tag"
            raise StoreError(f"'{rev}' {why} of expert '{name}' (main is {self._read_ref(name, 'main')})")
        return name, matches[0]

    def show(self, ref: str) -> ExpertEntry:
        name, revision = self.resolve(ref)
        m = self._manifest(name, revision)
        files = [FileEntry(**f) for f in m["files"]]
        card_entry = next((f for f in files if f.path == "README.md"), None)
        if card_entry is None:
            raise StoreError(f"revision {revision} of '{name}' has no README.md")
        card = parse_card(self._blob(card_entry.sha256).read_text(encoding="utf-8"), f"{name}@{revision}/README.md")
        refs_dir = self._repo(name) / "refs"
        refs = sorted(p.name for p in refs_dir.iterdir() if p.is_file() and p.read_text().strip() == revision)
        return ExpertEntry(name=name, revision=revision, card=card, files=files, created=m.get("created", 0.0),
                           refs=refs)

    def list(self) -> list[ExpertEntry]:
        repos = self.root / "repos"
        if not repos.is_dir():
            return []
        out = []
        for main in sorted(repos.glob("**/refs/main")):
            name = main.parent.parent.relative_to(repos).as_posix()
            out.append(self.show(name))
        return out

    def revisions(self, name: str) -> list[str]:
        """All revisions of an expert, oldest first."""
        revs = [json.loads(p.read_text()) for p in (self._repo(validate_name(name)) / "revisions").glob("*.json")]
        return [r["revision"] for r in sorted(revs, key=lambda r: r.get("created", 0))]

    def pull(self, ref: str) -> Path:
        """A folder holding the revision's files, verified against their sha256, loadable by transformers/peft."""
        entry = self.show(ref)
        snap = self.root / "snapshots" / entry.name / entry.revision
        if snap.is_dir():
            return snap
        try:
            with atomic_dir(snap, exclusive=False) as tmp:
                for f in entry.files:
                    blob = self._blob(f.sha256)
                    if not blob.is_file() or sha256_file(blob) != f.sha256:
                        raise StoreError(f"store blob for {entry.name}@{entry.revision}/{f.path} is missing or "
                                         f"corrupt (expected sha256 {f.sha256})")
                    dest = tmp / f.path
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(blob, dest)
                    except OSError:
                        shutil.copyfile(blob, dest)
        except FileExistsError:  # another process materialised it first
            pass
        return snap

    def search(self, domain: str | None = None, language: str | None = None, kind: str | None = None,
               base_fingerprint: str | None = None, like: torch.Tensor | None = None,
               limit: int = 20) -> list[tuple[ExpertEntry, float | None]]:
        """Filter experts by card fields; with ``like``, rank by cosine similarity of domain embeddings."""
        hits: list[tuple[ExpertEntry, float | None]] = []
        for entry in self.list():
            e = entry.card.expert
            if domain and e.domain != domain:
                continue
            if language and language not in e.languages:
                continue
            if kind and e.kind != kind:
                continue
            if base_fingerprint and not e.base_fingerprint.startswith(base_fingerprint.lower()):
                continue
            score = None
            if like is not None:
                emb = load_domain_embedding(self.pull(f"{entry.name}@{entry.revision}")).float()
                if emb.numel() != like.numel():
                    continue
                import torch

                score = float(torch.nn.functional.cosine_similarity(emb, like.float().reshape(-1), dim=0))
            hits.append((entry, score))
        if like is not None:
            hits.sort(key=lambda h: -h[1])
        return hits[:limit]


def open_registry(url: str | None = None, token: str | None = None) -> Registry:
    """The registry named by ``url`` or ``$EXPERTMIX_REGISTRY``: a local store path by default, a
    ``RemoteRegistry`` for http(s) URLs (``token`` or ``$EXPERTMIX_TOKEN`` authorises publishing)."""
    url = url or os.environ.get("EXPERTMIX_REGISTRY") or ""
    if url in ("", "local"):
        return LocalStore()
    if url.startswith("file://"):
        return LocalStore(url[len("file://"):])
    if url.startswith(("http://", "https://")):
        from .remote import RemoteRegistry

        return RemoteRegistry(url, token=token)
    if "://" not in url:
        return LocalStore(url)
    raise StoreError(f"registry URL {url!r}: use a local store path, file://PATH or an http(s):// URL")
