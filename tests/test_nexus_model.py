"""The Nexus MoE model on tiny random Llama, Qwen2 and Cohere seeds: structure, equivalences, save/load, generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from nexus_helpers import make_expert
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from expertmix.assembler.modeling_nexus import NexusForCausalLM
from expertmix.assembler.upcycling import load_expert, upcycle
from expertmix.experts.seed import build_seed

SEEDS = ["llama_seed", "qwen2_seed"]


def _ids(vocab: int, shape=(2, 12), seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _dense_with_summed_ffn(seed_dir: Path, expert_dir: Path, out: Path) -> Path:
    """A plain model of the seed's class whose FFN is seed FFN + expert FFN (one FFN of width 2I)."""
    config = AutoConfig.from_pretrained(seed_dir)
    inter = config.intermediate_size
    config.intermediate_size = 2 * inter
    model = AutoModelForCausalLM.from_config(config)
    seed_w, exp_w = load_file(str(seed_dir / "model.safetensors")), load_file(str(expert_dir / "model.safetensors"))
    state = {}
    for k, v in exp_w.items():
        if ".mlp.down_proj." in k:
            state[k] = torch.cat([seed_w[k], v], dim=1)
        elif ".mlp." in k:
            state[k] = torch.cat([seed_w[k], v], dim=0)
        else:
            state[k] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    model.tie_weights()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def identical_mixes(tmp_path_factory, request) -> dict[str, tuple[Path, Path]]:
    """Per architecture: a Nexus mix of three identical experts and the dense seed+expert reference."""
    out = {}
    for arch in SEEDS:
        seed_dir = request.getfixturevalue(arch)
        root = tmp_path_factory.mktemp(f"identical-{arch}")
        first = make_expert(seed_dir, root / "e0", "e0", seed=1, ffn_scale=0.2)
        experts = [first] + [make_expert(seed_dir, root / f"e{i}", f"e{i}", seed=10 + i, same_as=first)
                             for i in (1, 2)]
        mix = upcycle(seed_dir, [load_expert(str(e)) for e in experts], root / "mix", progress=False)
        out[arch] = (mix, _dense_with_summed_ffn(seed_dir, first, root / "dense"))
    return out


@pytest.mark.parametrize("arch", SEEDS)
def test_identical_experts_forced_to_any_expert_reproduce_seed_plus_expert_ffn(identical_mixes, arch):
    mix_dir, dense_dir = identical_mixes[arch]
    mix = AutoModelForCausalLM.from_pretrained(mix_dir).eval()
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    assert isinstance(mix, NexusForCausalLM) and mix.config.num_experts == 3
    ids = _ids(mix.config.text_config.vocab_size)
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        for k in range(3):
            with mix.route_to(k):
                got = mix(input_ids=ids).logits
            assert (got - want).abs().max() < 1e-4, f"expert {k}"
        # Routed normally the gate is a probability < 1, so the mix differs from the gated-1 sum.
        assert (mix(input_ids=ids).logits - want).abs().max() > 1e-3


@pytest.mark.parametrize("arch", SEEDS)
def test_save_load_round_trip_keeps_logits_and_config(identical_mixes, arch, tmp_path):
    mix = AutoModelForCausalLM.from_pretrained(identical_mixes[arch][0]).eval()
    with torch.no_grad():
        for b in mix.moe_blocks():  # make the router matter
            b.router.up_proj.weight.normal_(std=0.5)
    mix.save_pretrained(tmp_path / "saved")
    again, info = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    def cfg(m):
        return {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}

    assert cfg(again) == cfg(mix)
    ids = _ids(mix.config.text_config.vocab_size)
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids).logits, mix(input_ids=ids).logits)


def test_forward_returns_router_probabilities_and_adds_aux_loss(identical_mixes):
    mix = AutoModelForCausalLM.from_pretrained(identical_mixes["llama_seed"][0])
    ids = _ids(mix.config.text_config.vocab_size)
    out = mix(input_ids=ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == mix.config.text_config.num_hidden_layers
    assert out.router_logits[0].shape == (ids.numel(), 3)
    assert torch.allclose(torch.softmax(out.router_logits[0], -1).sum(-1), torch.ones(ids.numel()))
    lm_only = mix.language_model(input_ids=ids, labels=ids).loss
    assert torch.allclose(out.loss, lm_only + 0.05 * out.aux_loss)
    out.loss.backward()
    assert mix.moe_blocks()[0].router.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", SEEDS)
def test_generate_with_cache_equals_generate_without(identical_mixes, arch):
    mix = AutoModelForCausalLM.from_pretrained(identical_mixes[arch][0]).eval()
    with torch.no_grad():
        for b in mix.moe_blocks():
            b.router.up_proj.weight.normal_(std=0.5)
    ids = _ids(mix.config.text_config.vocab_size, (2, 6), seed=3)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = mix.generate(ids, use_cache=True, **kw)
    without = mix.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (2, 14)
    assert torch.equal(with_cache, without)


def test_cohere_seed_upcycles_and_generates(tmp_path, tokenizer):
    seed_dir = build_seed(tmp_path / "cohere", tokenizer, arch="cohere")
    experts = [load_expert(str(make_expert(seed_dir, tmp_path / f"e{i}", f"e{i}", seed=i))) for i in range(2)]
    mix = AutoModelForCausalLM.from_pretrained(upcycle(seed_dir, experts, tmp_path / "mix", progress=False))
    assert mix.language_model.config.model_type == "cohere"
    ids = _ids(mix.config.text_config.vocab_size, (1, 5))
    out = mix.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
