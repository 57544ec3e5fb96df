"""Hub protocol, upload side: validate-yaml, preupload, LFS batch + basic upload + verify, and commits.

Large files are streamed to a staging file, hashed, and placed at their content address only when the
sha256 and size match what the LFS batch request declared; a commit then references verified blobs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from typing import BinaryIO, Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from starlette.requests import ClientDisconnect

from ....errors import StoreError
from ..auth import is_revoked, require_writer, revoked_message
from ..commits import CommitRequest, apply_commit, parse_payload
from ..content import check_staged, refuse_pickle
from ..deps import BaseUrl, CurrentPrincipal, DbSession, RegistryState, Settings, State, Storage
from ..errors import HubError
from ..index import parse_expert_card
from ..models import Blob, BlobHolder, Commit, CommitFile, UploadGrant
from ..naming import check_path, check_repo_id, check_revision
from ..repos import commit_files, get_ref, may_use_blob, writable_repo
from ..storage import BlobMismatch, BlobStorage, BlobTooLarge, check_sha

router = APIRouter()
log = logging.getLogger("expertmix.registry")
SPOOL_IN_MEMORY = 1 << 20  # a commit payload up to this size stays in memory; a larger one goes to a file
LFS_JSON = "application/vnd.git-lfs+json"
WRITE_BATCH = 4 << 20
XET_MESSAGE = ("this registry does not speak the Xet protocol: set HF_HUB_DISABLE_XET=1 in the uploading "
               "process (expertmix does this for its own uploads)")


class YamlBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    content: str
    repoType: str | None = "model"


class PreuploadFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: str
    sample: str = ""
    size: int = Field(ge=0)


class PreuploadBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    files: list[PreuploadFile] = Field(max_length=10_000)
    gitIgnore: str | None = None


class LfsObject(BaseModel):
    oid: str
    size: int = Field(ge=0)


class LfsBatch(BaseModel):
    model_config = ConfigDict(extra="allow")
    operation: Literal["upload", "download"]
    transfers: list[str] = Field(default_factory=lambda: ["basic"])
    objects: list[LfsObject] = Field(max_length=10_000)
    hash_algo: str = "sha256"


class LfsVerify(BaseModel):
    oid: str
    size: int = Field(ge=0)


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)  # SQLite hands datetimes back without a zone


async def spool_body(request: Request, into: BinaryIO, limit: int, what: str) -> int:
    """Copy the request body into ``into`` (a spooled file), refusing (413) more than ``limit`` bytes, whether the
    body declares its length or not; returns its size. ClientDisconnect passes through to the caller."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HubError(413, f"{what} of {declared} bytes is over the limit of {limit} bytes (max_commit_bytes)")
    size, buf = 0, bytearray()
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HubError(413, f"{what} is over the limit of {limit} bytes (max_commit_bytes)")
        buf += chunk
        if len(buf) >= WRITE_BATCH:
            await run_in_threadpool(into.write, bytes(buf))
            buf.clear()
    if buf:
        await run_in_threadpool(into.write, bytes(buf))
    return size


@router.post("/api/validate-yaml")
def validate_yaml(body: YamlBody) -> JSONResponse:
    try:
        parse_expert_card(body.content, "README.md")
    except HubError as exc:
        return JSONResponse({"errors": [{"message": exc.message}], "warnings": []}, status_code=400)
    return JSONResponse({"errors": [], "warnings": []})


def upload_mode(path: str, size: int, sample: bytes, inline_max: int) -> str:
    """Small text files travel inline in the commit; binary, large and .safetensors files through LFS."""
    if size > inline_max or b"\x00" in sample or path.endswith(".safetensors"):
        return "lfs"
    return "regular"


