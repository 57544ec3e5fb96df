"""The Nexus MoE model: the seed's own causal LM whose decoder MLPs become shared + routed-expert blocks.

Shaped like transformers' Qwen2-MoE (fused ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` experts,
``output_router_logits``, ``load_balancing_loss_func`` times ``router_aux_loss_coef`` added to the loss), but
instead of re-implementing a family it wraps the seed's causal LM class (Llama, Qwen2, Cohere, ...) so that
attention, norms, rotary embeddings, caches and the head stay the family's own code.

Block output (Gritsch et al. 2024): ``shared(x) + p_k * expert_k(x)`` with ``p = softmax(x . e_i)`` over the
routed experts, top-1, ``p_k`` not renormalised. Nexus router: ``e_i = W2 . SwiGLU(W1 . d_i)`` per layer from
the experts' (standardised) domain embeddings ``d_i``; linear router: ``e_i`` is a free weight row.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

from .configuration_nexus import NexusConfig
from .routed_experts import experts_forward, router_topk

# Router logits of the forward pass in progress: each MoE block appends its [tokens, experts] logits here.
# (A context variable rather than transformers' output-capturing hooks: the blocks sit inside the wrapped
# family model, whose hooks only know that family's own module classes.)
_ROUTER_LOGITS: ContextVar[list[torch.Tensor] | None] = ContextVar("nexus_router_logits", default=None)


class NexusRouter(nn.Module):
    """Nexus adaptive router: a per-layer SwiGLU projection of the experts' domain embeddings."""

    def __init__(self, config: NexusConfig):
        super().__init__()
        hidden, inner = config.text_config.hidden_size, config.router_intermediate_size
        std = getattr(config.text_config, "initializer_range", 0.02)
        self.up_proj = nn.Linear(config.embedding_dim, 2 * inner, bias=False)  # W1: m -> 2h (gate, value)
        self.down_proj = nn.Linear(inner, hidden, bias=False)  # W2: h -> h
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=std)
        # The standardised domain embeddings: the router's input, fixed (not trained), saved with the mix.
        self.register_buffer("domain_embeddings", torch.zeros(config.num_experts, config.embedding_dim))

    def expert_embeddings(self) -> torch.Tensor:
        """``e_i = W2 . SwiGLU(W1 . d_i)``: one hidden-size vector per expert, ``[E, H]``."""
        weight = getattr(self.up_proj, "weight", None)  # none when quantized (--keep-float without 'router')
        d = self.domain_embeddings if weight is None else self.domain_embeddings.to(weight.dtype)
        gate, value = self.up_proj(d).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * value)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits ``x . e_i``: ``[T, H] -> [T, E]``."""
        return F.linear(hidden, self.expert_embeddings().to(hidden.dtype))


class LinearRouter(nn.Module):
    """BTX-style linear router: one free weight row per expert."""

    def __init__(self, config: NexusConfig):
        super().__init__()
        std = getattr(config.text_config, "initializer_range", 0.02)
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.text_config.hidden_size))
        nn.init.normal_(self.weight, std=std)

    def expert_embeddings(self) -> torch.Tensor:
        return self.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight.to(hidden.dtype))


ROUTERS = {"nexus": NexusRouter, "linear": LinearRouter}


class NexusExperts(nn.Module):
    """The routed experts of one layer as fused 3-D weights (transformers 5's MoE layout)."""

    def __init__(self, config: NexusConfig):
        super().__init__()
        e, h, i = config.num_experts, config.text_config.hidden_size, config.moe_intermediate_size
        std = getattr(config.text_config, "initializer_range", 0.02)
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # rows [0, I): gate, [I, 2I): up
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)
        self.impl = config.routed_experts_impl

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(hidden, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights,
                               impl=self.impl)


