"""Assembling mixes: streaming upcycling, refusal of foreign experts, the CLI from `train` to `extend`, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import write_jsonl
from nexus_helpers import crash_after_step_two_checkpoint, make_expert
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2MoeForCausalLM, TrainerCallback

import expertmix.assembler.assemble as assemble_module
from expertmix.assembler.assemble import AssembleConfig, assemble, mixture_blocks, teachers_of_sources
from expertmix.assembler.distillation import TEACHER_KEY
from expertmix.assembler.manifest import read_manifest
from expertmix.assembler.routing_report import eval_blocks
from expertmix.assembler.upcycling import load_expert, upcycle
from expertmix.cli import main
from expertmix.errors import ExpertmixError, IncompatibleExpertError
from expertmix.experts.data import TokenizedDocument
from expertmix.experts.seed import build_seed
from expertmix.experts.training import DataSource, TrainSettings
from expertmix.hub.store import LocalStore

TESTS = Path(__file__).parent


def test_upcycling_peak_memory_is_about_the_output_plus_one_expert(tmp_path):
    """Four 17 MB experts: loading them all would add ~4 experts to the output; streaming adds about one."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        from pathlib import Path
        import torch
        torch.set_num_threads(1)
        sys.path.insert(0, {str(TESTS)!r})
        from nexus_helpers import make_expert
        from expertmix.assembler.upcycling import load_expert, upcycle
        from expertmix.experts.seed import build_seed, train_tokenizer
        root = Path({str(tmp_path)!r})
        tok = train_tokenizer(["a b c d e f g"] * 10, vocab_size=260)
        seed = build_seed(root / "seed", tok, arch="llama", hidden_size=256, intermediate_size=1536, num_layers=3,
                          num_heads=4, num_kv_heads=4)
        experts = [load_expert(str(make_expert(seed, root / f"e{{i}}", f"e{{i}}", seed=i))) for i in range(4)]
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        before = peak()
        upcycle(seed, experts, root / "mix", progress=False)
        print(json.dumps({{"growth": peak() - before}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    output = (tmp_path / "mix" / "model.safetensors").stat().st_size
    expert = (tmp_path / "e0" / "model.safetensors").stat().st_size
    assert output > 3 * expert  # the test means something: the output dwarfs one expert
    assert growth < output + 1.5 * expert, f"peak grew {growth / 2**20:.0f} MiB; output {output / 2**20:.0f} MiB"


def test_expert_from_another_seed_is_refused_by_name(llama_seed, qwen2_seed, tokenizer, tmp_path):
    good = make_expert(llama_seed, tmp_path / "good", "good", seed=1)
    other_seed = build_seed(tmp_path / "other-seed", tokenizer, arch="llama", seed=7)
    stranger = make_expert(other_seed, tmp_path / "stranger", "stranger", seed=2)
    with pytest.raises(IncompatibleExpertError, match=r"'stranger'.*base_fingerprint"):
        upcycle(llama_seed, [load_expert(str(good)), load_expert(str(stranger))], tmp_path / "mix")
    qwen = make_expert(qwen2_seed, tmp_path / "qwen", "qwen", seed=3)
    with pytest.raises(IncompatibleExpertError, match=r"'qwen'.*base_fingerprint"):
        upcycle(llama_seed, [load_expert(str(good)), load_expert(str(qwen))], tmp_path / "mix")
    assert not (tmp_path / "mix").exists()
    result = CliRunner().invoke(main, ["assemble", "--seed", str(llama_seed), "--experts", str(good), str(stranger),
                                       "--data", f"x={tmp_path / 'none.jsonl'}", "--out", str(tmp_path / "mix")])
    assert result.exit_code == 1
    assert "expert 'stranger' does not fit" in result.output and "base_fingerprint" in result.output


# -- the CLI, end to end ---------------------------------------------------------------------------

def _cli(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def published(tmp_path_factory, llama_seed, corpus):
    """Three experts trained with `expertmix train` and published to a local store."""
    root = tmp_path_factory.mktemp("cli")
    store = root / "store"
    refs = {}
    for domain in ("math", "code", "prose"):
        _cli("train", "--base", llama_seed, "--data", corpus[domain], "--domain", domain, "--out", root / domain,
             "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--embedder", "seed")
        out = _cli("publish", root / domain, "--registry", store)
        refs[domain] = out.split()[-1]
    return root, store, refs


@pytest.fixture(scope="module")
def cli_mix(published, llama_seed, corpus):
    root, store, refs = published
    _cli("assemble", "--seed", llama_seed, "--experts", "math", "code", "--registry", store,
         "--data", f"math={corpus['math']}", "--data", f"code={corpus['code']}", "--out", root / "mix",
         "--max-steps", "3", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2")
    return root / "mix"


def test_assemble_pulls_experts_and_trains_only_the_router(published, cli_mix, llama_seed, tmp_path):
    root, store, refs = published
    manifest = read_manifest(cli_mix)
    assert manifest.router == "nexus" and [e.name for e in manifest.experts] == ["math", "code"]
    entries = {e.name: e for e in LocalStore(store).list()}
    for e in manifest.experts:
        assert e.revision == entries[e.name].revision == refs[e.name].split("@")[1]
        want = {f.path: f.sha256 for f in entries[e.name].files}["model.safetensors"]
        assert e.weights_sha256 == {"model.safetensors": want}
    assert manifest.history[-1]["stage"] == "assemble" and manifest.history[-1]["train"] == ["router"]
    assert manifest.history[-1]["metrics"]["steps"] == 3
    assert [d.name for d in manifest.data] == ["math", "code"]
    # Against a fresh upcycle of the same experts: only router weights moved.
    fresh = upcycle(llama_seed, [load_expert(r, str(store)) for r in ("math", "code")], tmp_path / "fresh",
                    progress=False)
    trained, init = load_file(str(cli_mix / "model.safetensors")), load_file(str(fresh / "model.safetensors"))
    assert set(trained) == set(init)
    moved = {k for k in trained if not torch.equal(trained[k], init[k])}
    assert moved and all(".router." in k for k in moved)
    assert any("up_proj" in k for k in moved)


def test_eval_blocks_are_spread_over_the_whole_file_not_its_first_documents(corpus, tokenizer, tmp_path):
    texts = [json.loads(line)["text"] for d in ("math", "code") for line in corpus[d].read_text().splitlines()]
    mixed = write_jsonl(tmp_path / "math-then-code.jsonl", texts)
    every = eval_blocks([DataSource("mixed", mixed)], tokenizer, 32, None)["mixed"]["input_ids"]
    some = eval_blocks([DataSource("mixed", mixed)], tokenizer, 32, 3)["mixed"]["input_ids"]
    assert every.shape[0] > 6 and some.shape == (3, 32)
    assert torch.equal(some[0], every[0]) and torch.equal(some[2], every[-1])  # first math, last code
    assert torch.equal(some[1], every[(every.shape[0] - 1) // 2]) or torch.equal(some[1], every[every.shape[0] // 2])


def test_eval_prints_perplexity_and_routing_and_saves_a_heatmap(cli_mix, corpus, tmp_path):
    png = tmp_path / "routing.png"
    out = _cli("eval", cli_mix, *[f"--data={d}={corpus[d]}" for d in ("math", "code", "prose")], "--seq-len", "32",
               "--max-blocks", "4", "--heatmap", png, "--json")
    report = json.loads(out)
    assert set(report["perplexity"]) == {"math", "code", "prose"}
    assert all(1 < v < 1e4 for v in report["perplexity"].values())
    assert report["experts"] == ["math", "code"]
    for row in report["routing"].values():
        assert abs(sum(row.values()) - 1) < 1e-5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    width, height = Image.open(png).size
    assert width >= 540 and height >= 360  # two experts: room for the title and the labels (4.5 x 3 in at 120 dpi)
    table = _cli("eval", cli_mix, f"--data=math={corpus['math']}", "--seq-len", "32", "--max-blocks", "2")
    assert "math" in table and "%" in table


def test_export_qwen2_moe_loads_in_stock_transformers_with_the_same_logits_and_routing(cli_mix, corpus, tmp_path):
    out = _cli("export", cli_mix, "--format", "qwen2-moe", "--out", tmp_path / "q")
    assert "max |logit difference|" in out
    check = json.loads((tmp_path / "q" / "export_check.json").read_text())
    assert check["checked"] and check["passed"] and check["max_logit_difference"] < 1e-4
    exported = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "q").eval()
    mix = AutoModelForCausalLM.from_pretrained(cli_mix).eval()
    ids = torch.randint(3, mix.config.text_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (exported(input_ids=ids).logits - mix(input_ids=ids).logits).abs().max() < 1e-4
    # `eval` reads the stock export's router too, and names its experts as the mix does: the same routing.
    data = [f"--data={d}={corpus[d]}" for d in ("math", "code")]
    reports = [json.loads(_cli("eval", m, *data, "--seq-len", "32", "--max-blocks", "4", "--json"))
               for m in (cli_mix, tmp_path / "q")]
    assert reports[1]["experts"] == reports[0]["experts"] == ["math", "code"]
    for domain in ("math", "code"):
        assert reports[1]["perplexity"][domain] == pytest.approx(reports[0]["perplexity"][domain], rel=1e-4)
        assert reports[1]["routing"][domain] == pytest.approx(reports[0]["routing"][domain], abs=1e-6)


def test_eval_refuses_options_of_the_other_mode(cli_mix, corpus, tmp_path):
    data = f"--data=math={corpus['math']}"
    result = CliRunner().invoke(main, ["eval", str(cli_mix), data, "--chart", str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "--chart and --report-json belong to the bits-per-byte mode" in result.output
    result = CliRunner().invoke(main, ["eval", str(cli_mix), data, "--bpb", "--heatmap", str(tmp_path / "h.png")])
    assert result.exit_code == 1 and "--heatmap draws the routing of the perplexity mode" in result.output
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "h.png").exists()
    result = CliRunner().invoke(main, ["eval", str(cli_mix), data, "--bpb", "--max-blocks", "2"])
    assert result.exit_code == 2 and "--max-blocks does not apply to the bits-per-byte mode" in result.output
    result = CliRunner().invoke(main, ["eval", str(cli_mix), data, "--max-bytes", "100"])
    assert result.exit_code == 2 and "--max-bytes does not apply to the perplexity mode" in result.output


def test_options_that_the_chosen_mode_would_ignore_are_refused_by_name(cli_mix, corpus, tmp_path):
    """An option the command would not use (another format's, method's or kind's) is an error, not a no-op."""
    out, data = tmp_path / "out", f"math={corpus['math']}"
    cases = {
        ("export", str(cli_mix), "--format", "qwen2-moe", "--onnx-quantize", "int8"):
            "--onnx-quantize does not apply to --format qwen2-moe",
        ("align", str(cli_mix), "--method", "dpo", "--prefs", str(corpus["math"]), "--k", "8"):
            "--k does not apply to --method dpo",
        ("align", str(cli_mix), "--method", "rloo", "--prompts", str(corpus["math"]), "--reward", "arithmetic",
         "--prefs", str(corpus["math"])): "--prefs does not apply to --method rloo",
        ("assemble", "--seed", str(cli_mix), "--experts", str(cli_mix), "--data", data, "--top-k", "2",
         "--shared-router"): "--top-k, --shared-router do not apply to --kind nexus",
        ("assemble", "--kind", "molora", "--seed", str(cli_mix), "--experts", str(cli_mix), "--data", data,
         "--rank", "8"): "--rank does not apply to a mix of published experts",
        ("assemble", "--kind", "mov", "--seed", str(cli_mix), "--data", data, "--router", "linear"):
            "--router does not apply to --kind mov",
    }
    for args, expected in cases.items():
        result = CliRunner().invoke(main, [*args, "--out", str(out)])
        assert result.exit_code == 2 and expected in " ".join(result.output.split()), (args, result.output)
        assert not out.exists() and not out.with_name("out.partial").exists()
    result = CliRunner().invoke(main, ["export", str(cli_mix), "--format", "onnx", "--block-size", "100",
                                       "--out", str(out)])
    assert result.exit_code == 2 and "'100' is not one of '16', '32', '64', '128', '256'" in result.output


def test_export_whose_logits_differ_from_the_mix_fails_the_command(cli_mix, tmp_path, monkeypatch):
    from expertmix.assembler import export as export_module

    real = export_module.qwen2_moe_tensors

    def wrong_head(*args):  # a conversion bug: one tensor altered on the way
        tensors = real(*args)
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 3
        return tensors

    monkeypatch.setattr(export_module, "qwen2_moe_tensors", wrong_head)
    result = CliRunner().invoke(main, ["export", str(cli_mix), "--format", "qwen2-moe", "--out", str(tmp_path / "q")])
    assert result.exit_code == 1
    assert "the export does not reproduce the mix" in " ".join(result.output.split())


def test_extend_appends_an_expert_and_keeps_the_old_ones(published, cli_mix, corpus):
    root, store, _ = published
    _cli("extend", cli_mix, "--expert", "prose", "--registry", store, "--data", f"prose={corpus['prose']}",
         "--out", root / "mix3", "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--passes", "2")
    before, after = load_file(str(cli_mix / "model.safetensors")), load_file(str(root / "mix3" / "model.safetensors"))
    for k in before:
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert after[k].shape[0] == 3 and torch.equal(after[k][:2], before[k])
    manifest = read_manifest(root / "mix3")
    assert [e.name for e in manifest.experts] == ["math", "code", "prose"]
    last = manifest.history[-1]
    assert last["stage"] == "extend" and last["recipe"] == "targeted (modified)" and last["passes"] == 2
    assert last["metrics"]["steps"] == 4  # two passes over the data two steps read
    assert AutoModelForCausalLM.from_pretrained(root / "mix3").config.expert_names == ["math", "code", "prose"]
    # the default recipe fits the new expert's router input per layer; the export still collapses each layer
    layers = AutoModelForCausalLM.from_pretrained(root / "mix3").config.text_config.num_hidden_layers
    assert len(manifest.experts[-1].router_input) == layers
    _cli("export", root / "mix3", "--format", "qwen2-moe", "--out", root / "mix3-q")
    exported = Qwen2MoeForCausalLM.from_pretrained(root / "mix3-q").eval()
    mix = AutoModelForCausalLM.from_pretrained(root / "mix3").eval()
    ids = torch.randint(3, mix.config.text_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (exported(input_ids=ids).logits - mix(input_ids=ids).logits).abs().max() < 1e-4


# -- resume --------------------------------------------------------------------------------------------

def test_assemble_resumes_from_its_last_checkpoint(llama_seed, corpus, tmp_path, monkeypatch):
    experts = [str(make_expert(llama_seed, tmp_path / n, n, seed=i)) for i, n in enumerate(("a", "b"))]
    cfg = AssembleConfig(seed=llama_seed, experts=experts, out=tmp_path / "mix", seq_len=32,
                         data=[DataSource("math", corpus["math"]), DataSource("code", corpus["code"])],
                         settings=TrainSettings(max_steps=4, batch_size=2, save_steps=2, progress=False))
    crash_after_step_two_checkpoint(monkeypatch, lambda: assemble(cfg, log=lambda _: None))
    assert not cfg.out.exists() and (cfg.work_dir / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(ExpertmixError, match="--resume"):
        assemble(cfg, log=lambda _: None)
    changed = AssembleConfig(**{**cfg.__dict__, "router": "linear", "resume": True})
    with pytest.raises(ExpertmixError, match="differs in: router"):
        assemble(changed, log=lambda _: None)
    cfg.resume = True
    assemble(cfg, log=lambda _: None)
    metrics = read_manifest(cfg.out).history[-1]["metrics"]
    assert metrics["resumed_from"] == "checkpoint-2" and metrics["steps"] == 4
    assert not cfg.work_dir.exists()


def test_a_refused_assemble_leaves_no_work_folder_so_the_corrected_command_runs(llama_seed, corpus, tmp_path,
                                                                              monkeypatch):
    experts = [str(make_expert(llama_seed, tmp_path / n, n, seed=i)) for i, n in enumerate(("a", "b"))]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field here"}\n')
    cfg = AssembleConfig(seed=llama_seed, experts=experts, out=tmp_path / "mix", seq_len=32,
                         data=[DataSource("math", corpus["math"]), DataSource("code", bad)],
                         settings=TrainSettings(max_steps=4, batch_size=2, save_steps=2, progress=False))
    with pytest.raises(ExpertmixError, match="bad.jsonl line 1: no field 'text'"):
        assemble(cfg, log=lambda _: None)  # refused after upcycling, before any training
    assert not cfg.work_dir.exists()
    # A refusal after a checkpoint keeps the folder: that progress is not thrown away.
    real_fit = assemble_module.fit

    class Refuse(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise ExpertmixError("refused after checkpoint-2")

    monkeypatch.setattr(assemble_module, "fit", lambda *a, **k: real_fit(*a, **k, callbacks=[Refuse()]))
    fixed = AssembleConfig(**{**cfg.__dict__, "data": [DataSource("math", corpus["math"]),
                                                       DataSource("code", corpus["code"])]})
    with pytest.raises(ExpertmixError, match="refused after checkpoint-2"):
        assemble(fixed, log=lambda _: None)
    assert (fixed.work_dir / "checkpoints" / "checkpoint-2").is_dir()


# -- distilling the experts into the mix ---------------------------------------------------------------

def _kl_to(teacher, student, blocks) -> float:
    """Mean per-token KL(teacher || student) on ``blocks``."""
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=blocks).logits.float(), -1)
        s = torch.log_softmax(student(input_ids=blocks).logits.float(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_assemble_teaches_each_domain_with_its_own_expert(llama_seed, corpus, tokenizer, tmp_path):
    """Distilled, the mix comes closer to each domain's expert on that domain than labels bring it."""
    experts = {d: make_expert(llama_seed, tmp_path / d, d, seed=i, ffn_scale=0.3, other_scale=0.02)
               for i, d in enumerate(("math", "code"))}
    data = [DataSource(d, corpus[d]) for d in experts]
    mixes = {}
    for mode in ("experts", "none"):
        logs: list[str] = []
        mixes[mode] = assemble(AssembleConfig(
            seed=llama_seed, experts=[str(p) for p in experts.values()], data=data, out=tmp_path / f"mix-{mode}",
            train_all=True, seq_len=32, distill=mode,
            settings=TrainSettings(max_steps=12, batch_size=4, learning_rate=3e-3, progress=False)), log=logs.append)
        assert any(line.startswith("distilling: math from math, code from code") for line in logs) == (
            mode == "experts")
    history = read_manifest(mixes["experts"]).history[-1]
    assert history["distill"] == "experts" and history["teachers"] == {"math": "math", "code": "code"}
    assert read_manifest(mixes["none"]).history[-1]["teachers"] == {}
    valid = eval_blocks(data, tokenizer, 32, 8)
    models = {m: AutoModelForCausalLM.from_pretrained(p).eval() for m, p in mixes.items()}
    teachers = {d: AutoModelForCausalLM.from_pretrained(p).eval() for d, p in experts.items()}
    for d, other in (("math", "code"), ("code", "math")):
        ids = valid[d]["input_ids"]
        kl = {m: _kl_to(teachers[d], model, ids) for m, model in models.items()}
        assert kl["experts"] < 0.5 * kl["none"], (d, kl)
        assert kl["experts"] < 0.8 * _kl_to(teachers[other], models["experts"], ids)  # its own expert, not any


def test_sources_are_taught_by_the_expert_of_their_domain_or_refused_when_ambiguous(llama_seed, tmp_path):
    a = load_expert(str(make_expert(llama_seed, tmp_path / "a", "math", seed=1)))
    b = load_expert(str(make_expert(llama_seed, tmp_path / "b", "code", seed=2)))
    assert teachers_of_sources(["code", "math", "prose"], [a, b]) == {"code": 1, "math": 0, "prose": -1}
    with pytest.raises(ExpertmixError, match="--data math: experts math, math all claim it"):
        teachers_of_sources(["math"], [a, a])


def test_taught_blocks_pack_each_source_apart_at_its_share(tmp_path):
    """Rows never mix two sources, each names its source's teacher, and the shares hold by tokens."""
    docs = {name: [TokenizedDocument([base + i % 7] * 20, [base + i % 7] * 20) for i in range(60)]
            for name, base in (("math", 10), ("code", 100), ("prose", 200))}
    shares = {"math": 0.5, "code": 0.25, "prose": 0.25}
    blocks, report = mixture_blocks(docs, shares, 1600, 16, seed=0, teachers={"math": 0, "code": 1})
    rows, teacher = blocks["input_ids"], blocks[TEACHER_KEY]
    kind = rows // 100  # 0: math, 1: code, 2: prose
    assert (kind == kind[:, :1]).all()
    assert torch.equal(teacher, torch.tensor([{0: 0, 1: 1, 2: -1}[int(k)] for k in kind[:, 0]]))
    counts = torch.bincount(kind[:, 0], minlength=3).tolist()
    assert counts[0] == pytest.approx(2 * counts[1], abs=2) and counts[1] == pytest.approx(counts[2], abs=1)
    assert {k: round(v["actual_share"], 2) for k, v in report.items()} == {"math": 0.5, "code": 0.25, "prose": 0.25}


def test_assemble_without_a_source_named_after_an_expert_trains_on_labels_and_says_so(llama_seed, corpus, tmp_path):
    experts = [str(make_expert(llama_seed, tmp_path / n, n, seed=i)) for i, n in enumerate(("a", "b"))]
    result = CliRunner().invoke(main, [
        "assemble", "--seed", str(llama_seed), "--experts", *experts, "--data", f"x={corpus['math']}",
        "--out", str(tmp_path / "mix"), "--max-steps", "1", "--batch-size", "2", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "no data source is named after an expert's domain (sources: x; domains: a, b)" in said
    assert read_manifest(tmp_path / "mix").history[-1]["teachers"] == {"x": None}


def test_experts_pulled_from_a_registry_are_named_by_their_registry_name(published, llama_seed, corpus, tmp_path):
    """An expert published under another --name than its card's is that name in the mix (it kept the card's, so two
    repos of one folder collided as 'given more than once')."""
    root, store, _ = published
    _cli("publish", root / "code", "--name", "team/code-v2", "--registry", store)
    _cli("assemble", "--seed", llama_seed, "--experts", "code", "team/code-v2", "--registry", store,
         "--data", f"code={corpus['code']}", "--out", tmp_path / "mix", "--max-steps", "1", "--batch-size", "2",
         "--seq-len", "32", "--distill", "none")  # one domain, two experts: no one teacher for it
    manifest = read_manifest(tmp_path / "mix")
    assert [(e.name, e.repo) for e in manifest.experts] == [("code", "code"), ("team/code-v2", "team/code-v2")]
    assert AutoConfig.from_pretrained(tmp_path / "mix").expert_names == ["code", "team/code-v2"]


def test_an_export_that_fails_its_check_is_not_written_and_an_unchecked_one_says_so(cli_mix, tmp_path, monkeypatch):
    import expertmix.assembler.export as export_module

    monkeypatch.setattr(export_module, "max_logit_difference", lambda mix, exported: 0.5)  # a broken conversion
    res = CliRunner().invoke(main, ["export", str(cli_mix), "--out", str(tmp_path / "bad")])
    message = " ".join(res.output.split())
    assert res.exit_code == 1 and "max |logit difference| 5.00e-01 > 0.001" in message and "nothing was written" \
        in message
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))
    out = _cli("export", cli_mix, "--no-check", "--out", tmp_path / "unchecked")
    assert "not checked against the mix" in out
    assert json.loads((tmp_path / "unchecked" / "export_check.json").read_text()) == {"checked": False}


def test_a_dense_merge_records_and_says_that_every_weight_trains(llama_seed, corpus, tmp_path):
    """A merge has no router: its history said it trained ["router", "experts", "shared", "dense"]."""
    experts = [str(make_expert(llama_seed, tmp_path / n, n, seed=i)) for i, n in enumerate(("math", "code"))]
    mix = tmp_path / "merge"
    result = CliRunner().invoke(main, [
        "assemble", "--seed", str(llama_seed), "--experts", *experts, "--router", "merge", "--distill", "none",
        "--data", f"math={corpus['math']}", "--out", str(mix), "--max-steps", "1", "--batch-size", "2",
        "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    model = AutoModelForCausalLM.from_pretrained(mix)
    every = sum(p.numel() for p in model.parameters())
    assert f"training every weight of the dense merge ({every / 1e6:.2f}M parameters)" in said, said
    stage = read_manifest(mix).history[-1]
    assert stage["router"] == "merge" and stage["train"] == ["all"] and stage["trainable_parameters"] == every


def test_a_tokenizer_with_ids_past_the_embedding_is_refused_before_any_work(llama_seed, corpus, tmp_path):
    """Tokens added to a seed's or a mix's tokenizer without resizing its embeddings: assemble (nexus and mov) and
    extend name the numbers before they read data or write a work folder."""
    experts = [make_expert(llama_seed, tmp_path / n, n, seed=i) for i, n in enumerate(("math", "code", "prose"))]
    seed = tmp_path / "seed"
    shutil.copytree(llama_seed, seed)
    tokenizer = AutoTokenizer.from_pretrained(seed)
    rows = len(tokenizer)
    tokenizer.add_tokens(["<extra-1>", "<extra-2>"])
    tokenizer.save_pretrained(seed)
    mix = tmp_path / "mix"
    shutil.copytree(upcycle(llama_seed, [load_expert(str(e)) for e in experts[:2]], tmp_path / "m", progress=False),
                    mix)
    tokenizer = AutoTokenizer.from_pretrained(mix)
    tokenizer.add_special_tokens({"eos_token": "<new-eos>"})
    tokenizer.save_pretrained(mix)
    data = ["--data", f"math={corpus['math']}"]
    too_many = f"it has {rows + 2} tokens but the model's embedding has {rows} rows"
    commands = {
        f"assemble --seed {seed}": (["assemble", "--seed", seed, "--experts", *experts[:2], *data], too_many),
        f"assemble --kind mov --seed {seed}": (["assemble", "--kind", "mov", "--seed", seed, *data], too_many),
        f"extend {mix}": (["extend", mix, "--expert", experts[2], "--data", f"prose={corpus['prose']}"],
                          f"it has {rows + 1} tokens but the model's embedding has {rows} rows; its eos token id "
                          f"{rows} is past the embedding's {rows} rows"),
    }
    for i, (where, (args, problem)) in enumerate(commands.items()):
        out = tmp_path / f"out{i}"
        result = CliRunner().invoke(main, [*map(str, args), "--out", str(out)])
        message = " ".join(result.output.split())
        assert result.exit_code == 1, result.output
        assert f"{where}: the tokenizer does not fit the model: {problem}" in message, message
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
