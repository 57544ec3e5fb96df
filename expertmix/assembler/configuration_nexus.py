"""Configuration of the Nexus MoE: the seed's own config (``text_config``) plus experts, router and aux loss.

The seed's architecture (Llama, Qwen2, Cohere, ...) stays in ``text_config`` untouched, so the MoE reuses
that family's attention, norms and positional code; only the feed-forward blocks become Nexus blocks.
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

RouterKind = Literal["nexus", "linear"]
ROUTER_KINDS: tuple[str, ...] = ("nexus", "linear")
SUPPORTED_ACTIVATIONS = ("silu", "swish")


@strict
class NexusConfig(PreTrainedConfig):
    r"""
    text_config (`dict` or `PreTrainedConfig`):
        The seed model's config; its decoder layers are kept, their MLPs become the MoE block's shared expert.
    num_experts (`int`):
        Routed experts per layer (each one a dense expert's FFN for that layer).
    router_type (`"nexus"` or `"linear"`):
        `nexus`: per-layer SwiGLU projection of the experts' domain embeddings (Gritsch et al. 2024);
        `linear`: a BTX-style linear gate over the hidden state.
    embedding_dim (`int`):
        Size of the experts' domain embeddings (the Nexus router's input); 0 for the linear router.
    router_intermediate_size (`int`, *optional*):
        Width of the Nexus projection's SwiGLU (defaults to the hidden size).
    num_experts_per_tok (`int`):
        Routed experts per token (Nexus: 1). Gates are the un-renormalised softmax probabilities.
    router_aux_loss_coef (`float`):
        Weight of the Switch-style load-balancing loss added to the LM loss when labels are given.
    routed_experts_impl (`str`):
        Which implementation of `routed_experts.experts_forward` runs the experts ("auto" picks per device).
    expert_names (`list[str]`):
        One name per routed expert, for reports.
    """

    model_type = "nexus"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    num_experts: int = 2
    router_type: RouterKind = "nexus"
    embedding_dim: int = 0
    router_intermediate_size: int | None = None
    num_experts_per_tok: int = 1
    router_aux_loss_coef: float = 0.05
    output_router_logits: bool = False
    routed_experts_impl: str = "auto"
    expert_names: list[str] | None = None
    tie_word_embeddings: bool = False  # the wrapped seed model ties its own head (text_config decides)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text = self.text_config
        if self.router_intermediate_size is None:
            self.router_intermediate_size = text.hidden_size
        if self.expert_names is None:
            self.expert_names = [f"expert{i}" for i in range(self.num_experts)]

    def validate_architecture(self) -> None:
        """Refuse settings the MoE cannot build, naming the field."""
        if self.router_type not in ROUTER_KINDS:
            raise ValueError(f"router_type {self.router_type!r}: choose one of {', '.join(ROUTER_KINDS)}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} not in 1..{self.num_experts}")
        if self.router_type == "nexus" and self.embedding_dim < 1:
            raise ValueError("the nexus router needs embedding_dim > 0 (the domain embeddings' size)")
        if len(self.expert_names) != self.num_experts:
            raise ValueError(f"expert_names: {len(self.expert_names)} names for {self.num_experts} experts")
        act = getattr(self.text_config, "hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"text_config.hidden_act {act!r}: routed experts are SiLU-gated (SwiGLU) FFNs")

    @property
    def moe_intermediate_size(self) -> int:
        """Intermediate size of every routed expert (the seed's FFN width: experts share the seed)."""
        return self.text_config.intermediate_size


__all__ = ["NexusConfig"]
