"""FastAPI dependencies: the database session, blob storage, settings and the request's principal."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from .auth import Principal, principal_for
from .settings import RegistrySettings
from .storage import BlobStorage


@dataclass
class RegistryState:
    """What the app factory builds once and every request shares."""

    settings: RegistrySettings
    sessions: sessionmaker[Session]
    storage: BlobStorage
    verified: set[str] = field(default_factory=set)  # blob versions whose bytes were hashed since start


def get_state(request: Request) -> RegistryState:
    return request.app.state.registry


State = Annotated[RegistryState, Depends(get_state)]


def get_settings(state: State) -> RegistrySettings:
    return state.settings


def get_storage(state: State) -> BlobStorage:
    return state.storage


def get_db(state: State) -> Iterator[Session]:
    with state.sessions() as db:
        yield db


Settings = Annotated[RegistrySettings, Depends(get_settings)]
Storage = Annotated[BlobStorage, Depends(get_storage)]
DbSession = Annotated[Session, Depends(get_db)]


def get_principal(request: Request, db: DbSession) -> Principal | None:
    return principal_for(db, request.headers.get("authorization"))


CurrentPrincipal = Annotated[Principal | None, Depends(get_principal)]


def get_base_url(request: Request, settings: Settings) -> str:
    """The URL clients reach this server at, for links handed out in responses."""
    return (settings.public_url or str(request.base_url)).rstrip("/")


BaseUrl = Annotated[str, Depends(get_base_url)]
