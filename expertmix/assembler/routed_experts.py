"""Routed-experts compute for the Nexus MoE block: an eager reference and fast expert-sorted paths.

Weights follow transformers 5's fused layout: ``gate_up_proj [E, 2I, H]`` (gate = first I rows, up = the
next I) and ``down_proj [E, H, I]``; expert ``e`` maps ``x`` to ``down_e(silu(gate_e x) * up_e x)``. A
token's output is the sum over its top-k slots of ``weight * expert(x)``.

Implementations (``impl=``); the fast ones sort the (token, slot) pairs by expert once:
- ``eager``: loop over experts with boolean masks; the reference every other path is tested against.
- ``grouped_mm``: one ``torch.nn.functional.grouped_mm`` per projection over all rows (no host sync, static
  shapes: the GPU path, and the one that traces under ``torch.compile``).
- ``segments``: one plain matrix product per expert over its contiguous rows, each expert's rows taken
  through gather, both projections, SwiGLU and scatter in turn (one host sync for the expert offsets). On
  the CPU the segments are cut into blocks whose ``[rows, 2I]`` activations stay in cache: whole-array
  stages stream those intermediates through memory and lose to this.
- ``auto``: ``segments`` on the CPU; on a GPU ``grouped_mm`` where torch has a kernel for the dtype, else
  ``segments``.
Both fast paths have hand-written backwards (autograd's version of the SwiGLU split zero-fills two ``[S, 2I]``
gradient buffers and adds them, and its grouped-GEMM weight gradients come out transposed, one copy each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLS = ("auto", "eager", "grouped_mm", "segments")
# CPU block size: a block's [rows, 2I] gate/up activations stay in the last-level cache (4 MiB measured best
# of 0.25-16 MiB and whole segments on a 32 MiB-L3 EPYC; benchmarks/moe_speed.py).
BLOCK_BYTES = 4 << 20


def router_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts then top-k, probabilities not renormalised: ``(weights [T,k], index [T,k])``.

    Top-1 skips the full softmax: its weight is ``exp(max - logsumexp)`` (same value and gradient).
    """
    logits32 = logits.float()
    if k == 1:
        top, index = logits32.max(dim=-1, keepdim=True)
        weights = torch.exp(top - torch.logsumexp(logits32, dim=-1, keepdim=True))
    else:
        weights, index = torch.topk(torch.softmax(logits32, dim=-1), k, dim=-1)
    return weights.to(logits.dtype), index


