"""Fingerprints that tell whether two experts share a seed: base weights, architecture, tokenizer."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import StoreError


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files that hold a model folder's weights (single file or shards)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise StoreError(f"{model_dir}: no model.safetensors (or sharded index) to fingerprint")


def fingerprint_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of tensors given in name order."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_weights(model_dir: str | Path) -> str:
    """Fingerprint of a model folder's weights, streamed tensor by tensor from safetensors.

    Independent of sharding and file metadata: two folders with the same tensors agree.
    """
    files = weight_files(model_dir)
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                where[k] = f

    def stream() -> Iterable[tuple[str, torch.Tensor]]:
        for name in sorted(where):
            with safe_open(where[name], framework="pt") as sf:
                yield name, sf.get_tensor(name)

    return fingerprint_tensors(stream())


def fingerprint_tokenizer(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary (token → id), enough to refuse a mismatched expert."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def architecture_of(config) -> str:
    """A short architecture signature: model type and the shapes experts must share."""
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    dims = ",".join(f"{k}={getattr(config, k, None)}" for k in keys)
    return f"{config.model_type}({dims})"


def model_signature(model_dir: str | Path):
    """The signature (weights, architecture, tokenizer) of a seed folder, as expert cards record it."""
    from transformers import AutoConfig, AutoTokenizer

    from .card import BaseSignature

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise StoreError(f"{model_dir}: not a model folder (no config.json)")
    return BaseSignature(base_fingerprint=fingerprint_weights(model_dir),
                         architecture=architecture_of(AutoConfig.from_pretrained(model_dir)),
                         tokenizer_fingerprint=fingerprint_tokenizer(AutoTokenizer.from_pretrained(model_dir)))
