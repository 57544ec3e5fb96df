"""``mix.json``: what a mix repo was built from, so it can be rebuilt, checked and extended.

It lists the seed's signature, every expert (repo id, revision, sha256 of its weights, its raw domain
embedding), the router kind, the embedding standardisation, the data the router was trained on and the
history of build stages (assemble, extend, align, quantize) with their settings and results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ExpertmixError
from ..fsutil import write_json_atomic
from ..hub.card import BaseSignature

MIX_FILE = "mix.json"
MIX_FORMAT = "expertmix-mix"
MixRouter = Literal["nexus", "linear", "merge"]


class SeedInfo(BaseSignature):
    """The seed every expert of the mix was trained from."""

    id: str


class MixExpert(BaseModel):
    """One routed expert: where it came from and its raw (unstandardised) domain embedding."""

    model_config = ConfigDict(extra="allow")

    name: str
    domain: str
    repo: str = Field(description="registry name, or the folder it was read from")
    revision: str | None = None
    weights_sha256: dict[str, str] = Field(description="weight file -> sha256")
    embedding_model: str
    embedding: list[float]


class Standardisation(BaseModel):
    """Per-feature standardisation of domain embeddings: ``(d - mean) / std``, fixed at assembly time.

    Kept fixed when experts are added, so the old experts' router inputs never move.
    """

    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, embeddings: torch.Tensor, eps: float = 1e-6) -> Standardisation:
        """Mean and (population) std per feature over the experts; std 1 where a feature does not vary."""
        e = embeddings.double()
        std = e.std(0, unbiased=False) if e.shape[0] > 1 else torch.ones(e.shape[1], dtype=e.dtype)
        std = torch.where(std > eps, std, torch.ones_like(std))
        return cls(mean=e.mean(0).tolist(), std=std.tolist())

    def apply(self, embeddings: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float64)
        std = torch.tensor(self.std, dtype=torch.float64)
        return ((embeddings.double() - mean) / std).float()


class DataRef(BaseModel):
    """A named data source the mix was trained on (replayed by ``extend``)."""

    name: str
    path: str


class MixManifest(BaseModel):
    """The contents of ``mix.json``."""

    model_config = ConfigDict(extra="allow")

    format: Literal["expertmix-mix"] = MIX_FORMAT
    version: int = 1
    router: MixRouter
    seed: SeedInfo
    experts: list[MixExpert]
    standardisation: Standardisation | None = None
    data: list[DataRef] = Field(default_factory=list)
    history: list[dict[str, Any]] = Field(default_factory=list)

    def embeddings(self) -> torch.Tensor:
        """The experts' raw domain embeddings, ``[E, m]``."""
        return torch.tensor([e.embedding for e in self.experts], dtype=torch.float32)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MIX_FILE
        write_json_atomic(path, self.model_dump(mode="json"))
        return path


def append_history(folder: str | Path, entry: dict[str, Any]) -> None:
    """Record a build stage in ``folder/mix.json`` (of any mix kind, kept as it is otherwise; rewritten atomically),
    so a mix aligned or quantized and then extended still says what was done to it."""
    path = Path(folder) / MIX_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    history = data.setdefault("history", [])
    if not isinstance(history, list):
        raise ExpertmixError(f"{path}: field 'history' is not a list")
    history.append(entry)
    write_json_atomic(path, data)


def read_manifest(folder: str | Path, model: type[BaseModel] | None = None):
    """Read and validate ``folder/mix.json`` as ``model`` (default :class:`MixManifest`); errors name file and field."""
    model = model or MixManifest
    path = Path(folder) / MIX_FILE
    if not path.is_file():
        raise ExpertmixError(f"{folder}: not a mix (no {MIX_FILE})")
    try:
        return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ExpertmixError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except ValidationError as exc:
        fields = "; ".join(f"field '{'.'.join(map(str, e['loc']))}': {e['msg']}" for e in exc.errors())
        raise ExpertmixError(f"{path}: {fields}") from exc