def eager_experts_forward(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference: loop over experts that received tokens (the semantics every fast path must match)."""
    num_experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    out = torch.zeros_like(hidden)
    for expert in range(num_experts):
        token_idx, slot = torch.where(top_k_index == expert)
        if token_idx.numel() == 0:
            continue
        x = hidden[token_idx]
        gate_up = F.linear(x, gate_up_proj[expert])
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(act, down_proj[expert]) * top_k_weights[token_idx, slot, None].to(hidden.dtype)
        out = out.index_add(0, token_idx, y.to(out.dtype))
    return out


def _aligned(t: torch.Tensor) -> bool:
    """Whether ``t`` starts on a 16-byte boundary and its row stride is a multiple of 16 bytes."""
    stride_ok = (t.stride(-2) * t.element_size()) % 16 == 0
    if torch.compiler.is_compiling():  # pointers are not traceable; compiled buffers are allocated aligned
        return stride_ok
    return stride_ok and t.data_ptr() % 16 == 0


def grouped_mm_supported(hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM has a kernel for these tensors' device, dtype and alignment."""
    if not hasattr(F, "grouped_mm") or not hidden.dtype == gate_up_proj.dtype == down_proj.dtype:
        return False
    if hidden.device.type == "cuda":
        capability = torch.cuda.get_device_capability(hidden.device)
        ok_device = hidden.dtype == torch.bfloat16 and capability >= (8, 0)
    elif hidden.device.type == "cpu":
        # Under torch.compile the op's shape function accepts bf16 only.
        dtypes = (torch.bfloat16,) if torch.compiler.is_compiling() else (torch.float32, torch.bfloat16)
        ok_device = hidden.dtype in dtypes
    else:
        ok_device = False
    # The kernels need 16-byte aligned rows in every operand, the [S, I] and [S, 2I] intermediates included.
    step = 16 // hidden.element_size()
    dims_ok = hidden.shape[-1] % step == 0 and down_proj.shape[-1] % step == 0
    return ok_device and dims_ok and all(_aligned(t) for t in (hidden, gate_up_proj, down_proj))


def _pick_impl(impl: str, hidden: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> str:
    """Resolve ``auto`` to the fastest implementation for the device (measured: benchmarks/moe_speed.py)."""
    if impl not in IMPLS:
        raise ValueError(f"experts_forward: impl={impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "auto":
        if hidden.device.type == "cpu":
            return "segments"
        return "grouped_mm" if grouped_mm_supported(hidden, gate_up_proj, down_proj) else "segments"
    if impl == "grouped_mm" and not grouped_mm_supported(hidden, gate_up_proj, down_proj):
        raise ValueError(
            f"experts_forward: impl='grouped_mm' has no kernel for device={hidden.device.type} "
            f"dtype={hidden.dtype} hidden={hidden.shape[-1]} width={down_proj.shape[-1]} (use impl='auto')"
        )
    return impl


def _combine(
    rows: torch.Tensor, order: torch.Tensor, num_tokens: int, top_k: int, by_gather: bool
) -> torch.Tensor:
    """Sum expert-sorted rows into their tokens: ``[S, H]`` -> ``[T, H]``; row r is flat pair ``order[r]``.

    ``by_gather``: gather the rows into (token, slot) order and sum the k slots instead of ``index_add_``.
    On CUDA ``index_add_`` accumulates with atomics in the row dtype (run-to-run differences in bf16); the
    gather is deterministic and its sum accumulates in float32.
    """
    if top_k == 1:  # rows are a permutation of the tokens: a plain copy back, no zero-fill or accumulation
        return rows.new_empty(num_tokens, rows.shape[1]).index_copy_(0, order, rows)
    if by_gather:
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
        return rows.index_select(0, inverse).view(num_tokens, top_k, -1).sum(dim=1)
    return rows.new_zeros(num_tokens, rows.shape[1]).index_add_(0, order // top_k, rows)


def _swiglu_backward(
    grad_act: torch.Tensor, gate_up: torch.Tensor, silu_gate: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Gradient of ``silu(gate) * up`` w.r.t. ``gate_up = [gate | up]``, written into ``out``; clobbers grad_act."""
    inter = silu_gate.shape[1]
    if torch.compiler.is_compiling():  # no out= into views there; the compiler fuses this form itself
        grad_gate = torch.ops.aten.silu_backward(grad_act * gate_up[:, inter:], gate_up[:, :inter])
        return torch.cat([grad_gate, grad_act * silu_gate], dim=1)
    torch.mul(grad_act, silu_gate, out=out[:, inter:])
    grad_act.mul_(gate_up[:, inter:])
    torch.ops.aten.silu_backward.grad_input(grad_act, gate_up[:, :inter], grad_input=out[:, :inter])
    return out


class _GroupedExperts(torch.autograd.Function):
    """All rows at once: gather, grouped gate_up, SwiGLU, grouped down, weight, combine."""

    @staticmethod
    def forward(ctx, hidden, gate_up_proj, down_proj, row_weights, order, offs, top_k, keep):
        inter, num_tokens, by_gather = down_proj.shape[2], hidden.shape[0], hidden.is_cuda
        x = hidden.index_select(0, order // top_k if top_k > 1 else order)
        gate_up = F.grouped_mm(x, gate_up_proj.transpose(-2, -1), offs=offs)
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        if not keep:  # inference: reuse the buffers in place
            del x
            y = F.grouped_mm(F.silu(gate, inplace=True).mul_(up), down_proj.transpose(-2, -1), offs=offs)
            del gate_up, gate, up
            return _combine(y.mul_(row_weights[:, None]), order, num_tokens, top_k, by_gather)
        silu_gate = F.silu(gate)
        act = silu_gate * up
        y = F.grouped_mm(act, down_proj.transpose(-2, -1), offs=offs)
        out = _combine(y * row_weights[:, None], order, num_tokens, top_k, by_gather)
        ctx.save_for_backward(
            x, gate_up, silu_gate, act, y, row_weights, order, offs, gate_up_proj, down_proj
        )
        ctx.top_k, ctx.num_tokens, ctx.by_gather = top_k, num_tokens, by_gather
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate_up, silu_gate, act, y, row_weights, order, offs, gate_up_proj, down_proj = ctx.saved_tensors
        top_k = ctx.top_k
        grad_rows = grad_out.index_select(0, order // top_k if top_k > 1 else order)
        grad_weights = (grad_rows * y).sum(dim=1) if ctx.needs_input_grad[3] else None
        grad_rows.mul_(row_weights[:, None])
        grad_down = F.grouped_mm(grad_rows.t(), act, offs=offs) if ctx.needs_input_grad[2] else None
        grad_act = F.grouped_mm(grad_rows, down_proj, offs=offs)
        del grad_rows
        grad_gate_up = _swiglu_backward(grad_act, gate_up, silu_gate, torch.empty_like(gate_up))
        del grad_act
        grad_gate_up_proj = F.grouped_mm(grad_gate_up.t(), x, offs=offs) if ctx.needs_input_grad[1] else None
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_x = F.grouped_mm(grad_gate_up, gate_up_proj, offs=offs)
            grad_hidden = _combine(grad_x, order, ctx.num_tokens, top_k, ctx.by_gather)
        return grad_hidden, grad_gate_up_proj, grad_down, grad_weights, None, None, None, None


def _blocks(offs: torch.Tensor, block_rows: int) -> list[tuple[int, int, int]]:
    """(expert, start, end) row blocks, expert by expert: each segment cut into equal blocks of at most
    ``block_rows`` rows (no empty ones, no small remainder block)."""
    blocks, start = [], 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            pieces = -(-(end - start) // block_rows)
            bounds = [start + (end - start) * p // pieces for p in range(pieces + 1)]
            blocks.extend((expert, a, b) for a, b in zip(bounds, bounds[1:], strict=False))
        start = end
    return blocks


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` or ``out += a @ b`` without a temporary."""
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


class _SegmentExperts(torch.autograd.Function):
    """Expert segments (cache-sized blocks on the CPU), each taken through the whole expert chain in turn.

    Gate and up are two products into separate contiguous buffers (the weights' two halves are contiguous
    ``[I, H]`` views), so SwiGLU and its gradient run on contiguous memory: twice as fast on the CPU as on
    the strided halves of one ``[rows, 2I]`` product.
    """

    @staticmethod
    def forward(ctx, hidden, gate_up_proj, down_proj, row_weights, order, offs, top_k, keep):
        num_tokens, dim = hidden.shape
        inter = down_proj.shape[2]
        rows_total = order.shape[0]
        if hidden.device.type == "cpu":
            blocks = _blocks(offs, max(16, BLOCK_BYTES // (2 * inter * hidden.element_size())))
        else:  # a GPU wants the largest products it can get: whole segments
            blocks = _blocks(offs, max(rows_total, 1))
        block_rows = max((b - a for _, a, b in blocks), default=0)
        token_of_row = order // top_k if top_k > 1 else order
        out = hidden.new_empty(num_tokens, dim) if top_k == 1 else hidden.new_zeros(num_tokens, dim)
        # keep: whole-array buffers that backward reads, filled block by block; else one block's scratch.
        rows = rows_total if keep else block_rows
        x, gate, up, silu_gate = (hidden.new_empty(rows, n) for n in (dim, inter, inter, inter))
        act = hidden.new_empty(rows, inter) if keep else silu_gate
        y = hidden.new_empty(rows, dim)
        for expert, a, b in blocks:
            tokens = token_of_row[a:b]
            at = slice(a, b) if keep else slice(0, b - a)
            torch.index_select(hidden, 0, tokens, out=x[at])
            torch.mm(x[at], gate_up_proj[expert, :inter].t(), out=gate[at])
            torch.mm(x[at], gate_up_proj[expert, inter:].t(), out=up[at])
            torch.ops.aten.silu.out(gate[at], out=silu_gate[at])
            torch.mul(silu_gate[at], up[at], out=act[at])
            torch.mm(act[at], down_proj[expert].t(), out=y[at])
            weighted = y[at] * row_weights[a:b, None]
            if top_k == 1:
                out.index_copy_(0, tokens, weighted)
            else:
                out.index_add_(0, tokens, weighted)
        if keep:
            ctx.save_for_backward(
                x, gate, up, silu_gate, act, y, row_weights, token_of_row, gate_up_proj, down_proj
            )
            ctx.blocks, ctx.block_rows, ctx.top_k = blocks, block_rows, top_k
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate, up, silu_gate, act, y, row_weights, token_of_row, gate_up_proj, down_proj = ctx.saved_tensors
        num_tokens, dim = grad_out.shape
        inter = act.shape[1]
        need_hidden, need_gate_up, need_down, need_weights = ctx.needs_input_grad[:4]
        grad_hidden = None
        if need_hidden:
            grad_hidden = (
                grad_out.new_empty(num_tokens, dim) if ctx.top_k == 1 else grad_out.new_zeros(num_tokens, dim)
            )
        grad_weights = row_weights.new_empty(row_weights.shape) if need_weights else None
        # Every expert with rows has its gradient written by its first block; only the others need zeros.
        grad_gate_up_proj = torch.empty_like(gate_up_proj) if need_gate_up else None
        grad_down = torch.empty_like(down_proj) if need_down else None
        idle = sorted(set(range(gate_up_proj.shape[0])) - {expert for expert, _, _ in ctx.blocks})
        for grad in (grad_gate_up_proj, grad_down):
            if grad is not None and idle:
                grad[idle] = 0
        grad_rows_buf, grad_x_buf = (grad_out.new_empty(ctx.block_rows, dim) for _ in range(2))
        grad_act_buf, grad_gate_buf, grad_up_buf = (
            grad_out.new_empty(ctx.block_rows, inter) for _ in range(3)
        )
        seen = set()  # the first block of an expert writes its weight gradients, later ones add to them
        for expert, a, b in ctx.blocks:
            n = b - a
            tokens = token_of_row[a:b]
            first = expert not in seen
            seen.add(expert)
            grad_rows = torch.index_select(grad_out, 0, tokens, out=grad_rows_buf[:n])
            if need_weights:
                torch.sum(grad_rows * y[a:b], dim=1, out=grad_weights[a:b])
            grad_rows.mul_(row_weights[a:b, None])
            if need_down:
                _mm_into(grad_down[expert], grad_rows.t(), act[a:b], accumulate=not first)
            grad_act = torch.mm(grad_rows, down_proj[expert], out=grad_act_buf[:n])
            grad_up = torch.mul(grad_act, silu_gate[a:b], out=grad_up_buf[:n])
            grad_act.mul_(up[a:b])
            grad_gate = torch.ops.aten.silu_backward.grad_input(
                grad_act, gate[a:b], grad_input=grad_gate_buf[:n]
            )
            if need_gate_up:
                _mm_into(grad_gate_up_proj[expert, :inter], grad_gate.t(), x[a:b], accumulate=not first)
                _mm_into(grad_gate_up_proj[expert, inter:], grad_up.t(), x[a:b], accumulate=not first)
            if need_hidden:
                grad_x = torch.mm(grad_gate, gate_up_proj[expert, :inter], out=grad_x_buf[:n])
                grad_x.addmm_(grad_up, gate_up_proj[expert, inter:])
                if ctx.top_k == 1:
                    grad_hidden.index_copy_(0, tokens, grad_x)
                else:
                    grad_hidden.index_add_(0, tokens, grad_x)
        return grad_hidden, grad_gate_up_proj, grad_down, grad_weights, None, None, None, None


def _check_shapes(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> None:
    """Refuse inconsistent shapes with a message naming the argument and its shape."""
    if hidden.dim() != 2 or gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(
            f"experts_forward: expected hidden [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I]; got "
            f"hidden {list(hidden.shape)}, gate_up_proj {list(gate_up_proj.shape)}, down_proj {list(down_proj.shape)}"
        )
    num_experts, dim, inter = down_proj.shape
    if list(gate_up_proj.shape) != [num_experts, 2 * inter, dim] or hidden.shape[1] != dim:
        raise ValueError(
            f"experts_forward: gate_up_proj {list(gate_up_proj.shape)} and hidden {list(hidden.shape)} do not "
            f"match down_proj {list(down_proj.shape)} (want gate_up_proj [{num_experts}, {2 * inter}, {dim}])"
        )
    if (
        top_k_index.dim() != 2
        or top_k_index.shape != top_k_weights.shape
        or top_k_index.shape[0] != hidden.shape[0]
    ):
        raise ValueError(
            f"experts_forward: top_k_index {list(top_k_index.shape)} and top_k_weights "
            f"{list(top_k_weights.shape)} must both be [T={hidden.shape[0]}, k]"
        )


def experts_forward(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """Weighted sum of each token's top-k SwiGLU experts: ``hidden [T,H]`` -> ``[T,H]`` (see module doc).

    Computes in the weights' dtype (the autocast dtype under ``torch.autocast``) and returns ``hidden``'s dtype.
    """
    _check_shapes(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights)
    device_type = hidden.device.type
    dtype = (
        torch.get_autocast_dtype(device_type)
        if torch.is_autocast_enabled(device_type)
        else gate_up_proj.dtype
    )
    if not hidden.dtype == gate_up_proj.dtype == down_proj.dtype == dtype:
        with torch.autocast(device_type, enabled=False):
            out = experts_forward(
                hidden.to(dtype),
                gate_up_proj.to(dtype),
                down_proj.to(dtype),
                top_k_index,
                top_k_weights,
                impl,
            )
        return out.to(hidden.dtype)
    impl = _pick_impl(impl, hidden, gate_up_proj, down_proj)
    if impl == "eager":
        return eager_experts_forward(hidden, gate_up_proj, down_proj, top_k_index, top_k_weights)
    num_experts, k = gate_up_proj.shape[0], top_k_index.shape[1]
    flat_index = top_k_index.reshape(-1)
    order = torch.argsort(flat_index, stable=True)
    # scatter_add_ rather than bincount: a static output shape, so the grouped path traces under torch.compile
    counts = flat_index.new_zeros(num_experts).scatter_add_(0, flat_index, torch.ones_like(flat_index))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    row_weights = top_k_weights.reshape(-1).index_select(0, order).to(hidden.dtype)
    keep = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden, gate_up_proj, down_proj, row_weights)
    )
    if impl == "grouped_mm":
        return _GroupedExperts.apply(hidden, gate_up_proj, down_proj, row_weights, order, offs, k, keep)
    return _segments_apply(hidden, gate_up_proj, down_proj, row_weights, order, offs, k, keep)


@torch.compiler.disable
def _segments_apply(*args: object) -> torch.Tensor:
    """Run the segments path eagerly: its blocks are data-dependent, so torch.compile treats it as opaque."""
    return _SegmentExperts.apply(*args)
