"""The registry client: the ``Registry`` interface over HTTP, against an ``expertmix serve`` registry.

The Hub-protocol parts (repos, uploads, downloads) go through ``huggingface_hub.HfApi`` pointed at the
registry, so what expertmix does is what any Hub client can do; the expert endpoints (card JSON,
search, similarity) are plain JSON over httpx. Uploads use plain HTTP (LFS), never Xet.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import torch
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .. import __version__
from ..errors import StoreError
from .card import ExpertCard
from .repo import validate_expert_folder
from .store import ExpertEntry, FileEntry, expertmix_home, parse_ref

TOKEN_ENV = "EXPERTMIX_TOKEN"


def disable_xet() -> None:
    """Make this process upload over plain HTTP: the registry does not speak Xet."""
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    constants.HF_HUB_DISABLE_XET = True  # read at import time by huggingface_hub; set it for this process too


def _server_message(exc: HfHubHTTPError) -> str:
    resp = exc.response
    msg = resp.headers.get("X-Error-Message") if resp is not None else None
    return msg or str(exc).strip().splitlines()[0]


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
        headers = {"user-agent": f"expertmix/{__version__}"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

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
            raise StoreError(f"{what}: registry {self.url} answered {status}: {_server_message(exc)}"
                             f"{self._token_hint(status)}") from exc
        except LocalEntryNotFoundError as exc:
            raise StoreError(f"{what}: cannot reach the registry {self.url} ({exc})") from exc
        except (httpx.HTTPError, OSError) as exc:
            raise StoreError(f"{what}: cannot reach the registry {self.url} ({exc})") from exc
        except Exception as exc:  # huggingface_hub's own HTTP layer (httpx2) raises its own connection errors
            if type(exc).__module__.startswith(("httpx", "httpcore")):
                raise StoreError(f"{what}: cannot reach the registry {self.url} ({exc})") from exc
            raise

    def _token_hint(self, status: object) -> str:
        if status == 401:
            return f" (set ${TOKEN_ENV} or pass --token)"
        return ""

    def _get_json(self, what: str, path: str, **params) -> object:
        with self._errors(what):
            resp = self._http.get(path, params={k: v for k, v in params.items() if v is not None})
        return self._json(what, resp)

    def _json(self, what: str, resp: httpx.Response) -> object:
        if resp.status_code >= 400:
            msg = resp.headers.get("X-Error-Message") or resp.text[:300]
            raise StoreError(f"{what}: registry {self.url} answered {resp.status_code}: {msg}"
                             f"{self._token_hint(resp.status_code)}")
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
        repo_id = self._repo_id(name or expert.card.expert.name)
        parse_ref(repo_id)
        disable_xet()
        with self._errors(f"publish {repo_id}"):
            self.api.create_repo(repo_id, exist_ok=True, private=private)
            # delete_patterns="*": the new revision holds exactly the folder's files, nothing left over.
            info = self.api.upload_folder(folder_path=expert.path, repo_id=repo_id, delete_patterns="*",
                                          ignore_patterns=[".*", "*/.*"],
                                          commit_message=f"Publish expert {repo_id}")
            if tag:
                self.api.create_tag(repo_id, tag=tag, revision=info.oid, exist_ok=False)
        return self.show(f"{repo_id}@{info.oid}")

    def show(self, ref: str) -> ExpertEntry:
        """The card fields and files of ``ORG/NAME[@REV]``."""
        name, rev = parse_ref(ref)
        doc = self._get_json(f"show {ref}", f"/api/experts/{name}", revision=rev)
        return self._entry(doc)

    def list(self) -> list[ExpertEntry]:
        """Every expert whose 'main' is readable with this token."""
        return [self._entry(d) for d in self._get_json("list experts", "/api/experts", limit=10_000)]

    def pull(self, ref: str) -> Path:
        """Download ``ORG/NAME[@REV]`` into the cache and verify every file against the registry's hashes."""
        name, rev = parse_ref(ref)
        with self._errors(f"pull {ref}"):
            path = Path(snapshot_download(name, revision=rev or "main", endpoint=self.url,
                                          cache_dir=self.cache_dir, token=self._hf_token,
                                          library_name="expertmix", library_version=__version__))
            check = self.api.verify_repo_checksums(name, revision=path.name, cache_dir=self.cache_dir)
        bad = [f"{m['path']} ({m['algorithm']} {m['actual'][:12]} != {m['expected'][:12]})"
               for m in check.mismatches]
        bad += [f"{p} (missing)" for p in check.missing_paths]
        if bad:
            raise StoreError(f"pull {ref}: downloaded files do not match the registry: {', '.join(bad)}; "
                             f"delete {path} and pull again")
        return path

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
