"""SQLAlchemy 2 models of the registry's metadata: tokens, repos, commits, refs, blobs, the expert index."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Token(Base):
    """A write token for one namespace; only its sha256 is stored."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(96), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RevokedToken(Base):
    """A revoked token: its row in ``tokens`` stays (so its id is never reused) and requests bearing it get 401."""

    __tablename__ = "revoked_tokens"
    token_id: Mapped[int] = mapped_column(ForeignKey("tokens.id", ondelete="CASCADE"), primary_key=True)
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Repo(Base):
    __tablename__ = "repos"
    __table_args__ = (UniqueConstraint("namespace", "name", name="uq_repo_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(96))
    name: Mapped[str] = mapped_column(String(96))
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


class Commit(Base):
    """An immutable snapshot of a repo's whole file tree."""

    __tablename__ = "commits"
    oid: Mapped[str] = mapped_column(String(40), primary_key=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id", ondelete="CASCADE"), index=True)
    parent_oid: Mapped[str | None] = mapped_column(String(40), nullable=True)
    title: Mapped[str] = mapped_column(Text, default="")
    message: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(96), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    files: Mapped[list[CommitFile]] = relationship(back_populates="commit", cascade="all, delete-orphan",
                                                   order_by="CommitFile.path")


class CommitFile(Base):
    __tablename__ = "commit_files"
    __table_args__ = (UniqueConstraint("commit_oid", "path", name="uq_commit_path"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    commit_oid: Mapped[str] = mapped_column(ForeignKey("commits.oid", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1000))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    git_oid: Mapped[str] = mapped_column(String(40))
    lfs: Mapped[bool] = mapped_column(Boolean, default=False)
    commit: Mapped[Commit] = relationship(back_populates="files")


class Ref(Base):
    """A branch (moves with commits) or a tag (fixed) naming a commit."""

    __tablename__ = "refs"
    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # "branch" | "tag"
    commit_oid: Mapped[str] = mapped_column(String(40))


class Blob(Base):
    """A content-addressed blob that is in storage and was verified against its sha256."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BlobHolder(Base):
    """A namespace that uploaded a blob, so proved it holds the bytes: it may reference the blob in its commits
    even where no repo it can read holds it (another namespace's private repo, a deleted repo)."""

    __tablename__ = "blob_holders"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(96), primary_key=True)


class UploadGrant(Base):
    """A pre-signed LFS upload URL: the URL's secret (hashed here) allows one blob of one size."""

    __tablename__ = "upload_grants"
    grant_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(96))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    token_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the token that asked; revoking it ends this


class ExpertRecord(Base):
    """The expert card of one commit, indexed for search (one row per commit that holds an expert card)."""

    __tablename__ = "experts"
    commit_oid: Mapped[str] = mapped_column(ForeignKey("commits.oid", ondelete="CASCADE"), primary_key=True)
    repo_id: Mapped[int] = mapped_column(ForeignKey("repos.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    domain: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    base_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    architecture: Mapped[str] = mapped_column(String(400))
    base_model: Mapped[str] = mapped_column(String(400))
    embedding_model: Mapped[str] = mapped_column(String(400))
    embedding_dim: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian
    card_json: Mapped[str] = mapped_column(Text)
    languages: Mapped[list[ExpertLanguage]] = relationship(cascade="all, delete-orphan")


class ExpertLanguage(Base):
    __tablename__ = "expert_languages"
    commit_oid: Mapped[str] = mapped_column(ForeignKey("experts.commit_oid", ondelete="CASCADE"),
                                            primary_key=True)
    language: Mapped[str] = mapped_column(String(32), primary_key=True)


# Repo ids are case-insensitive, as on the Hub: Alice/Expert and alice/expert are one repo.
Index("uq_repos_lower_id", func.lower(Repo.namespace), func.lower(Repo.name), unique=True)
Index("ix_expert_languages_language", ExpertLanguage.language)
Index("ix_commit_files_sha256", CommitFile.sha256)
