"""The fast routed-experts paths give the eager reference's outputs and gradients (issue 9)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

import expertmix.assembler.routed_experts as routed
from expertmix.assembler.routed_experts import eager_experts_forward, experts_forward, router_topk

FAST = ["grouped_mm", "segments"]
TOKENS, HIDDEN, WIDTH = 96, 32, 48


def make_case(num_experts: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0, idle: int = 2):
    """Random hidden states, experts and router logits; the last ``idle`` experts can never be picked."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen).to(dtype)
    gate_up = (torch.randn(num_experts, 2 * WIDTH, HIDDEN, generator=gen) * 0.2).to(dtype)
    down = (torch.randn(num_experts, HIDDEN, WIDTH, generator=gen) * 0.2).to(dtype)
    logits = torch.randn(TOKENS, num_experts, generator=gen)
    if idle:
        logits[:, num_experts - idle :] = -1e4  # these experts receive no tokens
    return hidden, gate_up, down, logits.to(dtype)


def run(impl: str, hidden, gate_up, down, logits, k: int):
    """Output and gradients w.r.t. hidden, both expert weights and the router logits (through the gates)."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, gate_up, down, logits)]
    weights, index = router_topk(leaves[3], k)
    out = experts_forward(leaves[0], leaves[1], leaves[2], index, weights, impl=impl)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    (out * upstream).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


NAMES = ["output", "grad hidden", "grad gate_up_proj", "grad down_proj", "grad router logits"]


def assert_float32_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """rtol 1e-4; entries near zero (sums that cancel) get an absolute 1e-6 of the tensor's largest entry."""
    for name, g, w in zip(NAMES, got, want, strict=True):
        atol = 1e-6 * max(w.abs().max().item(), 1.0)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize(("num_experts", "k"), [(4, 1), (8, 2), (16, 4)])
def test_fast_paths_match_eager_outputs_and_gradients_float32(impl, num_experts, k):
    case = make_case(num_experts, k)
    reference = run("eager", *case, k)
    fast = run(impl, *case, k)
    assert reference[3][-1].abs().max() == 0  # the idle experts got no tokens, hence no gradient
    assert_float32_close(fast, reference)


def test_segments_path_accumulates_weight_gradients_across_cpu_blocks(monkeypatch):
    # Blocks of 16 rows: every expert's rows span several blocks, so weight gradients are summed over blocks.
    monkeypatch.setattr(routed, "BLOCK_BYTES", 16 * 2 * WIDTH * 4)
    case = make_case(4, 2, idle=1)
    assert_float32_close(run("segments", *case, 2), run("eager", *case, 2))


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize(("num_experts", "k"), [(4, 1), (8, 3)])
def test_fast_paths_in_bfloat16_stay_within_its_rounding(impl, num_experts, k):
    case = make_case(num_experts, k, dtype=torch.bfloat16)
    exact = run("eager", *[t.double() for t in case], k)  # the same bf16 inputs, computed in float64
    eager = run("eager", *case, k)
    fast = run(impl, *case, k)
    for name, truth, ref, got in zip(NAMES, exact, eager, fast, strict=True):
        assert got.dtype == torch.bfloat16, name
        scale = truth.abs().max().item()
        err_fast = (got.double() - truth).abs().max().item() / scale
        err_eager = (ref.double() - truth).abs().max().item() / scale
        # bf16 keeps 8 significant bits (relative step 2^-8); the fast path may round differently from eager.
        assert err_fast <= max(2 * err_eager, 2**-7), f"{name}: fast {err_fast:.2e} vs eager {err_eager:.2e}"


@pytest.mark.parametrize("impl", FAST)
def test_inference_path_without_grad_gives_the_training_output(impl):
    hidden, gate_up, down, logits = make_case(8, 2)
    weights, index = router_topk(logits, 2)
    with torch.no_grad():
        inference = experts_forward(hidden, gate_up, down, index, weights, impl=impl)
    training = experts_forward(hidden.requires_grad_(), gate_up, down, index, weights, impl=impl)
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=0)


