"""``expertmix assemble``: pull experts, upcycle them into a mix, train its router (or all of it).

By default (``distill="experts"``) each data source whose name is an expert's domain is taught by that dense
expert: its rows learn the expert's next-token distributions (KL) instead of their labels, the stage
``expertmix extend`` uses for its short finetuning. The mix then learns to do on each domain what that domain's
expert does, from the whole vocabulary's signal per token: at the same token budget, a mix whose domains' mean
perplexity is 10-13% lower, for about 30% more time (benchmarks/RESULTS.md, stop 17).

Work happens in ``OUT.partial`` (the untrained upcycled checkpoint, Trainer checkpoints, the run's
settings), so an interrupted run resumes with ``resume=True``; the mix appears at ``OUT`` only when done.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from ..checkpoints import require_context, require_float_weights, require_tokenizer_fits
from ..errors import ExpertmixError
from ..experts.data import TokenizedDocument, count_tokens, pack, read_documents, tokenize_documents
from ..experts.mixing import draw_sources, mix_sources, parse_mix_spec
from ..experts.training import (
    Blocks,
    DataSource,
    ResumableJob,
    TrainSettings,
    fit,
    resumable_job,
    uses_bf16,
)
from ..fsutil import atomic_dir, remove_tree
from .distillation import TEACHER_KEY, DistillationTrainer, load_teachers
from .manifest import DataRef, MixManifest, read_manifest
from .upcycling import COPIED_FILES, ExpertSource, load_expert, seed_info, upcycle

DISTILL_MODES = ("experts", "none")
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
                   total_tokens: int | None, seq_len: int, seed: int = 0,
                   teachers: dict[str, int] | None = None) -> tuple[Blocks, dict]:
    """Sample the sources by token share (equal by default) and pack the mixture into blocks.

    With ``teachers`` (``{source: teacher index}``, -1 or absent: labels), each source is packed apart and its rows
    name their teacher in ``TEACHER_KEY`` (``distillation.DistillationTrainer``), so no row mixes two teachers.
    """
    shares = shares or {k: 1.0 / len(tokenized) for k in tokenized}
    # One extra block per source so that truncation at the budget never leaves the Trainer short.
    extra = seq_len * len(shares) if total_tokens is not None else 0
    total = total_tokens + extra if total_tokens else None
    if teachers is None:
        docs, report = mix_sources(tokenized, shares, total_tokens=total, seed=seed)
        return pack(docs, seq_len), report
    drawn, report = draw_sources(tokenized, shares, total_tokens=total, seed=seed)
    parts = []
    for name, docs in drawn.items():
        if docs:  # a source too short for one block gives one padded block
            blocks = pack(docs, seq_len, drop_last=count_tokens(docs) >= seq_len)
            blocks[TEACHER_KEY] = torch.full((blocks["input_ids"].shape[0],), teachers.get(name, -1),
                                             dtype=torch.long)
            parts.append(blocks)
    return {k: torch.cat([b[k] for b in parts]) for k in parts[0]}, report


def teachers_of_sources(sources: Sequence[str], experts: Sequence[ExpertSource]) -> dict[str, int]:
    """Which expert (index) teaches each data source: the one whose domain, else whose name, is the source's name.

    -1 for a source no expert claims (it trains on its labels). Two experts of one domain are ambiguous: refused.
    """
    out: dict[str, int] = {}
    for src in sources:
        by_domain = [i for i, e in enumerate(experts) if e.info.domain == src]
        by_name = [i for i, e in enumerate(experts) if e.info.name == src or e.info.name.split("/")[-1] == src]
        hits = by_domain or by_name
        if len(hits) > 1:
            raise ExpertmixError(f"--data {src}: experts {', '.join(experts[i].info.name for i in hits)} all "
                                 f"claim it; name the source after one expert, or pass --distill none")
        out[src] = hits[0] if hits else -1
    return out


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
    distill: str = "experts"
    resume: bool = False
    settings: TrainSettings = field(default_factory=TrainSettings)

    @property
    def train_groups(self) -> tuple[str, ...]:
        return GROUPS if (self.train_all or self.router == "merge") else ("router",)

    @property
    def trained(self) -> list[str]:
        """What the training stage trains, as mix.json records it: a dense merge has no router, experts or shared
        expert, so every one of its weights is in the ``dense`` group: ``["all"]``."""
        return ["all"] if self.router == "merge" else list(self.train_groups)


def train_stage(model, blocks: Blocks, settings: TrainSettings, work: Path, resume: bool,
                trainer_class: Callable[..., Trainer] = Trainer) -> dict:
    """One budgeted Trainer run (none when the budget is zero steps)."""
    if not settings.trains:
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


@resumable_job
def assemble(cfg: AssembleConfig, log: Callable[[str], None] = print) -> Path:
    """Pull and check the experts, upcycle them, train on their domains' mixture, write the mix."""
    if cfg.router not in ("nexus", "linear", "merge"):
        raise ExpertmixError(f"--router {cfg.router!r}: choose nexus, linear or merge")
    if cfg.distill not in DISTILL_MODES:
        raise ExpertmixError(f"--distill {cfg.distill!r}: choose {' or '.join(DISTILL_MODES)}")
    if not cfg.data:
        raise ExpertmixError("no training data given (--data NAME=PATH, one per domain)")
    shares = parse_mix_spec(cfg.mix) if cfg.mix else None
    require_float_weights(cfg.seed, "a seed")
    require_context(cfg.seed, cfg.seq_len)
    require_tokenizer_fits(AutoTokenizer.from_pretrained(cfg.seed), cfg.seed, f"assemble --seed {cfg.seed}")
    work = cfg.work_dir
    cfg.start_work_dir()
    init = work / "init"
    experts = [load_expert(ref, cfg.registry) for ref in cfg.experts]
    if not init.is_dir():
        log(f"experts: {', '.join(f'{e.info.name} ({e.info.domain})' for e in experts)}")
        upcycle(cfg.seed, experts, init, router=cfg.router, seed=seed_info(cfg.seed, cfg.seed_id),
                aux_coef=cfg.aux_loss_coef, init_seed=cfg.settings.seed, progress=cfg.settings.progress,
                log=log)
    teacher_of = teachers_of_sources([s.name for s in cfg.data], experts) if cfg.distill == "experts" else {}
    if teacher_of and all(t < 0 for t in teacher_of.values()):
        log(f"warning: no data source is named after an expert's domain (sources: {', '.join(teacher_of)}; "
            f"domains: {', '.join(e.info.domain for e in experts)}), so nothing is distilled: every source trains "
            f"on its labels. Name each --data NAME=PATH after its expert's domain to distill the experts.")
    elif unclaimed := [name for name, t in teacher_of.items() if t < 0]:  # a typo ('kode') trains without its expert
        log(f"warning: --data {', '.join(unclaimed)} names no expert's domain (domains: "
            f"{', '.join(e.info.domain for e in experts)}): it trains on its labels, not from an expert")
    manifest = read_manifest(init)
    tokenizer = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    trainable = freeze_except(model, cfg.train_groups)
    needed = budget_tokens(cfg.settings, cfg.seq_len)
    tokenized = read_sources(cfg.data, tokenizer, cfg.text_field, max_tokens=needed, seed=cfg.settings.seed)
    trainer_class: Callable[..., Trainer] = Trainer
    teachers: dict[str, int] | None = None
    teaching = sorted({t for t in teacher_of.values() if t >= 0})  # the experts loaded as teachers, in order
    if teaching and cfg.settings.trains:
        slot = {t: i for i, t in enumerate(teaching)}
        teachers = {name: slot.get(t, -1) for name, t in teacher_of.items()}
        models = load_teachers([experts[t].folder for t in teaching], uses_bf16(cfg.settings.bf16))
        trainer_class = partial(DistillationTrainer, teachers=models)
        log("distilling: " + ", ".join(f"{name} from {experts[t].info.name}" if t >= 0 else f"{name} from labels"
                                        for name, t in teacher_of.items()))
    blocks, report = mixture_blocks(tokenized, shares, needed, cfg.seq_len, cfg.settings.seed, teachers=teachers)
    what = "every weight of the dense merge" if cfg.router == "merge" else ", ".join(cfg.train_groups)
    log(f"training {what} ({trainable / 1e6:.2f}M parameters) on "
        f"{blocks['input_ids'].shape[0]} blocks of {cfg.seq_len} tokens from {', '.join(tokenized)}")
    metrics = train_stage(model, blocks, cfg.settings, work, cfg.resume, trainer_class=trainer_class)
    manifest.data = [DataRef(name=s.name, path=str(Path(s.path).resolve())) for s in cfg.data]
    manifest.history.append({"stage": "assemble", "router": cfg.router, "train": cfg.trained,
                             "trainable_parameters": trainable, "seq_len": cfg.seq_len,
                             "settings": asdict(cfg.settings), "metrics": metrics,
                             "distill": cfg.distill,
                             "teachers": {k: experts[t].info.name if t >= 0 else None for k, t in teacher_of.items()},
                             "mix": {k: v["actual_share"] for k, v in report.items()}})
    save_mix(model, init, manifest, cfg.out)
    remove_tree(work)  # gone at once: a kill now leaves nothing that looks resumable
    return cfg.out
