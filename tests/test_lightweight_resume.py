"""Lightweight mixtures (issue 6): an interrupted `assemble --kind mov|molora` resumes from its checkpoint, and
shared routers (one per block and input width) compute the formula, count once, and save and reload."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import TrainerCallback

from expertmix.assembler import assemble as assemble_module
from expertmix.assembler.lightweight import (
    MixtureSpec,
    build_mixture,
    fresh_expert_config,
    init_routers,
    load_base,
    load_lightweight,
    parameter_counts,
    read_lightweight_manifest,
    router_input_statistics,
)
from expertmix.assembler.mixture_layers import block_of, routed_layers, router_owners
from expertmix.cli import main
from expertmix.experts.data import pack, read_documents, tokenize_documents

FAST = ["--seq-len", "32", "--batch-size", "2"]
IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]])


def run(*args, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


class _Interrupt(TrainerCallback):
    """Ctrl-C after step 3, once the step-2 checkpoint is on disk."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt


def _adapters(folder) -> dict[str, torch.Tensor]:
    return {f"{d.name}/{k}": v for d in sorted((folder / "experts").iterdir()) if d.is_dir()
            for k, v in load_file(d / "adapter_model.safetensors").items()}


@pytest.mark.parametrize("kind, extra", [("mov", []), ("molora", ["--rank", "2", "--shared-router"])])
def test_interrupted_lightweight_assemble_resumes_from_its_checkpoint(kind, extra, llama_seed, corpus, home, tmp_path,
                                                                      monkeypatch):
    data = ["--data", f"math={corpus['math']}", "--data", f"code={corpus['code']}"]
    args = ["assemble", "--kind", kind, "--seed", llama_seed, "--num-experts", "3", *extra, *data, *FAST,
            "--max-steps", "4", "--save-steps", "2"]
    # The same run uninterrupted: what the resumed one must end with.
    run(*args, "--out", tmp_path / "straight")

    out = tmp_path / "mix"
    real_fit = assemble_module.fit
    monkeypatch.setattr(assemble_module, "fit", lambda *a, **k: real_fit(*a, **k, callbacks=[_Interrupt()]))
    interrupted = run(*args, "--out", out, ok=False)
    monkeypatch.setattr(assemble_module, "fit", real_fit)
    assert interrupted.exit_code != 0
    work = out.with_name("mix.partial")
    assert not out.exists() and (work / "checkpoints" / "checkpoint-2").is_dir()

    refused = run(*args, "--out", out, ok=False)  # an interrupted run is not silently restarted
    assert refused.exit_code == 1 and "--resume" in refused.output
    changed = run(*[a if a != "3" else "2" for a in args], "--out", out, "--resume", ok=False)
    assert changed.exit_code == 1 and "num_experts" in changed.output

    if not extra:  # a run started before a setting existed resumes while the setting keeps its default
        run_file = work / "run.json"
        older = json.loads(run_file.read_text())
        del older["shared_router"], older["settings"]["min_lr_ratio"]
        run_file.write_text(json.dumps(older))
        changed = run(*args, "--shared-router", "--out", out, "--resume", ok=False)
        assert changed.exit_code == 1 and "shared_router" in changed.output

    run(*args, "--out", out, "--resume")
    manifest = read_lightweight_manifest(out)
    metrics = manifest.history[-1]["metrics"]
    assert metrics["resumed_from"] == "checkpoint-2" and metrics["steps"] == 4
    assert manifest.shared_router == ("--shared-router" in extra)
    assert not work.exists()
    # Every expert and router came back from the checkpoint: the result is the uninterrupted run's.
    resumed, straight = _adapters(out), _adapters(tmp_path / "straight")
    assert resumed.keys() == straight.keys() and any(".mix_router" in k for k in resumed)
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-5, msg=key)
    fresh = load_base(llama_seed)
    assert not torch.equal(load_lightweight(out, device="cpu").model(input_ids=IDS).logits,
                           fresh(input_ids=IDS).logits)


