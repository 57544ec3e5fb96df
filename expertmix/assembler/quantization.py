"""``expertmix quantize``: weight-only int8 / group-wise int4 for every linear layer and the fused 3-D experts.

Schemes (weights only; activations stay float):

- ``int8``: symmetric, one scale per output row: ``w ~ q * s``, ``q`` in [-127, 127], ``s = max|w_row| / 127``.
- ``int4``: asymmetric, one scale and zero point per ``group_size`` inputs of a row: ``w ~ (q - z) * s``, ``q``
  in [0, 15], two values per byte (low nibble first). Scales and zero points are float16 (as GPTQ/AWQ store
  them); the codes are computed from the float16-rounded values, so the error bound ``|w - w~| <= s / 2`` holds
  for the stored scale. By default each layer's group is the largest even divisor of its input width up to
  ``DEFAULT_GROUP_SIZE`` (a width of 96 gets groups of 96, not one group of 128 with 32 padded zeros; the config
  records ``group_size: null``); a ``group_size`` given explicitly is used as is, and a row whose length is not a
  multiple of it is zero-padded to one.

Why hand-written rather than torchao: torchao's ``quantize_`` rewrites ``nn.Linear`` weights only, so the routed
experts' fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` parameters (most of a mix's weights) would
stay float; and torchao is not a dependency. Here one tensor-level routine covers both (the 3-D weights are
quantized per expert row exactly like a linear layer's rows).

The quantized modules dequantize on the fly in the activations' dtype (on the CPU, dequantize + float GEMM
measured faster than torch's int8 weight-only kernel). Routers and the output head stay float by default, as
transformers' own quantizers keep the head: a router flip sends a token to another expert.

A quantized mix is a transformers checkpoint: ``config.json`` carries ``quantization_config`` (``quant_method:
expertmix``) and this module registers a transformers quantizer for it, so ``AutoModelForCausalLM
.from_pretrained(DIR)`` rebuilds the quantized modules and loads the codes (``load_quantized`` does just that).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..checkpoints import require_float_weights
from ..errors import ExpertmixError
from ..fsutil import atomic_dir
from .manifest import MIX_FILE, append_history

QUANT_METHOD = "expertmix"
Scheme = Literal["int8", "int4"]
SCHEMES: tuple[str, ...] = ("int8", "int4")
# Module-name components left in float: routers (Nexus/linear routers, Qwen2-MoE's gates) and the output head.
DEFAULT_SKIP: tuple[str, ...] = ("lm_head", "router", "gate", "shared_expert_gate")
EXPERT_WEIGHTS: tuple[str, ...] = ("gate_up_proj", "down_proj")
DEFAULT_GROUP_SIZE = 128  # int4: the largest group a layer gets when no group size is given
MIN_FITTED_GROUP = 16  # below this a fitted group costs more in scales than it saves: pad to a default group instead
COPIED_FILES = ("generation_config.json", "mix.json")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: the scheme, the int4 group size (``None``: fitted to each layer, see ``fitted_group``) and
    which module-name components stay float."""

    scheme: Scheme = "int8"
    group_size: int | None = None
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ExpertmixError(f"--scheme {self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        if self.scheme == "int4" and self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise ExpertmixError(f"--group-size {self.group_size}: int4 needs an even group size >= 2")

    @property
    def bits(self) -> int:
        return 8 if self.scheme == "int8" else 4

    def group_for(self, in_features: int) -> int:
        """The int4 group of a weight with ``in_features`` inputs: the given group size, else the fitted one."""
        return self.group_size if self.group_size is not None else fitted_group(in_features)


def fitted_group(in_features: int, largest: int = DEFAULT_GROUP_SIZE, smallest: int = MIN_FITTED_GROUP) -> int:
    """The largest even divisor of ``in_features`` up to ``largest``, so rows need no padding; where that would be
    below ``smallest`` (an odd or awkward width), ``largest`` (or the row rounded up to even, when shorter) with the
    last group zero-padded."""
    for group in range(min(largest, in_features), smallest - 1, -1):
        if group % 2 == 0 and in_features % group == 0:
            return group
    return min(largest, in_features + in_features % 2)


# -- tensor-level quantization -------------------------------------------------------------------------

def _groups(spec: QuantSpec, in_features: int) -> int:
    return -(-in_features // spec.group_for(in_features))


def quantize_tensor(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Quantize ``w [..., out, in]`` row by row (leading dims: experts): ``{"qweight", "scale"[, "zero"]}``."""
    w = w.detach().float()
    if spec.scheme == "int8":
        scale = (w.abs().amax(dim=-1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return {"qweight": q, "scale": scale}
    n_in = w.shape[-1]
    g = spec.group_for(n_in)
    pad = _groups(spec, n_in) * g - n_in
    if pad:  # zero padding: zeros lie inside every group's [min, max] range once it is widened to hold 0
        w = F.pad(w, (0, pad))
    grouped = w.reshape(*w.shape[:-1], -1, g)
    lo = grouped.amin(dim=-1).clamp(max=0.0)
    hi = grouped.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / 15.0).clamp_min(1e-6).half()  # stored as float16; codes use the rounded values
    zero = (-lo / scale.float()).half()
    q = torch.round(grouped / scale.float()[..., None] + zero.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    q = q.reshape(*w.shape[:-1], -1)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return {"qweight": packed.contiguous(), "scale": scale, "zero": zero}


def dequantize_tensor(parts: dict[str, torch.Tensor], spec: QuantSpec, in_features: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``[..., out, in]`` that ``quantize_tensor``'s codes stand for."""
    q, scale = parts["qweight"], parts["scale"]
    if spec.scheme == "int8":
        return (q.to(dtype) * scale.to(dtype)[..., None])
    unpacked = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(*q.shape[:-1], -1)
    g = spec.group_for(in_features)
    grouped = unpacked.reshape(*q.shape[:-1], -1, g).to(dtype)
    w = (grouped - parts["zero"].to(dtype)[..., None]) * scale.to(dtype)[..., None]
    return w.reshape(*q.shape[:-1], -1)[..., :in_features]


def _code_shapes(spec: QuantSpec, lead: tuple[int, ...], out_features: int, in_features: int
                 ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the stored codes of a ``[*lead, out, in]`` weight."""
    if spec.scheme == "int8":
        return {"qweight": ((*lead, out_features, in_features), torch.int8),
                "scale": ((*lead, out_features), torch.float32)}
    groups = _groups(spec, in_features)
    return {"qweight": ((*lead, out_features, groups * spec.group_for(in_features) // 2), torch.uint8),
            "scale": ((*lead, out_features, groups), torch.float16),
            "zero": ((*lead, out_features, groups), torch.float16)}


# -- quantized modules ---------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """``nn.Linear`` whose weight is held as int8/int4 codes (buffers) and dequantized per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        for name, (shape, dtype) in _code_shapes(spec, (), out_features, in_features).items():
            self.register_buffer(f"weight_{name}", torch.zeros(shape, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> QuantizedLinear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec)
        module.load_codes(quantize_tensor(linear.weight, spec))
        if linear.bias is not None:
            module.bias.data = linear.bias.detach().float().clone()
        return module

    def codes(self) -> dict[str, torch.Tensor]:
        return {k[len("weight_"):]: v for k, v in self.named_buffers() if k.startswith("weight_")}

    def load_codes(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            setattr(self, f"weight_{k}", v)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_tensor(self.codes(), self.spec, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.spec.scheme}"


class QuantizedExperts(nn.Module):
    """Fused SwiGLU experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) held as codes.

    Same call as transformers 5's experts modules (``NexusExperts``, ``Qwen2MoeExperts``): ``(hidden [T, H],
    top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``. Only the experts that received tokens are
    dequantized, one at a time (hand-written loop: the float fast paths in ``routed_experts`` take whole 3-D
    float weights, which would mean dequantizing every expert on every call).
    """

    def __init__(self, num_experts: int, hidden: int, inter: int, spec: QuantSpec,
                 act: Callable[[torch.Tensor], torch.Tensor] = F.silu):
        super().__init__()
        self.num_experts, self.hidden, self.inter, self.spec, self.act = num_experts, hidden, inter, spec, act
        # A weight named in the skip list (``--keep-float down_proj``) stays a float tensor of the usual name.
        self.float_weights = tuple(w for w in EXPERT_WEIGHTS if w in spec.skip)
        for weight, (out_f, in_f) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
            if weight in self.float_weights:
                self.register_buffer(weight, torch.zeros(num_experts, out_f, in_f))
                continue
            for name, (shape, dtype) in _code_shapes(spec, (num_experts,), out_f, in_f).items():
                self.register_buffer(f"{weight}_{name}", torch.zeros(shape, dtype=dtype))

    @classmethod
    def from_experts(cls, experts: nn.Module, spec: QuantSpec) -> QuantizedExperts:
        e, two_i, h = experts.gate_up_proj.shape
        module = cls(e, h, two_i // 2, spec, act=getattr(experts, "act_fn", F.silu))
        for weight in EXPERT_WEIGHTS:
            if weight in module.float_weights:
                setattr(module, weight, getattr(experts, weight).detach().float().clone())
                continue
            for k, v in quantize_tensor(getattr(experts, weight), spec).items():
                setattr(module, f"{weight}_{k}", v)
        return module

    def expert_weight(self, weight: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``expert``'s float ``gate_up_proj`` or ``down_proj`` matrix."""
        if weight in self.float_weights:
            return getattr(self, weight)[expert].to(dtype)
        parts = {k[len(weight) + 1:]: v[expert] for k, v in self.named_buffers() if k.startswith(weight + "_")}
        return dequantize_tensor(parts, self.spec, self.hidden if weight == "gate_up_proj" else self.inter, dtype)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        hit = torch.unique(top_k_index).tolist()
        for expert in hit:
            token_idx, slot = torch.where(top_k_index == expert)
            x = hidden[token_idx]
            gate_up = F.linear(x, self.expert_weight("gate_up_proj", expert, hidden.dtype))
            act = self.act(gate_up[:, :self.inter]) * gate_up[:, self.inter:]
            y = F.linear(act, self.expert_weight("down_proj", expert, hidden.dtype))
            out.index_add_(0, token_idx, y * top_k_weights[token_idx, slot, None].to(hidden.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden}, inter={self.inter}, scheme={self.spec.scheme}"


def _skipped(name: str, spec: QuantSpec) -> bool:
    return any(part in spec.skip for part in name.split("."))


def _is_fused_experts(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, w, None), torch.Tensor) and getattr(module, w).dim() == 3
               for w in EXPERT_WEIGHTS)


def quantizable_modules(model: nn.Module, spec: QuantSpec) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear layer and fused-experts module that ``spec`` quantizes.

    The skip list names module-name parts; for fused experts it also names their weights (``down_proj`` keeps the
    routed experts' down projections float too), and a fused module with both weights named stays float.
    """
    return [(name, m) for name, m in model.named_modules()
            if name and not _skipped(name, spec) and (
                isinstance(m, nn.Linear) or (_is_fused_experts(m) and not set(EXPERT_WEIGHTS) <= set(spec.skip)))]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def replace_modules(model: nn.Module, spec: QuantSpec, quantize: bool = True,
                    replaced: Callable[[nn.Module, nn.Module], None] | None = None, progress: bool = False) -> int:
    """Swap every quantizable module for its quantized twin (``quantize=False``: empty codes, to be loaded);
    ``replaced(old, new)`` sees each pair before the float module is let go, so memory holds one float copy."""
    count = 0
    modules = quantizable_modules(model, spec)
    bar = tqdm(total=len(modules), desc="quantizing", unit="layer", disable=not progress or None, leave=False)
    for i in range(len(modules)):
        (name, m), modules[i] = modules[i], None  # the list keeps no float layer alive once it is replaced
        if isinstance(m, nn.Linear):
            new = QuantizedLinear.from_linear(m, spec) if quantize else \
                QuantizedLinear(m.in_features, m.out_features, m.bias is not None, spec)
        else:
            e, two_i, h = m.gate_up_proj.shape
            new = QuantizedExperts.from_experts(m, spec) if quantize else \
                QuantizedExperts(e, h, two_i // 2, spec, act=getattr(m, "act_fn", F.silu))
        if replaced is not None:
            replaced(m, new)
        _replace(model, name, new)
        del m, new
        count += 1
        bar.update()
    bar.close()
    return count


# -- transformers integration: quantization_config + quantizer -----------------------------------------

class WeightOnlyConfig(QuantizationConfigMixin):
    """``quantization_config`` of a mix quantized by expertmix (``quant_method: expertmix``).

    ``group_size`` is written for int4 only (int8 has one scale per row): a number, or ``null`` for groups fitted
    to each layer's input width.
    """

    def __init__(self, scheme: str = "int8", group_size: int | None = None, skip: Iterable[str] | None = None,
                 **kwargs):
        self.quant_method = QUANT_METHOD
        self.scheme = scheme
        self.group_size = group_size if scheme == "int4" else None  # older int8 configs recorded an unused 128
        self.skip = list(skip if skip is not None else DEFAULT_SKIP)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(scheme=self.scheme, group_size=self.group_size, skip=tuple(self.skip))

    def to_dict(self) -> dict:
        groups = {"group_size": self.group_size} if self.scheme == "int4" else {}
        return {"quant_method": QUANT_METHOD, "scheme": self.scheme, **groups, "skip": list(self.skip)}


class WeightOnlyQuantizer(HfQuantizer):
    """Loads an expertmix-quantized checkpoint: quantized modules are built before the codes load."""

    requires_calibration = True  # loads pre-quantized checkpoints only; quantize with quantize_mix

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_modules(model, self.quantization_config.spec, quantize=False)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


# Registered at import (like the Nexus model's Auto classes), once per process.
AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, WeightOnlyConfig)
AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, WeightOnlyQuantizer)


# -- whole models --------------------------------------------------------------------------------------

def keeps_tied_head_float(model: nn.Module, spec: QuantSpec) -> QuantSpec:
    """``spec``, with the output head kept float when it is tied to the input embeddings.

    The embeddings stay float (only linear layers are quantized), and a tied head is the same tensor: quantizing it
    would untie it and write a checkpoint that transformers cannot load (it re-ties the head to a missing weight).
    """
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return spec
    name = next((n for n, m in quantizable_modules(model, spec) if m is head), None)
    return spec if name is None else replace(spec, skip=(*spec.skip, name.rpartition(".")[2]))


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec,
                   replaced: Callable[[nn.Module, nn.Module], None] | None = None,
                   progress: bool = False) -> nn.Module:
    """Quantize ``model`` in place and record the ``quantization_config`` that reloads it (``replaced``: see
    :func:`replace_modules`)."""
    if getattr(model.config, "quantization_config", None) is not None:
        raise ExpertmixError("the model is already quantized (its config has a quantization_config)")
    spec = keeps_tied_head_float(model, spec)
    model.float()
    count = replace_modules(model, spec, replaced=replaced, progress=progress)
    if count == 0:
        raise ExpertmixError("the model has no linear layers or fused experts to quantize")
    q_config = WeightOnlyConfig(spec.scheme, spec.group_size, spec.skip)
    model.config.quantization_config = q_config
    model.hf_quantizer = WeightOnlyQuantizer(q_config)
    return model


@dataclass
class QuantizeReport:
    """What ``quantize_mix`` wrote: the folder, the scheme and the sizes of the weights on disk."""

    out: Path
    spec: QuantSpec
    tensors: int
    source_bytes: int
    quantized_bytes: int
    stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


def weights_bytes(folder: str | Path) -> int:
    """Bytes of a model folder's weight files (safetensors, ONNX and its external data)."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and (p.suffix in (".safetensors", ".onnx") or p.name.endswith(".onnx.data")))


def quantize_mix(mix: str | Path, out: str | Path, spec: QuantSpec, log: Callable[[str], None] = lambda _: None,
                 progress: bool = False) -> QuantizeReport:
    """Load a mix (or any causal LM folder), quantize it layer by layer (one float copy in memory) and write a
    loadable checkpoint to ``out``."""
    mix, out = Path(mix), Path(out)
    require_float_weights(mix, "quantize")
    if out.exists():
        raise ExpertmixError(f"output folder {out} already exists; choose another --out or remove it")
    from . import modeling_nexus  # noqa: F401  (registers the Nexus model with the Auto classes)

    with atomic_dir(out) as tmp:  # claimed first: a second run to the same --out is refused before any work
        model = AutoModelForCausalLM.from_pretrained(mix, dtype=torch.float32).eval()
        if (tied := keeps_tied_head_float(model, spec)) != spec:
            log(f"the output head is tied to the input embeddings, which stay float: keeping it float too "
                f"(--keep-float {','.join(tied.skip)})")
            spec = tied
        check_skip(model, spec)
        widths = sorted({w.shape[-1] for _, m in quantizable_modules(model, spec)
                         for w in _quantized_weights(m, spec).values()})
        if spec.scheme == "int4" and spec.group_size is not None and widths:
            shortest = widths[0]
            if spec.group_size > shortest:  # every row padded to a whole group: int4 bigger than int8
                raise ExpertmixError(f"--group-size {spec.group_size} is longer than the shortest rows to quantize "
                                     f"({shortest} inputs): each row would be padded to a whole group; use at most "
                                     f"{shortest}")
        errors: list[float] = []
        quantize_model(model, spec, replaced=lambda old, new: errors.extend(_relative_errors(old, new, spec)),
                       progress=progress)
        stats = {"tensors": float(len(errors)), "mean_relative_error": sum(errors) / max(len(errors), 1),
                 "max_relative_error": max(errors, default=0.0)}
        groups = {str(width): spec.group_for(width) for width in widths} if spec.scheme == "int4" else {}
        log(f"quantized {stats['tensors']:.0f} weight tensors to {spec.scheme}"
            + (f" (groups of {spec.group_size})" if spec.scheme == "int4" and spec.group_size is not None else "")
            + (" (groups fitted to the input widths: " + ", ".join(f"{w} inputs in groups of {g}"
                                                                   for w, g in groups.items()) + ")"
               if spec.scheme == "int4" and spec.group_size is None else "")
            + f"; mean relative weight error {stats['mean_relative_error']:.2e}")
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(mix).save_pretrained(tmp)
        for name in COPIED_FILES:
            if (mix / name).is_file():
                shutil.copyfile(mix / name, tmp / name)
        record = {"source": str(mix.resolve()), **model.config.quantization_config.to_dict(),
                  **({"groups_by_input_width": groups} if groups else {}), **stats}
        (tmp / "quantization.json").write_text(json.dumps(record, indent=2) + "\n")
        if (tmp / MIX_FILE).is_file():
            append_history(tmp, {"stage": "quantize", **record})
    return QuantizeReport(out=out, spec=spec, tensors=int(stats["tensors"]), source_bytes=weights_bytes(mix),
                          quantized_bytes=weights_bytes(out), stats=stats)


def check_skip(model: nn.Module, spec: QuantSpec) -> None:
    """Refuse a ``--keep-float`` entry that names nothing in ``model`` (a typo, a dotted path): it would keep
    nothing float, silently. The defaults are exempt: they name parts that only some models have."""
    parts = {part for name, _ in model.named_modules() for part in name.split(".") if part}
    if any(_is_fused_experts(m) for m in model.modules()):
        parts |= set(EXPERT_WEIGHTS)
    unknown = [entry for entry in spec.skip if entry not in parts and entry not in DEFAULT_SKIP]
    if unknown:
        some = ", ".join(sorted(p for p in parts if not p.isdigit())[:12])
        raise ExpertmixError(f"--keep-float {', '.join(unknown)}: matches no module of this model; entries are whole "
                             f"module-name parts (not dotted paths), e.g. {some}")


def _quantized_weights(m: nn.Module, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The float weights of ``m`` that ``spec`` quantizes, by name."""
    if isinstance(m, nn.Linear):
        return {"weight": m.weight}
    return {w: getattr(m, w) for w in EXPERT_WEIGHTS if w not in spec.skip}


def _relative_errors(old: nn.Module, new: nn.Module, spec: QuantSpec) -> list[float]:
    """Each quantized weight's relative error (Frobenius norm of the difference over the weight's)."""
    errors = []
    for w_name, w in _quantized_weights(old, spec).items():
        w = w.detach().float()
        if isinstance(new, QuantizedLinear):
            deq = new.dequantized_weight()
        else:
            deq = torch.stack([new.expert_weight(w_name, e, torch.float32) for e in range(new.num_experts)])
        errors.append(float((deq - w).norm() / w.norm().clamp_min(1e-12)))
    return errors


def load_quantized(folder: str | Path) -> nn.Module:
    """Load a quantized mix on the CPU (transformers rebuilds the quantized modules from the config)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if config.get("quantization_config", {}).get("quant_method") != QUANT_METHOD:
        raise ExpertmixError(f"{folder}: not a mix quantized by expertmix (config.json has no "
                             f"quantization_config with quant_method '{QUANT_METHOD}')")
    from . import modeling_nexus  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()


__all__ = ["QuantSpec", "fitted_group", "quantize_tensor", "dequantize_tensor", "QuantizedLinear", "QuantizedExperts",
           "quantize_model", "quantize_mix", "load_quantized", "QuantizeReport", "WeightOnlyConfig",
           "weights_bytes", "quantizable_modules"]
