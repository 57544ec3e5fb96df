"""Extension recipes (old experts untouched, merges as specified), dense merging, and the Qwen2-MoE export."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_docs, write_jsonl
from nexus_helpers import crash_after_step_two_checkpoint, make_expert
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2MoeForCausalLM

from expertmix.assembler import export as export_module
from expertmix.assembler import extension
from expertmix.assembler.assemble import read_sources
from expertmix.assembler.export import export, max_logit_difference
from expertmix.assembler.extension import RECIPES, ExtendConfig, extend, parse_recipe
from expertmix.assembler.manifest import DataRef, read_manifest
from expertmix.assembler.upcycling import load_expert, save_checkpoint, stream_tensors, upcycle
from expertmix.cli import main
from expertmix.errors import ExpertmixError
from expertmix.experts.data import TokenizedDocument, read_documents, tokenize_documents
from expertmix.experts.seed import build_seed, tiny_config
from expertmix.experts.training import DataSource, TrainSettings

EXPERT_KEYS = ("experts.gate_up_proj", "experts.down_proj")


@pytest.fixture(scope="module")
def base_mixes(tmp_path_factory, llama_seed, corpus):
    """Untrained nexus and linear mixes of two helper experts (math, code), with a third expert (prose)."""
    root = tmp_path_factory.mktemp("extend")
    experts = [load_expert(str(make_expert(llama_seed, root / n, n, seed=i))) for i, n in enumerate(("math", "code"))]
    new = make_expert(llama_seed, root / "prose", "prose", seed=5, other_scale=0.05)
    mixes = {}
    for router in ("nexus", "linear"):
        mix = upcycle(llama_seed, experts, root / router, router=router, progress=False)
        manifest = read_manifest(mix)  # as `assemble` records it: the data to replay
        manifest.data = [DataRef(name=d, path=str(corpus[d])) for d in ("math", "code")]
        manifest.save(mix)
        mixes[router] = mix
    return root, mixes, new


def _extend(base_mixes, corpus, router: str, recipe: str, out: Path, steps: int = 2) -> Path:
    _, mixes, new = base_mixes
    return extend(ExtendConfig(mix=mixes[router], expert=str(new), data=[DataSource("prose", corpus["prose"])],
                               out=out, recipe=parse_recipe(recipe), recipe_name=recipe, seq_len=32,
                               settings=TrainSettings(max_steps=steps, batch_size=2, progress=False)),
                  log=lambda _: None)


@pytest.mark.parametrize("router,recipe", [("nexus", "paper"), ("nexus", "targeted"), ("nexus", "isolated"),
                                           ("linear", "paper"), ("linear", "targeted")])
def test_extension_keeps_old_experts_bit_exact(base_mixes, corpus, tmp_path, router, recipe):
    out = _extend(base_mixes, corpus, router, recipe, tmp_path / "ext")
    before = load_file(str(base_mixes[1][router] / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    for k in before:
        if k.endswith(EXPERT_KEYS):
            assert after[k].shape[0] == 3 and torch.equal(after[k][:2], before[k]), k
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 3 and model.config.expert_names == ["math", "code", "prose"]
    assert read_manifest(out).history[-1]["recipe"] == recipe


def test_paper_merge_and_projected_embedding_before_finetuning(base_mixes, corpus, tmp_path):
    out = _extend(base_mixes, corpus, "nexus", "paper", tmp_path / "ext", steps=0)
    mix_dir = base_mixes[1]["nexus"]
    before, after = load_file(str(mix_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    new = load_file(str(base_mixes[2] / "model.safetensors"))
    lam = 1 / 3  # two old experts
    for k in ("language_model.model.embed_tokens.weight", "language_model.model.layers.1.self_attn.q_proj.weight"):
        want = (1 - lam) * before[k] + lam * new[k.removeprefix("language_model.")]
        assert torch.allclose(after[k], want, atol=1e-6)
    shared = "language_model.model.layers.0.mlp.shared_expert.gate_proj.weight"
    assert torch.equal(after[shared], before[shared])  # the shared expert is the seed's FFN, not merged
    manifest = read_manifest(out)
    d_new = manifest.standardisation.apply(load_expert(str(base_mixes[2])).embedding[None])[0]
    router_in = "language_model.model.layers.0.mlp.router.domain_embeddings"
    assert torch.equal(after[router_in][:2], before[router_in])
    assert torch.allclose(after[router_in][2], d_new)
    router_w = "language_model.model.layers.0.mlp.router.up_proj.weight"
    assert torch.equal(after[router_w], before[router_w])  # no new router parameters
    prefix = "language_model.model.layers.1.mlp.experts"
    raw = {p: new[f"model.layers.1.mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
    assert torch.equal(after[f"{prefix}.gate_up_proj"][2], torch.cat([raw["gate_proj"], raw["up_proj"]]))
    assert torch.equal(after[f"{prefix}.down_proj"][2], raw["down_proj"])


def test_transfer_adds_the_old_experts_mean_in_mix_update_to_the_new_ffn(base_mixes, corpus, tmp_path):
    root, mixes, new_dir = base_mixes
    mix = tmp_path / "trained"
    shutil.copytree(mixes["nexus"], mix)
    tensors = load_file(str(mix / "model.safetensors"))
    key = "language_model.model.layers.0.mlp.experts.down_proj"
    tensors[key] = tensors[key] + torch.tensor([0.1, 0.3])[:, None, None]  # "mix training" moved the experts
    save_checkpoint(mix, tensors)
    out = extend(ExtendConfig(mix=mix, expert=str(new_dir), data=[DataSource("prose", corpus["prose"])],
                              out=tmp_path / "ext", recipe=RECIPES["targeted"], seq_len=32,
                              settings=TrainSettings(max_steps=0, batch_size=2, progress=False)), log=lambda _: None)
    got = load_file(str(out / "model.safetensors"))[key][2]
    raw = load_file(str(new_dir / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    assert torch.allclose(got, raw + 0.2, atol=1e-6)


def test_token_row_merge_takes_new_domain_rows_and_keeps_the_rest(base_mixes, corpus, tmp_path, llama_seed):
    # a new-domain file the budget reads whole (isolated trains only the new FFN: embeddings move by the merge only)
    few = write_jsonl(tmp_path / "prose.jsonl", [d.text for d in read_documents(corpus["prose"])[:4]])
    out = _extend(base_mixes, {**corpus, "prose": few}, "nexus", "isolated", tmp_path / "ext", steps=6)
    before = load_file(str(base_mixes[1]["nexus"] / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    new = load_file(str(base_mixes[2] / "model.safetensors"))["model.embed_tokens.weight"]
    tok = AutoTokenizer.from_pretrained(llama_seed)
    count = {}
    for d, path in (("math", corpus["math"]), ("code", corpus["code"]), ("prose", few)):
        ids = torch.tensor([t for doc in tokenize_documents(read_documents(path), tok) for t in doc.input_ids])
        count[d] = torch.bincount(ids, minlength=len(tok))
    only_new = (count["prose"] > 0) & (count["math"] == 0) & (count["code"] == 0)
    unused_new = count["prose"] == 0
    key = "language_model.model.embed_tokens.weight"
    assert only_new.any() and unused_new.any()
    assert torch.allclose(after[key][only_new], new[only_new], atol=1e-6)
    assert torch.equal(after[key][unused_new], before[key][unused_new])
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(after[q], before[q])


def test_row_old_weight_keeps_shared_token_rows_and_still_takes_new_only_ones(base_mixes, corpus, tmp_path):
    """Through ``extend``: a large row_old_weight leaves rows the old domains use near the mix's (isolated trains
    only the new FFN, so the rows move by the merge alone)."""
    few = write_jsonl(tmp_path / "prose.jsonl", [d.text for d in read_documents(corpus["prose"])[:4]])
    data = {**corpus, "prose": few}
    key = "language_model.model.embed_tokens.weight"
    before = load_file(str(base_mixes[1]["nexus"] / "model.safetensors"))[key]
    new = load_file(str(base_mixes[2] / "model.safetensors"))["model.embed_tokens.weight"]
    after = {w: load_file(str(_extend(base_mixes, data, "nexus", f"isolated:row_old_weight={w}", tmp_path / str(w),
                                      steps=6) / "model.safetensors"))[key] for w in (1, 1000)}
    moved = {w: (a - before).norm(dim=1) for w, a in after.items()}
    only_new = torch.isclose(after[1], new, atol=1e-6).all(dim=1) & (moved[1] > 0)
    shared = (moved[1] > 0) & ~only_new  # rows both the new and an old domain use
    assert only_new.any() and shared.any()
    assert torch.allclose(after[1000][only_new], new[only_new], atol=1e-6)
    assert (moved[1000][shared] < 0.05 * moved[1][shared]).all()


def test_token_row_weights_follow_relative_frequency_and_the_old_domains_weight():
    doc = lambda ids: TokenizedDocument(input_ids=ids, labels=ids)  # noqa: E731
    new = [doc([1, 1, 2, 3])]  # token 1: new only; 2 and 3: shared at different rates; 4: old only; 0: unused
    old = {"a": [doc([2, 4, 4, 4])], "b": [doc([3, 3, 3, 3])]}
    even = extension.token_row_lambdas(new, old, vocab_size=5)
    # f_new = (0, .5, .25, .25, 0); max old f = (0, 0, .25, 1, .75)
    assert torch.allclose(even, torch.tensor([0.0, 1.0, 0.5, 0.2, 0.0]))
    strict = extension.token_row_lambdas(new, old, vocab_size=5, old_weight=4.0)
    assert torch.allclose(strict, torch.tensor([0.0, 1.0, 0.2, 0.25 / 4.25, 0.0]))
    with pytest.raises(ExpertmixError, match="row_old_weight=-1"):
        parse_recipe("targeted:row_old_weight=-1")


def test_extension_reads_no_more_data_than_its_token_budget(base_mixes, corpus, tmp_path):
    out = _extend(base_mixes, corpus, "nexus", "targeted", tmp_path / "ext", steps=2)  # 2 x 2 x 32 = 128 tokens
    read = read_manifest(out).history[-1]["tokens_read"]
    tok = AutoTokenizer.from_pretrained(out)
    lengths = {d: [len(t.input_ids) for t in tokenize_documents(read_documents(corpus[d]), tok)]
               for d in ("prose", "math", "code")}
    whole = {d: sum(n) for d, n in lengths.items()}
    # half the budget is new-domain data, plus the margin blocks packing draws (one per source), to a whole document
    assert 64 <= read["prose"] <= math.ceil(0.5 * (128 + 3 * 32)) + 32 + max(lengths["prose"]) < whole["prose"] / 4
    assert set(read) == {"prose", "math", "code"} and all(read[d] < whole[d] / 4 for d in ("math", "code"))


def test_extension_passes_repeat_the_budgets_data_without_reading_more(base_mixes, corpus, tmp_path):
    once, thrice = (read_manifest(_extend(base_mixes, corpus, "nexus", f"targeted:passes={n}", tmp_path / str(n),
                                          steps=2)).history[-1] for n in (1, 3))
    assert thrice["tokens_read"] == once["tokens_read"] and thrice["mix"] == once["mix"]
    assert (once["metrics"]["steps"], thrice["metrics"]["steps"]) == (2, 6) and thrice["passes"] == 3
    assert thrice["budget"] == {"max_steps": 2, "max_tokens": None} and thrice["settings"]["max_steps"] == 6


def test_a_small_budget_spans_min_documents_with_windows_of_long_ones(tokenizer, tmp_path):
    short = make_docs("prose", 40, seed=3)
    path = write_jsonl(tmp_path / "skewed.jsonl", ["\n".join(short[i::4]) * 6 for i in range(4)] + short)
    whole = {tuple(d.input_ids) for d in tokenize_documents(read_documents(path), tokenizer)}
    budget = 600
    plain = read_sources([DataSource("p", path)], tokenizer, max_tokens=budget, seed=1)["p"]
    spread = read_sources([DataSource("p", path)], tokenizer, max_tokens=budget, seed=1, min_documents=12)["p"]
    cap = math.ceil(budget / 12)
    assert len(spread) >= 12 and budget <= sum(len(d.input_ids) for d in spread) < budget + cap
    assert all(len(d.input_ids) <= cap and d.labels == d.input_ids for d in spread)
    windows = [d for d in spread if tuple(d.input_ids) not in whole]
    assert windows and all(d.input_ids[-1] == tokenizer.eos_token_id for d in windows)
    for d in windows:  # a contiguous piece of one document, closed by EOS
        body = d.input_ids[:-1]
        assert any(any(list(w[i:i + len(body)]) == body for i in range(len(w) - len(body) + 1)) for w in whole)
    assert len(plain) < len(spread)  # without it the same budget lands on fewer, longer documents


def test_fitted_placement_routes_the_new_domain_to_the_new_expert(base_mixes, corpus, tmp_path):
    fits = {}
    for weight in (1, 4):
        out = _extend(base_mixes, corpus, "nexus", f"isolated:fit_old_weight={weight}", tmp_path / f"w{weight}", 0)
        fits[weight] = read_manifest(out).history[-1]["placement_fit"]
    assert fits[1]["new_tokens_to_new"] > 0.8 and fits[1]["old_tokens_to_new"] < 0.4
    # Weighting the old tokens' term keeps more of them with their experts.
    assert fits[4]["old_tokens_to_new"] < fits[1]["old_tokens_to_new"]


def test_per_layer_placement_fits_each_layer_and_records_every_router_input(base_mixes, corpus, tmp_path):
    one = _extend(base_mixes, corpus, "nexus", "isolated:fit_old_weight=4", tmp_path / "one", 0)
    per = _extend(base_mixes, corpus, "nexus", "isolated:placement=fit-layers;fit_old_weight=4", tmp_path / "per", 0)
    key = "language_model.model.layers.{}.mlp.router.domain_embeddings"
    before = load_file(str(base_mixes[1]["nexus"] / "model.safetensors"))
    got = {name: load_file(str(path / "model.safetensors")) for name, path in (("one", one), ("per", per))}
    layers = range(AutoModelForCausalLM.from_pretrained(per).config.text_config.num_hidden_layers)
    for layer in layers:  # old experts' router inputs never move; no router weight changes shape
        for tensors in got.values():
            assert torch.equal(tensors[key.format(layer)][:2], before[key.format(layer)])
    # one fitted input shared by all layers, against one per layer
    assert all(torch.equal(got["one"][key.format(i)][2], got["one"][key.format(0)][2]) for i in layers)
    assert not torch.equal(got["per"][key.format(0)][2], got["per"][key.format(1)][2])
    manifest = read_manifest(per)
    inputs = manifest.experts[-1].router_input
    assert len(inputs) == len(layers)
    assert all(torch.allclose(torch.tensor(inputs[i]), got["per"][key.format(i)][2]) for i in layers)
    assert isinstance(read_manifest(one).experts[-1].router_input[0], float)
    fits = {name: read_manifest(path).history[-1]["placement_fit"] for name, path in (("one", one), ("per", per))}
    # more freedom fits at least as well: the per-layer loss is no higher
    assert fits["per"]["placement_loss"] <= fits["one"]["placement_loss"] + 1e-3
    assert fits["per"]["new_tokens_to_new"] > 0.5


def test_per_layer_placement_in_memory_bounded_layer_groups_fits_the_same(base_mixes, corpus, tmp_path,
                                                                           monkeypatch):
    spec = "isolated:placement=fit-layers;fit_old_weight=4"
    whole = read_manifest(_extend(base_mixes, corpus, "nexus", spec, tmp_path / "whole", 0))
    collected = []
    original = extension.collect_router_inputs

    def recording(model, blocks, max_blocks=16, batch_size=4, layers=None):
        collected.append(list(layers))
        return original(model, blocks, max_blocks, batch_size, layers)

    monkeypatch.setattr(extension, "PLACEMENT_MEMORY", 1)  # one layer's inputs at a time
    monkeypatch.setattr(extension, "collect_router_inputs", recording)
    grouped = read_manifest(_extend(base_mixes, corpus, "nexus", spec, tmp_path / "grouped", 0))
    layers = len(whole.experts[-1].router_input)
    assert collected == [[i] for i in range(layers) for _ in ("new", "old")]
    for a, b in zip(whole.experts[-1].router_input, grouped.experts[-1].router_input, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    fits = whole.history[-1]["placement_fit"], grouped.history[-1]["placement_fit"]
    assert fits[1] == pytest.approx(fits[0], abs=1e-5)


def test_extension_refuses_a_foreign_expert_and_a_duplicate_and_leaves_no_work_folder(base_mixes, corpus, tmp_path,
                                                                                      tokenizer):
    _, mixes, _ = base_mixes
    foreign_seed = build_seed(tmp_path / "seed2", tokenizer, arch="llama", seed=9)
    foreign = make_expert(foreign_seed, tmp_path / "foreign", "foreign", seed=1)
    settings = TrainSettings(max_steps=1, batch_size=2, progress=False)
    cfg = ExtendConfig(mix=mixes["nexus"], expert=str(foreign), data=[DataSource("prose", corpus["prose"])],
                       out=tmp_path / "x", seq_len=32, settings=settings)
    with pytest.raises(ExpertmixError, match=r"'foreign'.*base_fingerprint"):
        extend(cfg, log=lambda _: None)
    dup = replace(cfg, expert=str(base_mixes[0] / "math"), out=tmp_path / "y")
    with pytest.raises(ExpertmixError, match="already holds an expert named 'math'"):
        extend(dup, log=lambda _: None)
    assert not (tmp_path / "x.partial").exists() and not (tmp_path / "y.partial").exists()  # nothing to resume


def test_recipe_refuses_an_unknown_placement_merge_or_init():
    for spec, field_name in (("targeted:placement=fitted", "placement"), ("paper:merge=rows", "merge"),
                             ("targeted:ffn_init=copy", "ffn_init")):
        with pytest.raises(ExpertmixError, match=f"{field_name}=.*choose one of"):
            parse_recipe(spec)
    for spec, problem in (("targeted:distill=none;routing_weight=1", "only with distill"),
                          ("targeted:routing_weight=-1", "must be >= 0"), ("targeted:fit_tokens=0", "at least 1"),
                          ("targeted:passes=0", "passes=0: at least one pass"),
                          ("targeted:min_documents=0", "min_documents=0: at least one document"),
                          ("targeted:passes=two", "passes='two' is not a whole number"),
                          ("targeted:new_share=half", "new_share='half' is not a number")):
        with pytest.raises(ExpertmixError, match=problem):
            parse_recipe(spec)


def test_parse_recipe_overrides_fields_and_names_bad_keys():
    r = parse_recipe("isolated:train=experts+dense;learning_rate=1e-3;merge=none")
    assert r.train == ("experts", "dense") and r.learning_rate == 1e-3 and r.merge == "none"
    with pytest.raises(ExpertmixError, match="unknown extension recipe 'nope'"):
        parse_recipe("nope")
    with pytest.raises(ExpertmixError, match="'colour=red' is not KEY=VALUE"):
        parse_recipe("paper:colour=red")


def test_dense_merge_is_the_plain_weight_average(base_mixes, llama_seed, tmp_path):
    root = base_mixes[0]
    experts = [load_expert(str(root / n)) for n in ("math", "code")]
    merged = upcycle(llama_seed, experts, tmp_path / "merge", router="merge", progress=False)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert type(model).__name__ == "LlamaForCausalLM"
    a, b = (load_file(str(root / n / "model.safetensors")) for n in ("math", "code"))
    got = load_file(str(merged / "model.safetensors"))
    assert set(got) == set(a)
    for k in a:
        assert torch.allclose(got[k], (a[k] + b[k]) / 2, atol=1e-6), k


@pytest.mark.parametrize("arch", ["llama_seed", "qwen2_seed"])
@pytest.mark.parametrize("router", ["nexus", "linear"])
def test_export_gives_the_same_logits_in_stock_qwen2_moe(request, tmp_path, arch, router):
    seed_dir = request.getfixturevalue(arch)
    experts = [load_expert(str(make_expert(seed_dir, tmp_path / f"e{i}", f"e{i}", seed=i))) for i in range(3)]
    mix_dir = upcycle(seed_dir, experts, tmp_path / "mix", router=router, progress=False)
    model = AutoModelForCausalLM.from_pretrained(mix_dir)
    with torch.no_grad():  # a router that spreads tokens over the experts, so every gate row matters
        for b in model.moe_blocks():
            (b.router.up_proj.weight if router == "nexus" else b.router.weight).normal_(std=1.0)
    model.save_pretrained(tmp_path / "spread")
    (tmp_path / "spread" / "mix.json").write_bytes((mix_dir / "mix.json").read_bytes())
    AutoTokenizer.from_pretrained(mix_dir).save_pretrained(tmp_path / "spread")
    ids = torch.randint(3, model.config.text_config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        used = {int(i) for r in model(input_ids=ids, output_router_logits=True).router_logits for i in r.argmax(-1)}
    assert len(used) >= 2
    out = export(tmp_path / "spread", tmp_path / "q")
    assert "auto_map" not in (out / "config.json").read_text()  # stock transformers, no custom code
    exported = Qwen2MoeForCausalLM.from_pretrained(out)
    assert exported.config.num_experts == 3 and exported.config.num_experts_per_tok == 1
    assert not exported.config.norm_topk_prob and exported.config.qkv_bias == (arch == "qwen2_seed")
    assert max_logit_difference(tmp_path / "spread", out) < 1e-4


def test_export_refuses_a_cohere_mix_and_a_dense_merge(tmp_path, tokenizer, llama_seed):
    seed_dir = build_seed(tmp_path / "cohere", tokenizer, arch="cohere")
    experts = [load_expert(str(make_expert(seed_dir, tmp_path / f"c{i}", f"c{i}", seed=i))) for i in range(2)]
    mix = upcycle(seed_dir, experts, tmp_path / "mix", progress=False)
    with pytest.raises(ExpertmixError, match="'cohere' model; only llama and qwen2"):
        export(mix, tmp_path / "q")
    merged = upcycle(llama_seed, [load_expert(str(make_expert(llama_seed, tmp_path / f"l{i}", f"l{i}", seed=i)))
                                  for i in range(2)], tmp_path / "merge", router="merge", progress=False)
    with pytest.raises(ExpertmixError, match="dense merge"):
        export(merged, tmp_path / "q2")
    assert not (tmp_path / "q").exists() and not (tmp_path / "q2").exists()


@pytest.mark.parametrize("distill,routing_weight", [("replay", 0.0), ("all", 0.0), ("all", 2.0)])
def test_distilled_extension_trains_from_its_teachers(base_mixes, corpus, tmp_path, distill, routing_weight):
    out = _extend(base_mixes, corpus, "nexus", f"targeted:distill={distill};routing_weight={routing_weight};passes=1",
                  tmp_path / "ext", steps=2)
    before = load_file(str(base_mixes[1]["nexus"] / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    for k in before:
        if k.endswith(EXPERT_KEYS):
            assert torch.equal(after[k][:2], before[k]), k
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[q], before[q])  # the dense weights trained
    step = read_manifest(out).history[-1]
    assert step["distill"] == distill and step["routing_weight"] == routing_weight and step["metrics"]["steps"] == 2
    assert math.isfinite(step["metrics"]["train_loss"])
    assert step["mix"]["prose"] == pytest.approx(0.5, abs=0.15)  # half new domain, half replay


def test_distilled_extension_resumes_from_its_last_checkpoint(base_mixes, corpus, tmp_path, monkeypatch):
    _, mixes, new = base_mixes
    cfg = ExtendConfig(mix=mixes["nexus"], expert=str(new), data=[DataSource("prose", corpus["prose"])],
                       out=tmp_path / "ext", recipe=RECIPES["targeted"], seq_len=32,
                       settings=TrainSettings(max_steps=4, batch_size=2, save_steps=2, progress=False))
    crash_after_step_two_checkpoint(monkeypatch, lambda: extend(cfg, log=lambda _: None))
    assert not cfg.out.exists() and (cfg.work_dir / "checkpoints" / "checkpoint-2").is_dir()
    extend(replace(cfg, resume=True), log=lambda _: None)
    step = read_manifest(cfg.out).history[-1]
    assert step["metrics"]["resumed_from"] == "checkpoint-2"
    assert step["metrics"]["steps"] == 4 * RECIPES["targeted"].passes  # the passes survive the resume
    assert step["distill"] == "all" and not cfg.work_dir.exists()


def test_an_extension_started_before_a_recipe_field_existed_resumes_with_the_fields_old_behaviour(tmp_path):
    """A recipe field added later (row_old_weight) reads as its dataclass default in an older run's record."""
    kw = dict(mix=tmp_path / "mix", expert="org/es", data=[DataSource("es", tmp_path / "es.jsonl")],
              out=tmp_path / "out")
    ExtendConfig(recipe=parse_recipe("targeted:row_old_weight=1;passes=5"), **kw).start_work_dir()
    run_file = tmp_path / "out.partial" / "run.json"
    older = json.loads(run_file.read_text())
    del older["recipe"]["row_old_weight"]  # as a version before the field wrote it
    run_file.write_text(json.dumps(older))
    with pytest.raises(ExpertmixError, match=r"other settings \(differs in: recipe.passes, recipe.row_old_weight\)"):
        ExtendConfig(recipe=parse_recipe("targeted"), resume=True, **kw).start_work_dir()
    ExtendConfig(recipe=parse_recipe("targeted:row_old_weight=1;passes=5"), resume=True, **kw).start_work_dir()