@pytest.mark.parametrize("kind", ["mov", "molora"])
def test_shared_routers_merge_by_one_router_per_block_and_input_width(kind, llama_seed, corpus, tokenizer):
    targets = ["k_proj", "v_proj", "up_proj", "down_proj"]
    base = load_base(llama_seed)
    configs = [fresh_expert_config(MixtureSpec(kind, rank=2, target_modules=targets), base)] * 3
    torch.manual_seed(0)
    separate = build_mixture(load_base(llama_seed), configs)
    torch.manual_seed(0)
    shared = build_mixture(load_base(llama_seed), configs, shared_router=True)

    owners = {name: layer for name, layer in router_owners(shared)}
    for name, layer in routed_layers(shared):
        owner = layer.router_layer()
        assert owner in owners.values() and owner.in_features == layer.in_features
        assert block_of(name) == block_of(next(n for n, o in owners.items() if o is owner))
        assert (len(layer.mix_router) == 3) == (owner is layer)
    # k, v and up read the hidden size and share one router per block; down reads the FFN width: its own.
    n_blocks = len({block_of(n) for n, _ in routed_layers(shared)})
    assert len(owners) == 2 * n_blocks
    width = {n.rsplit(".", 1)[-1]: layer.in_features for n, layer in routed_layers(shared)}
    counts, before = parameter_counts(shared), parameter_counts(separate)
    assert counts["experts"] == before["experts"]
    assert counts["routers"] == 3 * n_blocks * (width["k_proj"] + width["down_proj"])
    assert before["routers"] == 3 * n_blocks * sum(width.values())

    # Each projection merges its experts by softmax(x R^T) with its block's router applied to its own input.
    blocks = pack(tokenize_documents(read_documents(corpus["math"]), tokenizer), 16)
    init_routers(shared, *router_input_statistics(shared, {"math": {k: v[:2] for k, v in blocks.items()}}))
    for _, layer in routed_layers(shared):
        for e in layer.experts():
            if kind == "mov":
                layer.ia3_l[e].data.uniform_(0.5, 1.5)
            else:
                layer.lora_B[e].weight.data.normal_()
    x = torch.randn(5, next(iter(routed_layers(shared)))[1].in_features)
    for name, layer in routed_layers(shared):
        if layer.in_features != x.shape[-1]:
            continue
        owner = layer.router_layer()
        gates = torch.softmax(x @ torch.stack([owner.mix_router[e] for e in layer.experts()]).T, dim=-1)
        out = layer.base_layer(x)
        if kind == "mov":
            want = out * (gates @ torch.stack([layer.ia3_l[e].flatten() for e in layer.experts()]))
        else:
            want = out + sum(g.unsqueeze(-1) * layer.scaling[e] * layer.lora_B[e](layer.lora_A[e](x))
                             for g, e in zip(gates.T, layer.experts(), strict=True))
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5, msg=name)


def test_shared_router_mix_saves_each_router_once_and_reloads(llama_seed, corpus, home, tmp_path):
    out = tmp_path / "mix"
    run("assemble", "--kind", "mov", "--seed", llama_seed, "--num-experts", "2", "--shared-router",
        "--targets", "k_proj,v_proj,up_proj", "--data", f"math={corpus['math']}", "--data", f"code={corpus['code']}",
        "--out", out, "--max-steps", "2", "--save-steps", "1000", *FAST)
    manifest = read_lightweight_manifest(out)
    assert manifest.shared_router
    saved = load_file(out / "experts/expert0/adapter_model.safetensors")
    routers = [k for k in saved if ".mix_router" in k]
    assert routers and all(".k_proj." in k for k in routers)  # v and up use k's router
    assert manifest.parameters["routers"] == sum(saved[k].numel() for k in routers) * 2
    first, again = load_lightweight(out, device="cpu"), load_lightweight(out, device="cpu")
    assert torch.equal(first.model(input_ids=IDS).logits, again.model(input_ids=IDS).logits)
    assert all(layer.router_owner is not None for n, layer in routed_layers(first.model) if ".k_proj" not in n)
