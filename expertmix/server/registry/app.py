"""The registry application: ``create_app(settings)`` wires storage, database and routers."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ... import __version__
from ...errors import ExpertmixError
from .db import init_db
from .deps import RegistryState
from .errors import (
    DB_UNAVAILABLE,
    HubError,
    database_error_handler,
    database_unavailable,
    expertmix_error_handler,
    http_error_handler,
    hub_error_handler,
    validation_error_handler,
)
from .limits import BodyLimitMiddleware
from .refpaths import FullRefMiddleware
from .routers import experts, files, repos, upload
from .settings import RegistrySettings
from .storage import open_storage

log = logging.getLogger("expertmix.registry")


def create_app(settings: RegistrySettings | None = None) -> FastAPI:
    """A FastAPI app serving the Hub protocol subset and the expert endpoints for ``settings``."""
    settings = settings or RegistrySettings.from_env()
    sessions = init_db(settings.database_url)
    storage = open_storage(settings.blobs_url)
    storage.check_writable()
    swept = storage.sweep()
    if swept:
        log.info("removed %d staging files left by killed uploads", swept)
    state = RegistryState(settings=settings, sessions=sessions, storage=storage)
    app = FastAPI(title="expertmix registry", version=__version__,
                  description="An expert registry that speaks the Hugging Face Hub protocol.")
    app.state.registry = state
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(FullRefMiddleware)  # outermost: the body limit sees the rewritten path
    app.add_exception_handler(HubError, hub_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(ExpertmixError, expertmix_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    for db_error in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(db_error, database_error_handler)

    def ping_database() -> None:
        with state.sessions() as db:
            db.execute(select(1))

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 when the database answers, 503 when it does not (so a load balancer takes this server out)."""
        try:
            await run_in_threadpool(ping_database)
        except (OperationalError, InterfaceError, PoolTimeoutError) as exc:
            return database_unavailable(exc, extra={"status": DB_UNAVAILABLE, "version": __version__,
                                                    "blobs": storage.describe()})
        return JSONResponse({"status": "ok", "version": __version__, "blobs": storage.describe()})

    # Order matters: the /api routes come before the catch-all /{namespace}/{name}/... routes.
    app.include_router(repos.router)
    app.include_router(upload.router)
    app.include_router(experts.router)
    app.include_router(files.router)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory``: settings from ``EXPERTMIX_REGISTRY_*`` variables."""
    return create_app(RegistrySettings.from_env())


def serve(settings: RegistrySettings, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the registry with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
