"""Lightweight mixtures (issue 6): MoV and MoLoRA layers, building from PEFT experts or fresh ones, training only
routers and experts, save/load, and the CLI path (train --peft, publish, assemble --kind, eval) on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from expertmix.assembler.lightweight import (
    MixtureSpec,
    as_seq2seq,
    build_mixture,
    fresh_expert_config,
    init_routers,
    load_base,
    load_expert_weights,
    load_lightweight,
    parameter_counts,
    read_lightweight_manifest,
    router_input_statistics,
)
from expertmix.assembler.mixture_layers import MoLoRALinear, MoVLinear, routed_layers
from expertmix.cli import main
from expertmix.errors import ExpertmixError, IncompatibleExpertError
from expertmix.experts.data import pack, read_documents, tokenize_documents
from expertmix.experts.training import TrainSettings, fit
from expertmix.hub.card import DataInfo, EmbeddingInfo, ExpertCard, ExpertInfo
from expertmix.hub.fingerprint import architecture_of, fingerprint_tokenizer, fingerprint_weights
from expertmix.hub.repo import save_domain_embedding

FAST = ["--seq-len", "32", "--batch-size", "4", "--save-steps", "1000"]


def run(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def t5_seed(tmp_path_factory, tokenizer) -> Path:
    """A tiny random T5 (encoder-decoder) with the shared test tokenizer."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=2, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    out = tmp_path_factory.mktemp("seeds") / "t5"
    T5ForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_peft_expert(seed_dir: Path, out: Path, name: str, kind: str, seed: int) -> Path:
    """A published-style PEFT expert repo with random (non-initial) adapter weights, a card and an embedding."""
    torch.manual_seed(seed)
    base = load_base(seed_dir)
    task = "SEQ_2_SEQ_LM" if base.config.is_encoder_decoder else "CAUSAL_LM"
    cfg = IA3Config(task_type=task) if kind == "ia3" else \
        LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "ia3_l" in pname:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif "lora_" in pname:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(seed_dir)
    tok.save_pretrained(out)
    dim = base.config.hidden_size
    save_domain_embedding(out, torch.randn(dim), "seed", 4)
    info = ExpertInfo(name=name, domain=name, kind=kind, base_model=seed_dir.name,
                      base_fingerprint=fingerprint_weights(seed_dir), architecture=architecture_of(base.config),
                      tokenizer_fingerprint=fingerprint_tokenizer(tok),
                      embedding=EmbeddingInfo(model="seed", dim=dim, documents=4), data=DataInfo(documents=1, tokens=1))
    ExpertCard(expert=info).save(out)
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 7, 12], [3, 44, 2, 8, 91, 10, 11, 4]])


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("kind", ["ia3", "lora"])
def test_one_expert_mixture_equals_the_plain_peft_adapter(kind, arch, request, tmp_path):
    """MoV with one expert is plain IA3; MoLoRA with one expert is plain LoRA (same outputs)."""
    seed = request.getfixturevalue(f"{arch}_seed")
    expert = make_peft_expert(seed, tmp_path / "e", "e", kind, seed=1)
    plain = PeftModel.from_pretrained(load_base(seed), expert).eval()
    mix = build_mixture(load_base(seed), [PeftConfig.from_pretrained(str(expert))])
    load_expert_weights(mix, [expert])
    layers = dict(routed_layers(mix))
    assert layers and all(isinstance(m, MoVLinear if kind == "ia3" else MoLoRALinear) for m in layers.values())
    base_out, want, got = logits(load_base(seed), IDS), logits(plain, IDS), logits(mix.eval(), IDS)
    assert not torch.allclose(want, base_out, atol=1e-4)  # the adapter does change the model
    if kind == "ia3":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with mix.disable_adapter():  # peft's own switch still reaches the routed layers
        assert torch.equal(logits(mix, IDS), base_out)