def test_matches_transformers_qwen2_moe_experts_layout():
    # The fused [gate | up] layout is transformers' own: its eager experts module computes the same function.
    config = Qwen2MoeConfig(
        hidden_size=HIDDEN, moe_intermediate_size=WIDTH, num_experts=8, num_experts_per_tok=2
    )
    config._experts_implementation = "eager"
    experts = Qwen2MoeExperts(config)
    hidden, gate_up, down, logits = make_case(8, 2)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
        weights, index = router_topk(logits, 2)
        theirs = experts(hidden, index, weights)
        ours = experts_forward(hidden, gate_up, down, index, weights)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_router_topk_equals_softmax_then_topk_with_same_gradient(k):
    logits = torch.randn(TOKENS, 8, generator=torch.Generator().manual_seed(3))
    upstream = torch.rand(TOKENS, k, generator=torch.Generator().manual_seed(4))
    a = logits.clone().requires_grad_()
    weights, index = router_topk(a, k)
    (weights * upstream).sum().backward()
    b = logits.clone().requires_grad_()
    want_weights, want_index = torch.topk(torch.softmax(b, dim=-1), k, dim=-1)
    (want_weights * upstream).sum().backward()
    assert torch.equal(index, want_index)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_deterministic_gather_combine_equals_index_add():
    # The CUDA combine (gather into token order, sum the k slots) checked on the CPU against index_add_.
    gen = torch.Generator().manual_seed(5)
    tokens, k = 10, 3
    order = torch.randperm(tokens * k, generator=gen)
    rows = torch.randn(tokens * k, 4, generator=gen)
    want = torch.zeros(tokens, 4).index_add_(0, order // k, rows)
    torch.testing.assert_close(routed._combine(rows, order, tokens, k, by_gather=True), want)
    torch.testing.assert_close(routed._combine(rows, order, tokens, k, by_gather=False), want)


def test_auto_falls_back_to_segments_where_grouped_mm_has_no_kernel():
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(20, 30, generator=gen)  # 30 floats = 120 bytes: rows not 16-byte aligned
    gate_up, down = torch.randn(3, 2 * 10, 30, generator=gen), torch.randn(3, 30, 10, generator=gen)
    weights, index = router_topk(torch.randn(20, 3, generator=gen), 2)
    assert not routed.grouped_mm_supported(hidden, gate_up, down)
    want = eager_experts_forward(hidden, gate_up, down, index, weights)
    torch.testing.assert_close(
        experts_forward(hidden, gate_up, down, index, weights), want, rtol=1e-4, atol=1e-6
    )
    with pytest.raises(ValueError, match="hidden=30 width=10"):
        experts_forward(hidden, gate_up, down, index, weights, impl="grouped_mm")


def test_mixed_dtypes_compute_in_the_weights_dtype_and_autocast_is_honoured():
    hidden, gate_up, down, logits = make_case(4, 1)
    weights, index = router_topk(logits, 1)
    want = eager_experts_forward(hidden, gate_up, down, index, weights)
    mixed = experts_forward(hidden.bfloat16(), gate_up, down, index, weights)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), want, rtol=2e-2, atol=2e-2)
    leaf = gate_up.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts_forward(hidden, leaf, down, index, weights)
    out.sum().backward()
    assert out.dtype == torch.float32 and leaf.grad.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)


def test_bad_arguments_are_refused_with_their_shapes():
    hidden, gate_up, down, logits = make_case(4, 1)
    weights, index = router_topk(logits, 1)
    with pytest.raises(ValueError, match=r"impl='fast'"):
        experts_forward(hidden, gate_up, down, index, weights, impl="fast")
    with pytest.raises(ValueError, match=r"gate_up_proj \[4, 48, 32\]"):
        experts_forward(hidden, gate_up[:, :WIDTH], down, index, weights)
    with pytest.raises(ValueError, match=r"top_k_weights \[96, 2\]"):
        experts_forward(hidden, gate_up, down, index, torch.cat([weights, weights], 1))


def test_grouped_path_traces_whole_under_torch_compile():
    hidden, gate_up, down, logits = make_case(8, 2, dtype=torch.bfloat16)

    def block(h, g):
        weights, index = router_topk(g, 2)
        return experts_forward(h, gate_up, down, index, weights, impl="grouped_mm")

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled(hidden, logits), block(hidden, logits), rtol=0, atol=0)
