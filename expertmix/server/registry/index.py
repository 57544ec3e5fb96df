"""The expert index: a commit whose README.md has an ``expert:`` block is checked and indexed for search."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import yaml
from huggingface_hub import ModelCard
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors_bytes

from ...errors import CardError
from ...hub.card import CARD_FILE, EMBEDDING_FILE, ExpertCard, parse_card
from .errors import HubError
from .models import ExpertLanguage, ExpertRecord

MAX_CARD_BYTES = 1 << 20
MAX_EMBEDDING_BYTES = 16 << 20


@dataclass(frozen=True)
class TreeFile:
    """One file of a commit's tree while it is being built."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool


def card_front_matter(text: str, source: str) -> dict:
    """The README's front matter as a dict ({} when there is none); 400 when it is not YAML."""
    try:
        return ModelCard(text, ignore_metadata_errors=False).data.to_dict()
    except (ValueError, yaml.YAMLError) as exc:  # yaml's scanner/constructor errors are not ValueErrors
        raise HubError(400, f"{source}: front matter is not valid YAML: {exc}") from exc


def parse_expert_card(text: str, source: str) -> ExpertCard | None:
    """The expert card in a README; None without an ``expert:`` block; 400 if the block is bad."""
    if "expert" not in card_front_matter(text, source):
        return None
    try:
        return parse_card(text, source)
    except CardError as exc:
        raise HubError(400, str(exc)) from exc


def _embedding(read: Callable[[str], bytes], f: TreeFile, source: str) -> np.ndarray:
    if f.size > MAX_EMBEDDING_BYTES:
        raise HubError(400, f"{source}: {f.size} bytes is too large for a domain embedding")
    try:
        tensors = load_safetensors_bytes(read(f.sha256))
    except (SafetensorError, ValueError) as exc:
        raise HubError(400, f"{source}: not a readable safetensors file ({exc})") from exc
    if "embedding" not in tensors:
        raise HubError(400, f"{source}: no tensor named 'embedding'")
    return np.asarray(tensors["embedding"], dtype=np.float32).reshape(-1)


def build_expert_record(repo_id: str, tree: dict[str, TreeFile],
                        read: Callable[[str], bytes]) -> ExpertRecord | None:
    """Check an expert commit is complete (like ``validate_expert_folder``) and make its index row."""
    readme = tree.get(CARD_FILE)
    if readme is None:
        return None
    source = f"{repo_id}/{CARD_FILE}"
    if readme.size > MAX_CARD_BYTES:
        raise HubError(400, f"{source}: {readme.size} bytes is too large for a model card")
    try:
        text = read(readme.sha256).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HubError(400, f"{source}: not UTF-8 text") from exc
    card = parse_expert_card(text, source)
    if card is None:
        return None
    info = card.expert
    if info.kind == "dense":
        needed = ["config.json"]
        if "model.safetensors" not in tree and "model.safetensors.index.json" not in tree:
            raise HubError(400, f"{repo_id}: dense expert has no model.safetensors")
    else:
        needed = ["adapter_config.json", "adapter_model.safetensors"]
    for name in needed + [EMBEDDING_FILE]:
        if name not in tree:
            raise HubError(400, f"{repo_id}: {info.kind} expert is missing {name}")
    emb = _embedding(read, tree[EMBEDDING_FILE], f"{repo_id}/{EMBEDDING_FILE}")
    if emb.size != info.embedding.dim:
        raise HubError(400, f"{repo_id}/{EMBEDDING_FILE}: embedding has {emb.size} values but the card's "
                            f"field 'expert.embedding.dim' says {info.embedding.dim}")
    if not np.isfinite(emb).all():
        raise HubError(400, f"{repo_id}/{EMBEDDING_FILE}: embedding holds NaN or infinite values")
    record = ExpertRecord(name=info.name, domain=info.domain, kind=info.kind,
                          base_fingerprint=info.base_fingerprint, architecture=info.architecture,
                          base_model=info.base_model, embedding_model=info.embedding.model,
                          embedding_dim=int(emb.size), embedding=emb.astype("<f4").tobytes(),
                          card_json=json.dumps(card.model_dump(mode="json")))
    record.languages = [ExpertLanguage(language=lang) for lang in sorted(set(info.languages))]
    return record


def record_embedding(record: ExpertRecord) -> np.ndarray:
    return np.frombuffer(record.embedding, dtype="<f4")
