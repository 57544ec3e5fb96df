"""The expert card: README.md front matter with the Hub's standard keys and an ``expert:`` block.

This is the contract between contributors and assemblers (DESIGN.md, "Expert repo"). It is read
strictly: a malformed card is refused with the file and the field named.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from huggingface_hub import ModelCard, ModelCardData
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import CardError, IncompatibleExpertError
from ..fsutil import write_text_atomic

ISO_639 = re.compile(r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")  # "de", "deu", "zh-Hans", "pt_BR"
CARD_FILE = "README.md"
EMBEDDING_FILE = "domain_embedding.safetensors"
ExpertKind = Literal["dense", "lora", "ia3"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=False)


class EmbeddingInfo(_Strict):
    """How the domain embedding was computed."""

    model: str = Field(description="embedder id: 'seed' or a sentence-transformers model name")
    dim: int = Field(gt=0)
    documents: int = Field(ge=1, description="training documents averaged")
    pooling: str = "mean"


class DataInfo(_Strict):
    """What the expert was trained on."""

    documents: int = Field(ge=0)
    tokens: int = Field(ge=0)
    sources: list[str] = Field(default_factory=list)
    pruning: dict[str, Any] | None = None
    mix: dict[str, float] | None = None


class BaseSignature(_Strict):
    """What must match between experts of one mix: seed weights, architecture, tokenizer."""

    base_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    architecture: str
    tokenizer_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")


class ExpertInfo(BaseSignature):
    """The ``expert:`` block of the card."""

    name: str = Field(min_length=1)
    domain: str = Field(min_length=1)
    languages: list[str] = Field(default_factory=list)
    kind: ExpertKind
    base_model: str = Field(min_length=1)
    embedding: EmbeddingInfo
    data: DataInfo
    metrics: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    federation: dict[str, Any] | None = None

    def signature(self) -> BaseSignature:
        return BaseSignature(base_fingerprint=self.base_fingerprint, architecture=self.architecture,
                             tokenizer_fingerprint=self.tokenizer_fingerprint)


class ExpertCard(BaseModel):
    """A whole card: the Hub's standard front-matter keys, the expert block and the prose body."""

    expert: ExpertInfo
    license: str = "apache-2.0"
    tags: list[str] = Field(default_factory=list)
    datasets: list[str] = Field(default_factory=list)
    body: str = ""

    @property
    def base_model_relation(self) -> str:
        return "finetune" if self.expert.kind == "dense" else "adapter"

    def card_data(self) -> ModelCardData:
        """The front matter: the Hub's standard keys and the ``expert:`` block (the registry serves it as
        ``cardData``)."""
        e = self.expert
        return ModelCardData(
            license=self.license,
            # the Hub's field holds ISO 639 codes; names ("German", from rows without a code) stay in expert.languages
            language=[lang for lang in e.languages if ISO_639.match(lang)] or None,
            library_name="transformers" if e.kind == "dense" else "peft",
            base_model=e.base_model,
            tags=sorted({"expertmix", "expert", f"domain:{e.domain}", f"kind:{e.kind}", *self.tags}),
            datasets=self.datasets or None,
            base_model_relation=self.base_model_relation,
            expert=e.model_dump(mode="json"),
        )

    def to_markdown(self) -> str:
        body = self.body or default_body(self.expert)
        return f"---\n{self.card_data().to_yaml()}\n---\n\n{body.rstrip()}\n"

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CARD_FILE
        write_text_atomic(path, self.to_markdown())
        return path


def default_body(e: ExpertInfo) -> str:
    """A short human-readable summary under the front matter."""
    lines = [f"# {e.name}", "", f"A **{e.kind}** expert for the **{e.domain}** domain, trained with expertmix "
             f"from `{e.base_model}`.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in sorted(e.metrics.items())]
    lines += ["", f"Training data: {e.data.documents} documents, {e.data.tokens} tokens."]
    return "\n".join(lines)


def _format_validation(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        loc = ".".join(str(x) for x in item["loc"])
        parts.append(f"field 'expert.{loc}': {item['msg']}")
    return "; ".join(parts)


def parse_card(text: str, source: str = CARD_FILE) -> ExpertCard:
    """Parse a card's markdown; raises CardError naming ``source`` and the bad field."""
    if not text.startswith("---"):
        raise CardError(f"{source}: no YAML front matter (the file must start with '---')")
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except (ValueError, yaml.YAMLError) as exc:
        raise CardError(f"{source}: front matter is not valid YAML: {exc}") from exc
    meta = card.data.to_dict()
    block = meta.get("expert")
    if not isinstance(block, dict):
        raise CardError(f"{source}: front matter has no 'expert:' block")
    try:
        info = ExpertInfo.model_validate(block)
    except ValidationError as exc:
        raise CardError(f"{source}: {_format_validation(exc)}") from exc
    tags = [t for t in meta.get("tags") or [] if t not in {"expertmix", "expert"}
            and not t.startswith(("domain:", "kind:"))]
    datasets = meta.get("datasets") or []
    return ExpertCard(expert=info, license=meta.get("license") or "apache-2.0", tags=tags,
                      datasets=[datasets] if isinstance(datasets, str) else list(datasets),
                      body=card.text.strip())


def read_card(folder: str | Path) -> ExpertCard:
    """Read and validate ``folder/README.md``."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        raise CardError(f"{folder}: no expert card ({CARD_FILE}); an expert folder is what `expertmix train` or "
                        f"`expertmix federate` writes")
    return parse_card(path.read_text(encoding="utf-8"), str(path))


def check_compatible(expected: BaseSignature, info: ExpertInfo, what: str = "the mix") -> None:
    """Refuse an expert whose base fingerprint, architecture or tokenizer differs from ``expected``."""
    for field in ("base_fingerprint", "architecture", "tokenizer_fingerprint"):
        want, got = getattr(expected, field), getattr(info, field)
        if want != got:
            raise IncompatibleExpertError(
                f"expert '{info.name}' does not fit {what}: field '{field}' differs "
                f"(expert has {got[:16] if 'fingerprint' in field else got}, "
                f"expected {want[:16] if 'fingerprint' in field else want}); "
                f"it was trained from base '{info.base_model}'")