def test_an_extended_mix_records_the_new_domains_data_so_the_next_extension_replays_it(base_mixes, corpus, tmp_path,
                                                                                       llama_seed):
    """Each extension adds its --data to mix.json's data: a second extension replays the first one's domain too
    (it replayed only the domains the mix was assembled on)."""
    first = _extend(base_mixes, corpus, "nexus", "targeted", tmp_path / "ext")
    manifest = read_manifest(first)
    assert [(d.name, d.path) for d in manifest.data] == [("math", str(corpus["math"])), ("code", str(corpus["code"])),
                                                         ("prose", str(corpus["prose"].resolve()))]
    assert manifest.history[-1]["data"] == {d.name: d.path for d in manifest.data}
    extra = make_expert(llama_seed, tmp_path / "extra", "extra", seed=7)
    second = extend(ExtendConfig(mix=first, expert=str(extra), data=[DataSource("extra", corpus["math"])],
                                 out=tmp_path / "ext2", recipe=parse_recipe("targeted"), recipe_name="targeted",
                                 seq_len=32, settings=TrainSettings(max_steps=2, batch_size=2, progress=False)),
                    log=lambda _: None)
    assert set(read_manifest(second).history[-1]["tokens_read"]) == {"extra", "math", "code", "prose"}


def test_extend_refuses_a_replay_name_given_twice_naming_it_and_the_option(base_mixes, corpus, tmp_path):
    """Two --replay sources under one name were reported as a --data error (or, with one path, as 'given to both
    P and P'); the refusal names the option, the name and the paths, before anything is loaded."""
    from click.testing import CliRunner

    from expertmix.cli import main

    _, mixes, new = base_mixes
    out = tmp_path / "ext"
    common = ["extend", str(mixes["nexus"]), "--expert", str(new), "--data", f"prose={corpus['prose']}",
              "--out", str(out)]
    math, code = f"math={corpus['math']}", f"math={corpus['code']}"
    res = CliRunner().invoke(main, [*common, "--replay", math, "--replay", code])
    message = " ".join(res.output.split())
    assert res.exit_code == 2 and "Invalid value for --replay" in message, res.output
    assert f"the name 'math' is given to both {corpus['math']} and {corpus['code']}" in message
    res = CliRunner().invoke(main, [*common, "--replay", math, "--replay", math])
    message = " ".join(res.output.split())
    assert res.exit_code == 2 and f"the name 'math' is given twice, both times to {corpus['math']}" in message
    assert not out.exists() and not out.with_name("ext.partial").exists()


