"""Hub protocol, repo side: create/delete repos, model info, trees, refs, tags, commits list, whoami."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ....hub.card import ExpertCard
from ..auth import Principal, can_read, require_writer
from ..commits import initial_commit
from ..deps import BaseUrl, CurrentPrincipal, DbSession, Settings
from ..errors import HubError, repo_not_found
from ..models import Commit, ExpertRecord, Ref, Repo
from ..naming import check_path, check_ref_name, check_repo_id, check_revision
from ..repos import (
    DEFAULT_BRANCH,
    commit_files,
    file_entry,
    folder_entry,
    get_repo,
    iso,
    resolve,
    sibling,
    tree_entries,
    visible_repo,
)
from ..settings import RegistrySettings

router = APIRouter()


class CreateRepo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    organization: str | None = None
    type: str | None = "model"
    private: bool | None = None
    visibility: str | None = None


class DeleteRepo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    organization: str | None = None
    type: str | None = "model"


class RepoSettings(BaseModel):
    model_config = ConfigDict(extra="allow")
    private: bool | None = None
    visibility: str | None = None


class CreateTag(BaseModel):
    tag: str
    message: str | None = None


class CreateBranch(BaseModel):
    model_config = ConfigDict(extra="allow")
    startingPoint: str | None = None  # noqa: N815 - the Hub's field name
    emptyBranch: bool | None = None  # noqa: N815


def _model_type(kind: str | None) -> None:
    if kind not in (None, "model"):
        raise HubError(400, f"this registry holds model repos only, not {kind!r} repos")


def _private(private: bool | None, visibility: str | None) -> bool:
    if visibility is not None:
        if visibility not in ("public", "private", "protected"):
            raise HubError(400, f"field 'visibility' must be 'public' or 'private', got {visibility!r}")
        return visibility != "public"
    return bool(private)


@router.get("/api/whoami-v2")
def whoami(principal: CurrentPrincipal) -> dict:
    if principal is None:
        raise HubError(401, "whoami needs a token")
    return {"type": "user", "name": principal.namespace, "fullname": principal.namespace, "orgs": [],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": principal.label, "role": "write"}}}


@router.post("/api/repos/create")
def create_repo(body: CreateRepo, db: DbSession, principal: CurrentPrincipal,
                base: BaseUrl) -> dict:
    _model_type(body.type)
    namespace = body.organization or (principal.namespace if principal else None)
    if namespace is None:
        raise HubError(401, "creating a repo needs a token")
    check_repo_id(namespace, body.name)
    # the token holder's spelling of the namespace, as the Hub files a repo under its owner's name
    namespace = require_writer(principal, namespace).namespace
    repo_id = check_repo_id(namespace, body.name)
    existing = get_repo(db, namespace, body.name)
    if existing is not None:
        # The body names the repo's URL: huggingface_hub's create_repo(exist_ok=True) reads it from the 409.
        if existing.repo_id == repo_id:
            raise HubError(409, f"You already created this model repo: {repo_id}",
                           extra={"url": f"{base}/{repo_id}"})
        if can_read(principal, existing.namespace, existing.private):
            raise HubError(409, f"{repo_id}: the repo {existing.repo_id} already exists (repo ids are "
                                f"case-insensitive)", extra={"url": f"{base}/{existing.repo_id}"})
        raise HubError(409, f"{repo_id}: a repo whose id differs only in case already exists (repo ids are "
                            f"case-insensitive)")
    repo = Repo(namespace=namespace, name=body.name, private=_private(body.private, body.visibility))
    db.add(repo)
    try:
        db.flush()
        initial_commit(db, repo, namespace)
        db.commit()
    except IntegrityError as exc:  # created concurrently
        db.rollback()
        raise HubError(409, f"You already created this model repo: {repo_id}",
                       extra={"url": f"{base}/{repo_id}"}) from exc
    return {"url": f"{base}/{repo_id}", "name": repo_id, "id": repo_id}


@router.delete("/api/repos/delete")
def delete_repo(body: DeleteRepo, db: DbSession,
                principal: CurrentPrincipal) -> dict:
    _model_type(body.type)
    namespace = body.organization or (principal.namespace if principal else None)
    if namespace is None:
        raise HubError(401, "deleting a repo needs a token")
    repo_id = check_repo_id(namespace, body.name)
    require_writer(principal, namespace)
    repo = get_repo(db, namespace, body.name)
    if repo is None or not can_read(principal, repo.namespace, repo.private):
        raise repo_not_found(repo_id)
    require_writer(principal, repo.namespace)
    db.execute(delete(Repo).where(Repo.id == repo.id))  # commits, files, refs and index rows cascade
    db.commit()
    return {}


@router.put("/api/models/{namespace}/{name}/settings")
def update_settings(namespace: str, name: str, body: RepoSettings, db: DbSession,
                    principal: CurrentPrincipal) -> dict:
    check_repo_id(namespace, name)
    require_writer(principal, namespace)
    repo = visible_repo(db, namespace, name, principal)
    require_writer(principal, repo.namespace)
    if body.private is not None or body.visibility is not None:
        repo.private = _private(body.private, body.visibility)
    db.commit()
    return {"private": repo.private}


def model_info(db: Session, repo: Repo, commit: Commit | None) -> dict[str, Any]:
    """The ``/api/models/{repo}`` document: enough for ``ModelInfo`` and ``snapshot_download``."""
    files = commit_files(db, commit) if commit else []
    info: dict[str, Any] = {
        "_id": repo.repo_id, "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.namespace,
        "sha": commit.oid if commit else None, "private": repo.private, "gated": False, "disabled": False,
        "downloads": 0, "likes": 0, "createdAt": iso(repo.created_at),
        "lastModified": iso(commit.created_at if commit else repo.created_at),
        "tags": [], "siblings": [sibling(f) for f in files], "spaces": [],
    }
    record = db.get(ExpertRecord, commit.oid) if commit else None
    if record is not None:
        card = ExpertCard.model_validate(json.loads(record.card_json))
        data = card.card_data().to_dict()  # the front matter as the README has it, as the Hub serves it
        info.update(library_name=data["library_name"], tags=data["tags"], cardData=data, expert=data["expert"],
                    pipeline_tag=EXPERT_PIPELINE)
    return info


# Query parameters of GET /api/models this registry understands; others (the Hub's apps, inference, num_parameters,
# library, ...) are refused by name rather than ignored, which would answer a filtered question with everything.
LIST_PARAMS = {"search", "author", "filter", "sort", "direction", "limit", "full", "config", "cardData", "expand",
               "pipeline_tag", "gated"}
# Sort keys: repos here have no download or like counts (0 for all, so those keep the id order).
SORT_KEYS = {"lastModified": lambda i: i["lastModified"] or "", "createdAt": lambda i: i["createdAt"] or "",
             "id": lambda i: i["id"].lower(), "downloads": lambda i: 0, "likes": lambda i: 0,
             "trendingScore": lambda i: 0}
EXPERT_PIPELINE = "text-generation"
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _list_options(q) -> tuple[str | None, bool, int]:
    """The sort key, its direction (descending?) and the limit of a /api/models query; 400 for what is not served."""
    unknown = sorted(set(q.keys()) - LIST_PARAMS)
    if unknown:
        raise HubError(400, f"list models: filter {unknown[0]!r} is not supported by this registry (supported: "
                            f"{', '.join(sorted(LIST_PARAMS))})")
    sort = q.get("sort") or None
    if sort is not None and sort not in SORT_KEYS:
        raise HubError(400, f"list models: sort={sort!r} is not supported (use one of {', '.join(SORT_KEYS)})")
    direction = q.get("direction")
    if direction not in (None, "", "-1", "1"):
        raise HubError(400, f"list models: direction={direction!r} must be -1 (descending) or 1 (ascending)")
    descending = direction == "-1" if direction else sort not in (None, "id")  # the Hub sorts counts high first
    try:
        limit = int(q.get("limit") or 0)
    except ValueError as exc:
        raise HubError(400, f"limit={q.get('limit')!r}: not an integer") from exc
    return sort, descending, limit


@router.get("/api/models")
def list_models(request: Request, db: DbSession,
                principal: CurrentPrincipal) -> list[dict]:
    q = request.query_params
    sort, descending, limit = _list_options(q)
    gated = (q.get("gated") or "").lower()
    if gated and gated not in TRUE + FALSE:
        raise HubError(400, f"list models: gated={q.get('gated')!r} must be true or false")
    if gated in TRUE:
        return []  # nothing here is gated
    pipeline = q.get("pipeline_tag")
    stmt = select(Repo).order_by(Repo.namespace, Repo.name)
    if q.get("author"):
        stmt = stmt.where(func.lower(Repo.namespace) == q["author"].lower())
    if q.get("search"):  # a substring: '%' and '_' are themselves, not SQL wildcards
        stmt = stmt.where(or_(Repo.name.icontains(q["search"], autoescape=True),
                              Repo.namespace.icontains(q["search"], autoescape=True)))
    wanted_tags = set(q.getlist("filter"))  # the Hub's filter: repos carrying every one of these tags
    out = []
    for repo in db.scalars(stmt):
        if not can_read(principal, repo.namespace, repo.private):
            continue
        ref = db.get(Ref, (repo.id, DEFAULT_BRANCH))
        commit = db.get(Commit, ref.commit_oid) if ref else None
        info = model_info(db, repo, commit)
        if wanted_tags <= set(info["tags"]) and (not pipeline or info.get("pipeline_tag") == pipeline):
            out.append(info)
    if sort is not None:
        out.sort(key=SORT_KEYS[sort], reverse=descending)
    elif descending:
        out.reverse()
    return out[:limit] if limit > 0 else out


@router.get("/api/models/{namespace}/{name}")
def get_model(namespace: str, name: str, db: DbSession,
              principal: CurrentPrincipal) -> dict:
    repo = visible_repo(db, namespace, name, principal)
    ref = db.get(Ref, (repo.id, DEFAULT_BRANCH))
    return model_info(db, repo, db.get(Commit, ref.commit_oid) if ref else None)


@router.get("/api/models/{namespace}/{name}/revision/{revision}")
def get_model_revision(namespace: str, name: str, revision: str, db: DbSession,
                       principal: CurrentPrincipal) -> dict:
    repo = visible_repo(db, namespace, name, principal)
    return model_info(db, repo, resolve(db, repo, revision))


def _tree(namespace: str, name: str, revision: str, path: str, request: Request, db: Session,
          principal: Principal | None, settings: RegistrySettings, base: str) -> Response:
    repo = visible_repo(db, namespace, name, principal)
    commit = resolve(db, repo, revision)
    folder = check_path(path.rstrip("/"), "path") if path else ""
    files = commit_files(db, commit)
    recursive = request.query_params.get("recursive", "false").lower() in ("1", "true")
    entries = tree_entries(files, folder, recursive)
    if folder and not entries:
        raise HubError(404, f"{folder!r} is not a folder of {repo.repo_id}@{commit.oid}", "EntryNotFound",
                       {"X-Repo-Commit": commit.oid})
    try:
        start = int(request.query_params.get("cursor") or 0)
    except ValueError as exc:
        raise HubError(400, "query parameter 'cursor' must be an integer") from exc
    page = entries[start:start + settings.tree_page_size]
    headers = {"X-Repo-Commit": commit.oid}
    if start + settings.tree_page_size < len(entries):
        params = {k: v for k, v in request.query_params.items() if k != "cursor"}
        params["cursor"] = str(start + settings.tree_page_size)
        headers["Link"] = f'<{base}{request.url.path}?{urlencode(params)}>; rel="next"'
    return Response(json.dumps(page), media_type="application/json", headers=headers)


@router.get("/api/models/{namespace}/{name}/tree/{revision}")
def tree_root(namespace: str, name: str, revision: str, request: Request, db: DbSession,
              principal: CurrentPrincipal,
              settings: Settings, base: BaseUrl) -> Response:
    return _tree(namespace, name, revision, "", request, db, principal, settings, base)


@router.get("/api/models/{namespace}/{name}/tree/{revision}/{path:path}")
def tree_path(namespace: str, name: str, revision: str, path: str, request: Request, db: DbSession,
              principal: CurrentPrincipal,
              settings: Settings, base: BaseUrl) -> Response:
    return _tree(namespace, name, revision, path, request, db, principal, settings, base)


@router.post("/api/models/{namespace}/{name}/paths-info/{revision}")
async def paths_info(namespace: str, name: str, revision: str, request: Request, db: DbSession,
                     principal: CurrentPrincipal) -> list[dict]:
    body = (await request.body()).decode("utf-8", "replace")
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            paths = json.loads(body).get("paths", [])
        except (json.JSONDecodeError, AttributeError) as exc:
            raise HubError(400, "paths-info body must be a form or JSON with 'paths'") from exc
    else:
        paths = parse_qs(body).get("paths", [])
    paths = [paths] if isinstance(paths, str) else list(paths)
    repo = visible_repo(db, namespace, name, principal)
    commit = resolve(db, repo, revision)
    files = commit_files(db, commit)
    by_path = {f.path: f for f in files}
    out = []
    for p in paths:
        p = check_path(str(p).rstrip("/"))
        if p in by_path:
            out.append(file_entry(by_path[p]))
        elif any(f.path.startswith(p + "/") for f in files):
            out.append(folder_entry(p, files))
    return out


@router.get("/api/models/{namespace}/{name}/refs")
def list_refs(namespace: str, name: str, db: DbSession,
              principal: CurrentPrincipal) -> dict:
    repo = visible_repo(db, namespace, name, principal)
    refs = db.scalars(select(Ref).where(Ref.repo_id == repo.id).order_by(Ref.name)).all()

    def entry(r: Ref) -> dict:
        return {"name": r.name, "ref": f"refs/{'heads' if r.kind == 'branch' else 'tags'}/{r.name}",
                "targetCommit": r.commit_oid}

    return {"branches": [entry(r) for r in refs if r.kind == "branch"],
            "tags": [entry(r) for r in refs if r.kind == "tag"], "converts": [], "pullRequests": []}


@router.get("/api/models/{namespace}/{name}/commits/{revision}")
def list_commits(namespace: str, name: str, revision: str, db: DbSession,
                 principal: CurrentPrincipal) -> list[dict]:
    repo = visible_repo(db, namespace, name, principal)
    commit: Commit | None = resolve(db, repo, revision)
    out = []
    while commit is not None:
        out.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                    "authors": [{"user": commit.author}], "date": iso(commit.created_at)})
        commit = db.get(Commit, commit.parent_oid) if commit.parent_oid else None
    return out


@router.post("/api/models/{namespace}/{name}/tag/{revision}")
def create_tag(namespace: str, name: str, revision: str, body: CreateTag, db: DbSession,
               principal: CurrentPrincipal) -> dict:
    check_repo_id(namespace, name)
    require_writer(principal, namespace)
    repo = visible_repo(db, namespace, name, principal)
    require_writer(principal, repo.namespace)
    commit = resolve(db, repo, revision)
    tag = check_ref_name(body.tag, "tag")
    if db.get(Ref, (repo.id, tag)) is not None:
        raise HubError(409, f"{tag!r} already exists in {repo.repo_id}")
    db.add(Ref(repo_id=repo.id, name=tag, kind="tag", commit_oid=commit.oid))
    try:
        db.commit()
    except IntegrityError as exc:  # created meanwhile by another request
        db.rollback()
        raise HubError(409, f"{tag!r} already exists in {repo.repo_id}") from exc
    return {"name": tag, "ref": f"refs/tags/{tag}", "targetCommit": commit.oid}


@router.delete("/api/models/{namespace}/{name}/tag/{tag}")
def delete_tag(namespace: str, name: str, tag: str, db: DbSession,
               principal: CurrentPrincipal) -> dict:
    check_repo_id(namespace, name)
    require_writer(principal, namespace)
    repo = visible_repo(db, namespace, name, principal)
    require_writer(principal, repo.namespace)
    ref = db.get(Ref, (repo.id, check_revision(tag)))
    if ref is None or ref.kind != "tag":
        raise HubError(404, f"no tag {tag!r} in {repo.repo_id}", "RevisionNotFound")
    db.delete(ref)
    db.commit()
    return {}


@router.post("/api/models/{namespace}/{name}/branch/{branch:path}")
def create_branch(namespace: str, name: str, branch: str, db: DbSession, principal: CurrentPrincipal,
                  body: CreateBranch | None = None) -> dict:
    """A new branch at ``startingPoint`` (default: the head of main); commits and ``--revision`` reads use it."""
    check_repo_id(namespace, name)
    require_writer(principal, namespace)
    repo = visible_repo(db, namespace, name, principal)
    require_writer(principal, repo.namespace)
    branch = check_ref_name(branch, "branch")
    if body is not None and body.emptyBranch:
        raise HubError(400, "empty branches are not supported by this registry; start from a revision")
    commit = resolve(db, repo, (body.startingPoint if body is not None else None) or DEFAULT_BRANCH)
    existing = db.get(Ref, (repo.id, branch))
    if existing is not None:
        raise HubError(409, f"{branch!r} already exists in {repo.repo_id} (a {existing.kind})")
    db.add(Ref(repo_id=repo.id, name=branch, kind="branch", commit_oid=commit.oid))
    try:
        db.commit()
    except IntegrityError as exc:  # created meanwhile by another request
        db.rollback()
        raise HubError(409, f"{branch!r} already exists in {repo.repo_id}") from exc
    return {}


@router.delete("/api/models/{namespace}/{name}/branch/{branch:path}")
def delete_branch(namespace: str, name: str, branch: str, db: DbSession, principal: CurrentPrincipal) -> dict:
    """Drop a branch (its commits stay reachable by id and by the tags that name them); main stays."""
    check_repo_id(namespace, name)
    require_writer(principal, namespace)
    repo = visible_repo(db, namespace, name, principal)
    require_writer(principal, repo.namespace)
    ref = db.get(Ref, (repo.id, check_revision(branch)))
    if branch == DEFAULT_BRANCH:
        raise HubError(403, f"{DEFAULT_BRANCH!r} is the default branch of {repo.repo_id} and cannot be deleted")
    if ref is None or ref.kind != "branch":
        raise HubError(404, f"no branch {branch!r} in {repo.repo_id}", "RevisionNotFound")
    db.delete(ref)
    db.commit()
    return {}
