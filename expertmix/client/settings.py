"""The federation's settings: the run config (same for the server and every node) and each node's own config.

Flower hands both to the apps as flat dicts of TOML scalars with dashed keys (``[tool.flwr.app.config]`` in the
app's pyproject.toml, ``flwr run --run-config``, ``flower-supernode --node-config``). They are validated here,
once, so a wrong key or value is refused with its name instead of failing deep inside a round.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ExpertmixError

K = TypeVar("K")

# What must not change when a restarted server resumes from its checkpoint (the rest may: more rounds, a longer
# timeout, another registry).
RESUMABLE_CHANGES = frozenset({"rounds", "round_timeout", "evaluate_every", "registry", "publish", "out",
                               "work_dir"})  # a work folder restored from a backup or moved resumes where it is


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def _from_flat(cls, values: dict[str, Any], what: str):
        data = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(k for k in data if k not in cls.model_fields)
        if unknown:
            known = ", ".join(k.replace("_", "-") for k in cls.model_fields)
            raise ExpertmixError(f"{what}: unknown key(s) {', '.join(u.replace('_', '-') for u in unknown)} "
                                 f"(known: {known})")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            parts = [(f"key '{'.'.join(str(x) for x in e['loc']).replace('_', '-')}': " if e["loc"] else "")
                     + e["msg"].removeprefix("Value error, ") for e in exc.errors()]
            raise ExpertmixError(f"{what}: {'; '.join(parts)}") from exc

    def to_flat(self) -> dict[str, Any]:
        """The dashed-key dict Flower configs use (TOML scalars only)."""
        return {k.replace("_", "-"): v for k, v in self.model_dump().items()}


class FederationConfig(_Config):
    """The run config: what to train, how to federate it, where the coordinator writes and publishes."""

    base: str = Field(min_length=1, description="seed model folder (on the coordinator; nodes may override)")
    domain: str = Field(min_length=1)
    work_dir: str = Field(min_length=1, description="coordinator folder for checkpoints, state and the expert")
    name: str = ""
    base_id: str = ""
    kind: Literal["dense", "lora"] = "dense"
    rounds: int = Field(3, ge=1)
    local_steps: int = Field(20, ge=1, description="optimizer steps per node and round")
    batch_size: int = Field(8, ge=1, description="a node's batch per step on average: the round's global batch is "
                            "batch-size x the nodes training in it")
    batch_split: Literal["by-data", "equal"] = Field(
        "by-data", description="by-data: the global batch is split over the round's nodes in proportion to their "
        "training tokens, as a batch drawn from all their data would be; equal: every node takes batch-size")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup: float = Field(0.1, ge=0, lt=1, description="share of the federation's steps (rounds x local steps) "
                          "over which the rate ramps up from 0, as central training's warm-up")
    keep_optimizer: bool = Field(True, description="nodes keep their AdamW moments between rounds (in their "
                                 "cache); off, every round starts a fresh optimizer")
    local_warmup: float = Field(0.0, ge=0, lt=1, description="share of each round's local steps (at least one "
                                "when > 0) over which the rate ramps up again: for keep-optimizer off, where a "
                                "fresh Adam's first full step moves every weight by lr")
    seq_len: int = Field(256, ge=2)
    valid_fraction: float = Field(0.05, gt=0, lt=1)
    strategy: Literal["fedavg", "fedprox", "fedavgm"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0)
    server_lr: float = Field(1.0, gt=0, description="fedavgm: step size of the averaged update on the server")
    server_momentum: float = Field(0.0, ge=0, lt=1, description="fedavgm: server momentum")
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(1.0, gt=0, le=1)
    min_nodes: int = Field(2, ge=1, description="nodes a round needs; also the nodes waited for at the start")
    round_timeout: float = Field(3600.0, gt=0, description="seconds a round waits for replies")
    evaluate_every: int = Field(0, ge=0, description="federated evaluation every N rounds; always after the "
                                "last (0: only then; each train reply already evaluates the state it received)")
    lora_r: int = Field(16, ge=1)
    embedder: str = "seed"
    embed_sample: int = Field(64, ge=1)
    seed: int = 0
    dp_clip: float = Field(0.0, ge=0, description="clipping norm of each node's update; 0 turns DP off")
    dp_noise: float = Field(0.0, ge=0, description="Gaussian noise multiplier (with dp-clip)")
    out: str = ""
    registry: str = ""
    publish: bool = True

    @model_validator(mode="after")
    def _check(self) -> FederationConfig:
        if self.dp_noise > 0 and self.dp_clip <= 0:
            raise ValueError("dp-noise needs dp-clip > 0 (the noise is scaled by the clipping norm)")
        return self

    @classmethod
    def from_run_config(cls, values: dict[str, Any]) -> FederationConfig:
        """Validate Flower's run config (dashed keys)."""
        return cls._from_flat(values, "federation run config")

    @property
    def expert_name(self) -> str:
        return self.name or self.domain

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.work_dir) / "expert"

    def resume_settings(self) -> dict[str, Any]:
        """The settings a resumed federation must share with the interrupted one, as JSON values."""
        return json.loads(json.dumps({k: v for k, v in self.model_dump().items() if k not in RESUMABLE_CHANGES},
                                     default=str))

    def resume_key(self) -> str:
        """Hash of :meth:`resume_settings`."""
        return hashlib.sha256(json.dumps(self.resume_settings(), sort_keys=True).encode()).hexdigest()

    @property
    def total_steps(self) -> int:
        """Sequential optimizer steps of the whole federation: every node takes ``local_steps`` per round."""
        return self.rounds * self.local_steps

    def node_batches(self, sizes: Mapping[K, int | None]) -> dict[K, int]:
        """Each node's batch for a round, from the training tokens each node holds (``None``: unknown).

        by-data splits the global batch (``batch_size`` x nodes) in proportion to the sizes by largest
        remainders, so the batches add up to it (at least 1 each, which may add a little); nodes of unknown size
        take ``batch_size``.
        With every node's update weighted by the examples it trained on, each example then counts the same, as
        in central training on all the nodes' data, and no node's data is oversampled.
        """
        known = {k: int(v) for k, v in sizes.items() if v is not None and int(v) > 0}
        out = {k: self.batch_size for k in sizes if k not in known}
        if self.batch_split == "equal" or not known:
            return {**out, **{k: self.batch_size for k in known}}
        total, budget = sum(known.values()), self.batch_size * len(known)
        exact = {k: max(1.0, budget * v / total) for k, v in known.items()}
        batches = {k: int(x) for k, x in exact.items()}
        by_remainder = sorted(known, key=lambda k: (exact[k] - batches[k], known[k]), reverse=True)
        for k in by_remainder[:max(0, budget - sum(batches.values()))]:
            batches[k] += 1
        return {**out, **batches}

    def step_lr(self, step: int) -> float:
        """The rate of the federation's global step ``step`` (0-based): linear warm-up from 0, then cosine to 0
        or constant; the schedule central training uses (transformers' ``cosine`` with warm-up)."""
        warmup = math.ceil(self.warmup * self.total_steps)
        if step < warmup:
            return self.lr * step / warmup
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def local_lr(self, server_round: int, local_step: int) -> float:
        """The rate of a node's local step in a round: the global schedule, ramped up again over the round's
        first steps when ``local_warmup`` is set."""
        lr = self.step_lr((server_round - 1) * self.local_steps + local_step)
        ramp = math.ceil(self.local_warmup * self.local_steps) if self.local_warmup else 0
        return lr * local_step / ramp if local_step < ramp else lr

    def round_lr(self, server_round: int) -> float:
        """The rate at the middle of a round (what the round log records)."""
        return self.step_lr((server_round - 1) * self.local_steps + self.local_steps // 2)


class NodeConfig(_Config):
    """A node's own config (``flower-supernode --node-config``): its private data and local paths."""

    data: str = Field(min_length=1, description="the node's training data (file or folder)")
    valid: str = ""
    name: str = ""
    base: str = ""
    text_field: str = ""
    cache_dir: str = ""
    debug_dir: str = ""
    threads: int = Field(0, ge=0, description="torch threads for training (0: torch's default)")

    @classmethod
    def from_node_config(cls, values: dict[str, Any]) -> NodeConfig:
        """Validate Flower's node config (dashed keys)."""
        return cls._from_flat(values, "node config")

    def label(self, node_id: int) -> str:
        """How the node is named in logs, the card and debug files."""
        return self.name or f"node-{node_id}"


def node_title(label: str) -> str:
    """A node as messages name it: ``node a`` for a named node, ``node-123`` for an unnamed one."""
    return label if label.startswith("node-") else f"node {label}"
