"""Routed mixtures of PEFT adapters (Zadouri et al. 2023): MoV over (IA)³ vectors and MoLoRA over LoRA adapters.

Each expert is one peft adapter (``expert0``, ``expert1``, ...) in peft's own per-adapter containers
(``ia3_l`` / ``lora_A`` / ``lora_B``); the layers below subclass peft's ``ia3.Linear`` and ``lora.Linear``
so injection, target selection, initialisation, device placement, adapter loading and
``disable_adapter()`` stay peft's. What they add per adapted projection is a router — one weight row per
expert (``mix_router``), no bias — and a forward that merges the active experts by the router's softmax
for every token instead of applying them all (several active (IA)³ adapters would multiply):

- MoV: ``x ⊙ Σ_i s_i(x) l_i`` on feed-forward inputs, ``W x ⊙ Σ_i s_i(x) l_i`` on other outputs;
- MoLoRA: ``W x + Σ_i s_i(x) · scale_i · B_i A_i x`` with the experts stacked as ``A [E, r, d]``,
  ``B [E, d_out, r]`` (ranks padded with zeros when they differ, which leaves every product unchanged).

``s(x) = softmax(x R^T)``; with ``top_k`` only the k largest weights are kept and renormalised, so a
merge of (IA)³ vectors stays a convex combination (all-ones experts remain the identity).

With shared routers (:func:`share_routers`), the routed layers of one transformer block whose inputs have the
same width use one router between them (held by the first; the others keep none), each applied to its own
input: the router then costs ``E x hidden`` per block instead of ``E x in_features`` per projection, which on
a small model is as much as the experts themselves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.ia3 import layer as ia3_layer
from peft.tuners.lora import layer as lora_layer
from torch import nn

from ..errors import ExpertmixError

ROUTER = "mix_router"


class RoutedMixin:
    """A router over the layer's experts: one weight row per adapter, softmax over the active ones."""

    top_k: int | None = None
    routing_sink: list[torch.Tensor] | None = None  # set by capture_routing: per-call probabilities
    router_owner: RoutedMixin | None = None  # set by share_routers: the layer whose router this one uses

    def _ensure_router(self) -> None:
        if ROUTER not in self._modules:  # peft's update_layer already walks adapter_layer_names
            self.mix_router = nn.ParameterDict({})

    def _add_router_row(self, adapter_name: str) -> None:
        if self.router_owner is not None:  # a shared router: the owner gets the row
            return
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        row = torch.empty(self.in_features, device=weight.device, dtype=dtype)
        nn.init.normal_(row, std=1.0 / math.sqrt(self.in_features))
        self.mix_router[adapter_name] = nn.Parameter(row, requires_grad=adapter_name in self.active_adapters)

    def router_layer(self) -> RoutedMixin:
        """The layer that holds this layer's router (itself, unless its router is shared)."""
        return self if self.router_owner is None else self.router_owner

    def experts(self) -> list[str]:
        """The active experts this layer mixes, in adapter order."""
        rows = self.router_layer().mix_router
        return [a for a in self.active_adapters if a in rows]

    def router_weight(self, experts: list[str]) -> torch.Tensor:
        """The router's weight ``[E, in_features]`` for ``experts``."""
        rows = self.router_layer().mix_router
        return torch.stack([rows[e] for e in experts])

    def route(self, x: torch.Tensor, experts: list[str]) -> torch.Tensor:
        """Per-token merging weights ``[..., E]`` (float32): softmax of ``x R^T``, optionally top-k."""
        weight = self.router_weight(experts)
        probs = torch.softmax(F.linear(x.to(weight.dtype), weight).float(), dim=-1)
        k = self.top_k
        if k is not None and k < len(experts):
            top, index = probs.topk(k, dim=-1)
            probs = torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))
        if self.routing_sink is not None:
            self.routing_sink.append(probs.detach())
        return probs

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ExpertmixError(f"{type(self).__name__}: a routed mixture cannot be merged into the base weights "
                             f"(its weights change with every token)")


class MoVLinear(RoutedMixin, ia3_layer.Linear):
    """(IA)³ experts merged per token by a router: a mixture of vectors (MoV)."""

    adapter_layer_names = ia3_layer.IA3Layer.adapter_layer_names + (ROUTER,)

    def update_layer(self, adapter_name: str, config, **kwargs) -> None:
        self._ensure_router()
        super().update_layer(adapter_name, config, **kwargs)
        self._add_router_row(adapter_name)

    def expert_vectors(self, experts: list[str]) -> torch.Tensor:
        """The experts' (IA)³ vectors ``[E, n]`` (n = in_features on feed-forward layers, else out_features)."""
        return torch.stack([self.ia3_l[e].flatten() for e in experts])

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        experts = self.experts()
        if self.disable_adapters or not experts:
            return self.base_layer(x, *args, **kwargs)
        vectors = self.expert_vectors(experts)
        scale = self.route(x, experts).to(vectors.dtype) @ vectors  # [..., n]: Σ_i s_i l_i per token
        if self.is_feedforward:
            return self.base_layer((x.to(vectors.dtype) * scale).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scale).to(result.dtype)