@router.post("/api/models/{namespace}/{name}/preupload/{revision}")
def preupload(namespace: str, name: str, revision: str, body: PreuploadBody, request: Request,
              db: DbSession, principal: CurrentPrincipal,
              settings: Settings) -> dict:
    check_repo_id(namespace, name)
    require_writer(principal, namespace)
    repo = writable_repo(db, namespace, name, principal)
    if request.query_params.get("create_pr"):
        raise HubError(400, "pull requests are not supported by this registry")
    ref = get_ref(db, repo, check_revision(revision))
    existing = {}
    if ref is not None:
        existing = {f.path: f for f in commit_files(db, db.get(Commit, ref.commit_oid))}
    out = []
    for n, f in enumerate(body.files):
        path = check_path(f.path, f"files[{n}].path")
        if f.size > settings.max_upload_bytes:
            raise HubError(413, f"{path}: {f.size} bytes is over the upload limit of "
                                f"{settings.max_upload_bytes} bytes")
        try:
            sample = base64.b64decode(f.sample, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise HubError(400, f"files[{n}].sample: not valid base64") from exc
        refuse_pickle(path, sample)
        mode = upload_mode(path, f.size, sample, settings.inline_max_bytes)
        old: CommitFile | None = existing.get(path)
        oid = None if old is None else (old.sha256 if mode == "lfs" else old.git_oid)
        out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return {"files": out, "commitOid": ref.commit_oid if ref else None}


@router.post("/{namespace}/{name}.git/info/lfs/objects/batch")
def lfs_batch(namespace: str, name: str, body: LfsBatch, db: DbSession,
              principal: CurrentPrincipal, storage: Storage,
              settings: Settings, base: BaseUrl) -> Response:
    check_repo_id(namespace, name)
    writer = require_writer(principal, namespace)
    writable_repo(db, namespace, name, principal)
    if body.operation != "upload":
        raise HubError(400, "LFS downloads are not served here: use /{repo}/resolve/{revision}/{path}")
    if body.hash_algo != "sha256":
        raise HubError(400, f"hash_algo must be 'sha256', got {body.hash_algo!r}")
    if "basic" not in body.transfers:
        raise HubError(400, f"this registry offers the 'basic' LFS transfer only, not {body.transfers}")
    objects = []
    for n, obj in enumerate(body.objects):
        try:
            check_sha(obj.oid)
        except StoreError as exc:
            raise HubError(400, f"objects[{n}].oid: {exc}") from exc
        if obj.size > settings.max_upload_bytes:
            raise HubError(413, f"objects[{n}]: {obj.size} bytes is over the upload limit of "
                                f"{settings.max_upload_bytes} bytes")
        blob = db.get(Blob, obj.oid)
        if blob is not None and blob.size == obj.size and storage.exists(obj.oid) \
                and may_use_blob(db, obj.oid, writer.namespace):
            objects.append({"oid": obj.oid, "size": obj.size})  # already here: nothing to upload
            continue
        # Otherwise the bytes are asked for, whether or not they are stored: a writer proves it holds them, and
        # the answer does not tell whether another namespace's private file exists.
        secret = secrets.token_urlsafe(32)
        expires = _now() + timedelta(seconds=settings.upload_ttl_s)
        db.add(UploadGrant(grant_hash=hashlib.sha256(secret.encode()).hexdigest(), namespace=writer.namespace,
                           sha256=obj.oid, size=obj.size, expires_at=expires, token_id=writer.token_id))
        objects.append({"oid": obj.oid, "size": obj.size, "authenticated": True, "actions": {
            "upload": {"href": f"{base}/api/lfs/upload/{secret}", "expires_in": settings.upload_ttl_s},
            "verify": {"href": f"{base}/api/lfs/verify/{namespace}/{name}"}}})
    db.execute(delete(UploadGrant).where(UploadGrant.expires_at < _now()))
    db.commit()
    return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, media_type=LFS_JSON)


def _find_grant(state: RegistryState, secret: str) -> UploadGrant:
    with state.sessions() as db:
        grant = db.get(UploadGrant, hashlib.sha256(secret.encode()).hexdigest())
        if grant is None or _aware(grant.expires_at) < _now():
            raise HubError(403, "upload URL is unknown or expired: ask the LFS batch endpoint for a new one")
        if is_revoked(db, grant.token_id):
            raise HubError(401, f"upload URL refused: {revoked_message(grant.token_id)}")
        return grant


def _record_upload(state: RegistryState, grant: UploadGrant) -> None:
    """The blob is verified and stored: record it and its uploader (each may exist already, or arrive
    concurrently from another upload of the same bytes), and spend the grant."""
    with state.sessions() as db:
        for row, key in ((Blob(sha256=grant.sha256, size=grant.size), grant.sha256),
                         (BlobHolder(sha256=grant.sha256, namespace=grant.namespace),
                          (grant.sha256, grant.namespace))):
            if db.get(type(row), key) is None:
                db.add(row)
                try:
                    db.commit()
                except IntegrityError:
                    db.rollback()
        db.execute(delete(UploadGrant).where(UploadGrant.grant_hash == grant.grant_hash))
        db.commit()


