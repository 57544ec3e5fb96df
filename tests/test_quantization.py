"""Weight-only int8 / int4 quantization: round-trip bounds, the quantized mix through the CLI and its loader."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from nexus_helpers import make_expert
from transformers import AutoModelForCausalLM

from expertmix.assembler.modeling_nexus import NexusExperts
from expertmix.assembler.quantization import (
    QuantizedExperts,
    QuantizedLinear,
    QuantSpec,
    dequantize_tensor,
    load_quantized,
    quantize_tensor,
)
from expertmix.assembler.upcycling import load_expert, upcycle
from expertmix.cli import main
from expertmix.experts.seed import build_seed


def _step_bound(parts: dict[str, torch.Tensor], spec: QuantSpec, in_features: int) -> torch.Tensor:
    """Half a quantization step for every weight (per row for int8, per group for int4)."""
    scale = parts["scale"].float()
    if spec.scheme == "int8":
        return (scale / 2)[..., None].expand(*scale.shape, in_features)
    return (scale / 2).repeat_interleave(spec.group_for(in_features), dim=-1)[..., :in_features]


@pytest.mark.parametrize("shape", [(48, 96), (3, 40, 70)], ids=["linear", "fused-experts"])
def test_int8_round_trip_error_is_within_half_a_step_per_row(shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 3
    w[..., 0, :] = 0.0  # an all-zero row must survive (no division by zero)
    spec = QuantSpec("int8")
    parts = quantize_tensor(w, spec)
    assert parts["qweight"].dtype == torch.int8 and parts["qweight"].shape == w.shape
    assert parts["scale"].shape == w.shape[:-1]
    back = dequantize_tensor(parts, spec, w.shape[-1])
    err = (back - w).abs()
    assert (err <= _step_bound(parts, spec, w.shape[-1]) * (1 + 1e-5) + 1e-7).all()
    assert err[..., 0, :].max() == 0
    # The largest weight of each row is hit exactly (it defines the scale) and the codes use the full range.
    assert parts["qweight"].abs().amax(-1)[..., 1:].eq(127).all()
    assert (back - w).norm() / w.norm() < 0.01


@pytest.mark.parametrize("shape,group", [((32, 128), 32), ((3, 20, 70), 32), ((8, 24), 128)],
                         ids=["aligned", "ragged-last-group", "group-wider-than-row"])
def test_int4_group_round_trip_error_is_within_half_a_step_per_group(shape, group):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen) + 0.3  # offset: asymmetric ranges need the zero point
    spec = QuantSpec("int4", group_size=group)
    parts = quantize_tensor(w, spec)
    groups = -(-shape[-1] // group)
    assert parts["qweight"].dtype == torch.uint8 and parts["qweight"].shape[-1] == groups * group // 2
    assert parts["scale"].shape == (*shape[:-1], groups) and parts["scale"].dtype == torch.float16
    back = dequantize_tensor(parts, spec, shape[-1])
    assert back.shape == w.shape
    err = (back - w).abs()
    assert (err <= _step_bound(parts, spec, shape[-1]) * (1 + 1e-3) + 1e-6).all()
    # Both nibbles of a byte carry a code: unpacking the packed bytes gives codes spanning 0..15.
    codes = torch.stack([parts["qweight"] & 15, parts["qweight"] >> 4], -1)
    assert codes.min() == 0 and codes.max() == 15
    assert 0.02 < float((back - w).norm() / w.norm()) < 0.2


def test_quantized_linear_equals_float_linear_with_dequantized_weight():
    lin = torch.nn.Linear(40, 24, bias=True)
    x = torch.randn(5, 40)
    for spec in (QuantSpec("int8"), QuantSpec("int4", group_size=16)):
        q = QuantizedLinear.from_linear(lin, spec)
        want = torch.nn.functional.linear(x, q.dequantized_weight(), lin.bias)
        assert torch.allclose(q(x), want, atol=1e-6)
        assert (q(x) - lin(x)).abs().max() < (0.02 if spec.scheme == "int8" else 0.3)


@pytest.fixture(scope="module")
def mixes(tmp_path_factory, request) -> dict[str, Path]:
    """A three-expert Nexus mix per architecture (experts: the seed with noise on its FFN)."""
    out = {}
    for arch in ("llama_seed", "qwen2_seed"):
        seed = request.getfixturevalue(arch)
        root = tmp_path_factory.mktemp(f"quant-{arch}")
        experts = [make_expert(seed, root / f"e{i}", f"e{i}", seed=i + 1, ffn_scale=0.2) for i in range(3)]
        out[arch] = upcycle(seed, [load_expert(str(e)) for e in experts], root / "mix", progress=False)
    return out


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def _relative_logit_error(ref, model, ids, expert: int | None) -> float:
    with torch.no_grad(), ref.route_to(expert), model.route_to(expert):
        a, b = ref(input_ids=ids).logits, model(input_ids=ids).logits
    return float((a - b).norm() / a.norm())


# Bounds on |logits - logits~| / |logits| for a tiny random mix (int8 measures ~0.018, int4 ~0.23): weights of
# std 0.02 through two layers. The next-token agreement checks the same thing as a user sees it.
@pytest.mark.parametrize("arch,scheme,bound,agree", [("llama_seed", "int8", 0.04, 0.9),
                                                     ("qwen2_seed", "int8", 0.04, 0.9),
                                                     ("llama_seed", "int4", 0.35, 0.5)])
def test_quantize_command_writes_a_smaller_mix_whose_logits_stay_close(mixes, tmp_path, arch, scheme, bound,
                                                                      agree):
    mix = mixes[arch]
    out = tmp_path / f"mix-{scheme}"
    groups = ["--group-size", "32"] if scheme == "int4" else []
    result = CliRunner().invoke(main, ["quantize", str(mix), "--scheme", scheme, *groups, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "quantized mix written to" in result.output
    stage = json.loads((out / "mix.json").read_text())["history"][-1]  # the mix's record says what was done
    assert stage["stage"] == "quantize" and stage["scheme"] == scheme and stage["source"] == str(mix.resolve())
    float_bytes, q_bytes = (mix / "model.safetensors").stat().st_size, (out / "model.safetensors").stat().st_size
    assert q_bytes < float_bytes * (0.45 if scheme == "int8" else 0.35)

    # Plain transformers loads it (the registered quantizer rebuilds the quantized modules) ...
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.quantization_config.to_dict()["scheme"] == scheme
    blocks = model.moe_blocks()
    assert all(isinstance(b.experts, QuantizedExperts) for b in blocks)
    assert not any(isinstance(m, NexusExperts) for m in model.modules())
    assert all(isinstance(b.shared_expert.down_proj, QuantizedLinear) for b in blocks)
    assert all(isinstance(b.router.up_proj, torch.nn.Linear) for b in blocks)  # routers stay float
    # ... and the loader runs it on the CPU: every routed expert (forced) and the normal routing stay close.
    ref = AutoModelForCausalLM.from_pretrained(mix).eval()
    ids = _ids(ref.config.text_config.vocab_size)
    for expert in (0, 1, 2):
        assert _relative_logit_error(ref, model, ids, expert) < bound
    with torch.no_grad():
        r, q = ref(input_ids=ids, output_router_logits=True), model(input_ids=ids, output_router_logits=True)
    same_route = torch.stack([(a.argmax(-1) == b.argmax(-1)).float().mean()
                              for a, b in zip(r.router_logits, q.router_logits, strict=True)])
    assert same_route.min() > 0.8
    assert (r.logits.argmax(-1) == q.logits.argmax(-1)).float().mean() >= agree
    loaded = load_quantized(out)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, q.logits)
        generated = loaded.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9) and torch.equal(generated[:, :4], ids[:1, :4])


def test_quantize_refuses_an_existing_output_and_a_float_loader_misuse(mixes, tmp_path):
    mix = mixes["llama_seed"]
    out = tmp_path / "taken"
    out.mkdir()
    result = CliRunner().invoke(main, ["quantize", str(mix), "--scheme", "int8", "--out", str(out)])
    assert result.exit_code == 1 and "already exists" in result.output
    result = CliRunner().invoke(main, ["quantize", str(mix), "--scheme", "int4", "--group-size", "7",
                                       "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--group-size 7" in result.output
    # A group longer than the rows would pad every row (int4 larger than int8); int8 has no groups.
    result = CliRunner().invoke(main, ["quantize", str(mix), "--scheme", "int4", "--group-size", "1000",
                                       "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "--group-size 1000 is longer than the shortest rows" in result.output
    result = CliRunner().invoke(main, ["quantize", str(mix), "--scheme", "int8", "--group-size", "32",
                                       "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "groups are an int4 setting" in result.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(Exception, match="not a mix quantized by expertmix"):
        load_quantized(mix)


def test_stages_that_need_float_weights_refuse_a_quantized_mix_by_name_and_leave_nothing(mixes, corpus, tmp_path):
    mix = mixes["llama_seed"]
    quantized = tmp_path / "mix-int8"
    assert CliRunner().invoke(main, ["quantize", str(mix), "--scheme", "int8", "--out", str(quantized)]).exit_code == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1 + 2 =", "language": "en"}\n')
    experts = [str(mix.parent / "e0"), str(mix.parent / "e1")]
    data = str(corpus["math"])
    commands = {
        "extend": ["extend", str(quantized), "--expert", experts[0], "--data", f"math={data}"],
        "export --format qwen2-moe": ["export", str(quantized), "--format", "qwen2-moe"],
        "export --format onnx": ["export", str(quantized), "--format", "onnx"],
        "align": ["align", str(quantized), "--method", "rloo", "--prompts", str(prompts), "--reward", "arithmetic"],
        "quantize": ["quantize", str(quantized), "--scheme", "int4"],
        "training an expert": ["train", "--base", str(quantized), "--data", data, "--domain", "math"],
        "a seed": ["assemble", "--seed", str(quantized), "--experts", *experts, "--data", f"math={data}"],
    }
    for i, (action, args) in enumerate(commands.items()):
        out = tmp_path / f"out{i}"
        result = CliRunner().invoke(main, [*args, "--out", str(out)])
        assert result.exit_code == 1, (action, result.output)
        message = " ".join(result.output.split())
        assert f"a quantized model (int8); {action} needs float weights" in message, message
        assert str(mix.resolve()) in message  # the float mix it was quantized from
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def test_sampling_a_quantized_mix_for_preferences_uses_its_quantized_weights(mixes, tmp_path):
    quantized = tmp_path / "mix-int4"
    assert CliRunner().invoke(main, ["quantize", str(mixes["llama_seed"]), "--scheme", "int4", "--group-size", "32",
                                     "--out", str(quantized)]).exit_code == 0
    # A fresh process, as `expertmix prefs generate` runs: nothing has imported the quantizer beforehand.
    script = textwrap.dedent(f"""
        import torch
        from expertmix.alignment.policy import load_policy
        policy, _ = load_policy({str(quantized)!r})
        from expertmix.assembler.quantization import load_quantized
        ids = torch.arange(3, 19).reshape(2, 8)
        with torch.no_grad():
            print(float((policy(input_ids=ids).logits - load_quantized({str(quantized)!r})(input_ids=ids).logits)
                        .abs().max()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(result.stdout.split()[-1]) == 0.0


def test_publishing_a_mix_or_a_seed_says_what_the_folder_is_and_what_to_do(mixes, llama_seed, home):
    mix = mixes["llama_seed"]
    for folder, expected in ((mix, f"{mix}: a mix (mix.json), not an expert"),
                             (llama_seed, f"{llama_seed}: no expert card (README.md)")):
        result = CliRunner().invoke(main, ["publish", str(folder)])
        message = " ".join(result.output.split())
        assert result.exit_code == 1 and expected in message and "expertmix train" in message, message
    assert "--format qwen2-moe" in " ".join(CliRunner().invoke(main, ["publish", str(mix)]).output.split())
    assert not (home / "store").exists() or not any((home / "store").rglob("*.safetensors"))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizing_everything_keeps_a_tied_head_float_and_the_result_loads_and_runs(mixes, tmp_path, scheme):
    """--keep-float "" asks for every linear layer, routers included; the head shares the (float) embedding
    matrix, so it stays float, and transformers loads the result (a quantized tied head did not load)."""
    mix = mixes["llama_seed"]
    out = tmp_path / "all"
    groups = ["--group-size", "32"] if scheme == "int4" else []
    result = CliRunner().invoke(main, ["quantize", str(mix), "--scheme", scheme, *groups, "--keep-float", "",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "tied to the input embeddings" in result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["skip"] == ["lm_head"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(isinstance(b.router.up_proj, QuantizedLinear) for b in model.moe_blocks())  # routers too
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ref = AutoModelForCausalLM.from_pretrained(mix).eval()
    ids = _ids(ref.config.text_config.vocab_size)
    with torch.no_grad():
        agree = (ref(input_ids=ids).logits.argmax(-1) == model(input_ids=ids).logits.argmax(-1)).float().mean()
    assert agree >= 0.5


@pytest.mark.parametrize("kept", ["down_proj", "gate_up_proj,down_proj"])
def test_keep_float_names_the_routed_experts_fused_weights_too(mixes, tmp_path, kept):
    """--keep-float down_proj keeps every down projection float, the routed experts' fused one included; naming
    both fused weights leaves the routed experts wholly float."""
    mix = mixes["llama_seed"]
    out = tmp_path / "kept"
    result = CliRunner().invoke(main, ["quantize", str(mix), "--scheme", "int8", "--out", str(out),
                                       "--keep-float", f"lm_head,router,gate,{kept}"])
    assert result.exit_code == 0, result.output
    ref = AutoModelForCausalLM.from_pretrained(mix).eval()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for ref_block, block in zip(ref.moe_blocks(), model.moe_blocks(), strict=True):
        assert isinstance(block.shared_expert.down_proj, torch.nn.Linear)
        if kept == "down_proj":
            assert isinstance(block.experts, QuantizedExperts) and block.experts.float_weights == ("down_proj",)
            assert torch.equal(block.experts.down_proj, ref_block.experts.down_proj.float())
            assert not torch.equal(block.experts.expert_weight("gate_up_proj", 0, torch.float32),
                                   ref_block.experts.gate_up_proj[0].float())
            assert isinstance(block.shared_expert.up_proj, QuantizedLinear)
        else:
            assert isinstance(block.experts, NexusExperts)
    ids = _ids(ref.config.text_config.vocab_size)
    for expert in (0, 1, 2):
        assert _relative_logit_error(ref, model, ids, expert) < 0.04


def test_a_keep_float_entry_that_names_nothing_is_refused_and_a_second_writer_waits_for_none(mixes, tmp_path):
    """A dotted path or a typo used to keep nothing float, silently; a second quantize to an --out being written
    is refused before it loads anything."""
    import subprocess
    import sys

    mix = mixes["llama_seed"]
    for entry in ("mlp.experts.down_proj", "down_prj"):
        res = CliRunner().invoke(main, ["quantize", str(mix), "--scheme", "int8", "--out", str(tmp_path / "q"),
                                        "--keep-float", f"lm_head,{entry}"])
        message = " ".join(res.output.split())
        assert res.exit_code == 1 and f"--keep-float {entry}: matches no module of this model" in message, message
        assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.*"))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from expertmix.fsutil import atomic_dir\n"
                               "with atomic_dir(sys.argv[1]):\n    print('writing', flush=True); time.sleep(120)",
                               str(tmp_path / "busy")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "writing"
        res = CliRunner().invoke(main, ["quantize", str(mix), "--scheme", "int8", "--out", str(tmp_path / "busy")])
        assert res.exit_code == 1 and "is being written by another expertmix process" in res.output
        assert "quantized" not in res.output  # refused before the work, not after it
    finally:
        holder.kill()
        holder.wait()


def test_int8_records_no_group_size_and_int4_groups_fit_widths_the_default_group_does_not_divide(tokenizer, tmp_path):
    """Widths 96 and 160 (no multiple of 128): without --group-size each layer's group is a divisor of its input
    width (96 and 80, no padded rows; a group of 128 was refused as longer than the rows); int8 has no groups."""
    seed = build_seed(tmp_path / "seed", tokenizer, hidden_size=96, intermediate_size=160)
    for scheme in ("int8", "int4"):
        out = tmp_path / scheme
        result = CliRunner().invoke(main, ["quantize", str(seed), "--scheme", scheme, "--out", str(out)])
        assert result.exit_code == 0, result.output
        config = json.loads((out / "config.json").read_text())["quantization_config"]
        record = json.loads((out / "quantization.json").read_text())
        if scheme == "int8":
            assert "group_size" not in config and "group_size" not in record
            continue
        assert config["group_size"] is None
        assert record["groups_by_input_width"] == {"96": 96, "160": 80}
        assert "96 inputs in groups of 96, 160 inputs in groups of 80" in " ".join(result.output.split())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "int4").eval()
    ref = AutoModelForCausalLM.from_pretrained(seed).eval()
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        q, w = model.model.layers[0].get_submodule(name), ref.model.layers[0].get_submodule(name).weight.detach()
        groups = w.shape[1] // {96: 96, 160: 80}[w.shape[1]]
        # codes for exactly the row's inputs (two per byte): no padding; one scale per fitted group
        assert q.weight_qweight.shape == (w.shape[0], w.shape[1] // 2) and q.weight_scale.shape == (w.shape[0], groups)
        assert float((q.dequantized_weight() - w).norm() / w.norm()) < 0.2
    ids = _ids(ref.config.vocab_size)
    with torch.no_grad():
        agree = (ref(input_ids=ids).logits.argmax(-1) == model(input_ids=ids).logits.argmax(-1)).float().mean()
    assert agree >= 0.5


def test_importing_expertmix_assembler_alone_lets_transformers_load_a_quantized_mix(mixes, tmp_path):
    quantized = tmp_path / "mix-int4"
    result = CliRunner().invoke(main, ["quantize", str(mixes["llama_seed"]), "--scheme", "int4",
                                       "--out", str(quantized)])
    assert result.exit_code == 0, result.output
    # A fresh process that imports the package only: the quantizer is registered with it, as the Nexus model is.
    script = textwrap.dedent(f"""
        import sys
        import expertmix.assembler
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(quantized)!r})
        block = model.moe_blocks()[0]
        print(type(block.experts).__name__, type(block.shared_expert.up_proj).__name__)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["QuantizedExperts", "QuantizedLinear"]


def test_quantizing_lets_each_float_layer_go_as_its_codes_replace_it(tokenizer, tmp_path, monkeypatch):
    """Layers are quantized one at a time and each float layer is freed as its codes replace it, its error measured
    then: a 7B model in float32 is 28 GB, and a second float copy (kept to measure the error) would double that."""
    import gc
    import weakref

    import expertmix.assembler.quantization as quantization

    seed = build_seed(tmp_path / "seed", tokenizer, arch="llama", hidden_size=64,
                      intermediate_size=128, num_layers=3)
    replaced, alive = [], []
    measure = quantization._relative_errors

    def watched(old, new, spec):
        gc.collect()
        alive.append(sum(ref() is not None for ref in replaced))  # float layers replaced earlier, still in memory
        replaced.append(weakref.ref(old))
        return measure(old, new, spec)

    monkeypatch.setattr(quantization, "_relative_errors", watched)
    report = quantization.quantize_mix(seed, tmp_path / "q", QuantSpec("int8"))
    assert len(replaced) == report.tensors == 3 * 7 and alive == [0] * 21
    assert 0 < report.stats["mean_relative_error"] < 0.02  # int8's small error, measured layer by layer