class MoLoRALinear(RoutedMixin, lora_layer.Linear):
    """LoRA experts whose outputs a router merges per token (MoLoRA)."""

    adapter_layer_names = lora_layer.LoraLayer.adapter_layer_names + (ROUTER,)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        self._ensure_router()
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if self.lora_variant.get(adapter_name) is not None or self.lora_bias.get(adapter_name):
            raise ExpertmixError(f"adapter '{adapter_name}': MoLoRA mixes plain LoRA experts; LoRA variants "
                                 f"(DoRA, ...) and lora_bias are not supported")
        self._add_router_row(adapter_name)

    def stacked(self, experts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``A [E, r, d]``, ``B [E, d_out, r]`` and the scalings ``[E]``; smaller ranks are zero-padded."""
        r = max(self.r[e] for e in experts)
        a = torch.stack([F.pad(self.lora_A[e].weight, (0, 0, 0, r - self.r[e])) for e in experts])
        b = torch.stack([F.pad(self.lora_B[e].weight, (0, r - self.r[e])) for e in experts])
        scaling = torch.tensor([self.scaling[e] for e in experts], device=a.device, dtype=torch.float32)
        return a, b, scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ExpertmixError("MoLoRA routes every token over all experts; per-sample adapter_names do not apply")
        experts = self.experts()
        if self.disable_adapters or not experts:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        a, b, scaling = self.stacked(experts)
        gates = self.route(x, experts) * scaling  # [..., E]
        # One shared dropout on the input (peft's per-adapter dropouts are all alike in a mixture).
        h = torch.einsum("...d,erd->...er", self.lora_dropout[experts[0]](self._cast_input_dtype(x, a.dtype)), a)
        y = torch.einsum("...er,eor->...o", h * gates.to(h.dtype).unsqueeze(-1), b)
        return (result + y.to(result.dtype)).to(result.dtype)


ROUTED_CLASSES: dict[type, type] = {ia3_layer.Linear: MoVLinear, lora_layer.Linear: MoLoRALinear}


def routed_layers(model: nn.Module) -> Iterator[tuple[str, RoutedMixin]]:
    """``(module name, layer)`` of every routed mixture layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, RoutedMixin):
            yield name, module


def install_routers(model: nn.Module, adapter_name: str, config) -> int:
    """Replace the peft layers that hold ``adapter_name`` (the only adapter so far) by their routed subclasses.

    The new layer wraps the same base layer and takes over the adapter's weights, so the model computes what
    it did before; adapters added afterwards (``add_adapter``) each get their own router row.
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, RoutedMixin):
            continue
        cls = ROUTED_CLASSES.get(type(module))
        if cls is None:
            if isinstance(module, (ia3_layer.IA3Layer, lora_layer.LoraLayer)):
                raise ExpertmixError(f"{name}: {type(module).__name__} layers cannot be routed; mixtures adapt "
                                     f"linear layers only (check the adapter's target_modules)")
            continue
        if cls is MoVLinear:
            routed = MoVLinear(module.base_layer, adapter_name, config=config, is_feedforward=module.is_feedforward)
        else:
            routed = MoLoRALinear(module.base_layer, adapter_name, config=config, r=module.r[adapter_name],
                                  lora_alpha=module.lora_alpha[adapter_name])
        result = routed.load_state_dict({k: v for k, v in module.state_dict().items()
                                         if not k.startswith("base_layer.")}, strict=False)
        if result.unexpected_keys:
            raise ExpertmixError(f"{name}: adapter state {result.unexpected_keys[:3]} has no place in the routed layer")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, routed)
        swapped += 1
    if swapped == 0:
        raise ExpertmixError("no layer of the model was adapted: check the adapters' target_modules")
    return swapped


def block_of(name: str) -> str:
    """The transformer block a module belongs to: its name up to the last numeric part (``model.layers.3``)."""
    match = re.match(r"^(.*\.\d+)(?:\.|$)", name)
    return match.group(1) if match else ""


def share_routers(model: nn.Module) -> int:
    """Let the routed layers of each block with inputs of one width share the first one's router.

    The others' router rows are dropped (so saved adapters hold each shared router once); call after every
    expert is added. Returns how many layers now use another layer's router.
    """
    owners: dict[tuple[str, int], RoutedMixin] = {}
    shared = 0
    for name, layer in routed_layers(model):
        owner = owners.setdefault((block_of(name), layer.in_features), layer)
        if owner is layer:
            continue
        if list(layer.mix_router) != list(owner.mix_router):
            raise ExpertmixError(f"{name}: its experts differ from those of the router it would share")
        for key in list(layer.mix_router):
            del layer.mix_router[key]
        layer.__dict__["router_owner"] = owner  # a plain reference: not a submodule, not in the state dict
        shared += 1
    return shared


def router_owners(model: nn.Module) -> list[tuple[str, RoutedMixin]]:
    """The routed layers that hold a router (all of them unless routers are shared)."""
    return [(n, layer) for n, layer in routed_layers(model) if layer.router_owner is None]


def unrouted_layers(model: nn.Module) -> list[str]:
    """Names of peft layers that are not routed (e.g. made by an expert that adapts extra modules)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (ia3_layer.IA3Layer, lora_layer.LoraLayer)) and not isinstance(m, RoutedMixin)]


def set_top_k(model: nn.Module, top_k: int | None) -> None:
    """Keep only the ``top_k`` largest merging weights per token in every router (None: soft merging)."""
    if top_k is not None and top_k < 1:
        raise ExpertmixError(f"top_k must be at least 1, got {top_k}")
    for _, layer in routed_layers(model):
        layer.top_k = top_k


@contextmanager
def capture_routing(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect every router's merging weights (``[..., E]`` per forward call) while the block runs."""
    sinks: dict[str, list[torch.Tensor]] = {}
    layers = list(routed_layers(model))
    for name, layer in layers:
        layer.routing_sink = sinks.setdefault(name, [])
    try:
        yield sinks
    finally:
        for _, layer in layers:
            layer.routing_sink = None
