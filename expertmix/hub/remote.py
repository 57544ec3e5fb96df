"""The registry client: the ``Registry`` interface over HTTP, against an ``expertmix serve`` registry.

The Hub-protocol parts (repos, commits, uploads, trees) go through ``huggingface_hub.HfApi`` pointed at
the registry, so what expertmix does is what any Hub client can do; file bytes are streamed from the
Hub's ``/resolve`` URLs and hashed as they arrive, and the expert endpoints (card JSON, search,
similarity) are plain JSON over httpx. Uploads use plain HTTP (LFS), never Xet.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch
from huggingface_hub import HfApi, RepoFile, constants, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, HfUriError, RepositoryNotFoundError, RevisionNotFoundError
from tqdm.auto import tqdm

from .. import __version__
from ..errors import StoreError
from ..fsutil import atomic_dir, sha256_file
from .card import ExpertCard
from .repo import validate_expert_folder, validate_publish_name, validate_tag
from .store import ExpertEntry, FileEntry, expertmix_home, parse_ref

TOKEN_ENV = "EXPERTMIX_TOKEN"
DOWNLOAD_BUFFER = 1 << 20
DOWNLOAD_RETRIES = 3  # resumed range requests after a cut connection, per file


def disable_xet() -> None:
    """Make this process upload over plain HTTP: the registry does not speak Xet."""
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    constants.HF_HUB_DISABLE_XET = True  # read at import time by huggingface_hub; set it for this process too


def _server_message(exc: HfHubHTTPError) -> str:
    resp = exc.response
    msg = resp.headers.get("X-Error-Message") if resp is not None else None
    return msg or str(exc).strip().splitlines()[0]


def _text(body: bytes) -> str:
    """An error body as one readable line (binary content is not printed)."""
    text = body.decode("utf-8", "replace")
    if "\ufffd" in text or any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return f"({len(body)} bytes of binary content)"
    return " ".join(text.split())


class RemoteRegistry:
    """An expert registry reached at ``url``; ``token`` (or ``$EXPERTMIX_TOKEN``) is needed to publish."""

    def __init__(self, url: str, token: str | None = None, cache_dir: str | Path | None = None,
                 timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.cache_dir = Path(cache_dir) if cache_dir else expertmix_home() / "hub-cache"
        # token=False keeps huggingface_hub from sending a Hugging Face login to a third-party server.
        self._hf_token: str | bool = self.token or False
        self.api = HfApi(endpoint=self.url, token=self._hf_token, library_name="expertmix",
                         library_version=__version__)
        self.timeout = timeout
        self._headers = {"user-agent": f"expertmix/{__version__}"}
        if self.token:
            self._headers["authorization"] = f"Bearer {self.token}"

    @functools.cached_property
    def _http(self) -> httpx.Client:
        # Made on first use: building its TLS context costs ~0.1 s, wasted on commands that never need it.
        return httpx.Client(base_url=self.url, headers=self._headers, timeout=self.timeout)

    def __repr__(self) -> str:
        return f"RemoteRegistry({self.url!r})"

    # -- plumbing ----------------------------------------------------------------------------------
    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn HTTP and connection failures into one clear StoreError line."""
        try:
            yield
        except RepositoryNotFoundError as exc:
            raise StoreError(f"{what}: not found in the registry {self.url} (or private and the token does "
                             f"not cover it)") from exc
        except RevisionNotFoundError as exc:
            raise StoreError(f"{what}: {_server_message(exc)}") from exc
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            message = _server_message(exc)
            raise StoreError(f"{what}: registry {self.url} answered {status}: {message}"
                             f"{self._token_hint(status, message)}") from exc
        except (httpx.HTTPError, http.client.HTTPException, OSError) as exc:
            raise StoreError(f"{what}: talking to the registry {self.url} failed ({exc})") from exc
        except HfUriError as exc:
            raise StoreError(f"{what}: the registry answers with URLs outside {self.url} ({exc}); it was started "
                             f"with another --public-url: reach it at that address") from exc
        except Exception as exc:  # huggingface_hub's own HTTP layer (httpx2) raises its own connection errors
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise StoreError(f"{what}: talking to the registry {self.url} failed ({exc})") from exc
            raise

    def _token_hint(self, status: object, message: str) -> str:
        """What to do about a 401, unless the registry's message already says (a revoked token)."""
        if status != 401 or "revoked" in message:
            return ""
        if self.token:
            return f" (the registry does not know this token: check ${TOKEN_ENV} or --token)"
        return f" (set ${TOKEN_ENV} or pass --token)"

    def _get_json(self, what: str, path: str, **params) -> object:
        with self._errors(what):
            resp = self._http.get(path, params={k: v for k, v in params.items() if v is not None})
        return self._json(what, resp)

    def _json(self, what: str, resp: httpx.Response) -> object:
        if resp.status_code >= 400:
            msg = resp.headers.get("X-Error-Message") or resp.text[:300]
            raise StoreError(f"{what}: registry {self.url} answered {resp.status_code}: {msg}"
                             f"{self._token_hint(resp.status_code, msg)}")
        return resp.json()

    def _repo_id(self, name: str) -> str:
        """``ORG/NAME`` as given, or ``NAME`` under the token's namespace."""
        if "/" in name:
            return name
        if not self.token:
            raise StoreError(f"expert name {name!r} has no namespace: use ORG/NAME, or set ${TOKEN_ENV} so "
                             f"the token's namespace is used")
        with self._errors("who am I"):
            return f"{self.api.whoami()['name']}/{name}"

    @staticmethod
    def _entry(doc: dict) -> ExpertEntry:
        created = doc.get("created")
        when = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp() if created else 0.0
        card = ExpertCard.model_validate(doc["card"])
        return ExpertEntry(name=doc["id"], revision=doc["revision"], card=card,
                           files=[FileEntry(**f) for f in doc.get("files", [])], created=when,
                           refs=list(doc.get("refs", [])))

    # -- Registry ----------------------------------------------------------------------------------
    def publish(self, folder: str | Path, name: str | None = None, tag: str | None = None,
                private: bool = False) -> ExpertEntry:
        """Validate an expert folder and commit it (all files at once) as the new 'main' of ORG/NAME."""
        expert = validate_expert_folder(folder)
        repo_id = validate_publish_name(self._repo_id(name or expert.card.expert.name))
        if tag:
            validate_tag(tag)
        disable_xet()
        with self._errors(f"publish {repo_id}"):
            created = self._ensure_repo(repo_id, private)
            try:
                tagged = None
                mine = {f.relative_to(expert.path).as_posix(): sha256_file(f) for f in expert.files} if tag else {}
                if tag and tag in {t.name for t in self.api.list_repo_refs(repo_id).tags}:
                    tagged = self.show(f"{repo_id}@{tag}")  # tags do not move: refuse before anything is committed
                    if {f.path: f.sha256 for f in tagged.files} != mine:
                        raise StoreError(f"tag '{tag}' already names revision {tagged.revision[:12]} of {repo_id}, "
                                         f"which holds other files; tags do not move: choose another --tag (nothing "
                                         f"was published)")
                # delete_patterns="*": the new revision holds exactly the folder's files, nothing left over.
                info = self.api.upload_folder(folder_path=expert.path, repo_id=repo_id, delete_patterns="*",
                                              ignore_patterns=[".*", "*/.*"],
                                              commit_message=f"Publish expert {repo_id}")
            except BaseException:
                if created:
                    self._drop_if_empty(repo_id)
                raise
            if tag and tagged is None:
                self._tag(repo_id, tag, info.oid, mine)
        return self.show(f"{repo_id}@{info.oid}")

    def _ensure_repo(self, repo_id: str, private: bool) -> bool:
        """Create ``repo_id`` unless it exists (``--private`` applies either way); True when this call made it."""
        # create only a missing repo: create_repo(exist_ok=True) neither applies --private to an existing one
        # nor reports a refused token cleanly for one (huggingface_hub builds a Hub-only URL on 401/403)
        if not self.api.repo_exists(repo_id):
            try:
                self.api.create_repo(repo_id, private=private)
                return True
            except HfUriError:  # made, but its URL is not under ours (the server's --public-url): nothing works
                self._drop_if_empty(repo_id)
                raise
            except HfHubHTTPError as exc:
                if exc.response is None or exc.response.status_code != 409:
                    raise  # 409: another publish created it meanwhile
        if private:
            self.api.update_repo_settings(repo_id, private=True)
        return False

    def _drop_if_empty(self, repo_id: str) -> None:
        """Delete a repo this publish created and that holds no commit of files, so a failed publish leaves no
        empty repo behind (best effort: the failure being reported matters more)."""
        try:
            if len(self.api.list_repo_commits(repo_id)) <= 1:
                self.api.delete_repo(repo_id)
        except Exception:  # noqa: BLE001 - the registry may be the thing that failed
            pass

    def _tag(self, repo_id: str, tag: str, revision: str, files: dict[str, str]) -> None:
        """Tag the revision just committed; a concurrent publish that took the tag first is named, with where the
        files are (committed to main, untagged)."""
        try:
            self.api.create_tag(repo_id, tag=tag, revision=revision, exist_ok=False)
        except HfHubHTTPError as exc:
            if exc.response is None or exc.response.status_code != 409:
                raise
            other = self.show(f"{repo_id}@{tag}")
            if {f.path: f.sha256 for f in other.files} != files:
                raise StoreError(f"publish {repo_id}: the files are on main as revision {revision[:12]}, but another "
                                 f"publish took tag '{tag}' meanwhile (for revision {other.revision[:12]}); tags do "
                                 f"not move: rerun with another --tag to tag this revision (nothing new is "
                                 f"committed)") from exc

    def show(self, ref: str) -> ExpertEntry:
        """The card fields and files of ``ORG/NAME[@REV]``."""
        name, rev = parse_ref(ref)
        doc = self._get_json(f"show {ref}", f"/api/experts/{name}", revision=rev)
        return self._entry(doc)

    def list(self) -> list[ExpertEntry]:
        """Every expert whose 'main' is readable with this token."""
        return [self._entry(d) for d in self._get_json("list experts", "/api/experts", limit=10_000)]

    def pull(self, ref: str) -> Path:
        """A folder with the files of ``ORG/NAME[@REV]``, each verified against the registry's hash.

        Snapshots live at ``CACHE/ORG/NAME/COMMIT`` and appear whole or not at all; a commit's snapshot
        never changes, so one that exists is returned as is.
        """
        name, rev = parse_ref(ref)
        with self._errors(f"pull {ref}"):
            commit = self.api.model_info(name, revision=rev or "main").sha
            snap = self.cache_dir / name / commit
            if snap.is_dir():
                return snap
            files = [f for f in self.api.list_repo_tree(name, revision=commit, recursive=True)
                     if isinstance(f, RepoFile)]
            if not files:  # e.g. a repo left by a publish the registry refused: created, never committed to
                raise StoreError(f"pull {ref}: {name} holds no files at revision {commit[:12]} (an empty repo, "
                                 f"nothing published to it); `expertmix list` shows the published experts")
            try:
                with atomic_dir(snap, exclusive=False) as tmp, \
                        tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True, desc=f"pull {name}",
                             disable=None) as bar:
                    for f in files:
                        self._download(name, commit, f, tmp / f.path, bar)
            except FileExistsError:  # another process made it first
                pass
        return snap

    def _download(self, name: str, commit: str, entry: RepoFile, dest: Path, bar: tqdm) -> None:
        """Stream one file to ``dest``, hashing as it arrives; refuse it unless hash and size match the tree.

        A connection cut mid-file resumes with a ``Range`` request for the rest (up to ``DOWNLOAD_RETRIES``
        times), so a network blip costs no bytes already received, and a blob the registry finds corrupt is
        named by its answer rather than as a network failure (the registry cuts a whole-file stream whose bytes
        do not match their hash, and checks the hash before answering a range).

        Hand-written rather than ``hf_hub_download``, and on the standard library's ``http.client`` rather
        than httpx: on a 2-core machine the stock download loop (httpx2, re-chunked into 10 MiB pieces)
        measured ~100 MB/s, httpx's streaming ~400, ``readinto`` a reused 1 MiB buffer ~600; hashing
        while streaming also spares a second read of every file.
        """
        expected = entry.lfs.sha256 if entry.lfs is not None else entry.blob_id

        def hasher():
            return hashlib.sha256() if entry.lfs is not None else hashlib.sha1(b"blob %d\x00" % entry.size)

        h = hasher()
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = urlsplit(hf_hub_url(name, entry.path, revision=commit, endpoint=self.url))
        conn_class = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        size, buf = 0, memoryview(bytearray(DOWNLOAD_BUFFER))
        with open(dest, "wb") as out:
            for attempt in range(DOWNLOAD_RETRIES + 1):
                headers = {**self._headers, "accept-encoding": "identity"}
                if attempt:  # a retry asks for the rest (from byte 0 too: the registry checks the hash first)
                    headers["range"] = f"bytes={size}-"
                conn = conn_class(url.hostname, url.port, timeout=self.timeout)
                try:
                    conn.request("GET", url.path + (f"?{url.query}" if url.query else ""), headers=headers)
                    resp = conn.getresponse()
                    if attempt and resp.status == 200:  # the range was ignored (a proxy): the whole file again
                        out.seek(0)
                        out.truncate()
                        bar.update(-size)
                        h, size = hasher(), 0
                    elif resp.status != (206 if attempt else 200):
                        msg = resp.getheader("X-Error-Message") or _text(resp.read(300))
                        raise StoreError(f"download {name}/{entry.path}: registry {self.url} answered "
                                         f"{resp.status}: {msg}")
                    while n := resp.readinto(buf):
                        h.update(buf[:n])
                        out.write(buf[:n])
                        size += n
                        bar.update(n)
                    if size < entry.size:  # http.client reads a body cut short as a quiet end of file
                        raise http.client.IncompleteRead(b"", entry.size - size)
                    break
                except (http.client.HTTPException, OSError) as exc:
                    if attempt == DOWNLOAD_RETRIES or size >= entry.size:
                        raise StoreError(f"download {name}/{entry.path}: the connection to {self.url} broke "
                                         f"after {size} of {entry.size} bytes ({type(exc).__name__}), "
                                         f"{attempt + 1} times; pull again") from exc
                finally:
                    conn.close()
        if size != entry.size or h.hexdigest() != expected:
            raise StoreError(f"pull {name}@{commit}: {entry.path} arrived with {size} bytes and hash "
                             f"{h.hexdigest()[:16]}, expected {entry.size} bytes and {expected[:16]}; pull again")

    def search(self, domain: str | None = None, language: str | None = None, kind: str | None = None,
               base_fingerprint: str | None = None, like: torch.Tensor | None = None, limit: int = 20,
               embedding_model: str | None = None) -> list[tuple[ExpertEntry, float | None]]:
        """Filter experts by card fields; with ``like``, rank by cosine similarity of domain embeddings."""
        filters = {"domain": domain, "language": language, "kind": kind, "base_fingerprint": base_fingerprint}
        if like is None:
            docs = self._get_json("search experts", "/api/experts", limit=limit, **filters)
            return [(self._entry(d), None) for d in docs]
        body = {**{k: v for k, v in filters.items() if v is not None}, "limit": limit,
                "embedding": [float(x) for x in like.detach().float().reshape(-1)],
                "embedding_model": embedding_model}
        with self._errors("similarity search"):
            resp = self._http.post("/api/experts/similar", json=body)
        return [(self._entry(d), float(d["score"])) for d in self._json("similarity search", resp)]
