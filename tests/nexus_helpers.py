"""Helpers for the Nexus tests: expert repos made by perturbing a tiny seed (no training needed), and a crash
in the middle of a mix's training stage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import expertmix.assembler.assemble as assemble_module
from expertmix.hub.card import DataInfo, EmbeddingInfo, ExpertCard, ExpertInfo
from expertmix.hub.fingerprint import architecture_of, fingerprint_tokenizer, fingerprint_weights
from expertmix.hub.repo import save_domain_embedding


def make_expert(seed_dir: Path, out: Path, name: str, seed: int, ffn_scale: float = 0.05,
                other_scale: float = 0.01, same_as: Path | None = None) -> Path:
    """An expert repo: the seed with noise on its FFN (and a little elsewhere), a card and an embedding.

    ``same_as`` copies another expert's weights exactly (identical experts).
    """
    model = AutoModelForCausalLM.from_pretrained(same_as or seed_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(seed_dir)
    gen = torch.Generator().manual_seed(seed)
    if same_as is None:
        with torch.no_grad():
            for pname, p in model.named_parameters():
                scale = ffn_scale if ".mlp." in pname else other_scale
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    dim = model.config.hidden_size
    embedding = torch.randn(dim, generator=gen)
    save_domain_embedding(out, embedding, "seed", 8)
    info = ExpertInfo(
        name=name, domain=name, languages=["en"], kind="dense", base_model=seed_dir.name,
        base_fingerprint=fingerprint_weights(seed_dir), architecture=architecture_of(model.config),
        tokenizer_fingerprint=fingerprint_tokenizer(tokenizer),
        embedding=EmbeddingInfo(model="seed", dim=dim, documents=8),
        data=DataInfo(documents=1, tokens=1))
    ExpertCard(expert=info).save(out)
    return out


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated crash after the step-2 checkpoint")


def crash_after_step_two_checkpoint(monkeypatch: pytest.MonkeyPatch, job: Callable[[], object]) -> None:
    """Run ``job`` (an assemble or extend) with its training stage killed at step 3, after checkpoint-2."""
    real_fit = assemble_module.fit
    monkeypatch.setattr(assemble_module, "fit", lambda *a, **k: real_fit(*a, **k, callbacks=[_Crash()]))
    with pytest.raises(KeyboardInterrupt):
        job()
    monkeypatch.setattr(assemble_module, "fit", real_fit)
