"""A PEFT (LoRA, IA³) expert on its seed as one plain causal LM, so the tools that score models can score it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM

from ..checkpoints import ADAPTER_CONFIG, require_float_weights
from ..errors import ExpertmixError
from ..hub.card import CARD_FILE, check_compatible, read_card
from ..hub.fingerprint import model_signature


def is_adapter_folder(folder: str | Path) -> bool:
    """A PEFT adapter folder: ``adapter_config.json`` and no model of its own."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def recorded_base(folder: str | Path) -> str | None:
    """The seed a PEFT adapter folder names (``base_model_name_or_path``); None for other folders."""
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(folder)).base_model_name_or_path if is_adapter_folder(folder) else None


def load_adapter_expert(folder: str | Path, seed: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The adapter merged into its seed (``seed``, else the adapter's recorded base), checked against its card."""
    from peft import PeftModel

    folder = Path(folder)
    recorded = recorded_base(folder)
    seed_dir = Path(seed) if seed is not None else Path(recorded or "")
    if seed is None and not (seed_dir / "config.json").is_file():
        raise ExpertmixError(f"{folder}: its seed {recorded!r} (field 'base_model_name_or_path' of {ADAPTER_CONFIG}) "
                             f"is not a model folder here; pass the seed folder (--seed)")
    require_float_weights(seed_dir, "a seed")
    if (folder / CARD_FILE).is_file():  # an expertmix expert: its card names the exact seed it was trained from
        check_compatible(model_signature(seed_dir), read_card(folder).expert, what=f"the seed {seed_dir}")
    base = AutoModelForCausalLM.from_pretrained(seed_dir, dtype=dtype)
    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()


# Llama's names, the fallback where a model's own names give no answer: (IA)³ scales keys, values and the FFN's
# input to its down projection (peft's defaults for Llama); LoRA adapts every linear layer of the blocks.
LLAMA_IA3_TARGETS = ["k_proj", "v_proj", "down_proj"]
LLAMA_IA3_FEEDFORWARD = ["down_proj"]
LLAMA_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The names architectures give each role (peft's per-architecture tables, by role): keys and values (or a fused
# projection of both), and the FFN's down (output) projection.
KEY_NAMES = ("k_proj", "key", "k", "wk", "k_lin")
VALUE_NAMES = ("v_proj", "value", "v", "wv", "v_lin")
FUSED_KV_NAMES = ("qkv_proj", "query_key_value", "Wqkv", "c_attn", "W_pack")
FEEDFORWARD_NAMES = ("down_proj", "fc2", "w2", "dense_4h_to_h", "wo", "fc_out", "lin2")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The last name component of every linear layer of ``model`` but its output head (what peft's "all-linear"
    targets), sorted."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear | Conv1D) and module is not head and name})


def default_targets(model: torch.nn.Module, method: Literal["lora", "ia3"]) -> list[str]:
    """The modules a LoRA or (IA)³ adapter of ``model`` targets by default, from the model's own module names.

    peft's own defaults come from a table keyed by ``model_type`` that lacks many architectures (Cohere, Aya 23's,
    among them: peft then refuses to build the adapter). LoRA: every linear layer of the blocks. (IA)³: peft's
    table where it names modules the model has, else the key, value and FFN down projections found by name; Llama's
    names where none is found (peft then names what is missing)."""
    names = linear_module_names(model)
    if method == "lora":
        return names or list(LLAMA_LORA_TARGETS)
    if method != "ia3":
        raise ExpertmixError(f"unknown adapter method {method!r}: use 'lora' or 'ia3'")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as KNOWN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if (known := KNOWN.get(model_type)) and set(known) <= set(names):
        return list(known)
    found = [next((n for n in candidates if n in names), None) for candidates in (KEY_NAMES, VALUE_NAMES)]
    attention = [n for n in found if n] if all(found) else [n for n in FUSED_KV_NAMES if n in names][:1]
    feedforward = [n for n in FEEDFORWARD_NAMES if n in names][:1]
    return attention + feedforward if attention and feedforward else list(LLAMA_IA3_TARGETS)


def feedforward_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The (IA)³ ``targets`` that sit on an FFN's input (peft scales their input rather than their output): peft's
    table for the architecture where it has one, else the FFN down projections found by name."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as KNOWN

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = KNOWN.get(model_type)
    return [t for t in targets if t in (known if known is not None else FEEDFORWARD_NAMES)]
