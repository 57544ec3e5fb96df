"""What a node carries from one round to the next: its optimizer's moments, and its place in the federation's
learning-rate schedule.

Flower starts a fresh ClientApp process each round and the node receives the averaged weights. Restarting
AdamW there would throw away its moment estimates every round (a fresh Adam's first steps move every weight
by about the full learning rate), and a per-round schedule would warm up and decay once per round. Instead
the node keeps its moments in its cache between rounds (safetensors, keyed by the federation) and each local
step takes the rate the federation's schedule gives its global step, as central training would.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from .weights import load_state, save_state

logger = logging.getLogger(__name__)


def cache_key(*parts) -> str:
    """A short stable name for a node's cache entry made of ``parts`` (data stamps, a federation id...)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def moments_file(cache: Path, federation_id: str, label: str) -> Path:
    """Where node ``label`` keeps its optimizer moments between the rounds of federation ``federation_id``."""
    return cache / "optimizer" / f"{cache_key(federation_id, label)}.safetensors"


def _inner(optimizer):
    """The torch optimizer behind accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


class LocalOptimizerState(TrainerCallback):
    """Sets each local step's learning rate from the federation's schedule and, when ``path`` is given, loads
    the node's optimizer moments before training and saves them after.

    ``lr_at(i)`` is the rate of the round's local step ``i`` (0-based).
    """

    def __init__(self, model: torch.nn.Module, lr_at: Callable[[int], float], path: Path | None = None):
        self.lr_at, self.path = lr_at, path
        self.lr: float | None = None  # the rate of the step being taken
        self.names = {p: n for n, p in model.named_parameters() if p.requires_grad}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.path is not None and self.path.is_file() and optimizer is not None:
            self._load(_inner(optimizer))
        return control

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.lr = self.lr_at(state.global_step)
            for group in _inner(optimizer).param_groups:
                group["lr"] = self.lr
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer logs its own (constant) scheduler's rate; the rate the step used is this one.
        if logs is not None and "learning_rate" in logs and self.lr is not None:
            logs["learning_rate"] = self.lr
        return control

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.path is not None and optimizer is not None:
            self._save(_inner(optimizer), state.global_step)
        return control

    def _save(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        tensors = {}
        for param, slots in optimizer.state.items():
            name = self.names.get(param)
            if name is None:
                continue
            for slot, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"{slot}/{name}"] = value.detach().float().cpu()
        save_state(self.path, tensors, {"steps": steps})

    def _load(self, optimizer: torch.optim.Optimizer) -> None:
        try:
            saved = load_state(self.path)
        except Exception as exc:  # a damaged file costs the moments, not the round
            logger.warning("node optimizer state %s unreadable (%s); starting with fresh moments", self.path, exc)
            return
        by_name = {n: p for p, n in self.names.items()}
        on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
        slots: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
        for key, value in saved.items():
            slot, _, name = key.partition("/")
            param = by_name.get(name)
            if param is None or (slot != "step" and value.shape != param.shape):
                logger.warning("node optimizer state %s does not fit this model (%s); starting with fresh moments",
                               self.path, key)
                return
            # Adam keeps its step count on the CPU unless it runs fused/capturable; moments live with the weight
            if slot == "step":
                value = value.to(param.device) if on_device else value
            else:
                value = value.to(param.device, param.dtype)
            slots.setdefault(param, {})[slot] = value
        for param, state in slots.items():
            optimizer.state[param] = state
