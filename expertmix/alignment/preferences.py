"""Preference data: prompts (plain or Aya-style), pairs ``prompt/chosen/rejected/language``, generation.

``generate_preferences`` samples k completions per prompt from a policy, scores them with a reward and keeps
the best and the worst as a pair, with every sample and score written beside it for audit (Dang et al. 2024:
completions are generated in each prompt's language, not translated).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress

from ..errors import DataError, ExpertmixError
from ..experts.data import (
    data_digest,
    iter_jsonl_records,
    language_key,
    language_names,
    row_language,
    with_language_codes,
)
from ..fsutil import write_text_atomic
from ..journal import Journal, weights_identity
from .policy import load_policy, sample_completions, score_samples
from .rewards import BUILTIN_REWARDS, RewardFn, load_reward, score

PAIR_FIELDS = ("prompt", "chosen", "rejected", "language", "chosen_score", "rejected_score", "samples")


@dataclass
class PromptRecord:
    """One prompt; ``fields`` holds the file's other columns, handed to reward functions (``keyword``...)."""

    prompt: str
    language: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    line: int = field(default=0, compare=False)  # in the prompt file, for errors
    # every name the row gives its language (Aya: "deu" and "German"), for --language filters
    language_names: frozenset[str] = field(default=frozenset(), compare=False, repr=False)


@dataclass
class PreferencePair:
    """A preferred and a dispreferred completion of one prompt, with the scores that ranked them."""

    prompt: str
    chosen: str
    rejected: str
    language: str | None = None
    chosen_score: float | None = None
    rejected_score: float | None = None
    samples: list[dict] | None = None  # every sampled completion with its score
    fields: dict[str, Any] = field(default_factory=dict)
    language_names: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    line: int = field(default=0, compare=False)  # in the pair file, for errors

    def to_json(self) -> dict:
        row = {k: getattr(self, k) for k in PAIR_FIELDS}
        return {**self.fields, **{k: v for k, v in row.items() if v is not None}}