@router.put("/api/lfs/upload/{secret}")
async def lfs_upload(secret: str, request: Request, state: State) -> Response:
    grant = await run_in_threadpool(_find_grant, state, secret)
    limit = min(grant.size, state.settings.max_upload_bytes)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) != grant.size:
        raise HubError(413 if int(declared) > limit else 400,
                       f"upload of {declared} bytes, but {grant.size} were declared for blob {grant.sha256}")
    with state.storage.staged(limit) as staged:
        head, buf = bytearray(), bytearray()
        try:
            async for chunk in request.stream():
                if len(head) < 512:
                    head += chunk[:512 - len(head)]
                    if len(head) >= 512:
                        refuse_pickle(f"blob {grant.sha256}", bytes(head))
                buf += chunk
                if len(buf) >= WRITE_BATCH:
                    await run_in_threadpool(staged.write, bytes(buf))
                    buf.clear()
            refuse_pickle(f"blob {grant.sha256}", bytes(head))
            if buf:
                await run_in_threadpool(staged.write, bytes(buf))
            staged.verify(grant.sha256, grant.size)
            await run_in_threadpool(check_staged, f"blob {grant.sha256}", staged)  # the whole file
        except BlobTooLarge as exc:
            raise HubError(413, f"blob {grant.sha256}: {exc} (the declared size)") from exc
        except BlobMismatch as exc:
            raise HubError(400, f"blob {grant.sha256} refused: {exc}") from exc
        except ClientDisconnect:
            return Response(status_code=400)  # the client is gone; the staging file is removed
        await run_in_threadpool(state.storage.place, staged, grant.sha256)
    await run_in_threadpool(_record_upload, state, grant)
    return Response(status_code=200)


@router.post("/api/lfs/verify/{namespace}/{name}")
def lfs_verify(namespace: str, name: str, body: LfsVerify, db: DbSession,
               principal: CurrentPrincipal) -> dict:
    check_repo_id(namespace, name)
    writer = require_writer(principal, namespace)
    blob = db.get(Blob, body.oid)
    if blob is None or blob.size != body.size or not may_use_blob(db, body.oid, writer.namespace):
        raise HubError(404, f"blob {body.oid} ({body.size} bytes) was not received intact; upload it again")
    return {"oid": blob.sha256, "size": blob.size}


def _spool_dir(storage: BlobStorage) -> str | None:
    """Spool commit payloads beside the blob staging files (a disk meant for uploads), else the temp folder."""
    staging = getattr(storage, "staging_dir", None)
    if staging is None:
        return None
    staging.mkdir(parents=True, exist_ok=True)
    return str(staging)


@router.post("/api/models/{namespace}/{name}/commit/{revision}")
async def commit(namespace: str, name: str, revision: str, request: Request, db: DbSession,
                 principal: CurrentPrincipal, state: State,
                 base: BaseUrl) -> Response:
    check_repo_id(namespace, name)
    branch = check_revision(revision)
    writer = require_writer(principal, namespace)
    repo = await run_in_threadpool(writable_repo, db, namespace, name, principal)
    if request.query_params.get("create_pr"):
        raise HubError(400, "pull requests are not supported by this registry")
    repo_pk, repo_id = repo.id, repo.repo_id
    await run_in_threadpool(db.rollback)  # no transaction (nor lock) stays open while the body streams in
    settings, storage = state.settings, state.storage
    with ExitStack() as stack:
        spool = stack.enter_context(tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed by the stack
            max_size=SPOOL_IN_MEMORY, dir=await run_in_threadpool(_spool_dir, storage)))
        try:
            await spool_body(request, spool, settings.max_commit_bytes, "commit payload")
        except ClientDisconnect:
            log.info("commit to %s: the client went away mid-payload; nothing was committed", repo_id)
            return Response(status_code=400)
        spool.seek(0)

        def parse() -> CommitRequest:
            return parse_payload(spool, settings.max_upload_bytes, settings.max_commit_line_bytes,
                                 lambda limit: stack.enter_context(storage.staged(limit)))

        req = await run_in_threadpool(parse)
        made = await run_in_threadpool(apply_commit, db, storage, repo_pk, repo_id, branch, req, writer.namespace)
    return JSONResponse({"commitUrl": f"{base}/{repo_id}/commit/{made.oid}", "commitOid": made.oid,
                         "pullRequestUrl": None})


@router.api_route("/api/models/{namespace}/{name}/xet-write-token/{revision}", methods=["GET", "POST"])
@router.api_route("/api/models/{namespace}/{name}/xet-read-token/{revision}", methods=["GET", "POST"])
def xet_token(namespace: str, name: str, revision: str) -> Response:
    raise HubError(400, XET_MESSAGE)
