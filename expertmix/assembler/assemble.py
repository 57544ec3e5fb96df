"""``expertmix assemble``: pull experts, upcycle them into a mix, train its router (or all of it).

Work happens in ``OUT.partial`` (the untrained upcycled checkpoint, Trainer checkpoints, the run's
settings), so an interrupted run resumes with ``resume=True``; the mix appears at ``OUT`` only when done.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from ..errors import ExpertmixError
from ..experts.data import TokenizedDocument, pack, read_documents, tokenize_documents
from ..experts.mixing import mix_sources, parse_mix_spec
from ..experts.training import Blocks, DataSource, ResumableJob, TrainSettings, fit
from ..fsutil import atomic_dir
from .manifest import DataRef, MixManifest, read_manifest
from .upcycling import COPIED_FILES, load_expert, seed_info, upcycle

# Parameter groups of a mix that a training stage can unfreeze.
GROUPS = ("router", "experts", "shared", "dense")
SAMPLE_CHUNK = 32  # documents tokenized at a time when sampling up to a token budget
GROUP_MARKERS = (("router", ".mlp.router."), ("experts", ".mlp.experts."), ("shared", ".mlp.shared_expert."))


def param_group(name: str) -> str:
    """Which group a parameter of a Nexus mix (or a dense model) belongs to."""
    for group, marker in GROUP_MARKERS:
        if marker in name:
            return group
    return "dense"


def freeze_except(model: torch.nn.Module, groups: Iterable[str]) -> int:
    """Train only the named parameter groups; returns the number of trainable parameters."""
    groups = set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise ExpertmixError(f"unknown parameter group(s) {', '.join(sorted(unknown))}: "
                             f"choose from {', '.join(GROUPS)}")
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(param_group(name) in groups)
        count += p.numel() if p.requires_grad else 0
    if count == 0:
        raise ExpertmixError(f"nothing to train: the model has no parameters in group(s) "
                             f"{', '.join(sorted(groups))}")
    return count


def read_sources(sources: Sequence[DataSource], tokenizer, text_field: str | None = None,
                 max_tokens: int | None = None, seed: int = 0,
                 min_documents: int = 1) -> dict[str, list[TokenizedDocument]]:
    """Tokenized documents of each named data source.

    With ``max_tokens``, only a seeded random sample of documents is tokenized per source, the fewest that hold
    that many tokens: a small budget does not pay for tokenizing whole corpora, and reads no more than it needs.
    With ``min_documents`` too, no document gives more than ``max_tokens / min_documents`` tokens (a window at a
    seeded offset, closed by EOS), so a small budget spans that many documents where the source has them rather
    than the two or three long ones a plain sample can land on.
    """
    out: dict[str, list[TokenizedDocument]] = {}
    for src in sources:
        if src.name in out:
            raise ExpertmixError(f"--data: source name '{src.name}' given twice")
        docs = read_documents(src.path, text_field, domain=src.name)
        if max_tokens is None:
            out[src.name] = tokenize_documents(docs, tokenizer)
            continue
        random.Random(f"{seed}:{src.name}").shuffle(docs)
        cap = max(2, -(-max_tokens // min_documents)) if min_documents > 1 else None
        windows = random.Random(f"{seed}:{src.name}:windows")
        picked: list[TokenizedDocument] = []
        count = 0
        for start in range(0, len(docs), SAMPLE_CHUNK):
            for doc in tokenize_documents(docs[start:start + SAMPLE_CHUNK], tokenizer):
                if count >= max_tokens:
                    break
                if cap is not None and len(doc.input_ids) > cap:
                    doc = document_window(doc, cap, windows.randrange(len(doc.input_ids) - cap + 1),
                                          tokenizer.eos_token_id)
                picked.append(doc)
                count += len(doc.input_ids)
            if count >= max_tokens:
                break
        out[src.name] = picked
    return out


def document_window(doc: TokenizedDocument, length: int, start: int, eos: int | None) -> TokenizedDocument:
    """``length`` tokens of ``doc`` from ``start``; the last one is EOS when the window ends inside the document."""
    ids, labels = doc.input_ids[start:start + length], doc.labels[start:start + length]
    if eos is not None and start + length < len(doc.input_ids):
        ids, labels = [*ids[:-1], eos], [*labels[:-1], eos]
    return TokenizedDocument(input_ids=ids, labels=labels)


def budget_tokens(settings: TrainSettings, seq_len: int) -> int | None:
    """Training tokens the budget consumes (None when the budget is one pass over the data)."""
    if settings.max_tokens is None and settings.max_steps is None:
        return None
    steps = settings.steps_for(1, seq_len)
    return steps * settings.batch_size * settings.grad_accum * seq_len


def mixture_blocks(tokenized: dict[str, list[TokenizedDocument]], shares: dict[str, float] | None,
                   total_tokens: int | None, seq_len: int, seed: int = 0) -> tuple[Blocks, dict]:
    """Sample the sources by token share (equal by default) and pack the mixture into blocks."""
    shares = shares or {k: 1.0 / len(tokenized) for k in tokenized}
    # One extra block per source so that truncation at the budget never leaves the Trainer short.
    extra = seq_len * len(shares) if total_tokens is not None else 0
    docs, report = mix_sources(tokenized, shares, total_tokens=total_tokens + extra if total_tokens else None,
                               seed=seed)
    return pack(docs, seq_len), report


@dataclass
class AssembleConfig(ResumableJob):
    """Everything ``expertmix assemble`` needs."""

    seed: Path
    experts: list[str]
    data: list[DataSource]
    out: Path
    router: str = "nexus"
    registry: str | None = None
    seed_id: str | None = None
    train_all: bool = False
    mix: str | None = None
    seq_len: int = 256
    text_field: str | None = None
    aux_loss_coef: float = 0.05
    resume: bool = False
    settings: TrainSettings = field(default_factory=TrainSettings)

    @property
    def train_groups(self) -> tuple[str, ...]:
        return GROUPS if (self.train_all or self.router == "merge") else ("router",)


def train_stage(model, blocks: Blocks, settings: TrainSettings, work: Path, resume: bool,
                trainer_class: Callable[..., Trainer] = Trainer) -> dict:
    """One budgeted Trainer run (none when the budget is zero steps)."""
    if settings.max_steps == 0 or settings.max_tokens == 0:
        return {"steps": 0, "tokens": 0}
    metrics = fit(model, blocks, None, settings, work / "checkpoints", resume=resume, trainer_class=trainer_class)
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str) or v is None}


def save_mix(model, source: Path, manifest: MixManifest, out: Path) -> Path:
    """Write the trained mix: the checkpoint, the tokenizer and extra files of ``source``, and mix.json."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        for name in COPIED_FILES:
            if (source / name).is_file() and not (tmp / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        manifest.save(tmp)
    return out


def assemble(cfg: AssembleConfig, log: Callable[[str], None] = print) -> Path:
    """Pull and check the experts, upcycle them, train on their domains' mixture, write the mix."""
    if cfg.router not in ("nexus", "linear", "merge"):
        raise ExpertmixError(f"--router {cfg.router!r}: choose nexus, linear or merge")
    if not cfg.data:
        raise ExpertmixError("no training data given (--data NAME=PATH, one per domain)")
    shares = parse_mix_spec(cfg.mix) if cfg.mix else None
    work = cfg.work_dir
    cfg.start_work_dir()
    init = work / "init"
    if not init.is_dir():
        experts = [load_expert(ref, cfg.registry) for ref in cfg.experts]
        log(f"experts: {', '.join(f'{e.info.name} ({e.info.domain})' for e in experts)}")
        upcycle(cfg.seed, experts, init, router=cfg.router, seed=seed_info(cfg.seed, cfg.seed_id),
                aux_coef=cfg.aux_loss_coef, init_seed=cfg.settings.seed, progress=cfg.settings.progress,
                log=log)
    manifest = read_manifest(init)
    tokenizer = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    trainable = freeze_except(model, cfg.train_groups)
    needed = budget_tokens(cfg.settings, cfg.seq_len)
    tokenized = read_sources(cfg.data, tokenizer, cfg.text_field, max_tokens=needed, seed=cfg.settings.seed)
    blocks, report = mixture_blocks(tokenized, shares, needed, cfg.seq_len, cfg.settings.seed)
    log(f"training {', '.join(cfg.train_groups)} ({trainable / 1e6:.2f}M parameters) on "
        f"{blocks['input_ids'].shape[0]} blocks of {cfg.seq_len} tokens from {', '.join(tokenized)}")
    metrics = train_stage(model, blocks, cfg.settings, work, cfg.resume)
    manifest.data = [DataRef(name=s.name, path=str(Path(s.path).resolve())) for s in cfg.data]
    manifest.history.append({"stage": "assemble", "router": cfg.router, "train": list(cfg.train_groups),
                             "trainable_parameters": trainable, "seq_len": cfg.seq_len,
                             "settings": asdict(cfg.settings), "metrics": metrics,
                             "mix": {k: v["actual_share"] for k, v in report.items()}})
    save_mix(model, init, manifest, cfg.out)
    shutil.rmtree(work, ignore_errors=True)
    return cfg.out
