"""MoE block speed against its dense-equivalent FFN (issue 9): transformers' Qwen2-MoE block vs expertmix.

Block under test (Qwen2-MoE layout, as the Nexus block): a shared SwiGLU expert of width I (sigmoid-gated, as
in transformers) plus the top-k of E routed SwiGLU experts, softmax router, gates not renormalised. Routed
experts have width I too, or I / k with ``--fine-grained`` (same active routed compute for every k).
Dense equivalent = one SwiGLU FFN with the block's active compute: width k * routed width + I (the k routed
experts plus the shared one). Rows: dense; transformers' ``Qwen2MoeSparseMoeBlock`` with
``experts_implementation`` eager and grouped_mm; expertmix = the same block's weights through ``router_topk`` +
``experts_forward`` (impl auto). Speed ratio = dense time / block time (1.00x = as fast as dense); with
``--compile`` the dense FFN and expertmix rows are timed compiled too, each compiled row against the dense FFN
compiled in the same mode (inductor fuses SwiGLU and the routing's elementwise work on both sides). Times: the
minimum over repeats on the CPU (robust to other load on shared cores), the median on a GPU.
``--check`` first compares expertmix's outputs and gradients with the eager reference on the device.
Random weights and inputs: this needs no data; ``--shared`` is accepted for the benchmark convention only.

    python benchmarks/moe_speed.py --device cpu [--clock cpu]
    python benchmarks/moe_speed.py --device cuda --check [--fine-grained] [--compile default]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP, Qwen2MoeSparseMoeBlock

from expertmix.assembler.routed_experts import _pick_impl, experts_forward, router_topk

CONFIGS = ((8, 1), (16, 2), (64, 8))
SIZES = {  # hidden, width, tokens, dtype
    "cpu": (256, 704, 8192, torch.float32),
    "cuda": (2048, 5632, 16384, torch.bfloat16),
}


@dataclass
class Case:
    """One (experts, top-k) configuration at one size."""

    experts: int
    top_k: int
    hidden: int
    shared_width: int
    expert_width: int
    tokens: int
    dtype: torch.dtype
    device: str


class OursBlock(torch.nn.Module):
    """The transformers block's own weights, routed and computed by expertmix's fast path."""

    def __init__(self, block: Qwen2MoeSparseMoeBlock, top_k: int, impl: str = "auto") -> None:
        super().__init__()
        self.block = block
        self.top_k = top_k
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shared expert (sigmoid-gated as in Qwen2-MoE) plus the routed experts."""
        b = self.block
        weights, index = router_topk(F.linear(x, b.gate.weight), self.top_k)
        routed = experts_forward(
            x, b.experts.gate_up_proj, b.experts.down_proj, index, weights, impl=self.impl
        )
        return routed + torch.sigmoid(b.shared_expert_gate(x)) * b.shared_expert(x)


def build(case: Case) -> tuple[Qwen2MoeConfig, Qwen2MoeSparseMoeBlock, Qwen2MoeMLP]:
    """Random MoE block and its dense-equivalent FFN, made on the case's device."""
    config = Qwen2MoeConfig(
        hidden_size=case.hidden,
        moe_intermediate_size=case.expert_width,
        shared_expert_intermediate_size=case.shared_width,
        num_experts=case.experts,
        num_experts_per_tok=case.top_k,
        norm_topk_prob=False,
        hidden_act="silu",
    )
    config._experts_implementation = "eager"
    with torch.device(case.device):
        block = Qwen2MoeSparseMoeBlock(config)
        dense = Qwen2MoeMLP(config, intermediate_size=case.top_k * case.expert_width + case.shared_width)
    with torch.no_grad():
        for p in list(block.parameters()) + list(dense.parameters()):
            p.normal_(0.0, 0.02)
        block.gate.weight.normal_(0.0, 1.0)  # a random router spreads tokens over all experts
    return config, block.to(case.dtype), dense.to(case.dtype)