@pytest.mark.parametrize("top_k", [None, 2])
def test_soft_merging_matches_the_formula_on_hand_set_routers(llama_seed, top_k):
    torch.manual_seed(0)
    mov = build_mixture(load_base(llama_seed), [fresh_expert_config(MixtureSpec("mov"), load_base(llama_seed))] * 3,
                        top_k=top_k)
    molora = build_mixture(load_base(llama_seed),
                           [fresh_expert_config(MixtureSpec("molora", rank=2, alpha=6), load_base(llama_seed))] * 3,
                           top_k=top_k)

    def gates(x, router):
        s = torch.softmax(x @ router.T, dim=-1)
        if top_k is not None:
            top, idx = s.topk(top_k, dim=-1)
            s = torch.zeros_like(s).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        return s

    checked = set()
    with torch.no_grad():
        for model in (mov, molora):
            for name, layer in routed_layers(model):
                experts = layer.experts()
                router = torch.randn(3, layer.in_features)
                for e, row in zip(experts, router, strict=True):
                    layer.mix_router[e].copy_(row)
                x = torch.randn(2, 5, layer.in_features)
                s = gates(x, router)
                if isinstance(layer, MoVLinear):
                    vectors = torch.stack([torch.randn_like(layer.ia3_l[e]).flatten() + 1 for e in experts])
                    for e, v in zip(experts, vectors, strict=True):
                        layer.ia3_l[e].copy_(v.reshape(layer.ia3_l[e].shape))
                    merged = s @ vectors  # Σ_i s_i l_i per token
                    w = layer.base_layer.weight
                    want = (x * merged) @ w.T if layer.is_feedforward else (x @ w.T) * merged
                    checked.add("mov-ff" if layer.is_feedforward else "mov")
                else:
                    want = x @ layer.base_layer.weight.T
                    for i, e in enumerate(experts):
                        layer.lora_B[e].weight.copy_(torch.randn_like(layer.lora_B[e].weight))
                        a, b = layer.lora_A[e].weight, layer.lora_B[e].weight
                        want = want + s[..., i:i + 1] * (6 / 2) * (x @ a.T @ b.T)
                    checked.add("molora")
                torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5, msg=name)
    assert checked == {"mov", "mov-ff", "molora"}


@pytest.mark.parametrize("kind", ["mov", "molora"])
def test_training_moves_only_routers_and_experts_and_leaves_the_seed_bit_identical(kind, qwen2_seed, corpus,
                                                                                    tokenizer, tmp_path):
    torch.manual_seed(0)
    base = load_base(qwen2_seed)
    model = build_mixture(base, [fresh_expert_config(MixtureSpec(kind), base)] * 3)
    docs = tokenize_documents(read_documents(corpus["math"]) + read_documents(corpus["code"]), tokenizer)
    blocks = pack(docs, 32)
    means, samples = router_input_statistics(model, {"all": {k: v[:4] for k, v in blocks.items()}})
    init_routers(model, means, samples)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all((".mix_router." in n) or (".ia3_l." in n if kind == "mov" else ".lora_" in n)
                             for n in trainable)
    assert parameter_counts(model)["trainable"] == sum(before[n].numel() for n in trainable)
    fit(model.get_base_model(), blocks, None, TrainSettings(max_steps=4, batch_size=4, learning_rate=1e-2,
                                                              save_steps=0, progress=False), tmp_path / "work")
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert torch.equal(p, before[n]), f"{n} changed"
    changed = {n for n in trainable if not torch.equal(dict(model.named_parameters())[n], before[n])}
    assert any(".mix_router." in n for n in changed) and any(".mix_router." not in n for n in changed)


def test_save_load_round_trip_and_the_seed_check(t5_seed, llama_seed, corpus, home, tmp_path):
    """A T5 MoLoRA built through the CLI from scratch reloads to the same outputs; another seed is refused."""
    out = tmp_path / "mix"
    run("assemble", "--kind", "molora", "--seed", t5_seed, "--num-experts", "3", "--top-k", "2", "--rank", "2",
        "--data", f"math={corpus['math']}", "--data", f"code={corpus['code']}", "--out", out, "--max-steps", "3",
        *FAST)
    manifest = read_lightweight_manifest(out)
    assert manifest.kind == "molora" and manifest.task == "seq2seq" and manifest.top_k == 2
    assert [e.adapter for e in manifest.experts] == ["experts/expert0", "experts/expert1", "experts/expert2"]
    p = manifest.parameters
    assert 0 < p["routers"] < p["trainable"] < p["total"] and p["trainable_share"] == p["trainable"] / p["total"]
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["base_model_relation"] == "adapter" and front["mixture"]["trainable_share"] == p["trainable_share"]
    assert not any(out.rglob("*.bin")) and not (out / "model.safetensors").exists()  # no copy of the seed
    # Every expert folder is a plain peft adapter (its router rows travel with it).
    saved = load_file(out / "experts/expert1/adapter_model.safetensors")
    assert any(".mix_router" in k for k in saved) and any("lora_A" in k for k in saved)

    first = load_lightweight(out, device="cpu")
    again = load_lightweight(out, seed=t5_seed, device="cpu")
    assert torch.equal(logits(first.model, IDS), logits(again.model, IDS))
    # What was trained is what was saved: the reloaded experts differ from fresh ones (B started at zero).
    assert any(layer.lora_B["expert0"].weight.abs().sum() > 0 for _, layer in routed_layers(first.model))
    with pytest.raises(IncompatibleExpertError, match="field 'seed.base_fingerprint'"):
        load_lightweight(out, seed=llama_seed)

    data = as_seq2seq(pack(tokenize_documents(read_documents(corpus["code"]), first.tokenizer), 32))
    assert data["input_ids"].shape[1] == 16 and data["labels"].shape[1] == 16


