"""Shared fixtures: tiny random seeds of real architectures and small domain corpora the tests write."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from expertmix.experts.seed import build_seed, train_tokenizer

torch.set_num_threads(1)

WORDS = {
    "math": lambda r: f"{r.randint(0, 99)} + {r.randint(0, 99)} = {r.randint(0, 198)}",
    "code": lambda r: f"def f{r.randint(0, 9)}(x):\n    return x * {r.randint(0, 9)} + {r.randint(0, 9)}",
    "prose": lambda r: " ".join(r.choice(["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "home"])
                                for _ in range(12)),
}


def make_docs(domain: str, n: int, seed: int = 0) -> list[str]:
    r = random.Random(f"{domain}-{seed}")
    return ["\n".join(WORDS[domain](r) for _ in range(r.randint(2, 6))) for _ in range(n)]


def write_jsonl(path: Path, texts: list[str], **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, **extra}) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Three small domains as JSONL files: ``{domain: path}``."""
    root = tmp_path_factory.mktemp("corpus")
    return {d: write_jsonl(root / f"{d}.jsonl", make_docs(d, 60), domain=d) for d in WORDS}


@pytest.fixture(scope="session")
def tokenizer(corpus):
    texts = [json.loads(line)["text"] for p in corpus.values() for line in p.read_text().splitlines()]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def llama_seed(tmp_path_factory, tokenizer) -> Path:
    return build_seed(tmp_path_factory.mktemp("seeds") / "llama", tokenizer, arch="llama")


@pytest.fixture(scope="session")
def qwen2_seed(tmp_path_factory, tokenizer) -> Path:
    return build_seed(tmp_path_factory.mktemp("seeds") / "qwen2", tokenizer, arch="qwen2")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty EXPERTMIX_HOME for the test (the local store lives under it)."""
    h = tmp_path / "home"
    monkeypatch.setenv("EXPERTMIX_HOME", str(h))
    monkeypatch.delenv("EXPERTMIX_REGISTRY", raising=False)
    return h
