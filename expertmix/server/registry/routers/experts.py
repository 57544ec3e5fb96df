"""Expert endpoints beyond the Hub: search by card fields, similarity to a domain embedding, card JSON."""

from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..auth import Principal, can_read
from ..deps import CurrentPrincipal, DbSession
from ..errors import HubError
from ..index import record_embedding
from ..models import Commit, ExpertLanguage, ExpertRecord, Ref, Repo
from ..repos import DEFAULT_BRANCH, commit_files, iso, refs_to, resolve, visible_repo

router = APIRouter()


class SimilarBody(BaseModel):
    embedding: list[float] = Field(min_length=1, max_length=65536)
    embedding_model: str | None = None
    domain: str | None = None
    language: str | None = None
    kind: str | None = None
    base_fingerprint: str | None = None
    limit: int = Field(default=20, ge=1, le=100_000)


def summary(repo: Repo, record: ExpertRecord, commit: Commit, score: float | None = None) -> dict:
    card = json.loads(record.card_json)
    e = card["expert"]
    out = {"id": repo.repo_id, "revision": record.commit_oid, "private": repo.private,
           "created": iso(commit.created_at), "name": e["name"], "domain": e["domain"], "kind": e["kind"],
           "languages": e["languages"], "base_model": e["base_model"],
           "base_fingerprint": e["base_fingerprint"],
           "architecture": e["architecture"], "embedding_model": record.embedding_model,
           "embedding_dim": record.embedding_dim, "metrics": e["metrics"], "card": card}
    if score is not None:
        out["score"] = score
    return out


def _candidates(db: Session, principal: Principal | None, domain: str | None, language: str | None,
                kind: str | None, base_fingerprint: str | None):
    """(repo, record, commit) for every readable expert whose 'main' matches the filters."""
    stmt = (select(Repo, ExpertRecord, Commit)
            .join(Ref, (Ref.repo_id == Repo.id) & (Ref.name == DEFAULT_BRANCH))
            .join(ExpertRecord, ExpertRecord.commit_oid == Ref.commit_oid)
            .join(Commit, Commit.oid == Ref.commit_oid)
            .order_by(Repo.namespace, Repo.name))
    if domain:
        stmt = stmt.where(ExpertRecord.domain == domain)
    if kind:
        stmt = stmt.where(ExpertRecord.kind == kind)
    if base_fingerprint:
        if not all(c in "0123456789abcdef" for c in base_fingerprint.lower()):
            raise HubError(400, f"base_fingerprint {base_fingerprint!r} is not hex")
        stmt = stmt.where(ExpertRecord.base_fingerprint.startswith(base_fingerprint.lower()))
    if language:
        stmt = stmt.where(ExpertRecord.commit_oid.in_(
            select(ExpertLanguage.commit_oid).where(ExpertLanguage.language == language)))
    return [row for row in db.execute(stmt).all() if can_read(principal, row[0].namespace, row[0].private)]


@router.get("/api/experts")
def search_experts(db: DbSession, principal: CurrentPrincipal, domain: str | None = None,
                   language: str | None = None, kind: str | None = None, base_fingerprint: str | None = None,
                   limit: int = Query(default=100, ge=1, le=100_000)) -> list[dict]:
    rows = _candidates(db, principal, domain, language, kind, base_fingerprint)
    return [summary(*row) for row in rows[:limit]]


@router.post("/api/experts/similar")
def similar_experts(body: SimilarBody, db: DbSession,
                    principal: CurrentPrincipal) -> list[dict]:
    query = np.asarray(body.embedding, dtype=np.float64)
    if not np.isfinite(query).all() or not np.linalg.norm(query):
        raise HubError(400, "field 'embedding' must be finite and not all zeros")
    hits = []
    for repo, record, commit in _candidates(db, principal, body.domain, body.language, body.kind,
                                            body.base_fingerprint):
        if record.embedding_dim != query.size:
            continue
        if body.embedding_model and record.embedding_model != body.embedding_model:
            continue
        emb = record_embedding(record).astype(np.float64)
        score = float(emb @ query / max(np.linalg.norm(emb) * np.linalg.norm(query), 1e-12))
        hits.append(summary(repo, record, commit, score))
    hits.sort(key=lambda h: -h["score"])
    return hits[:body.limit]


@router.get("/api/experts/{namespace}/{name}")
def expert_card(namespace: str, name: str, db: DbSession, principal: CurrentPrincipal,
                revision: str | None = None) -> dict:
    repo = visible_repo(db, namespace, name, principal)
    commit = resolve(db, repo, revision)
    record = db.get(ExpertRecord, commit.oid)
    if record is None:
        raise HubError(404, f"{repo.repo_id}@{commit.oid} is not an expert (no 'expert:' block in README.md)",
                       "EntryNotFound", {"X-Repo-Commit": commit.oid})
    out = summary(repo, record, commit)
    out["refs"] = [r.name for r in refs_to(db, repo, commit.oid)]
    out["files"] = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in commit_files(db, commit)]
    return out
