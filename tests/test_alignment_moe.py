"""Alignment of a custom MoE class (like the Nexus mix): its router loss, a frozen router, mix.json kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from nexus_helpers import make_expert
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from expertmix.alignment.align import AlignConfig, align
from expertmix.alignment.dpo import dpo_step
from expertmix.alignment.policy import load_policy, load_reference
from expertmix.alignment.preferences import PreferencePair, PromptRecord, write_prompts
from expertmix.alignment.rloo import rloo_step
from expertmix.assembler.modeling_nexus import NexusForCausalLM
from expertmix.assembler.upcycling import load_expert, upcycle
from expertmix.cli import main
from expertmix.errors import ExpertmixError


class ToyMixConfig(PretrainedConfig):
    model_type = "expertmix_toy_mix"

    def __init__(self, vocab_size=300, hidden_size=32, num_experts=3, router_aux_loss_coef=0.05, **kwargs):
        self.vocab_size, self.hidden_size, self.num_experts = vocab_size, hidden_size, num_experts
        self.router_aux_loss_coef = router_aux_loss_coef
        self.use_cache = False
        super().__init__(**kwargs)


class ToyMixForCausalLM(PreTrainedModel, GenerationMixin):
    """Shared path plus top-1 routed experts; its own forward computes a Switch-style aux loss (no labels)."""

    config_class = ToyMixConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(config.hidden_size, config.hidden_size)
                                     for _ in range(config.num_experts))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        h = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.size(1) + 1)[None, :, None]  # causal
        probs = self.router(h).softmax(-1)
        gate, idx = probs.max(-1)
        routed = torch.stack([e(h) for e in self.experts], -2)
        routed = routed.gather(-2, idx[..., None, None].expand(*idx.shape, 1, h.size(-1))).squeeze(-2)
        h = h + gate[..., None] * routed
        fraction = F.one_hot(idx, self.config.num_experts).float().flatten(0, 1).mean(0)
        aux = self.config.num_experts * (fraction * probs.flatten(0, 1).mean(0)).sum()
        return MoeCausalLMOutputWithPast(logits=self.lm_head(h), aux_loss=aux)


AutoConfig.register(ToyMixConfig.model_type, ToyMixConfig)
AutoModelForCausalLM.register(ToyMixConfig, ToyMixForCausalLM)


@pytest.fixture(scope="module")
def toy_mix(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("mix") / "toy"
    torch.manual_seed(0)
    ToyMixForCausalLM(ToyMixConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1,
                                   eos_token_id=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "mix.json").write_text(json.dumps({"experts": [{"repo": "org/math", "sha256": "ab" * 32}]}))
    return path


def _aux_of(model, tokenizer, prompt_completions):
    """The model's own aux loss on the packed rows that a step scores."""
    from expertmix.alignment.policy import pack_sequences

    ids, mask, _ = pack_sequences(*zip(*prompt_completions, strict=True), tokenizer.pad_token_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).aux_loss.item()


def test_dpo_adds_the_models_own_router_loss_to_the_policy_loss(toy_mix):
    policy, tok = load_policy(toy_mix)
    reference = load_reference(toy_mix)
    pairs = [PreferencePair("the cat", " sat", " 12"), PreferencePair("def f", " x", " far home")]
    plain, m0 = dpo_step(policy, reference, tok, pairs, beta=0.1, aux_loss_coef=0.0)
    with_aux, m1 = dpo_step(policy, reference, tok, pairs, beta=0.1, aux_loss_coef=0.5)
    eos = [tok.eos_token_id]
    rows = [(tok(p.prompt)["input_ids"], tok(getattr(p, side), add_special_tokens=False)["input_ids"] + eos)
            for side in ("chosen", "rejected") for p in pairs]
    aux = _aux_of(policy, tok, rows)
    assert m1["aux_loss"] == pytest.approx(aux) and aux > 0
    assert with_aux.item() == pytest.approx(plain.item() + 0.5 * aux, rel=1e-5)
    with_aux.backward()
    assert policy.router.weight.grad is not None and policy.router.weight.grad.abs().sum() > 0


