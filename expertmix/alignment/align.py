"""``expertmix align``: DPO or RLOO on a mix or any causal LM, logged every step, saved as a checkpoint.

The output folder holds the aligned model (same class and dtype as the input, its tokenizer, ``mix.json``
and other side files of the input), ``align_log.jsonl`` (one line of metrics per step) and ``alignment.json``
(settings and summary). It appears only when the run completes; until then the run works in ``OUT.partial``,
checkpointed every ``save_steps`` steps (trained weights, optimizer, random state, log), and ``--resume``
continues it as if it had not stopped.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, TypeVar

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from ..assembler.manifest import MIX_FILE, append_history
from ..checkpoints import require_float_weights
from ..errors import CardError, ExpertmixError
from ..experts.data import data_digest
from ..experts.training import OUT_FIELD, ResumableJob, resumable_job
from ..fsutil import atomic_dir, remove_tree, write_json_atomic, write_text_atomic
from ..hub.card import ExpertCard, read_card
from .dpo import dpo_step
from .policy import (
    evaluate_policy,
    freeze_router,
    load_policy,
    load_reference,
    router_parameters,
    save_aligned,
)
from .preferences import (
    PromptRecord,
    check_reward_fields,
    filter_languages,
    pair_prompts,
    prompt_columns,
    read_preferences,
    read_prompts,
    write_prompts,
)
from .rewards import RewardFn, load_reward
from .rloo import rloo_step

DEFAULT_BETA = {"rloo": 0.05, "dpo": 0.1}  # TRL's defaults for RLOOTrainer and DPOTrainer
DEFAULT_AUX_LOSS_COEF = 0.05  # DESIGN.md's load-balancing coefficient, for models whose config names none
T = TypeVar("T")


CHECKPOINT = "checkpoint-"  # a step's checkpoint folder in OUT.partial: checkpoint-STEP, as the Trainer names its
LOG_FILE = "align_log.jsonl"


@dataclass
class AlignConfig(ResumableJob):
    """Settings of one alignment run (the CLI's options)."""

    model: Path
    out: Path
    method: Literal["dpo", "rloo"] = "rloo"
    prompts: Path | None = None  # RLOO training prompts
    prefs: Path | None = None  # DPO preference pairs
    reward: str | RewardFn | None = None  # RLOO's reward; for DPO, optional, scores the monitoring samples
    k: int = 4  # RLOO samples per prompt
    beta: float | None = None  # KL coefficient (default per method: DEFAULT_BETA)
    lr: float = 1e-5
    steps: int = 100
    batch_size: int = 8  # prompts (RLOO) or pairs (DPO) per step
    max_new_tokens: int = 32
    temperature: float = 1.0
    train_router: bool = True
    aux_loss_coef: float | None = None  # default: the model config's router_aux_loss_coef
    languages: list[str] | None = None  # train only on these languages' prompts/pairs
    monitor: bool = True  # DPO: sample one completion per prompt each step to log KL (and the reward)
    eval_prompts: Path | None = None  # held-out prompts: reward and KL before and after, per language
    eval_samples: int = 4
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    save_steps: int = 25  # checkpoint every this many steps (0: never)
    resume: bool = False  # continue the interrupted run in OUT.partial
    extra: dict = field(default_factory=dict)  # recorded in alignment.json as is

    @property
    def kl_beta(self) -> float:
        return DEFAULT_BETA[self.method] if self.beta is None else self.beta

    def fingerprint(self) -> dict:
        """What a resumed run must keep: every setting but the step budget, checkpointing, the device and the output
        folder (a moved ``OUT.partial`` resumes); the prompt, pair and reward files by their contents (a file
        rewritten before ``--resume`` is other data)."""
        skipped = ("steps", "save_steps", "resume", "device", OUT_FIELD)
        out = {k: v for k, v in _settings(self).items() if k not in skipped}
        for key in ("model", "prompts", "prefs", "eval_prompts"):
            if out.get(key) is not None:
                out[key] = str(Path(out[key]).resolve())
        files = {"prompts": self.prompts, "prefs": self.prefs, "eval_prompts": self.eval_prompts}
        reward_file, _, function = str(self.reward).rpartition(":") if isinstance(self.reward, str) else ("", "", "")
        if reward_file.endswith(".py") and function:
            files["reward"] = Path(reward_file)
        out["data_contents"] = {k: data_digest(v) for k, v in files.items() if v is not None}
        return json.loads(json.dumps(out, default=str))


def _cycle(items: Sequence[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless shuffled batches, reshuffled every pass."""
    rng, order = random.Random(seed), list(range(len(items)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield [items[j] for j in order[i:i + batch_size]]


def _check(cfg: AlignConfig) -> None:
    if cfg.method not in DEFAULT_BETA:
        raise ExpertmixError(f"unknown method {cfg.method!r}: use dpo or rloo")
    require_float_weights(cfg.model, "align")
    if cfg.method == "rloo" and (cfg.prompts is None or cfg.reward is None):
        raise ExpertmixError("--method rloo needs --prompts FILE and --reward SPEC")
    if cfg.method == "rloo" and cfg.k < 2:
        raise ExpertmixError(f"--k must be at least 2 for RLOO (leave-one-out baseline), got {cfg.k}")
    if cfg.method == "dpo" and cfg.prefs is None:
        raise ExpertmixError("--method dpo needs --prefs FILE (make one with `expertmix prefs generate`)")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ExpertmixError(f"--steps, --batch-size and --lr must be positive (got {cfg.steps}, "
                             f"{cfg.batch_size}, {cfg.lr})")
    if cfg.save_steps < 0:
        raise ExpertmixError(f"--save-steps must be 0 (no checkpoints) or more, got {cfg.save_steps}")
    if cfg.aux_loss_coef is not None and not (math.isfinite(cfg.aux_loss_coef) and cfg.aux_loss_coef >= 0):
        raise ExpertmixError(f"--aux-loss {cfg.aux_loss_coef}: the load-balancing coefficient must be 0 or more")


def _evaluate(policy, reference, tokenizer, records: list[PromptRecord], reward, cfg: AlignConfig) -> dict:
    return evaluate_policy(policy, reference, tokenizer, [r.prompt for r in records], prompt_columns(records),
                           reward, cfg.eval_samples, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed + 1)


def _dpo_monitor(policy, reference, tokenizer, pairs, reward, cfg: AlignConfig, step: int) -> dict:
    """DPO never samples: measure the KL to the reference (and the reward) on one fresh sample per prompt."""
    rows = pair_prompts(pairs)
    m = evaluate_policy(policy, reference, tokenizer, [r.prompt for r in rows], prompt_columns(rows), reward,
                        1, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed + step)
    out = {"kl": m["kl"], "kl_per_language": {lang: v["kl"] for lang, v in m["per_language"].items()}}
    if reward is not None:
        out["sample_reward"] = m["reward"]
        out["sample_reward_per_language"] = {lang: v["reward"] for lang, v in m["per_language"].items()}
    return out


def _summary(history: list[dict]) -> dict:
    """Mean of each scalar metric over the first and the last quarter of the steps (at most 10 steps each)."""
    n = max(1, min(10, len(history) // 4))
    keys = [k for k, v in history[0].items() if isinstance(v, int | float) and k != "step"]

    def mean(rows):
        return {k: sum(r[k] for r in rows if k in r) / max(1, sum(k in r for r in rows)) for k in keys}

    return {"first_steps": mean(history[:n]), "last_steps": mean(history[-n:]), "steps_averaged": n}


def _settings(cfg: AlignConfig) -> dict:
    """The run's settings as JSON values (a reward function or model by its name)."""
    out = {}
    for f in fields(cfg):  # not asdict(): it deep-copies every value, a loaded reward model included
        v = getattr(cfg, f.name)
        if f.name == "reward" and v is not None and not isinstance(v, str):
            v = getattr(v, "__name__", type(v).__name__)
        if f.name not in ("progress", "resume"):
            out[f.name] = str(v) if isinstance(v, Path) else v
    return out


def _trained(policy) -> dict[str, torch.Tensor]:
    """The policy's trainable tensors by name: what alignment changes, all a checkpoint needs of the model."""
    return {n: p.detach().contiguous() for n, p in policy.named_parameters() if p.requires_grad}


def save_align_checkpoint(work: Path, step: int, policy, optimizer, before: dict | None) -> None:
    """Write ``work/checkpoint-STEP`` whole (a temporary folder renamed into place), then drop older ones."""
    tmp = work / f".{CHECKPOINT}{step}.tmp"
    remove_tree(tmp)
    tmp.mkdir()
    save_file(_trained(policy), str(tmp / "trained.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / "state.pt")
    write_json_atomic(tmp / "progress.json", {"step": step, "eval_before": before})
    tmp.rename(work / f"{CHECKPOINT}{step}")
    for old in work.glob(f"{CHECKPOINT}*"):
        if old.name != f"{CHECKPOINT}{step}":
            remove_tree(old)


def last_align_checkpoint(work: Path) -> Path | None:
    """The newest whole checkpoint in ``work`` (folders appear by rename, whole), or None."""
    steps = [(int(d.name.removeprefix(CHECKPOINT)), d) for d in work.glob(f"{CHECKPOINT}*")
             if d.name.removeprefix(CHECKPOINT).isdigit() and (d / "progress.json").is_file()]
    return max(steps)[1] if steps else None


def load_align_checkpoint(checkpoint: Path, policy, optimizer, device: str) -> tuple[int, dict | None]:
    """Restore the policy's trained tensors, the optimizer and the random state; returns (step, eval_before)."""
    trained = load_file(str(checkpoint / "trained.safetensors"), device)
    if differ := sorted(set(_trained(policy)) ^ set(trained)):
        raise ExpertmixError(f"--resume: {checkpoint} trains other parameters than this run (e.g. {differ[0]})")
    policy.load_state_dict(trained, strict=False)
    state = torch.load(checkpoint / "state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    progress = json.loads((checkpoint / "progress.json").read_text())
    return progress["step"], progress["eval_before"]


def _logged_steps(log_file: Path, upto: int) -> list[dict]:
    """The per-step metrics logged up to step ``upto`` (a run stopped after its checkpoint logged more)."""
    if not log_file.is_file():
        return []
    rows = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _progress_text(m: dict) -> str:
    parts = [f"{k} {m[k]:.3f}" for k in ("reward", "kl", "loss") if k in m]
    langs = m.get("reward_per_language") or m.get("sample_reward_per_language") or {}
    if 1 < len(langs) <= 6:
        parts.append(" ".join(f"{lang}:{v:.2f}" for lang, v in langs.items()))
    return "  ".join(parts)


@resumable_job
def align(cfg: AlignConfig, log=print) -> dict:
    """Run DPO or RLOO on ``cfg.model``, write the aligned checkpoint to ``cfg.out``; returns the summary."""
    _check(cfg)
    cfg.start_work_dir()  # held first: a second run to the same --out is refused before any work
    summary = _align_in(cfg, cfg.work_dir, log)
    remove_tree(cfg.work_dir)
    return summary


def _align_in(cfg: AlignConfig, work: Path, log) -> dict:
    """``align``'s work: steps and checkpoints in ``work``, then the output folder written whole."""
    torch.manual_seed(cfg.seed)
    reward = load_reward(cfg.reward, cfg.device) if cfg.reward is not None else None
    if cfg.method == "rloo":
        train_rows = filter_languages(read_prompts(cfg.prompts), cfg.languages, cfg.prompts)
    else:
        train_rows = filter_languages(read_preferences(cfg.prefs), cfg.languages, cfg.prefs)
    eval_rows = read_prompts(cfg.eval_prompts) if cfg.eval_prompts is not None else None
    if eval_rows is not None and reward is None:
        raise ExpertmixError("--eval-prompts needs a --reward to score the samples")
    if reward is not None:  # DPO's reward scores its monitoring samples of the pairs' prompts
        check_reward_fields(reward, train_rows if cfg.method == "rloo" else pair_prompts(train_rows),
                            cfg.prompts if cfg.method == "rloo" else cfg.prefs)
    if reward is not None and eval_rows is not None:
        check_reward_fields(reward, eval_rows, cfg.eval_prompts)

    policy, tokenizer = load_policy(cfg.model, cfg.device)
    if cfg.aux_loss_coef is not None and not router_parameters(policy):
        raise ExpertmixError(f"--aux-loss {cfg.aux_loss_coef}: {cfg.model} is a dense {type(policy).__name__} with no "
                             f"router, so there is no load-balancing loss to weigh; drop --aux-loss")
    reference = load_reference(cfg.model, cfg.device)
    frozen = 0 if cfg.train_router else freeze_router(policy)
    aux_coef = None  # a dense model has no router and no load-balancing loss to weigh
    if router_parameters(policy):
        aux_coef = cfg.aux_loss_coef if cfg.aux_loss_coef is not None else \
            getattr(policy.config, "router_aux_loss_coef", DEFAULT_AUX_LOSS_COEF)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    beta = cfg.kl_beta
    n_trainable = sum(p.numel() for p in trainable) / 1e6
    log(f"align: {cfg.method} on {cfg.model} ({n_trainable:.2f}M trainable parameters"
        f"{f', router frozen ({frozen} parameters)' if frozen else ''}), {len(train_rows)} "
        f"{'prompts' if cfg.method == 'rloo' else 'pairs'}, beta {beta}, lr {cfg.lr}, {cfg.steps} steps")

    checkpoint = last_align_checkpoint(work) if cfg.resume else None
    if checkpoint is not None:
        done, before = load_align_checkpoint(checkpoint, policy, optimizer, cfg.device)
        if done > cfg.steps:
            raise ExpertmixError(f"--resume: {checkpoint} has trained {done} steps, past this run's --steps "
                                 f"{cfg.steps}; give at least {done}")
        log(f"resuming from {checkpoint} (step {done} of {cfg.steps})")
    else:
        done = 0
        before = _evaluate(policy, reference, tokenizer, eval_rows, reward, cfg) if eval_rows else None
    if before is not None:
        log(f"held-out reward before: {before['reward']:.4f}")
    batches = _cycle(train_rows, cfg.batch_size, cfg.seed)
    for _ in range(done):  # the batches the checkpoint's steps drew
        next(batches)
    history = _logged_steps(work / LOG_FILE, done)
    write_text_atomic(work / LOG_FILE, "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in history))
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with open(work / LOG_FILE, "a", encoding="utf-8") as logf, \
            Progress(*columns, disable=not cfg.progress, transient=True) as bar:
        task = bar.add_task(cfg.method, total=cfg.steps, completed=done, info="")
        policy.train()
        for step in range(done + 1, cfg.steps + 1):
            batch = next(batches)
            if cfg.method == "rloo":
                loss, metrics = rloo_step(policy, reference, tokenizer, [r.prompt for r in batch],
                                          prompt_columns(batch), reward, cfg.k, beta, cfg.max_new_tokens,
                                          cfg.temperature, aux_coef or 0.0)
            else:
                loss, metrics = dpo_step(policy, reference, tokenizer, batch, beta, aux_coef or 0.0)
            if not math.isfinite(loss.item()):
                raise ExpertmixError(f"step {step}: the loss is {loss.item()}; lower --lr (now {cfg.lr})")
            loss.backward()
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.method == "dpo" and cfg.monitor:
                metrics.update(_dpo_monitor(policy, reference, tokenizer, batch, reward, cfg, step))
            metrics = {"step": step, **metrics}
            history.append(metrics)
            logf.write(json.dumps(metrics, ensure_ascii=False) + "\n")
            logf.flush()
            if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.steps:
                save_align_checkpoint(work, step, policy, optimizer, before)
            bar.update(task, advance=1, info=_progress_text(metrics))
    policy.eval()
    after = _evaluate(policy, reference, tokenizer, eval_rows, reward, cfg) if eval_rows else None
    if after is not None:
        log(f"held-out reward after: {after['reward']:.4f} (KL {after['kl']:.3f})")
    with atomic_dir(cfg.out) as tmp:
        shutil.copy2(work / LOG_FILE, tmp / LOG_FILE)
        save_aligned(policy, tokenizer, cfg.model, tmp)
        summary = {"method": cfg.method, "beta": beta, "aux_loss_coef": aux_coef, "router_frozen": frozen > 0,
                   "train_rows": len(train_rows), **_summary(history),
                   "eval_before": before, "eval_after": after}
        record = {"settings": _settings(cfg), "summary": summary}
        write_json_atomic(tmp / "alignment.json", record)
        if (tmp / MIX_FILE).is_file():  # a mix: its own record says it was aligned, and how
            append_history(tmp, {"stage": "align", **record})
        if (card := aligned_card(cfg.model, record)) is not None:
            card.save(tmp)
    return summary


def aligned_card(source: str | Path, record: dict) -> ExpertCard | None:
    """The card of an aligned expert: the input expert's, renamed ``NAME-METHOD``, its alignment (``record``, as
    alignment.json holds it) recorded, so it can be published and mixed like any expert. ``None`` when the input
    has no expert card (a mix, a seed)."""
    try:
        card = read_card(source)
    except CardError:  # no card, or a model card of another kind: nothing to carry over
        return None
    e, settings, summary = card.expert, record["settings"], record["summary"]
    evaluated = {f"held_out_reward_{when}": summary[f"eval_{when}"]["reward"] for when in ("before", "after")
                 if summary.get(f"eval_{when}")}
    alignment = {"method": settings["method"], "beta": summary["beta"], "steps": settings["steps"],
                 "learning_rate": settings["lr"], "reward": settings["reward"], "train_rows": summary["train_rows"],
                 "from": e.name, **evaluated}
    # validation perplexity and training loss describe the input's weights; the alignment's numbers replace them
    metrics = {k: v for k, v in e.metrics.items() if k == "valid_perplexity_before"} | evaluated
    info = e.model_copy(update={"name": f"{e.name}-{settings['method']}", "metrics": metrics,
                                "training": {**e.training, "alignment": alignment}})
    return card.model_copy(update={"expert": info, "body": ""})


# -- quickstart stage ---------------------------------------------------------------------------------

def arithmetic_prompts(n: int, seed: int, ops: str = "+-") -> list[PromptRecord]:
    """Few-shot sums from the quickstart's arithmetic domain, ending in an unanswered ``a OP b =``.

    Only questions with an operator in ``ops`` are kept (products of a 3- and a 2-digit number are far
    beyond a quickstart-sized model).
    """
    from ..experts.synthetic import arithmetic_documents

    out: list[PromptRecord] = []
    docs = iter(arithmetic_documents(20 * n, seed))
    while len(out) < n:
        *shots, last = next(docs).splitlines()
        question, answer = last.rsplit("=", 1)
        if question.split()[1] in ops:
            out.append(PromptRecord("\n".join(shots + [question + "="]), None, {"answer": int(answer)}))
    return out


def align_quickstart_stage(model: Path, workdir: Path, steps: int, lr: float = 3e-4, n_prompts: int = 64,
                           n_eval: int = 32, log=print) -> dict:
    """Quickstart's alignment stage: RLOO on arithmetic correctness; held-out reward and KL before and after.

    Writes ``workdir/align/{prompts,eval}.jsonl`` and the aligned model to ``workdir/aligned``; a finished
    stage is reused.
    """
    out = Path(workdir) / "aligned"
    if (out / "alignment.json").is_file():
        log(f"align: reusing {out}")
        return json.loads((out / "alignment.json").read_text())["summary"]
    data = Path(workdir) / "align"
    data.mkdir(parents=True, exist_ok=True)
    write_prompts(data / "prompts.jsonl", arithmetic_prompts(n_prompts, seed=11))
    write_prompts(data / "eval.jsonl", arithmetic_prompts(n_eval, seed=12))
    return align(AlignConfig(model=Path(model), out=out, method="rloo", prompts=data / "prompts.jsonl",
                             eval_prompts=data / "eval.jsonl", reward="arithmetic", k=4, lr=lr, steps=steps,
                             batch_size=8, max_new_tokens=6, resume=True), log=log)  # rerunning resumes
