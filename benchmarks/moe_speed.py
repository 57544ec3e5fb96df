"""MoE block speed against its dense-equivalent FFN (issue 9): transformers' Qwen2-MoE block vs expertmix's path.

Block under test (Qwen2-MoE layout, as the Nexus block): a shared SwiGLU expert of width I (sigmoid-gated, as in
transformers) plus top-k of E routed SwiGLU experts of width I, softmax router, weights not renormalised.
Dense equivalent = one SwiGLU FFN with the same active compute: width (k + 1) * I (k routed experts + the shared
one). Rows: dense; transformers' ``Qwen2MoeSparseMoeBlock`` with ``experts_implementation`` eager and grouped_mm;
ours = the same block's weights run through ``router_topk`` + ``experts_forward`` (impl auto). Speed ratio =
dense time / block time (1.00x = as fast as dense). Times are the minimum over repeats (robust to other load).
Random weights and inputs: this needs no data; ``--shared`` is accepted for the benchmark convention only.

    python benchmarks/moe_speed.py --device cpu
    python benchmarks/moe_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP, Qwen2MoeSparseMoeBlock

from expertmix.assembler.routed_experts import experts_forward, router_topk

CONFIGS = ((8, 1), (16, 2), (64, 8))
SIZES = {  # hidden, expert width, tokens, dtype
    "cpu": (256, 704, 8192, torch.float32),
    "cuda": (2048, 5632, 16384, torch.bfloat16),
}


@dataclass
class Case:
    """One (experts, top-k) configuration at one size."""

    experts: int
    top_k: int
    hidden: int
    width: int
    tokens: int
    dtype: torch.dtype
    device: str


class OursBlock(torch.nn.Module):
    """The transformers block's own weights, routed and computed by expertmix's fast path."""

    def __init__(self, block: Qwen2MoeSparseMoeBlock, top_k: int) -> None:
        super().__init__()
        self.block = block
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shared expert (sigmoid-gated as in Qwen2-MoE) plus the routed experts."""
        b = self.block
        weights, index = router_topk(F.linear(x, b.gate.weight), self.top_k)
        routed = experts_forward(x, b.experts.gate_up_proj, b.experts.down_proj, index, weights)
        return routed + torch.sigmoid(b.shared_expert_gate(x)) * b.shared_expert(x)


def build(case: Case) -> tuple[Qwen2MoeConfig, Qwen2MoeSparseMoeBlock, Qwen2MoeMLP]:
    """Random MoE block and its dense-equivalent FFN on the case's device and dtype."""
    config = Qwen2MoeConfig(
        hidden_size=case.hidden,
        moe_intermediate_size=case.width,
        shared_expert_intermediate_size=case.width,
        num_experts=case.experts,
        num_experts_per_tok=case.top_k,
        norm_topk_prob=False,
        hidden_act="silu",
    )
    config._experts_implementation = "eager"
    block = Qwen2MoeSparseMoeBlock(config)
    dense = Qwen2MoeMLP(config, intermediate_size=(case.top_k + 1) * case.width)
    with torch.no_grad():
        for p in list(block.parameters()) + list(dense.parameters()):
            p.normal_(0.0, 0.02)
        block.gate.weight.normal_(0.0, 1.0)  # a random router spreads tokens over all experts
    return config, block.to(case.device, case.dtype), dense.to(case.device, case.dtype)


def make_calls(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               grad: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, forward+backward) closures of ``module`` on ``x``."""

    def fwd() -> None:
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        xg = x.detach().requires_grad_()
        module(xg).backward(grad)

    return fwd, fwd_bwd


def interleaved_min(calls: dict[str, Callable[[], None]], device: str, repeats: int) -> dict[str, float]:
    """Minimum ms per call; calls alternate within each round so background load hits all of them alike."""
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: t * 1e3 for name, t in best.items()}


def run_case(case: Case, repeats: int) -> list[tuple[str, float | None, float | None]]:
    """Time every implementation of one case; a row's times are None where it does not run."""
    torch.manual_seed(0)
    config, block, dense = build(case)
    x = torch.randn(case.tokens, case.hidden, device=case.device, dtype=case.dtype)
    grad = torch.randn_like(x)
    ours = OursBlock(block, case.top_k)
    with torch.no_grad():  # the rows must compute the same function
        reference = block(x[None])[0].float()
        diff = (ours(x).float() - reference).abs().max().item() / reference.abs().max().item()
    print(f"  expertmix vs transformers eager output: max relative difference {diff:.1e}")

    def hf(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def call(t: torch.Tensor) -> torch.Tensor:
            config._experts_implementation = name  # one config object is shared by the block's experts
            return block(t[None])[0]

        return call

    modules = {"dense FFN": dense, "transformers eager": hf("eager"), "transformers grouped_mm": hf("grouped_mm"),
               "expertmix": ours}
    calls: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
    for name, module in modules.items():
        fwd, fwd_bwd = make_calls(module, x, grad)
        try:  # warm-up, and drop what does not run here
            fwd()
            fwd_bwd()
            calls[name] = (fwd, fwd_bwd)
        except (RuntimeError, NotImplementedError) as err:
            print(f"  {name} does not run: {str(err).splitlines()[0][:120]}")
    f = interleaved_min({n: c[0] for n, c in calls.items()}, case.device, repeats)
    fb = interleaved_min({n: c[1] for n, c in calls.items()}, case.device, repeats)
    return [(name, f.get(name), fb.get(name)) for name in modules]


def main() -> None:
    """Parse arguments, run the configurations, print one table with ratios to dense."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (min is kept)")
    parser.add_argument("--tokens", type=int, default=None, help="override the token count")
    parser.add_argument("--configs", default=None, help="e.g. 8x1,64x8 (default: 8x1,16x2,64x8)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--shared", default="../shared", help="unused: the benchmark makes random data")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden, width, tokens, dtype = SIZES[args.device]
    tokens = args.tokens or tokens
    repeats = args.repeats or (3 if args.device == "cpu" else 10)
    configs = CONFIGS if not args.configs else tuple(tuple(int(v) for v in c.split("x")) for c in args.configs.split(","))
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# MoE block speed on {card}: hidden {hidden}, expert width {width}, {tokens} tokens, {dtype}, "
          f"torch {torch.__version__}, min of {repeats}")
    lines = ["| E x k | implementation | fwd ms | fwd x dense | fwd+bwd ms | fwd+bwd x dense |",
             "|---|---|---:|---:|---:|---:|"]
    for experts, top_k in configs:
        print(f"## {experts} experts, top-{top_k}")
        case = Case(experts, top_k, hidden, width, tokens, dtype, args.device)
        rows = run_case(case, repeats)
        dense_f, dense_fb = rows[0][1], rows[0][2]
        for name, f, fb in rows:
            fcol = f"{f:.1f} | {dense_f / f:.2f}x" if f else "- | -"
            fbcol = f"{fb:.1f} | {dense_fb / fb:.2f}x" if fb else "- | -"
            lines.append(f"| {experts}x{top_k} | {name} | {fcol} | {fbcol} |")
        print("\n".join(lines[-len(rows):]))
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