def test_cli_mov_from_published_ia3_experts_end_to_end(llama_seed, corpus, home, tmp_path):
    """train --peft ia3 per domain, publish, assemble --kind mov from the registry, eval: perplexity and routing."""
    for domain in ("math", "code"):
        run("train", "--base", llama_seed, "--data", corpus[domain], "--domain", domain, "--out",
            tmp_path / domain, "--peft", "ia3", "--max-steps", "2", "--lr", "1e-2", *FAST)
        run("publish", tmp_path / domain)
    data = ["--data", f"math={corpus['math']}", "--data", f"code={corpus['code']}"]
    # The wrong PEFT kind is refused by name before any work.
    refused = run("assemble", "--kind", "molora", "--seed", llama_seed, "--experts", "math", "code", *data,
                  "--out", tmp_path / "bad", "--max-steps", "1", *FAST, ok=False)
    assert refused.exit_code == 1 and "field 'expert.kind' must be 'lora'" in refused.output
    assert not (tmp_path / "bad.partial").exists() and not (tmp_path / "bad").exists()

    mix = tmp_path / "mov"
    run("assemble", "--kind", "mov", "--seed", llama_seed, "--experts", "math", "code", *data, "--out", mix,
        "--max-steps", "3", *FAST)
    manifest = read_lightweight_manifest(mix)
    assert [(e.name, e.repo) for e in manifest.experts] == [("math", "math"), ("code", "code")]
    assert all(e.revision and e.adapter_sha256 for e in manifest.experts)
    init = manifest.router_init
    assert init["method"] == "domain"
    assert init["assignment"]["math"]["math"] > 0.5 and init["assignment"]["code"]["code"] > 0.5
    assert manifest.parameters["trainable_share"] < 0.05

    report = json.loads(run("eval", mix, *data, "--seq-len", "32", "--max-blocks", "4", "--json").stdout)
    assert set(report["perplexity"]) == {"math", "code"} and all(v > 1 for v in report["perplexity"].values())
    routing = report["routing"]
    assert report["experts"] == ["math", "code"]
    assert all(abs(sum(r.values()) - 1) < 1e-4 for r in routing.values())
    # Routers started from each expert's domain: each domain leans on its own expert.
    assert routing["math"]["math"] > routing["math"]["code"] and routing["code"]["code"] > routing["code"]["math"]
    table = run("eval", mix, *data, "--seq-len", "32", "--max-blocks", "2").output
    assert "math" in table and "%" in table


def test_mixture_settings_are_checked(llama_seed, corpus, tmp_path):
    base = load_base(llama_seed)
    ia3 = fresh_expert_config(MixtureSpec("mov"), base)
    lora = fresh_expert_config(MixtureSpec("molora"), base)
    with pytest.raises(ExpertmixError, match="all be"):
        build_mixture(load_base(llama_seed), [ia3, lora])
    with pytest.raises(ExpertmixError, match="--top-k 3"):
        build_mixture(load_base(llama_seed), [ia3, ia3], top_k=3)
    narrow = fresh_expert_config(MixtureSpec("molora", target_modules=["q_proj"]), base)
    for order in ([lora, narrow], [narrow, lora]):
        with pytest.raises(IncompatibleExpertError, match="adapt the same modules"):
            build_mixture(load_base(llama_seed), order)
    result = run("assemble", "--seed", llama_seed, "--data", corpus["math"], "--out", tmp_path / "x", ok=False)
    assert result.exit_code != 0 and "--kind nexus needs --experts" in result.output