def make_calls(
    module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(forward, forward+backward) closures of ``module`` on ``x``."""

    def fwd() -> None:
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        xg = x.detach().requires_grad_()
        module(xg).backward(grad)

    return fwd, fwd_bwd


def interleaved_times(
    calls: dict[str, Callable[[], None]], device: str, repeats: int, clock: Callable[[], float]
) -> dict[str, float]:
    """ms per call (min on the CPU, median on a GPU); calls alternate so background load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = clock()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(clock() - start)
    reduce = statistics.median if device == "cuda" else min
    return {name: reduce(t) * 1e3 for name, t in times.items()}


def run_case(
    case: Case,
    repeats: int,
    clock: Callable[[], float],
    impls: list[str],
    profile: bool = False,
    compile_modes: tuple[str, ...] = (),
) -> list[tuple[str, float | None, float | None]]:
    """Time every implementation of one case; a row's times are None where it does not run.

    ``compile_modes``: also time the dense FFN and each expertmix row under ``torch.compile`` (inductor) in
    these modes, rows named ``... [compile MODE]`` (compile time is spent in the warm-up, not timed).
    """
    torch.manual_seed(0)
    config, block, dense = build(case)
    x = torch.randn(case.tokens, case.hidden, device=case.device, dtype=case.dtype)
    grad = torch.randn_like(x)
    ours = {}
    with torch.no_grad():  # the rows must compute the same function
        reference = block(x[None])[0].float()
        for impl in impls:
            resolved = _pick_impl(impl, x, block.experts.gate_up_proj, block.experts.down_proj)
            name = "expertmix" + (f" {impl}" if impl != "auto" else f" (auto: {resolved})")
            ours[name] = OursBlock(block, case.top_k, impl)
            diff = (ours[name](x).float() - reference).norm().item() / reference.norm().item()
            print(f"  {name} vs transformers eager output: relative difference {diff:.1e}")

    def hf(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def call(t: torch.Tensor) -> torch.Tensor:
            config._experts_implementation = name  # one config object is shared by the block's experts
            return block(t[None])[0]

        return call

    modules = {
        "dense FFN": dense,
        "transformers eager": hf("eager"),
        "transformers grouped_mm": hf("grouped_mm"),
        **ours,
    }
    for mode in compile_modes:
        torch._dynamo.reset()
        for name in ("dense FFN", *ours):
            modules[f"{name} [compile {mode}]"] = torch.compile(modules[name], mode=mode)
    calls: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}
    for name, module in modules.items():
        fwd, fwd_bwd = make_calls(module, x, grad)
        try:  # warm-up, and drop what does not run here
            fwd()
            fwd_bwd()
            calls[name] = (fwd, fwd_bwd)
        except (RuntimeError, NotImplementedError, ValueError) as err:  # no kernel here, or no compiler
            print(f"  {name} does not run: {str(err).splitlines()[0][:120]}")
    if profile:
        print_profile(calls, case.device)
    f = interleaved_times({n: c[0] for n, c in calls.items()}, case.device, repeats, clock)
    fb = interleaved_times({n: c[1] for n, c in calls.items()}, case.device, repeats, clock)
    return [(name, f.get(name), fb.get(name)) for name in modules]


def print_profile(calls: dict[str, tuple[Callable[[], None], Callable[[], None]]], device: str) -> None:
    """Kernel-time table of one forward+backward of each expertmix row and of the dense FFN."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, (_, fwd_bwd) in calls.items():
        if not name.startswith(("expertmix", "dense")):
            continue
        with profile(activities=activities) as prof:
            fwd_bwd()
            if device == "cuda":
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"### profile: {name}, one forward+backward")
        print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60))


def check_against_eager(device: str) -> bool:
    """Outputs and gradients of impl auto vs the eager reference on ``device`` (idle experts included)."""
    ok = True
    print(f"# correctness on {device}: relative error norm vs a float64 eager reference of the same inputs")
    for dtype in (torch.float32, torch.bfloat16):
        for experts, top_k in CONFIGS:
            gen = torch.Generator(device).manual_seed(experts)
            tokens, hidden, width = 1024, 256, 384
            leaves = [
                torch.randn(tokens, hidden, device=device, generator=gen),
                torch.randn(experts, 2 * width, hidden, device=device, generator=gen) * 0.05,
                torch.randn(experts, hidden, width, device=device, generator=gen) * 0.05,
                torch.randn(tokens, experts, device=device, generator=gen),
            ]
            leaves[3][:, -1] = -1e4  # one expert gets no tokens
            upstream = torch.randn(tokens, hidden, device=device, generator=gen)
            results = {}
            for name, impl, dt in (
                ("exact", "eager", torch.float64),
                ("eager", "eager", dtype),
                ("auto", "auto", dtype),
            ):
                ts = [t.to(dtype).to(dt).clone().requires_grad_() for t in leaves]
                weights, index = router_topk(ts[3], top_k)
                out = experts_forward(ts[0], ts[1], ts[2], index, weights, impl=impl)
                (out * upstream.to(dt)).sum().backward()
                results[name] = [out.detach().double()] + [t.grad.double() for t in ts]
            used = _pick_impl("auto", leaves[0].to(dtype), leaves[1].to(dtype), leaves[2].to(dtype))
            errs = []
            for exact, eager, fast in zip(results["exact"], results["eager"], results["auto"], strict=True):
                scale = exact.norm().item() or 1.0
                errs.append(((fast - exact).norm().item() / scale, (eager - exact).norm().item() / scale))
            bound = 1e-4 if dtype == torch.float32 else 2e-2
            good = all(e_fast <= max(2 * e_eager, bound) for e_fast, e_eager in errs)
            idle = (
                results["auto"][3][-1].abs().max().item() == 0
                and results["auto"][2][-1].abs().max().item() == 0
            )
            ok &= good and idle
            shown = " ".join(
                f"{n}={a:.1e}/{b:.1e}"
                for n, (a, b) in zip(("out", "dh", "dgu", "dd", "dlogit"), errs, strict=True)
            )
            print(
                f"  {str(dtype):14s} {experts}x{top_k} impl {used:10s} fast/eager {shown} "
                f"idle-expert grads zero={idle} {'OK' if good and idle else 'MISMATCH'}"
            )
    return ok


def main() -> None:
    """Parse arguments, run the configurations, print one table with ratios to dense."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    parser.add_argument("--tokens", type=int, default=None, help="override the token count")
    parser.add_argument("--configs", default=None, help="e.g. 8x1,64x8 (default: 8x1,16x2,64x8)")
    parser.add_argument("--fine-grained", action="store_true", help="routed expert width = width / k")
    parser.add_argument("--check", action="store_true", help="check outputs and gradients first")
    parser.add_argument("--ours", default="auto", help="expertmix impls to time, e.g. grouped_mm,segments")
    parser.add_argument("--profile", action="store_true", help="print kernel times of the first config")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time, unaffected by other load on shared cores (sets 1 thread)",
    )
    parser.add_argument(
        "--compile",
        default="",
        help="also time the dense FFN and expertmix under torch.compile in these modes, e.g. default,max-autotune; "
        "compiled rows' ratios are to the compiled dense FFN of the same mode",
    )
    parser.add_argument("--shared", default="../shared", help="unused: the benchmark makes random data")
    args = parser.parse_args()
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu measures CPU runs only")
        args.threads = 1  # with one thread, process CPU time is the compute time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check and not check_against_eager(args.device):
        sys.exit("expertmix's fast path does not match the eager reference on this device")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    hidden, width, tokens, dtype = SIZES[args.device]
    tokens = args.tokens or tokens
    repeats = args.repeats or (3 if args.device == "cpu" else 10)
    configs = CONFIGS
    if args.configs:
        configs = tuple(tuple(int(v) for v in c.split("x")) for c in args.configs.split(","))
    card = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# MoE block speed on {card}: hidden {hidden}, width {width}"
        f"{' (routed experts width / k)' if args.fine_grained else ''}, {tokens} tokens, {dtype}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{'median' if args.device == 'cuda' else 'min'} of {repeats}, {args.clock} clock"
    )
    lines = [
        "| E x k | implementation | fwd ms | fwd x dense | fwd+bwd ms | fwd+bwd x dense |",
        "|---|---|---:|---:|---:|---:|",
    ]
    compile_modes = tuple(m for m in args.compile.split(",") if m)
    for experts, top_k in configs:
        expert_width = width // top_k if args.fine_grained else width
        print(f"## {experts} experts, top-{top_k}, routed width {expert_width}", flush=True)
        case = Case(experts, top_k, hidden, width, expert_width, tokens, dtype, args.device)
        rows = run_case(
            case,
            repeats,
            clock,
            args.ours.split(","),
            args.profile and (experts, top_k) == configs[0],
            compile_modes,
        )
        by_name = {name: (f, fb) for name, f, fb in rows}
        for name, f, fb in rows:
            mode = name[name.index(" [compile ") :] if name.endswith("]") else ""
            dense_f, dense_fb = by_name["dense FFN" + mode]  # compiled rows: to the compiled dense FFN
            fcol = f"{f:.1f} | " + (f"{dense_f / f:.2f}x" if dense_f else "-") if f else "- | -"
            fbcol = f"{fb:.1f} | " + (f"{dense_fb / fb:.2f}x" if dense_fb else "-") if fb else "- | -"
            lines.append(f"| {experts}x{top_k} | {name} | {fcol} | {fbcol} |")
        print("\n".join(lines[-len(rows) :]), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