class NexusSparseMoeBlock(nn.Module):
    """Shared expert (the seed's FFN, always on, unweighted) plus the top-k routed experts."""

    def __init__(self, config: NexusConfig, shared_expert: nn.Module):
        super().__init__()
        self.shared_expert = shared_expert
        self.router = ROUTERS[config.router_type](config)
        self.experts = NexusExperts(config)
        self.top_k = config.num_experts_per_tok
        self.forced_expert: int | None = None  # set by NexusForCausalLM.route_to for analysis

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.router(x)
        sink = _ROUTER_LOGITS.get()
        if sink is not None:
            sink.append(logits)
        if self.forced_expert is None:
            weights, index = router_topk(logits, self.top_k)  # softmax, top-k, gates not renormalised
        else:
            index = torch.full((x.shape[0], 1), self.forced_expert, dtype=torch.long, device=x.device)
            weights = torch.ones(x.shape[0], 1, device=x.device)
        routed = self.experts(x, index, weights.to(x.dtype))
        return (self.shared_expert(x) + routed).reshape(shape)


class NexusPreTrainedModel(PreTrainedModel):
    config: NexusConfig
    config_class = NexusConfig
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # data-dependent routing

    def _init_weights(self, module):
        super()._init_weights(module)
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, NexusExperts):
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)
        elif isinstance(module, LinearRouter):
            nn.init.normal_(module.weight, std=std)


class NexusForCausalLM(NexusPreTrainedModel, GenerationMixin):
    """The seed's causal LM with every decoder layer's MLP replaced by a :class:`NexusSparseMoeBlock`."""

    def __init__(self, config: NexusConfig):
        super().__init__(config)
        config.validate_architecture()
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        layers = self.language_model.base_model.layers
        for layer in layers:
            if not hasattr(layer, "mlp"):
                raise ValueError(f"{type(layer).__name__} has no 'mlp' to turn into an MoE block")
            layer.mlp = NexusSparseMoeBlock(config, layer.mlp)
        self._no_split_modules = list(getattr(self.language_model, "_no_split_modules", None) or [])
        self.post_init()

    # -- structure ---------------------------------------------------------------------------------
    def moe_blocks(self) -> list[NexusSparseMoeBlock]:
        """The MoE block of every decoder layer, in layer order."""
        return [layer.mlp for layer in self.language_model.base_model.layers]

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    @contextmanager
    def route_to(self, expert: int | None) -> Iterator[None]:
        """Send every token to routed expert ``expert`` with gate 1 (analysis and tests); ``None`` routes."""
        if expert is not None and not 0 <= expert < self.config.num_experts:
            raise ValueError(f"expert {expert} out of range 0..{self.config.num_experts - 1}")
        blocks = self.moe_blocks()
        for b in blocks:
            b.forced_expert = expert
        try:
            yield
        finally:
            for b in blocks:
                b.forced_expert = None

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Causal-LM forward; with labels the loss includes ``router_aux_loss_coef`` x load-balancing loss."""
        output_router_logits = output_router_logits if output_router_logits is not None \
            else self.config.output_router_logits
        want_aux = labels is not None and self.config.router_aux_loss_coef > 0
        sink: list[torch.Tensor] | None = [] if (output_router_logits or want_aux) else None
        token = _ROUTER_LOGITS.set(sink)
        try:
            out = self.language_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                logits_to_keep=logits_to_keep, **kwargs)
        finally:
            _ROUTER_LOGITS.reset(token)
        loss, aux_loss = out.loss, None
        if sink:
            n_tokens = sink[0].shape[0]
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 \
                and attention_mask.numel() == n_tokens else None
            aux_loss = load_balancing_loss_func(tuple(sink), self.config.num_experts,
                                                self.config.num_experts_per_tok, mask)
            if want_aux:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=out.logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=tuple(sink) if output_router_logits else None,
        )


def router_probabilities(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Stack per-layer router logits into probabilities ``[layers, tokens, experts]``."""
    return torch.softmax(torch.stack([r.float() for r in router_logits]), dim=-1)


AutoConfig.register(NexusConfig.model_type, NexusConfig, exist_ok=True)
AutoModelForCausalLM.register(NexusConfig, NexusForCausalLM, exist_ok=True)

__all__ = ["NexusForCausalLM", "NexusPreTrainedModel", "NexusSparseMoeBlock", "NexusRouter", "LinearRouter",
           "router_probabilities"]
