"""Database engine and sessions for the registry: SQLite by default, PostgreSQL (psycopg) in production."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from ...errors import StoreError
from .models import Base


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL mode and a busy timeout so threads can share it."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"database URL {url!r} is not a SQLAlchemy URL (e.g. sqlite:///PATH or "
                         f"postgresql+psycopg://USER:PASSWORD@HOST/DB)") from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # noqa: ANN001 - DB-API connection
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    try:
        return create_engine(parsed, pool_size=10, max_overflow=30, pool_pre_ping=True)
    except ImportError as exc:  # e.g. postgresql:// means psycopg2, which is not a dependency
        raise StoreError(f"database URL {parsed.render_as_string(hide_password=True)}: its driver is not installed "
                         f"({exc.name or exc}); for PostgreSQL use postgresql+psycopg://USER:PASSWORD@HOST/DB") from exc


def _sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def init_db(url: str, create: bool = True) -> sessionmaker[Session]:
    """Create the tables if missing and return a session factory.

    ``create=False`` opens an existing registry only: a database without the registry's tables (a mistyped
    SQLite path, the wrong PostgreSQL database) is refused rather than made into a new, empty registry.
    """
    sqlite_file = _sqlite_file(url)
    if not create and sqlite_file is not None and not sqlite_file.is_file():
        raise StoreError(f"no registry database at {sqlite_file}: check --database (`expertmix serve` creates the "
                         f"database on its first start; --init creates a new one here)")
    engine = make_engine(url)
    try:
        if not create:
            missing = sorted(set(Base.metadata.tables) - set(inspect(engine).get_table_names()))
            if missing:
                raise StoreError(f"the database {engine.url.render_as_string(hide_password=True)} is not an "
                                 f"expertmix registry (no {', '.join(missing)} tables): check --database "
                                 f"(--init makes it a new registry)")
        Base.metadata.create_all(engine)
    except DBAPIError as exc:  # unreachable server, wrong password, unwritable file: one line, password hidden
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise StoreError(f"cannot open the registry database {engine.url.render_as_string(hide_password=True)}: "
                         f"{reason}") from exc
    return sessionmaker(engine, expire_on_commit=False)
