"""What travels between the coordinator and the nodes: every weight of a dense expert, only the adapter of a
LoRA expert. Both sides build the model the same way (seed, then the PEFT wrapper), so the names match."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ExpertmixError
from ..fsutil import atomic_path


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _travelling(model) -> dict[str, torch.Tensor]:
    if _is_peft(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return dict(model.named_parameters())  # tied weights appear once


def travelling_state(model) -> dict[str, torch.Tensor]:
    """The tensors a node sends and receives, float32 on the CPU (numpy, hence Flower, has no bfloat16)."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in _travelling(model).items()}


def load_travelling_state(model, state: Mapping[str, torch.Tensor]) -> None:
    """Put received tensors into ``model``; refuses a state whose names or shapes do not fit it."""
    own = _travelling(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ExpertmixError(f"received weights do not fit this model: {len(missing)} missing "
                             f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}); are the "
                             f"coordinator and the node using the same seed and expert kind?")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ExpertmixError(f"received weight {k} has shape {tuple(v.shape)}, the model has {tuple(own[k].shape)}")
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, dict(state))
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v.to(params[k].dtype))


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Payload size of a state in bytes (what one transfer of it costs, before protocol overhead)."""
    return sum(v.numel() * v.element_size() for v in state.values())


def save_state(path: str | Path, state: Mapping[str, torch.Tensor],
               metadata: Mapping[str, object] | None = None) -> Path:
    """Write a state as safetensors, atomically (string metadata only)."""
    path = Path(path)
    with atomic_path(path, ".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state written by :func:`save_state`."""
    path = Path(path)
    if not path.is_file():
        raise ExpertmixError(f"{path}: no such weights file")
    return load_file(str(path))
