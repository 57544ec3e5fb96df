"""ONNX export of a mix: routing traced for any input, KV-cache generation under onnxruntime, ORT quantization."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from nexus_helpers import make_expert
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from expertmix.assembler import onnx_export
from expertmix.assembler.evaluation import evaluate_quality
from expertmix.assembler.onnx_export import OnnxCausalLM, OnnxExportSettings, export_onnx, weight_matmuls
from expertmix.assembler.upcycling import load_expert, upcycle
from expertmix.cli import main
from expertmix.experts.training import DataSource

NUM_EXPERTS = 3
EXAMPLE = [[5, 5], [5, 5]]  # every token alike: the export example reaches one expert per layer


@pytest.fixture(scope="module")
def mix(llama_seed, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("onnx-mix")
    experts = [make_expert(llama_seed, root / f"e{i}", f"e{i}", seed=i + 1, ffn_scale=0.2)
               for i in range(NUM_EXPERTS)]
    return upcycle(llama_seed, [load_expert(str(e)) for e in experts], root / "mix", progress=False)


@pytest.fixture(scope="module")
def model(mix):
    return AutoModelForCausalLM.from_pretrained(mix).eval()


@pytest.fixture(scope="module")
def exported(mix, tmp_path_factory) -> Path:
    """The mix exported (sparse routing) from a one-expert-per-layer example, with int8 and int4 graphs."""
    out = tmp_path_factory.mktemp("onnx") / "export"
    return export_onnx(mix, out, OnnxExportSettings(example_ids=EXAMPLE, quantize=("int8", "int4"), block_size=32))


def _experts_hit(model, ids: torch.Tensor) -> set[tuple[int, int]]:
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    return {(layer, int(e)) for layer, logits in enumerate(out.router_logits) for e in logits.argmax(-1).unique()}


def _random_ids(model, shape, seed) -> torch.Tensor:
    return torch.randint(3, model.config.text_config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_onnx_logits_equal_torch_on_inputs_routed_unlike_the_export_example(model, exported):
    ids = _random_ids(model, (3, 24), seed=1)
    example_hits, hits = _experts_hit(model, torch.tensor(EXAMPLE)), _experts_hit(model, ids)
    assert len(example_hits) == model.config.text_config.num_hidden_layers  # one expert per layer
    assert hits - example_hits, "the test input must reach experts the export example did not"
    ort = OnnxCausalLM(exported)
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
    assert np.abs(ort.logits(ids.numpy()) - want).max() < 1e-3
    # Other shapes than the example's: one sequence, one token, and right padding.
    for shape in ((1, 1), (1, 9)):
        x = _random_ids(model, shape, seed=sum(shape))
        with torch.no_grad():
            assert np.abs(ort.logits(x.numpy()) - model(input_ids=x).logits.numpy()).max() < 1e-3
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    got = ort.logits(ids.numpy(), mask.numpy())
    assert np.abs(got - want)[mask.bool().numpy()].max() < 1e-3


def test_kv_cache_greedy_generation_through_onnxruntime_equals_transformers(model, exported):
    prompts = _random_ids(model, (2, 6), seed=3)
    with torch.no_grad():
        want = model.generate(prompts, max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0).numpy()
    ort = OnnxCausalLM(exported)
    got = ort.generate(prompts.numpy(), max_new_tokens=12, eos_token_id=-1)
    assert got.shape == (2, 18)
    np.testing.assert_array_equal(got, want)
    # Step by step with the cache gives the logits of one whole forward.
    full = ort.logits(got[:, :10])
    first = ort.step(got[:, :6], np.ones((2, 6)), np.arange(6)[None].repeat(2, 0))
    nxt = ort.step(got[:, 6:10], np.ones((2, 10)), np.arange(6, 10)[None].repeat(2, 0), first.present)
    assert nxt.present[0].shape == (2, ort.kv_heads, 10, ort.head_dim)
    assert np.abs(nxt.logits - full[:, 6:10]).max() < 1e-4


def test_onnxruntime_int8_and_int4_graphs_quantize_every_expert_matmul(model, exported):
    layers = model.config.text_config.num_hidden_layers
    base = onnx.load(str(exported / "model.onnx"))
    # Every expert projection is its own constant 2-D MatMul weight: 4 attention + 3 shared + 3 per routed expert.
    per_layer = 4 + 3 + 3 * NUM_EXPERTS
    weights = weight_matmuls(base)
    assert len(weights) == layers * (per_layer + 1) + 1  # + router gate per layer + the head
    vocab = model.config.text_config.vocab_size
    for variant, op in (("int8", "MatMulInteger"), ("int4", "MatMulNBits")):
        graph = onnx.load(str(exported / f"model.{variant}.onnx"))
        assert [n.op_type for n in graph.graph.node].count(op) == layers * per_layer, variant
        # What stays float, as in torch quantization: each layer's router gate and the output head.
        kept = weight_matmuls(graph)
        assert len(kept) == layers + 1
        assert all(w.endswith("router_gate") or dims == [model.config.text_config.hidden_size, vocab]
                   for _, w, dims in kept)
    size = {v: (exported / f).stat().st_size for v, f in
            (("fp32", "model.onnx"), ("int8", "model.int8.onnx"), ("int4", "model.int4.onnx"))}
    assert size["int4"] < size["int8"] < size["fp32"]
    ids = _random_ids(model, (2, 16), seed=4)
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
    for variant, bound in (("int8", 0.1), ("int4", 0.45)):
        got = OnnxCausalLM(exported, variant).logits(ids.numpy())
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound, variant


def test_eval_scores_the_onnx_export_like_the_mix(mix, exported, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text("the cat sat on the mat\n\n12 + 30 = 42\n\ndef f(x):\n    return x\n", encoding="utf-8")
    report = evaluate_quality(exported, [DataSource("en", data)], reference=mix, window=8, progress=False)
    row = report.group("all")
    name = report.candidates[0]
    assert abs(row.relative_change[name]) < 1e-5 and row.kl_per_token[name] < 1e-6
    assert row.top1_flip_rate[name] == 0


def test_export_command_writes_a_dense_routing_onnx_that_matches_the_mix(mix, model, tmp_path):
    out = tmp_path / "dense"
    result = CliRunner().invoke(main, ["export", str(mix), "--format", "onnx", "--routing", "dense",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "dense routing" in result.output
    diff = float(re.search(r"max \|logit difference\| against the mix \(onnxruntime fp32\): (\S+)",
                           result.output).group(1))
    assert diff < 1e-3
    for name in ("model.onnx", "onnx_export.json", "config.json", "tokenizer.json", "mix.json"):
        assert (out / name).is_file(), name
    ids = _random_ids(model, (2, 20), seed=5)
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
    assert np.abs(OnnxCausalLM(out).logits(ids.numpy()) - want).max() < 1e-3
    again = CliRunner().invoke(main, ["export", str(mix), "--format", "onnx", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_export_refuses_sliding_window_attention_and_dynamic_rope_in_one_line_before_any_work(
        mix, llama_seed, tmp_path, monkeypatch):
    """A mix whose text config has dynamic RoPE scaling, and a model with sliding-window attention: the graph would
    freeze what transformers computes per input, so both are refused from their config, nothing loaded or written."""
    dynamic = tmp_path / "dynamic-mix"
    shutil.copytree(mix, dynamic)
    config = json.loads((dynamic / "config.json").read_text())
    config["text_config"]["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (dynamic / "config.json").write_text(json.dumps(config))
    sliding = tmp_path / "sliding"
    qwen2 = AutoConfig.for_model("qwen2", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                 sliding_window=16, max_window_layers=0)
    AutoModelForCausalLM.from_config(qwen2).save_pretrained(sliding)
    AutoTokenizer.from_pretrained(llama_seed).save_pretrained(sliding)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(onnx_export, "load_for_export", no_loading)
    for folder, what in ((dynamic, "rope_type 'dynamic' (RoPE frequencies recomputed from each input's length)"),
                         (sliding, "sliding-window attention (sliding_window 16)")):
        out = tmp_path / f"{folder.name}-onnx"
        result = CliRunner().invoke(main, ["export", str(folder), "--format", "onnx", "--out", str(out)])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and f"{folder}: export --format onnx cannot express {what}" in lines[0], result.output
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.*"))
