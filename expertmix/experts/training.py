"""Training with the transformers Trainer: the shared ``fit`` loop and ``train_expert`` (dense or PEFT).

The Trainer gives the progress bar, checkpoints, resume and multi-GPU (``accelerate launch`` / torchrun)
for free; ``fit`` only turns token blocks and a budget into its arguments.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal, TypeVar

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoints import require_context, require_float_weights, require_model_weights, require_tokenizer_fits
from ..errors import ExpertmixError
from ..fsutil import atomic_dir, holds_folder, lock_folder, release_folder, remove_tree, write_json_atomic
from ..hub.card import DataInfo, EmbeddingInfo, ExpertCard, ExpertInfo
from ..hub.fingerprint import architecture_of, fingerprint_tokenizer, fingerprint_weights
from ..hub.repo import save_domain_embedding, validate_name
from ..journal import journal_path
from .data import Document, data_digest, held_out_split, pack, read_documents, tokenize_documents

Blocks = dict[str, torch.Tensor]
T = TypeVar("T")


@dataclass
class TrainSettings:
    """Optimisation settings and budget. ``max_tokens`` wins over ``max_steps`` when both are set."""

    max_steps: int | None = None
    max_tokens: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 5e-4
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"
    min_lr_ratio: float = 0.0  # cosine decays to this share of the peak rate (Nexus' reference: 0.3)
    weight_decay: float = 0.0
    save_steps: int = 100  # checkpoint every N steps; 0 writes none
    logging_steps: int = 10
    seed: int = 0
    bf16: bool | Literal["auto"] = "auto"
    progress: bool = True

    @property
    def trains(self) -> bool:
        """False for a zero budget (``max_steps`` or ``max_tokens`` of 0): the stage trains nothing."""
        return self.max_steps != 0 and self.max_tokens != 0

    def steps_for(self, n_blocks: int, seq_len: int) -> int:
        """Optimizer steps for the budget; one pass over the data when no budget is set."""
        world = max(1, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
        per_step = self.batch_size * self.grad_accum * world
        if self.max_tokens is not None:
            return max(1, math.ceil(self.max_tokens / (per_step * seq_len)))
        if self.max_steps is not None:
            return max(1, self.max_steps)
        return max(1, math.ceil(n_blocks / per_step))


class BlockDataset(torch.utils.data.Dataset):
    """Packed token blocks as a map-style dataset for the Trainer."""

    def __init__(self, blocks: Blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.blocks.items()}


def uses_bf16(flag: bool | str) -> bool:
    """Whether training runs in bf16 autocast: ``auto`` means on a GPU that supports it."""
    if flag == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(flag)


def warmup_steps(ratio: float, steps: int) -> int:
    """Warm-up steps for a run of ``steps``: ``ratio`` of them, rounded up, unless that is the whole run.

    A one-step run would otherwise take its only step at learning rate 0 and train nothing.
    """
    warmup = math.ceil(ratio * steps)
    return warmup if warmup < steps else 0


class RunLoss(TrainerCallback, ExportableState):
    """The mean training loss over the whole run, resumes included (the Trainer's own ``train_loss`` covers only
    the steps since the last resume). Every checkpoint and the last step are also logging steps, so the loss sum
    saved with a checkpoint covers every step before it."""

    def __init__(self, loss_sum: float = 0.0, steps: int = 0):
        self.loss_sum, self.steps = loss_sum, steps

    def state(self) -> dict:
        return {"args": {"loss_sum": self.loss_sum, "steps": self.steps}, "attributes": {}}

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.global_step > self.steps:
            self.loss_sum += float(logs["loss"]) * (state.global_step - self.steps)
            self.steps = state.global_step
        if logs and "train_loss" in logs and self.steps:  # the run's closing metrics, as printed and in log_history
            logs["train_loss"] = self.mean

    @property
    def mean(self) -> float:
        return self.loss_sum / self.steps if self.steps else float("nan")


class _TiedKeysFilter(logging.Filter):
    """Drops the Trainer's "missing keys" warning on resume when the keys are tied duplicates (a tied output head):
    they are not saved, and loading the tensor they share restores them (transformers 5 warns regardless)."""

    PREFIX = "There were missing keys in the checkpoint model loaded: "

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.tied = every - {n for n, _ in model.named_parameters()}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.PREFIX):
            return True
        try:
            missing = set(ast.literal_eval(message[len(self.PREFIX):].rstrip(".")))
        except (ValueError, SyntaxError):
            return True
        return not (missing and missing <= self.tied)


def fit(model, train_blocks: Blocks, valid_blocks: Blocks | None, settings: TrainSettings, work_dir: str | Path,
        resume: bool = False, callbacks: Sequence | None = None,
        trainer_class: Callable[..., Trainer] = Trainer) -> dict:
    """Train ``model`` on packed blocks with the Trainer; checkpoints go to ``work_dir``, resumable.

    ``trainer_class``: a Trainer subclass (or a partial of one) for a loss of its own.
    """
    work_dir = Path(work_dir)
    seq_len = train_blocks["input_ids"].shape[1]
    steps = settings.steps_for(train_blocks["input_ids"].shape[0], seq_len)
    floored = settings.lr_scheduler == "cosine" and settings.min_lr_ratio > 0  # cosine down to a floor
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        warmup_steps=warmup_steps(settings.warmup_ratio, steps),
        lr_scheduler_type="cosine_with_min_lr" if floored else settings.lr_scheduler,
        lr_scheduler_kwargs={"min_lr_rate": settings.min_lr_ratio} if floored else {},
        weight_decay=settings.weight_decay,
        logging_steps=settings.logging_steps,
        save_strategy="steps" if settings.save_steps > 0 else "no",  # 0: no checkpoints (e.g. a federated round)
        save_steps=max(1, settings.save_steps),
        save_total_limit=2,
        eval_strategy="no",
        report_to="none",
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=uses_bf16(settings.bf16),
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        disable_tqdm=not settings.progress,
        dataloader_drop_last=False,
    )
    checkpoint = last_complete_checkpoint(work_dir) if resume else None
    # Restored by hand: the Trainer's restore_callback_states_from_checkpoint would also restore its control flags
    # as they stood mid-save (and so save again on the first resumed step).
    saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text()) if checkpoint else {}
    if saved.get("global_step", 0) > steps:
        raise ExpertmixError(f"--resume: {checkpoint} has trained {saved['global_step']} steps, past this run's budget "
                             f"of {steps}; give a budget of at least {saved['global_step']} steps")
    run_loss = RunLoss(**saved.get("stateful_callbacks", {}).get("RunLoss", {}).get("args", {}))
    # Given to the constructor, it runs before the progress bar's callback, which then prints its train_loss.
    trainer = trainer_class(model=model, args=args, train_dataset=BlockDataset(train_blocks),
                            eval_dataset=BlockDataset(valid_blocks) if valid_blocks is not None else None,
                            callbacks=[*(callbacks or []), run_loss])
    tied_filter = _TiedKeysFilter(model)
    trainer_log = logging.getLogger("transformers.trainer")
    trainer_log.addFilter(tied_filter)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        trainer_log.removeFilter(tied_filter)
    metrics = dict(result.metrics)
    if run_loss.steps:
        metrics["train_loss"] = run_loss.mean
    metrics.update(steps=steps, tokens=steps * settings.batch_size * settings.grad_accum * seq_len,
                   resumed_from=Path(checkpoint).name if checkpoint else None)
    return metrics


def last_complete_checkpoint(work_dir: str | Path) -> str | None:
    """The newest checkpoint that was written whole (a run killed mid-save leaves a partial newest one).

    transformers' ``get_last_checkpoint`` takes the highest step even when its files are incomplete; the
    Trainer writes ``trainer_state.json`` after the weights and optimizer state, in place, so a whole one is marked
    by that file parsing (a kill while it is written leaves it empty or cut short).
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    steps = []
    for d in work_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and suffix.isdigit() and _whole_json(d / "trainer_state.json") \
                and any((d / f).is_file() for f in ("model.safetensors", "adapter_model.safetensors",
                                                    "model.safetensors.index.json")):
            steps.append((int(suffix), d))
    return str(max(steps)[1]) if steps else None


