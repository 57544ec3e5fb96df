"""Namespace-scoped write tokens: created once, shown once, stored as a sha256."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ...errors import StoreError
from .db import init_db
from .errors import HubError
from .models import Repo, RevokedToken, Token
from .naming import check_namespace

TOKEN_PREFIX = "emx_"


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings: a plain sha256 stores them safely (no password stretching needed).
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the namespace its token may write to."""

    namespace: str
    label: str = ""
    token_id: int | None = None


def same_namespace(a: str, b: str) -> bool:
    """Namespaces ignore letter case, like repo ids (and user names on the Hub): ``acme`` and ``ACME`` are one."""
    return a.lower() == b.lower()


def namespace_spelling(db: Session, namespace: str) -> str | None:
    """How this registry already spells ``namespace`` (a token's or a repo's), in any letter case; None if new."""
    for column in (Token.namespace, Repo.namespace):
        found = db.scalar(select(column).where(func.lower(column) == namespace.lower()).limit(1))
        if found is not None:
            return found
    return None


def issue_token(db: Session, namespace: str, label: str = "") -> str:
    """Create a token that may write to ``namespace``; the clear text is returned once and never stored. A second
    spelling of a namespace is refused: namespaces ignore case, so it would write to the first one's repos."""
    check_namespace(namespace)
    spelled = namespace_spelling(db, namespace)
    if spelled is not None and spelled != namespace:
        raise StoreError(f"namespace {namespace!r} is spelled {spelled!r} on this registry (namespaces ignore "
                         f"letter case); use --namespace {spelled}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    db.add(Token(namespace=namespace, token_hash=hash_token(token), label=label))
    db.commit()
    return token


def create_token(database_url: str, namespace: str, label: str = "", init: bool = True) -> str:
    """Open the registry database at ``database_url`` and issue a token for ``namespace``.

    ``init=False``: the database must already be a registry (see ``init_db``).
    """
    try:
        check_namespace(namespace)
    except HubError as exc:
        raise StoreError(exc.message) from exc
    factory = init_db(database_url, create=init)
    with factory() as db:
        return issue_token(db, namespace, label)


def list_tokens(database_url: str, namespace: str | None = None) -> list[dict]:
    """The tokens of a registry (of one namespace): id, namespace, label and creation time, never the secret."""
    factory = init_db(database_url, create=False)
    with factory() as db:
        stmt = select(Token).where(Token.id.not_in(select(RevokedToken.token_id))).order_by(Token.id)
        if namespace is not None:
            stmt = stmt.where(func.lower(Token.namespace) == namespace.lower())
        return [{"id": t.id, "namespace": t.namespace, "label": t.label,
                 "created": t.created_at.isoformat(timespec="seconds")} for t in db.scalars(stmt)]


def revoke_token(database_url: str, token_id: int) -> dict:
    """Revoke token ``token_id`` (as ``list_tokens`` numbers them): requests bearing it, and the upload URLs it was
    given, are refused from now on with a 401 that says it was revoked."""
    factory = init_db(database_url, create=False)
    with factory() as db:
        row = db.get(Token, token_id)
        revoked = db.get(RevokedToken, token_id) if row is not None else None
        if row is None or revoked is not None:
            active = select(Token.id).where(Token.id.not_in(select(RevokedToken.token_id))).order_by(Token.id)
            known = ", ".join(str(t) for t in db.scalars(active)) or "none"
            when = f" (it was revoked at {revoked.revoked_at.isoformat(timespec='seconds')})" if revoked else ""
            raise StoreError(f"no token with id {token_id} in the registry{when}; active ids: {known}")
        db.add(RevokedToken(token_id=row.id))
        db.commit()
        return {"id": row.id, "namespace": row.namespace, "label": row.label}


def revoked_message(token_id: int) -> str:
    """The 401 message for a revoked token (or an upload URL it was given)."""
    return (f"this token (id {token_id}) was revoked by the registry operator; ask them for a new one "
            f"(`expertmix token create`)")


def is_revoked(db: Session, token_id: int | None) -> bool:
    """Whether token ``token_id`` was revoked (None: no token, never revoked)."""
    return token_id is not None and db.get(RevokedToken, token_id) is not None


def principal_for(db: Session, authorization: str | None) -> Principal | None:
    """The principal named by an ``Authorization: Bearer TOKEN`` header; None without one, 401 if unknown."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HubError(401, "Invalid credentials in Authorization header")
    row = db.scalar(select(Token).where(Token.token_hash == hash_token(token.strip())))
    if row is None:
        raise HubError(401, "Invalid credentials in Authorization header")
    if is_revoked(db, row.id):
        raise HubError(401, revoked_message(row.id))
    return Principal(namespace=row.namespace, label=row.label, token_id=row.id)


def require_writer(principal: Principal | None, namespace: str) -> Principal:
    """401 without a token, 403 with a token for another namespace (in any letter case it is the same one)."""
    if principal is None:
        raise HubError(401, f"writing to namespace {namespace!r} needs a token: create one with "
                            f"`expertmix token create --namespace {namespace}` and pass it as a Bearer token")
    if not same_namespace(principal.namespace, namespace):
        raise HubError(403, f"this token writes to namespace {principal.namespace!r}, not {namespace!r}")
    return principal


def can_read(principal: Principal | None, namespace: str, private: bool) -> bool:
    """Public repos are readable by all; private ones only with a token for their namespace."""
    return not private or (principal is not None and same_namespace(principal.namespace, namespace))
