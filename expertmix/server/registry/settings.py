"""Configuration of the expert registry service: where metadata and blobs live, and upload limits."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationError, field_validator

from ...errors import ExpertmixError
from ...hub.store import expertmix_home

ENV_PREFIX = "EXPERTMIX_REGISTRY_"


def default_root() -> Path:
    """The embedded default's folder: ``$EXPERTMIX_HOME/registry``."""
    return expertmix_home() / "registry"


class RegistrySettings(BaseModel):
    """Everything ``expertmix serve`` can be told; every field also reads ``EXPERTMIX_REGISTRY_<FIELD>``."""

    database_url: str = Field(default_factory=lambda: f"sqlite:///{default_root() / 'registry.db'}",
                              description="SQLAlchemy URL: sqlite:///PATH (default) or postgresql+psycopg://...")
    blobs_url: str = Field(default_factory=lambda: str(default_root() / "blobs"),
                           description="a folder (content-addressed blobs on disk) or any fsspec URL")
    max_upload_bytes: int = Field(default=20 << 30, gt=0, description="largest file accepted in one upload")
    max_commit_bytes: int = Field(default=2 << 30, gt=0,
                                  description="largest commit payload (inline small files travel in it); it is "
                                              "spooled to disk, never held in memory whole")
    max_commit_line_bytes: int = Field(default=64 << 20, gt=0,
                                       description="largest line of a commit payload (one inline file, base64)")
    inline_max_bytes: int = Field(default=1 << 20, ge=0,
                                  description="text files up to this size travel inline in the commit; "
                                              "larger or binary files go through the LFS upload")
    upload_ttl_s: int = Field(default=3600, gt=0, description="how long an LFS upload URL stays valid")
    tree_page_size: int = Field(default=1000, gt=0, description="entries per page of /tree listings")
    verify_downloads: bool = Field(default=True,
                                   description="hash whole-file downloads; cut them short on a mismatch")
    public_url: str | None = Field(default=None,
                                   description="URL clients reach the server at (default: the request's)")

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        """Links handed to clients must be ones they can follow: an http(s) URL with a host."""
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host "
                             f"(e.g. https://registry.example.org)")
        return value.rstrip("/")

    @classmethod
    def from_env(cls, **overrides) -> RegistrySettings:
        """Settings from ``EXPERTMIX_REGISTRY_*`` variables, then ``overrides`` (None values are ignored)."""
        values: dict = {}
        for name in cls.model_fields:
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ExpertmixError(f"registry settings: {bad}") from exc
