"""A PEFT (LoRA, IA³) expert on its seed as one plain causal LM, so the tools that score models can score it."""

from __future__ import annotations

from pathlib import Path

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