def test_a_peft_expert_is_evaluated_on_its_seed_and_adapter_folders_are_refused_where_weights_are_needed(
        llama_seed, qwen2_seed, corpus, home, tmp_path):
    """eval scores a LoRA expert as its seed plus adapter (perplexity and bits per byte, checked against the same
    model saved whole); commands that need a model's own weights name a LoRA expert and a MoLoRA mix for what
    they are and write nothing."""
    expert = tmp_path / "math-lora"
    run("train", "--base", llama_seed, "--data", corpus["math"], "--domain", "math", "--out", expert,
        "--peft", "lora", "--max-steps", "3", "--lr", "1e-2", *FAST)
    # The same expert as one plain model folder, merged by hand with peft.
    merged = tmp_path / "math-merged"
    PeftModel.from_pretrained(load_base(llama_seed), str(expert)).merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(llama_seed).save_pretrained(merged)
    data = ["--data", f"math={corpus['math']}", "--seq-len", "32", "--max-blocks", "4"]

    def ppl(model, *extra) -> float:
        return json.loads(run("eval", model, *data, *extra, "--json").stdout)["perplexity"]["math"]

    def bpb(model) -> float:
        report = json.loads(run("eval", model, *data[:4], "--bpb", "--json").stdout)
        return next(g for g in report["groups"] if g["kind"] == "all")["bpb"][report["models"][0]]

    assert ppl(expert) == pytest.approx(ppl(merged), rel=1e-5)
    assert ppl(expert) != pytest.approx(ppl(llama_seed), rel=1e-3)  # the adapter is applied
    assert bpb(expert) == pytest.approx(bpb(merged), rel=1e-5)
    # The seed comes from the adapter's config, or --seed when that folder is elsewhere; a wrong seed is refused.
    moved = tmp_path / "moved-lora"
    moved.mkdir()
    for f in expert.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "gone/seed"}))
    lost = run("eval", moved, *data, ok=False)
    assert lost.exit_code == 1 and "'gone/seed'" in lost.output and "--seed" in lost.output
    assert ppl(moved, "--seed", llama_seed) == pytest.approx(ppl(expert), rel=1e-6)
    wrong = run("eval", expert, *data, "--seed", qwen2_seed, ok=False)
    assert wrong.exit_code == 1 and "does not fit the seed" in wrong.output

    mix = tmp_path / "molora"
    run("assemble", "--kind", "molora", "--seed", llama_seed, "--num-experts", "2", "--rank", "2",
        "--data", f"math={corpus['math']}", "--data", f"code={corpus['code']}", "--out", mix, "--max-steps", "2",
        *FAST)
    assert bpb(mix) > 0  # the mix scores in bits per byte too, on its recorded seed
    missing = run("eval", mix, *data, "--seed", tmp_path / "no-such-seed", ok=False)  # the user's path, not mix.json
    assert missing.exit_code == 1 and "--seed" in missing.output and "no-such-seed" in missing.output
    assert "seed_path" not in missing.output
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1 + 2 =", "language": "en"}\n')
    refusals = {
        (mix, "extend"): ["extend", mix, "--expert", expert, "--data", f"math={corpus['math']}"],
        (mix, "export --format qwen2-moe"): ["export", mix, "--format", "qwen2-moe"],
        (mix, "export --format onnx"): ["export", mix, "--format", "onnx"],
        (mix, "quantize"): ["quantize", mix, "--scheme", "int8"],
        (mix, "align"): ["align", mix, "--method", "rloo", "--prompts", prompts, "--reward", "arithmetic"],
        (expert, "training an expert"): ["train", "--base", expert, "--data", corpus["math"], "--domain", "m"],
        (expert, "quantize"): ["quantize", expert, "--scheme", "int8"],
        (expert, "a seed"): ["assemble", "--seed", expert, "--num-experts", "2", "--kind", "molora",
                             "--data", f"math={corpus['math']}"],
    }
    for i, ((folder, action), args) in enumerate(refusals.items()):
        out = tmp_path / f"out{i}"
        message = " ".join(run(*args, "--out", out, ok=False).output.split())
        what = (f"a molora mix of PEFT adapters, with no weights of its own (it runs over its seed {llama_seed})"
                if folder == mix else f"a lora adapter of {llama_seed}, not a full model")
        needs = "a Nexus or linear mix" if action == "export --format qwen2-moe" else "a full model"
        assert f"{folder}: {what}; {action} needs {needs}" in message, message
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