def test_rloo_adds_the_models_own_router_loss_to_the_policy_loss(toy_mix):
    policy, tok = load_policy(toy_mix)
    reference = load_reference(toy_mix)

    def length(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    losses, metrics = [], []
    for coef in (0.0, 2.0):
        torch.manual_seed(3)  # the same samples both times
        loss, m = rloo_step(policy, reference, tok, ["the cat", "def f"], {}, length, k=3, beta=0.05,
                            max_new_tokens=5, aux_loss_coef=coef)
        losses.append(loss.item())
        metrics.append(m)
    assert metrics[0]["aux_loss"] == pytest.approx(metrics[1]["aux_loss"]) and metrics[1]["aux_loss"] > 0
    assert losses[1] == pytest.approx(losses[0] + 2.0 * metrics[1]["aux_loss"], rel=1e-5)


def _assert_mix_json_gained_the_align_stage(source: Path, out: Path, method: str) -> None:
    """The aligned mix's mix.json is its input's, with one more history entry: the alignment and its settings."""
    before, after = (json.loads((p / "mix.json").read_text()) for p in (source, out))
    stage = after["history"][-1]
    assert after["history"][:-1] == before.get("history", [])
    assert {k: v for k, v in after.items() if k != "history"} == {k: v for k, v in before.items() if k != "history"}
    assert stage["stage"] == "align" and stage["settings"]["method"] == method
    assert stage["summary"] == json.loads((out / "alignment.json").read_text())["summary"]


def test_aligning_a_mix_keeps_its_class_and_mix_json_and_can_freeze_the_router(toy_mix, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [PromptRecord("the cat", "en"), PromptRecord("def f", "py")])
    out = tmp_path / "aligned"
    s = align(AlignConfig(model=toy_mix, out=out, method="rloo", prompts=prompts, reward="script", k=2,
                          steps=3, batch_size=2, lr=1e-2, max_new_tokens=4, train_router=False,
                          progress=False), log=lambda m: None)
    assert s["router_frozen"] and s["aux_loss_coef"] == 0.05  # the config's own coefficient
    _assert_mix_json_gained_the_align_stage(toy_mix, out, "rloo")
    before = AutoModelForCausalLM.from_pretrained(toy_mix)
    after = AutoModelForCausalLM.from_pretrained(out)
    assert type(after) is ToyMixForCausalLM
    assert torch.equal(after.router.weight, before.router.weight)
    assert not torch.equal(after.experts[0].weight, before.experts[0].weight)
    log = [json.loads(line) for line in (out / "align_log.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in log)


def test_aligning_a_nexus_mix_keeps_it_a_loadable_mix(llama_seed, tmp_path):
    experts = [load_expert(str(make_expert(llama_seed, tmp_path / name, name, seed=i)))
               for i, name in enumerate(("math", "code"))]
    mix = upcycle(llama_seed, experts, tmp_path / "mix", progress=False)
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [PromptRecord("the cat", "en"), PromptRecord("def f", "py")])
    out = tmp_path / "aligned"
    align(AlignConfig(model=mix, out=out, method="rloo", prompts=prompts, reward="script", k=2, steps=2,
                      batch_size=2, lr=1e-2, max_new_tokens=4, train_router=False, progress=False),
          log=lambda m: None)
    _assert_mix_json_gained_the_align_stage(mix, out, "rloo")
    before, after = (AutoModelForCausalLM.from_pretrained(p) for p in (mix, out))
    assert type(after) is NexusForCausalLM
    routers = [n for n, _ in after.named_parameters() if ".router." in n]
    assert routers and all(torch.equal(after.get_parameter(n), before.get_parameter(n)) for n in routers)
    assert not torch.equal(after.get_input_embeddings().weight, before.get_input_embeddings().weight)
    log = [json.loads(line) for line in (out / "align_log.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in log)  # the mix's load-balancing loss is part of the policy loss


def test_freezing_the_router_of_a_dense_model_is_refused(llama_seed, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [PromptRecord("the cat", "en")])
    with pytest.raises(ExpertmixError, match="no router parameters"):
        align(AlignConfig(model=llama_seed, out=tmp_path / "o", method="rloo", prompts=prompts,
                          reward="script", steps=1, train_router=False, progress=False), log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_aux_loss_sets_the_load_balancing_coefficient_and_is_refused_for_a_dense_model(toy_mix, llama_seed,
                                                                                      tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [PromptRecord("the cat", "en"), PromptRecord("def f", "py")])
    args = ["--method", "rloo", "--prompts", str(prompts), "--reward", "script", "--k", "2", "--steps", "2",
            "--batch-size", "2", "--max-new-tokens", "4", "--lr", "1e-2"]
    out = tmp_path / "aligned"
    result = CliRunner().invoke(main, ["align", str(toy_mix), *args, "--aux-loss", "0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "alignment.json").read_text())
    assert record["settings"]["aux_loss_coef"] == 0.5 and record["summary"]["aux_loss_coef"] == 0.5  # not 0.05
    log = [json.loads(line) for line in (out / "align_log.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in log)
    dense = tmp_path / "dense"
    result = CliRunner().invoke(main, ["align", str(llama_seed), *args, "--aux-loss", "0.1", "--out", str(dense)])
    message = " ".join(result.output.split())
    assert result.exit_code == 1
    assert (f"--aux-loss 0.1: {llama_seed} is a dense LlamaForCausalLM with no router, so there is no load-balancing "
            f"loss to weigh; drop --aux-loss") in message, message
    assert not dense.exists() and not dense.with_name("dense.partial").exists()