def _read_rows(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return iter_jsonl_records(path)


def _string(row: dict, key: str, path: Path, line: int, empty: bool = False) -> str:
    """A text field of a row; ``empty``: it may be '' (a reply that stops at once is a reply)."""
    if key not in row:
        raise DataError(f"{path} line {line}: no field '{key}' (fields: {', '.join(sorted(row)) or 'none'})")
    if not isinstance(row[key], str) or not (row[key] or empty):
        raise DataError(f"{path} line {line}: field '{key}' must be a {'' if empty else 'non-empty '}string, "
                        f"got {row[key]!r}")
    return row[key]


def read_prompts(path: str | Path) -> list[PromptRecord]:
    """Prompts from JSONL: ``prompt`` rows, or Aya rows (``inputs``, ``language``/``language_code``).

    An Aya ``inputs`` prompt gets the newline that separates inputs from targets in training data, so
    completions start where the targets would.
    """
    path = Path(path)
    out, rows = [], []
    for i, row in _read_rows(path):
        if "prompt" in row:
            prompt = _string(row, "prompt", path, i)
        elif "inputs" in row:
            prompt = _string(row, "inputs", path, i) + "\n"
        else:
            raise DataError(f"{path} line {i}: no field 'prompt' or 'inputs' "
                            f"(fields: {', '.join(sorted(row))})")
        skip = {"prompt", "inputs", "targets", "language", *PAIR_FIELDS}
        out.append(PromptRecord(prompt, row_language(row), {k: v for k, v in row.items() if k not in skip}, line=i,
                                language_names=language_names(row)))
        rows.append(row)
    if not out:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return with_language_codes(out, rows)  # a row naming only 'German' joins 'deu', as in eval


def pair_prompts(pairs: Sequence[PreferencePair]) -> list[PromptRecord]:
    """The prompts of preference pairs, as rewards score them (with their lines, for errors)."""
    return [PromptRecord(p.prompt, p.language, p.fields, line=p.line) for p in pairs]


def write_prompts(path: str | Path, records: Sequence[PromptRecord]) -> None:
    """Write prompts as JSONL (``prompt``, ``language``, extra fields), atomically."""
    rows = ({"prompt": r.prompt, **({"language": r.language} if r.language else {}), **r.fields}
            for r in records)
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def filter_languages(rows: list, languages: Sequence[str] | None, source: str | Path) -> list:
    """The prompts or pairs in ``languages`` (all of them when none are named); none left is an error."""
    if not languages:
        return rows
    wanted = {language_key(lang) for lang in languages}
    kept = [r for r in rows if language_key(r.language) in wanted or r.language_names & wanted]
    if not kept:
        found = sorted({str(r.language) for r in rows})
        raise DataError(f"{source}: no rows in language(s) {', '.join(languages)} "
                        f"(found: {', '.join(found)})")
    return kept


def check_reward_fields(reward: RewardFn, records: Sequence[PromptRecord], source: str | Path) -> None:
    """Before any sampling: every prompt has the fields a built-in reward reads (an arithmetic ``answer``, a
    ``keyword``), so a bad row is named by its line at once instead of failing a run when its batch comes up.
    Other rewards are not called here: a reward model or remote scorer would do a pass's work."""
    if reward not in BUILTIN_REWARDS.values():
        return
    for r in records:
        try:
            score(reward, [r.prompt], [""], prompt_columns([r]))
        except ExpertmixError as exc:
            reason = str(exc).removeprefix("prompt 0: ")
            raise DataError(f"{source} line {r.line}: {reason}") from exc


def prompt_columns(records: Sequence[PromptRecord]) -> dict[str, list]:
    """The records' ``language`` and extra fields as columns (TRL's reward-function keyword arguments)."""
    keys = sorted({k for r in records for k in r.fields})
    cols = {k: [r.fields.get(k) for r in records] for k in keys}
    cols["language"] = [r.language for r in records]
    return cols


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Pairs from JSONL rows with ``prompt``, ``chosen``, ``rejected`` (and ``language``, scores)."""
    path = Path(path)
    out, rows = [], []
    for i, row in _read_rows(path):
        # a sampled reply may be empty (the model stopped at once): DPO learns from it as from any other
        texts = [_string(row, key, path, i, empty=key != "prompt") for key in ("prompt", "chosen", "rejected")]
        extra = {k: v for k, v in row.items() if k not in PAIR_FIELDS}
        out.append(PreferencePair(*texts, row_language(row), row.get("chosen_score"), row.get("rejected_score"),
                                  row.get("samples"), extra, language_names=language_names(row), line=i))
        rows.append(row)
    if not out:
        raise DataError(f"{path}: no preference pairs (the file is empty)")
    return with_language_codes(out, rows)


def write_preferences(path: str | Path, pairs: Sequence[PreferencePair]) -> None:
    """Write pairs as JSONL, atomically."""
    write_text_atomic(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs))


def generate_preferences(policy, tokenizer, records: Sequence[PromptRecord], reward: RewardFn, k: int = 4,
                         max_new_tokens: int = 32, temperature: float = 1.0, batch_size: int = 8,
                         min_margin: float = 0.0, seed: int = 0, progress: bool = True,
                         journal: Journal | None = None) -> tuple[list, dict]:
    """Sample ``k`` completions per prompt, score them, keep best and worst as a pair if they differ.

    A pair needs a score gap above ``min_margin``; prompts whose samples tie are skipped. Each batch of prompts
    samples from its own seed, so with an open ``journal`` (one policy, prompt file and set of options) the
    batches it holds are reused and an interrupted run's rerun gives the pairs one whole run gives.

    Returns the pairs and a per-language summary (prompts, pairs, exact ties and gaps within ``min_margin``
    skipped, the largest gap, mean scores).
    """
    if k < 2:
        raise DataError(f"k must be at least 2 to form a pair, got {k}")
    pairs: list[PreferencePair] = []
    stats: dict[str, Counter] = defaultdict(Counter)
    all_scores: dict[str, list[float]] = defaultdict(list)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("sampling completions", total=len(records))
        for start in range(0, len(records), batch_size):
            batch = list(records[start:start + batch_size])
            key = str(start)
            if journal is not None and key in journal.done:
                texts, scores = journal.done[key]["texts"], journal.done[key]["scores"]
            else:
                prompts = [r.prompt for r in batch]
                torch.manual_seed(seed * 1_000_003 + start)  # the batch's own stream: a resumed run samples alike
                s = sample_completions(policy, tokenizer, prompts, k, max_new_tokens, temperature, batch_size * k)
                texts = list(s.texts)
                scores, _ = score_samples(reward, prompts, prompt_columns(batch), s)
                if journal is not None:
                    journal.add(key, {"texts": texts, "scores": list(scores)})
            for j, rec in enumerate(batch):
                rows = list(zip(texts[j * k:(j + 1) * k], scores[j * k:(j + 1) * k], strict=True))
                lang = rec.language or "unknown"
                all_scores[lang].extend(sc for _, sc in rows)
                stats[lang]["prompts"] += 1
                best = max(rows, key=lambda r: r[1])
                worst = min(rows, key=lambda r: r[1])
                gap = best[1] - worst[1]
                stats[lang]["largest_gap"] = max(stats[lang]["largest_gap"], gap)
                if gap <= min_margin:
                    stats[lang]["ties" if gap == 0 else "below_margin"] += 1
                    continue
                stats[lang]["pairs"] += 1
                pairs.append(PreferencePair(rec.prompt, best[0], worst[0], rec.language, best[1], worst[1],
                                            [{"text": t, "score": sc} for t, sc in rows], dict(rec.fields)))
            bar.advance(task, len(batch))
    summary = {lang: {"prompts": st["prompts"], "pairs": st["pairs"], "ties": st["ties"],
                      "below_margin": st["below_margin"], "largest_gap": st["largest_gap"],
                      "mean_score": sum(all_scores[lang]) / len(all_scores[lang])}
               for lang, st in sorted(stats.items())}
    return pairs, summary


def generate_preference_file(policy: str | Path, prompts: str | Path, reward: str | RewardFn, out: str | Path,
                             k: int = 4, languages: Sequence[str] | None = None,
                             log: Callable[[str], None] = lambda _: None, **options) -> dict:
    """``expertmix prefs generate``: load the policy, make pairs from the prompt file, write them to ``out``.

    Returns the per-language summary; ``options`` go to :func:`generate_preferences`.
    """
    if Path(out).exists():  # the prompt file itself, or earlier pairs: never overwritten
        raise DataError(f"--out {out} already exists; choose another path or remove it")
    records = filter_languages(read_prompts(prompts), languages, prompts)
    reward_fn = load_reward(reward)
    check_reward_fields(reward_fn, records, prompts)
    # Sampling takes long: each batch's samples and scores are journalled beside --out, so the same command goes on
    # after an interruption. --min-margin only picks pairs from them: a rerun with another margin samples nothing.
    journal = Journal(out, {"job": "preference pairs", "policy": weights_identity(policy),
                            "prompts": str(Path(prompts).resolve()), "prompts_contents": data_digest(prompts),
                            "reward": reward if isinstance(reward, str) else getattr(reward, "__name__", str(reward)),
                            "k": k, "languages": sorted(languages or []),
                            **{name: value for name, value in sorted(options.items())
                               if name not in ("progress", "min_margin")}},
                      "batches of prompts sampled")
    if done := len(journal.open()):
        log(f"resuming: {done} batches of prompts were sampled before ({journal.path})")
    try:
        model, tokenizer = load_policy(policy)
        pairs, summary = generate_preferences(model, tokenizer, records, reward_fn, k, journal=journal, **options)
    except BaseException as exc:
        journal.stopped(exc)
        raise
    if not pairs:
        gap = max(s["largest_gap"] for s in summary.values())
        if gap > 0:
            journal.close()
            raise DataError(f"{prompts}: no prompt's best and worst samples differ by more than --min-margin "
                            f"{options.get('min_margin', 0.0)} (largest gap {gap:.4g}); no pair to write (lower "
                            f"--min-margin: the samples are kept in {journal.path} and reused; or raise --k)")
        journal.finish()  # every sample tied: a rerun needs another --k or reward, which samples afresh
        raise DataError(f"{prompts}: every prompt's {k} samples scored the same; no pair to write "
                        f"(raise --k or check the reward)")
    write_preferences(out, pairs)
    journal.finish()
    return summary
