"""An expert repo on disk: its files, its domain embedding, and the checks made before it is shared."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StoreError
from ..fsutil import atomic_path
from .card import CARD_FILE, EMBEDDING_FILE, ExpertCard, read_card
from .content import check_folder_file

if TYPE_CHECKING:  # torch is imported where it is used: the registry server starts without it
    import torch

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
# Weights travel as safetensors only: pickled formats can run code when loaded.
FORBIDDEN_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}


TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Refs resolve before commit ids, so a tag or branch named like a commit id (or a 7+ digit prefix of one) would
# hide the revision it names: such names are refused. Commit ids are lowercase hex, here and on a registry server
# (which imports this), and refs are matched by exact case, so an uppercase name such as "CAFE123" hides none.
COMMIT_LIKE_RE = re.compile(r"^[0-9a-f]{7,}$")


def is_tag(tag: str) -> bool:
    """A well-formed tag (or branch) name: one path component, no '..', not a git lock name."""
    return bool(TAG_RE.match(tag)) and ".." not in tag and not tag.endswith((".", ".lock"))


def validate_tag(tag: str) -> str:
    """A tag a user chose: refused before anything is published, naming what a tag may hold."""
    if not is_tag(tag) or tag == "main":
        raise StoreError(f"invalid tag {tag!r}: use letters, digits, '.', '_' and '-' (no '/'), and not 'main'")
    if COMMIT_LIKE_RE.match(tag):
        raise StoreError(f"invalid tag {tag!r}: it looks like a revision id (7 or more lowercase hex digits, or a "
                         f"prefix of one), which it would hide; choose a name with a letter beyond a-f, e.g. v1")
    return tag


def validate_name(name: str) -> str:
    """An expert name is ``NAME`` or ``ORG/NAME`` of letters, digits, '.', '_' and '-'."""
    if not NAME_RE.match(name) or ".." in name or name.endswith((".", ".git")):
        raise StoreError(f"invalid expert name {name!r}: use NAME or ORG/NAME with letters, digits, '.', '_', '-'")
    return name


# Namespaces the registry's URLs use (/api/..., /models/...): no repo can live under them.
RESERVED_NAMESPACES = {"api", "datasets", "spaces", "kernels", "buckets", "models", "new", "settings"}


def validate_publish_name(name: str) -> str:
    """A name to publish under: valid, and not in a reserved namespace, so an expert of the local store can move
    to a registry server under the same name."""
    validate_name(name)
    org = name.split("/")[0] if "/" in name else None
    if org is not None and org.lower() in RESERVED_NAMESPACES:
        raise StoreError(f"invalid expert name {name!r}: namespace {org!r} is reserved by the registry "
                         f"({', '.join(sorted(RESERVED_NAMESPACES))})")
    return name


def save_domain_embedding(folder: str | Path, embedding: torch.Tensor, model: str, documents: int) -> Path:
    """Write ``domain_embedding.safetensors`` (one float32 vector, embedder id in the metadata)."""
    from safetensors.torch import save_file

    path = Path(folder) / EMBEDDING_FILE
    with atomic_path(path, ".safetensors") as tmp:
        save_file({"embedding": embedding.detach().float().cpu().contiguous().reshape(-1)}, str(tmp),
                  metadata={"model": model, "documents": str(documents), "format": "expertmix-domain-embedding"})
    return path


def load_domain_embedding(folder: str | Path) -> torch.Tensor:
    """Read an expert's domain embedding vector."""
    from safetensors import safe_open

    path = Path(folder) / EMBEDDING_FILE
    if not path.is_file():
        raise StoreError(f"{folder}: no {EMBEDDING_FILE}")
    with safe_open(path, framework="pt") as f:
        if "embedding" not in f.keys():
            raise StoreError(f"{path}: no tensor named 'embedding'")
        return f.get_tensor("embedding")


@dataclass(frozen=True)
class ExpertFolder:
    """A validated expert repo folder."""

    path: Path
    card: ExpertCard

    @property
    def files(self) -> list[Path]:
        return sorted(p for p in self.path.rglob("*") if p.is_file() and not _hidden(p.relative_to(self.path)))


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def validate_expert_folder(folder: str | Path) -> ExpertFolder:
    """Check a folder is a complete expert repo (card, weights, embedding) whose files hold no pickle, before it is
    shared."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StoreError(f"{folder}: not a folder")
    if (folder / "mix.json").is_file():  # the assembler's output; the literal keeps hub below assembler
        raise StoreError(f"{folder}: a mix (mix.json), not an expert; the registry holds experts, the folders "
                         f"`expertmix train` and `expertmix federate` write. Share a Nexus mix as a standard "
                         f"checkpoint: `expertmix export {folder} --format qwen2-moe --out DIR`, then upload DIR with "
                         f"any Hub client")
    card = read_card(folder)
    info = card.expert
    shared = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    for p in shared:
        if p.suffix.lower() in FORBIDDEN_SUFFIXES:
            raise StoreError(f"{p}: pickled weight files are refused; weights must be safetensors")
    for p in shared:  # a pickle under any name (compressed, in a zip, an .npy of objects), broken safetensors
        check_folder_file(p)
    if info.kind == "dense":
        needed = ["config.json"]
        if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
            raise StoreError(f"{folder}: dense expert has no model.safetensors")
    else:
        needed = ["adapter_config.json", "adapter_model.safetensors"]
    for name in needed + [CARD_FILE, EMBEDDING_FILE]:
        if not (folder / name).is_file():
            raise StoreError(f"{folder}: {info.kind} expert is missing {name}")
    import torch

    emb = load_domain_embedding(folder)
    if emb.numel() != info.embedding.dim:
        raise StoreError(f"{folder / EMBEDDING_FILE}: embedding has {emb.numel()} values but the card's "
                         f"field 'expert.embedding.dim' says {info.embedding.dim}")
    if not torch.isfinite(emb).all():
        raise StoreError(f"{folder / EMBEDDING_FILE}: embedding holds NaN or infinite values")
    return ExpertFolder(folder, card)
