"""Database engine and sessions for the registry: SQLite by default, PostgreSQL (psycopg) in production."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.request import pathname2url

from sqlalchemy import Column, Integer, create_engine, event, func, inspect, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateIndex

from ...errors import StoreError
from .models import Base, Repo


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


def _sqlite_tables(path: Path) -> set[str]:
    """The tables of a SQLite file, read without writing to it (the engine's WAL pragma would convert it)."""
    try:
        with closing(sqlite3.connect(f"file:{pathname2url(str(path.resolve()))}?mode=ro", uri=True)) as con:
            return {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"the database {path} is not an expertmix registry ({exc}): check --database") from exc


# The tables every registry has had: a database with them is a registry, and tables and indexes added by later
# versions are created on open. Without them it is some other database (a mistyped URL).
CORE_TABLES = {"blobs", "commit_files", "commits", "refs", "repos", "tokens"}


def _require_registry(tables: set[str], where: str) -> None:
    missing = sorted(CORE_TABLES - tables)
    if missing:
        raise StoreError(f"the database {where} is not an expertmix registry (no {', '.join(missing)} tables): check "
                         f"--database (--init makes it a new registry)")


# Columns added to existing tables by later versions: (table, column); each is nullable, so adding it is safe.
ADDED_COLUMNS = [("upload_grants", Column("token_id", Integer, nullable=True))]


def _add_missing_columns(engine: Engine) -> None:
    """Add the nullable columns later versions gave existing tables (ALTER TABLE ADD COLUMN: SQLite and PostgreSQL)."""
    inspector = inspect(engine)
    for table, column in ADDED_COLUMNS:
        if column.name in {c["name"] for c in inspector.get_columns(table)}:
            continue
        kind = column.type.compile(dialect=engine.dialect)
        prep = engine.dialect.identifier_preparer
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {prep.quote(table)} ADD COLUMN {prep.quote(column.name)} {kind}"))


def _refuse_case_duplicates(engine: Engine) -> None:
    """Repo ids are case-insensitive: a registry made before that with repos differing only in case is named, so
    the operator can rename one, rather than failing on the unique index with a database message."""
    lower_ns, lower_name = func.lower(Repo.namespace), func.lower(Repo.name)
    stmt = (select(lower_ns, lower_name).group_by(lower_ns, lower_name).having(func.count() > 1))
    with engine.connect() as conn:
        clashes = conn.execute(stmt).all()
        if not clashes:
            return
        names = [f"{r.namespace}/{r.name}" for r in conn.execute(
            select(Repo.namespace, Repo.name).where(func.lower(Repo.namespace) == clashes[0][0],
                                                    func.lower(Repo.name) == clashes[0][1]))]
    raise StoreError(f"the registry database holds repos whose ids differ only in case ({', '.join(names)}); "
                     f"repo ids are case-insensitive: delete or rename all but one")


def init_db(url: str, create: bool = True) -> sessionmaker[Session]:
    """Create the tables if missing and return a session factory.

    ``create=False`` opens an existing registry only: a database without the registry's tables (a mistyped
    SQLite path, the wrong PostgreSQL database) is refused rather than made into a new, empty registry.
    """
    sqlite_file = _sqlite_file(url)
    if not create and sqlite_file is not None:
        if not sqlite_file.is_file():
            raise StoreError(f"no registry database at {sqlite_file}: check --database (`expertmix serve` creates the "
                             f"database on its first start; --init creates a new one here)")
        _require_registry(_sqlite_tables(sqlite_file), str(sqlite_file))  # read-only: a refused file stays as it was
    engine = make_engine(url)
    try:
        if not create and sqlite_file is None:
            _require_registry(set(inspect(engine).get_table_names()), engine.url.render_as_string(hide_password=True))
        Base.metadata.create_all(engine)
        _add_missing_columns(engine)
        _refuse_case_duplicates(engine)
        # Indexes added since a table was made; IF NOT EXISTS (SQLite and PostgreSQL) because reflection does not
        # see expression indexes such as the case-insensitive repo id.
        with engine.begin() as conn:
            for table in Base.metadata.sorted_tables:
                for index in table.indexes:
                    conn.execute(CreateIndex(index, if_not_exists=True))
    except DBAPIError as exc:  # unreachable server, wrong password, unwritable file: one line, password hidden
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise StoreError(f"cannot open the registry database {engine.url.render_as_string(hide_password=True)}: "
                         f"{reason}") from exc
    return sessionmaker(engine, expire_on_commit=False)
