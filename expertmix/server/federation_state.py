"""The coordinator's checkpoint: after every round the global state and the federation's record are written
under the work folder, so a restarted ServerApp continues with the next round instead of starting over.

Layout of ``WORK``::

    state.json                     settings key, rounds done, the round log, node summaries, the checkpoint
    checkpoints/round-0003.safetensors   the global state after round 3 (the last two are kept)
    result.json                    written last: where the expert is and what was published
                                   (the expert's folder relative to WORK when inside it: a moved WORK still finds it)
    failure.json                   why the last run stopped without an expert (cleared when a run starts)

Each file is replaced atomically and the weights are written before ``state.json`` points at them, so a
server killed at any moment leaves either the previous round's checkpoint or the new one.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..client.settings import FederationConfig
from ..client.weights import load_state, save_state
from ..errors import ExpertmixError
from ..experts.training import changed_settings
from ..fsutil import write_json_atomic

STATE_FILE, RESULT_FILE, FAILURE_FILE, CHECKPOINTS = "state.json", "result.json", "failure.json", "checkpoints"
KEEP_CHECKPOINTS = 2


@dataclass
class FederationRecord:
    """What the coordinator knows after some rounds (the global state lives beside it)."""

    resume_key: str
    settings: dict = field(default_factory=dict)  # what the key hashes, to name a change (empty in older records)
    rounds_done: int = 0
    checkpoint: str | None = None
    history: list[dict] = field(default_factory=list)
    nodes: dict[str, dict] = field(default_factory=dict)  # label -> latest summary (counts, languages, embedding)
    expert: str | None = None
    momentum: str | None = None  # FedAvgM's server momentum, checkpointed beside the global state
    # Names this federation to the nodes (they keep their optimizer moments under it); kept across restarts
    federation_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class FederationStore:
    """Reads and writes the checkpoint of one federation in ``work_dir``."""

    def __init__(self, work_dir: str | Path):
        self.root = Path(work_dir)

    @property
    def result_file(self) -> Path:
        return self.root / RESULT_FILE

    def load(self, cfg: FederationConfig) -> tuple[FederationRecord, dict[str, torch.Tensor] | None]:
        """The record and global state to continue from; a fresh record when nothing was checkpointed yet.

        Refuses a checkpoint made with other settings (only the number of rounds, timeouts and where the
        expert goes may change between a run and its resumption).
        """
        record = self.check(cfg)
        if record is None:
            return FederationRecord(resume_key=cfg.resume_key(), settings=cfg.resume_settings()), None
        state = load_state(self.root / record.checkpoint) if record.checkpoint else None
        return record, state

    def check(self, cfg: FederationConfig) -> FederationRecord | None:
        """The saved record, when ``cfg`` may resume it (None before the first round); a federation started with
        other settings is refused, naming them."""
        path = self.root / STATE_FILE
        if not path.is_file():
            return None
        record = FederationRecord(**json.loads(path.read_text()))
        if record.resume_key != cfg.resume_key():
            now = cfg.resume_settings()
            what = f" (differs in: {', '.join(changed_settings(record.settings, now))})" if record.settings else ""
            raise ExpertmixError(f"{path}: this work folder holds a federation started with other settings{what}; "
                                 f"rerun it with those, use another --work-dir, or delete {self.root} to start over")
        if cfg.rounds < record.rounds_done:  # it would end without its last round's evaluation and cleanup
            raise ExpertmixError(f"--rounds {cfg.rounds}: the federation in {self.root} has done {record.rounds_done} "
                                 f"rounds already; give at least {record.rounds_done}")
        return record

    def save_round(self, record: FederationRecord, state: dict[str, torch.Tensor],
                   momentum: dict[str, torch.Tensor] | None = None) -> None:
        """Checkpoint the global state (and a server momentum) after ``record.rounds_done`` rounds, then the
        record that points at them."""
        name = f"{CHECKPOINTS}/round-{record.rounds_done:04d}.safetensors"
        save_state(self.root / name, state, {"round": record.rounds_done})
        record.checkpoint = name
        if momentum is not None:
            record.momentum = f"{CHECKPOINTS}/momentum-{record.rounds_done:04d}.safetensors"
            save_state(self.root / record.momentum, momentum, {"round": record.rounds_done})
        self.save_record(record)
        for pattern in ("round-*.safetensors", "momentum-*.safetensors"):
            kept = sorted((self.root / CHECKPOINTS).glob(pattern))
            for old in kept[:-KEEP_CHECKPOINTS]:
                old.unlink(missing_ok=True)

    def load_momentum(self, record: FederationRecord) -> dict[str, torch.Tensor] | None:
        return load_state(self.root / record.momentum) if record.momentum else None

    def save_record(self, record: FederationRecord) -> None:
        write_json_atomic(self.root / STATE_FILE, record.__dict__)

    def finish(self, result: dict) -> None:
        """Record the federation's result; its ``expert`` folder relative to the work folder when inside it."""
        write_json_atomic(self.result_file, {**result, "expert": self.relative(result["expert"])})

    def relative(self, path: str | Path) -> str:
        """``path`` as the record keeps it: relative to the work folder when inside it (a work folder moved or
        restored elsewhere still finds it), absolute otherwise."""
        path = Path(path).absolute()
        try:
            return path.relative_to(self.root.absolute()).as_posix()
        except ValueError:
            return str(path)

    def located(self, recorded: str) -> Path:
        """A path the record keeps (see :meth:`relative`) as an absolute path from where the work folder is now."""
        return self.root.absolute() / recorded

    def state(self) -> dict | None:
        """The record as last saved (rounds done, the round log), or None before the first round; for watchers."""
        path = self.root / STATE_FILE
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except ValueError:  # replaced between the check and the read: read it next time
            return None

    def result(self) -> dict | None:
        """The recorded result (None before the federation has finished), its ``expert`` an absolute path."""
        if not self.result_file.is_file():
            return None
        result = json.loads(self.result_file.read_text())
        return {**result, "expert": str(self.located(result["expert"]))}

    def record_failure(self, message: str) -> None:
        """Why the run stopped without an expert, for the coordinator to show as one line."""
        write_json_atomic(self.root / FAILURE_FILE, {"error": message})

    def failure(self) -> str | None:
        path = self.root / FAILURE_FILE
        try:
            return json.loads(path.read_text())["error"] if path.is_file() else None
        except (ValueError, KeyError):
            return None

    def clear_failure(self) -> None:
        (self.root / FAILURE_FILE).unlink(missing_ok=True)