def _whole_json(path: Path) -> bool:
    """Whether ``path`` is a file holding one complete JSON document."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


@torch.no_grad()
def perplexity(model, blocks: Blocks, batch_size: int = 8, progress: str | None = None) -> float:
    """Token-weighted perplexity of ``model`` on packed blocks (labels -100 are skipped)."""
    nll, count = token_nll(model, blocks, batch_size, progress)
    return math.exp(nll / max(count, 1))


@torch.no_grad()
def token_nll(model, blocks: Blocks, batch_size: int = 8, progress: str | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over packed blocks and the number of tokens scored; ``progress``
    labels a progress bar over the blocks (shown on a terminal only), since a whole validation file takes a while."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    n = blocks["input_ids"].shape[0]
    bar = tqdm(total=n, desc=progress, unit="block", disable=None if progress else True, leave=False)
    for start in range(0, n, batch_size):
        ids = blocks["input_ids"][start:start + batch_size].to(device)
        labels = blocks["labels"][start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((target != -100).sum())
        bar.update(ids.shape[0])
    bar.close()
    model.train(was_training)
    return total, count


# --------------------------------------------------------------------------------------------------
# Expert training
# --------------------------------------------------------------------------------------------------

@dataclass
class DataSource:
    """A named source of training documents (``NAME=PATH`` on the command line)."""

    name: str
    path: Path


OUT_FIELD = "out"  # a ResumableJob's output folder: OUT.partial sits beside it


class ResumableJob:
    """For job configs with ``out`` and ``resume``: work happens in ``OUT.partial``, keyed by the settings."""

    @property
    def work_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    def fingerprint(self) -> dict:
        return run_fingerprint(self)

    def fingerprint_defaults(self) -> dict:
        """Top-level settings that have defaults, at their defaults: a run started by an older version, before
        a setting existed, resumes when the setting is left at its default."""
        out = {}
        for f in fields(self):
            if f.default is not MISSING:
                out[f.name] = f.default
            elif f.default_factory is not MISSING:
                out[f.name] = _class_defaults(f.default_factory())
        return json.loads(json.dumps(out, default=lambda v: asdict(v) if is_dataclass(v) else str(v)))

    def start_work_dir(self) -> None:
        """Create (or, with ``resume``, reuse) the job's ``OUT.partial`` folder; a resumed job must keep its
        settings (those added since it started may be missing from its record while they keep their defaults)."""
        work, out = self.work_dir, Path(self.out)
        if out.exists():
            raise ExpertmixError(f"output folder {out} already exists; choose another --out or remove it")
        if work.is_dir():
            lock_folder(work)  # before the data is hashed: a second run is refused at once
        if work.exists() and not self.resume:
            raise ExpertmixError(f"an interrupted run exists in {work}; rerun with --resume to continue it, "
                                 f"or delete that folder to start over")
        fingerprint = self.fingerprint()
        run_file = work / "run.json"
        if run_file.is_file():
            previous = _with_defaults(json.loads(run_file.read_text()), self.fingerprint_defaults(), fingerprint)
            previous.pop(OUT_FIELD, None)  # older records hold the output folder's absolute path
            previous.setdefault("data_contents", fingerprint.get("data_contents"))  # older records: not hashed
            if previous != fingerprint:
                raise ExpertmixError(f"--resume: the run in {work} was started with other settings "
                                     f"(differs in: {', '.join(changed_settings(previous, fingerprint))})")
        elif work.is_dir() and has_checkpoints(work):
            raise ExpertmixError(f"--resume: {work} holds checkpoints but no run.json, so the settings they were made "
                                 f"with cannot be checked (left by a run killed while it cleaned up); delete that "
                                 f"folder to start over")
        work.mkdir(parents=True, exist_ok=True)
        lock_folder(work)
        write_json_atomic(run_file, fingerprint)


def has_checkpoints(work: Path) -> bool:
    """Whether a work folder holds any Trainer checkpoint (whole or not)."""
    return any(work.rglob(f"{PREFIX_CHECKPOINT_DIR}-*"))


def resumable_job(job: Callable[..., T]) -> Callable[..., T]:
    """For a job whose first argument is a :class:`ResumableJob`: its ``OUT.partial`` folder is held for the call
    (see ``fsutil.lock_folder``). When the job fails (refuses its input, or crashes) before any checkpoint exists,
    the folder this call made is removed, so the corrected command starts afresh instead of being told to resume a
    run with nothing to resume; every failure after a checkpoint, and every failure of a run that an earlier call
    started, keeps it. An interruption (Ctrl-C, SIGTERM) keeps the checkpoints and says how to resume; one before
    any checkpoint removes the folder it holds (nothing in it could be resumed) and says that nothing was kept."""

    @functools.wraps(job)
    def run(cfg: ResumableJob, *args, **kwargs) -> T:
        work = cfg.work_dir
        made_here = not work.exists()
        try:
            return job(cfg, *args, **kwargs)
        except KeyboardInterrupt as exc:
            if has_checkpoints(work):
                exc.add_note(f"interrupted: the checkpoints in {work} are kept; rerun the same command with --resume "
                             f"to continue from the last one")
            elif not work.exists() or holds_folder(work):  # never a folder another process holds
                release_folder(work)
                remove_tree(work)
                exc.add_note(f"interrupted before the first checkpoint: nothing was kept (no {work} is left); rerun "
                             f"the same command, without --resume, to start over")
            raise
        except Exception:
            if made_here and holds_folder(work) and not has_checkpoints(work):
                shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            release_folder(work)

    return run


@dataclass
class ExpertTrainConfig(ResumableJob):
    """Everything ``expertmix train`` needs; validated by :func:`train_expert` before any work starts."""

    base: Path
    data: list[DataSource]
    domain: str
    out: Path
    name: str | None = None
    base_id: str | None = None
    kind: Literal["dense", "lora", "ia3"] = "dense"
    valid: Path | None = None
    valid_fraction: float = 0.05
    seq_len: int = 256
    text_field: str | None = None
    prune: str | None = None
    prune_reference: Path | None = None
    mix: str | None = None
    mix_tokens: int | None = None
    embedder: str | None = None
    embed_sample: int = 64
    languages: list[str] | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    resume: bool = False
    settings: TrainSettings = field(default_factory=TrainSettings)


def run_fingerprint(cfg) -> dict:
    """A job's settings as JSON, less ``resume``, the budget and the output folder: what a resumed run must keep.
    Input paths are absolute (``data.jsonl`` and ``./data.jsonl`` are one file), and every data source's contents
    are hashed (``data_contents``): a file rewritten between the interruption and ``--resume`` is a change of data.
    ``out`` is left out: ``OUT.partial`` is found beside ``--out``, so a work folder moved or renamed (with its
    parent or alone) resumes wherever ``--out`` now puts it."""
    d = asdict(cfg)
    d.pop("resume")
    d.pop(OUT_FIELD, None)
    settings = d.get("settings")
    if isinstance(settings, dict):
        for budget in ("max_steps", "max_tokens", "save_steps", "logging_steps", "progress"):
            settings.pop(budget, None)  # a resumed run may train longer or checkpoint differently
    out = json.loads(json.dumps(d, default=lambda v: str(v.resolve()) if isinstance(v, Path) else str(v)))
    sources = [v for f in fields(cfg) for v in _as_list(getattr(cfg, f.name)) if isinstance(v, DataSource)]
    if valid := getattr(cfg, "valid", None):
        sources.append(DataSource("valid", Path(valid)))
    if sources:
        out["data_contents"] = {src.name: data_digest(src.path) for src in sources}
    return out


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def changed_settings(previous: dict, current: dict, prefix: str = "") -> list[str]:
    """The settings that differ, named down to the nested field (``settings.learning_rate``)."""
    out = []
    for key in sorted(set(previous) | set(current)):
        a, b = previous.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def _class_defaults(value: object) -> object:
    """A nested dataclass's own field defaults, where it has them all: a field added to it later behaves as its
    default did before it existed, whatever the values of the instance a job defaults to (e.g. a named recipe)."""
    if is_dataclass(value):
        try:
            return type(value)()
        except TypeError:  # fields without defaults: keep the instance
            return value
    return value


def _with_defaults(previous: dict, defaults: dict, current: dict) -> dict:
    """``previous`` with the settings it lacks (it predates them) filled from ``defaults``, nested dicts too, where
    the current run has them."""
    out = dict(previous)
    for key, value in defaults.items():
        if key not in current:
            continue
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict) and isinstance(current[key], dict):
            out[key] = _with_defaults(out[key], value, current[key])
    return out


def split_valid(docs: list[Document], fraction: float, seed: int,
                give_valid: str = "pass --valid FILE") -> tuple[list[Document], list[Document]]:
    """Hold out a reproducible random ``fraction`` of documents (at least one) for validation; ``give_valid`` says
    how the caller's user gives a validation file instead."""
    if len(docs) < 2:
        raise ExpertmixError(f"{docs[0].source if docs else 'data'}: need at least 2 documents to hold out "
                             f"validation data (or {give_valid})")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_valid = max(1, round(fraction * len(docs)))
    held = set(order[:n_valid])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def _saved_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model folder stores its weights in (experts are saved like their seed)."""
    dtype = AutoConfig.from_pretrained(model_dir).dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    return dtype or torch.float32


def peft_wrap(model, kind: str, r: int, alpha: int):
    """Wrap ``model`` in the PEFT adapter an expert of ``kind`` ('lora' or 'ia3') trains, on the modules
    :func:`~expertmix.experts.adapter.default_targets` finds in it (peft's own table lacks e.g. Cohere)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    from .adapter import default_targets, feedforward_targets

    targets = default_targets(model, kind)
    if kind == "lora":
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    else:
        cfg = IA3Config(task_type="CAUSAL_LM", target_modules=targets,
                        feedforward_modules=feedforward_targets(model, targets))
    try:
        return get_peft_model(model, cfg)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError: name the modules tried and the model's own
        from .adapter import linear_module_names

        raise ExpertmixError(f"--peft {kind}: target modules {targets} do not fit this {model.config.model_type} "
                             f"model (its linear layers: {', '.join(linear_module_names(model))}): {exc}") from exc


@resumable_job
def train_expert(cfg: ExpertTrainConfig, log=print) -> Path:
    """Train a dense or PEFT expert from a seed and write the expert repo of DESIGN.md to ``cfg.out``.

    Work happens in ``OUT.partial`` (checkpoints, audit files); the repo appears at ``OUT`` only when complete.
    """
    from .embedding import DEFAULT_EMBEDDER, domain_embedding, load_embedder
    from .mixing import mix_sources, parse_mix_spec
    from .pruning import SCORE_TOKENS, parse_prune_spec, prune_documents, scoring_journal, write_scores

    out, work = Path(cfg.out), cfg.work_dir
    name = validate_name(cfg.name or cfg.domain)
    if out.exists():  # checked again by cfg.start_work_dir(); here before any model is loaded
        raise ExpertmixError(f"output folder {out} already exists; choose another --out or remove it")
    require_float_weights(cfg.base, "training an expert")
    if cfg.prune_reference is not None:
        require_model_weights(cfg.prune_reference, "--prune-reference")
    require_context(cfg.base, cfg.seq_len)
    if not cfg.data:
        raise ExpertmixError("no training data given (--data)")
    prune_spec = parse_prune_spec(cfg.prune) if cfg.prune else None
    shares = parse_mix_spec(cfg.mix) if cfg.mix else None
    tokenizer = AutoTokenizer.from_pretrained(cfg.base)
    require_tokenizer_fits(tokenizer, cfg.base, f"train --base {cfg.base}")  # before any folder or model
    cfg.start_work_dir()
    torch.manual_seed(cfg.settings.seed)

    save_dtype = _saved_dtype(cfg.base)
    # by its absolute path: a PEFT expert's adapter_config.json records it as its base, read from anywhere later
    model = AutoModelForCausalLM.from_pretrained(Path(cfg.base).resolve(), dtype=torch.float32)

    # -- data ---------------------------------------------------------------------------------------
    sources: dict[str, list[Document]] = {}
    for src in cfg.data:
        if src.name in sources:
            raise ExpertmixError(f"--data: source name '{src.name}' given twice")
        sources[src.name] = read_documents(src.path, cfg.text_field, domain=src.name)
    if cfg.valid is not None:
        valid_docs = read_documents(cfg.valid, cfg.text_field, role="eval")
        train_sources = sources
    else:  # a DatasetDict's own held-out split, else a share of the data held out
        train_sources, valid_docs = {}, []
        for src in cfg.data:
            docs = sources[src.name]
            if (split := held_out_split(src.path)) is not None:
                log(f"validation: the '{split}' split of {src.path}")
                train_sources[src.name] = docs
                valid_docs += read_documents(src.path, cfg.text_field, role="eval")
                continue
            tr, va = split_valid(docs, cfg.valid_fraction, cfg.settings.seed)
            train_sources[src.name], valid_docs = tr, valid_docs + va

    pruning_info = None
    if prune_spec is not None:
        ref_dir = cfg.prune_reference or cfg.base
        ref = model if ref_dir == cfg.base else AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
        records_all = []
        # the scores are journalled in the work folder: --resume scores only what is left
        journal = scoring_journal(work / "pruning_scores.jsonl", None, ref_dir, SCORE_TOKENS)
        if reused := len(journal.open()):
            log(f"pruning: {reused} documents scored before the interruption")
        try:
            for k, docs in train_sources.items():
                kept, records = prune_documents(docs, ref, tokenizer, prune_spec, journal=journal)
                log(f"pruning {k}: kept {len(kept)} of {len(docs)} documents "
                    f"({prune_spec.where} {prune_spec.fraction})")
                train_sources[k] = kept
                records_all += [{"source_name": k, **r} for r in records]
            write_scores(work / "pruning_scores.jsonl", records_all)
        finally:
            journal.close()  # kept until training ends: a resumed run prunes from it
        pruning_info = {"where": prune_spec.where, "fraction": prune_spec.fraction,
                        "reference": str(ref_dir if ref_dir != cfg.base else cfg.base_id or Path(cfg.base).name),
                        "scores_file": "pruning_scores.jsonl"}

    tokenized = {k: tokenize_documents(docs, tokenizer) for k, docs in train_sources.items()}
    mix_report = None
    if shares is not None or len(tokenized) > 1:
        shares = shares or {k: 1.0 / len(tokenized) for k in tokenized}
        train_tok, mix_report = mix_sources(tokenized, shares, total_tokens=cfg.mix_tokens, seed=cfg.settings.seed)
    else:
        train_tok = next(iter(tokenized.values()))
    train_blocks = pack(train_tok, cfg.seq_len)
    valid_blocks = pack(tokenize_documents(valid_docs, tokenizer), cfg.seq_len, drop_last=False)
    n_docs = sum(len(d) for d in train_sources.values())
    n_tokens = int((train_blocks["labels"] != -100).sum())
    log(f"data: {n_docs} documents, {train_blocks['input_ids'].shape[0]} blocks of {cfg.seq_len} tokens; "
        f"{valid_blocks['input_ids'].shape[0]} validation blocks")

    # -- training -----------------------------------------------------------------------------------
    bar = "validation" if cfg.settings.progress else None
    ppl_before = perplexity(model, valid_blocks, cfg.settings.batch_size, bar)
    log(f"validation perplexity before: {ppl_before:.3f}")
    train_model = peft_wrap(model, cfg.kind, cfg.lora_r, cfg.lora_alpha) if cfg.kind != "dense" else model
    trainable, total = parameter_counts(train_model)
    metrics = fit(train_model, train_blocks, None, cfg.settings, work / "checkpoints", resume=cfg.resume)
    if prune_spec is not None:
        journal_path(work / "pruning_scores.jsonl").unlink(missing_ok=True)
    ppl_after = perplexity(train_model, valid_blocks, cfg.settings.batch_size, bar)
    log(f"validation perplexity after: {ppl_after:.3f}")

    # -- domain embedding ---------------------------------------------------------------------------
    embedder_spec = cfg.embedder or DEFAULT_EMBEDDER
    embedder = load_embedder(embedder_spec, cfg.base)
    all_train_docs = [d for docs in train_sources.values() for d in docs]
    embedding, n_embedded = domain_embedding(all_train_docs, embedder, sample=cfg.embed_sample,
                                             seed=cfg.settings.seed)

    # -- the repo -----------------------------------------------------------------------------------
    languages = cfg.languages if cfg.languages is not None else \
        sorted({d.language for d in all_train_docs if d.language})
    info = ExpertInfo(
        name=name, domain=cfg.domain, languages=languages, kind=cfg.kind,
        base_model=cfg.base_id or Path(cfg.base).resolve().name,
        base_fingerprint=fingerprint_weights(cfg.base), architecture=architecture_of(model.config),
        tokenizer_fingerprint=fingerprint_tokenizer(tokenizer),
        embedding=EmbeddingInfo(model=embedder.name, dim=int(embedding.numel()), documents=n_embedded),
        data=DataInfo(documents=n_docs, tokens=n_tokens, sources=[str(s.path) for s in cfg.data],
                      pruning=pruning_info, mix={k: v["actual_share"] for k, v in mix_report.items()}
                      if mix_report else None),
        metrics={"valid_perplexity_before": ppl_before, "valid_perplexity_after": ppl_after,
                 "train_loss": float(metrics.get("train_loss", float("nan")))},
        training={"steps": metrics["steps"], "tokens": metrics["tokens"], "seq_len": cfg.seq_len,
                  "resumed_from": metrics["resumed_from"], "runtime_seconds": float(metrics.get("train_runtime", 0.0)),
                  "batch_size": cfg.settings.batch_size, "grad_accum": cfg.settings.grad_accum,
                  "learning_rate": cfg.settings.learning_rate, "trainable_parameters": int(trainable),
                  "total_parameters": int(total), "trainable_share": trainable / total},
    )
    scores = work / "pruning_scores.jsonl"
    write_expert_repo(out, train_model, tokenizer, ExpertCard(expert=info, datasets=[s.name for s in cfg.data]),
                      embedding, embedder.name, n_embedded, save_dtype,
                      extra_files=[scores] if scores.is_file() else ())
    remove_tree(work)  # gone at once: a kill now leaves nothing that looks resumable
    return out


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters: the adapter's share for a PEFT model, everything for a dense one."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return total, total


def write_expert_repo(out: str | Path, model, tokenizer, card: ExpertCard, embedding: torch.Tensor, embedder: str,
                      embedded_documents: int, save_dtype: torch.dtype = torch.float32,
                      extra_files: Sequence[Path] = ()) -> Path:
    """Write the expert repo of DESIGN.md atomically: weights (dense) or adapter (PEFT), tokenizer, domain
    embedding, card; shared by ``train_expert`` and the federation server so both publish the same kind of repo."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        if card.expert.kind == "dense":
            model.to(save_dtype).save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_domain_embedding(tmp, embedding, embedder, embedded_documents)
        for extra in extra_files:
            shutil.copyfile(extra, tmp / Path(extra).name)
        card.save(tmp)
    return out