def _cli_ok(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_export_refuses_an_existing_out_before_reading_the_mix(base_mixes, tmp_path, monkeypatch):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def no_reading(*args, **kwargs):
        raise AssertionError("the mix's tensors were read before the refusal")

    monkeypatch.setattr(export_module, "qwen2_moe_tensors", no_reading)
    result = CliRunner().invoke(main, ["export", str(base_mixes[1]["nexus"]), "--format", "qwen2-moe",
                                       "--out", str(out)])
    assert result.exit_code == 1 and f"output folder {out} already exists" in " ".join(result.output.split())
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_qwen2_moe_export_carries_a_head_dim_that_is_not_hidden_over_heads(tokenizer, tmp_path):
    """A Llama seed with head_dim 32 and 4 heads over a hidden size of 64 (as Gemma-style configs set it): the
    export names the head_dim, so stock Qwen2-MoE builds the same attention and gives the same logits."""
    seed = tmp_path / "seed"
    config = tiny_config("llama", vocab_size=len(tokenizer))
    config.head_dim = 32
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(seed)
    tokenizer.save_pretrained(seed)
    experts = [load_expert(str(make_expert(seed, tmp_path / f"e{i}", f"e{i}", seed=i))) for i in range(2)]
    mix = upcycle(seed, experts, tmp_path / "mix", progress=False)
    out = tmp_path / "q"
    assert "max |logit difference| against the mix" in _cli_ok("export", mix, "--format", "qwen2-moe", "--out", out)
    exported = Qwen2MoeForCausalLM.from_pretrained(out)
    assert exported.config.head_dim == 32
    assert exported.model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)
    assert max_logit_difference(mix, out) < 1e-4


def test_a_sharded_mix_exports_and_extends(base_mixes, corpus, tmp_path):
    """A mix saved in shards (model.safetensors.index.json, as save_pretrained writes a big one) is read shard by
    shard: the export gives the mix's logits and the extension keeps the old experts bit-exact."""
    root, mixes, new = base_mixes
    mix = mixes["nexus"]
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(mix).save_pretrained(sharded, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(mix).save_pretrained(sharded)
    shutil.copyfile(mix / "mix.json", sharded / "mix.json")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    assert dict(stream_tensors(sharded)).keys() == load_file(str(mix / "model.safetensors")).keys()

    exported = tmp_path / "q"
    _cli_ok("export", sharded, "--format", "qwen2-moe", "--out", exported)
    assert max_logit_difference(mix, exported) < 1e-4
    extended = tmp_path / "ext"
    _cli_ok("extend", sharded, "--expert", new, "--data", f"prose={corpus['prose']}", "--recipe", "isolated",
            "--max-steps", "1", "--seq-len", "32", "--batch-size", "2", "--out", extended)
    before, after = load_file(str(mix / "model.safetensors")), load_file(str(extended / "model.safetensors"))
    for k in before:
        if k.endswith(EXPERT_KEYS):
            assert after[k].shape[0] == 3 and torch.equal(after[k][:2], before[k]), k
    assert read_manifest(extended).experts[-1].name == "prose"
