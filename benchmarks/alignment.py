"""Alignment benchmark: RLOO vs DPO on ``seed-s`` with a verifiable multilingual reward (de, ja, ru, zh).

Prompts are snippets of the corpus's translated manual pages (``train`` split for training, ``valid`` for the
held-out prompts); the reward (``multilingual``) gives half for a reply in the prompt language's script and
half for repeating a keyword taken from the prompt. Runs, all from the same seed and settings:

- RLOO on all four languages, and DPO on pairs made by sampling the same number of completions from the seed
  (``prefs generate`` with the same k), trained for the same number of steps;
- RLOO on one language only, evaluated on the other three (cross-lingual transfer).

Reports held-out reward per language before and after, its two parts (script, keyword), and the KL to the
seed on the policy's own samples.

    python benchmarks/alignment.py                 # CPU budget, a few minutes on one core
    python benchmarks/alignment.py --device cuda   # a bigger budget
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from expertmix.alignment.align import AlignConfig, align
from expertmix.alignment.policy import evaluate_policy, load_policy, load_reference
from expertmix.alignment.preferences import (
    PromptRecord,
    generate_preferences,
    prompt_columns,
    write_preferences,
    write_prompts,
)
from expertmix.alignment.rewards import keyword_reward, language_scripts, script_fraction, script_reward

LANGUAGES = ("de", "ja", "ru", "zh")
REPO = Path(__file__).resolve().parents[1]
WORD = re.compile(r"[^\W\d_]+")


@dataclass
class Budget:
    """How much work each run does; the CPU preset takes a few minutes on one core."""

    train_prompts: int = 48  # per language
    eval_prompts: int = 16  # per language
    eval_samples: int = 2
    steps: int = 16
    prompts_per_step: int = 8
    k: int = 4
    max_new_tokens: int = 24
    rloo_lr: float = 1e-4
    dpo_lr: float = 3e-5  # at 1e-4 DPO overshot on CPU: KL 16 nats and German replies left Latin script
    rloo_beta: float = 0.05
    dpo_beta: float = 0.1


PRESETS = {"cpu": Budget(),
           "cuda": Budget(train_prompts=256, eval_prompts=64, eval_samples=4, steps=150, prompts_per_step=16,
                          max_new_tokens=32)}


def _words(text: str, scripts: frozenset[str], cjk: bool) -> list[str]:
    """Candidate keywords: words (4+ letters) in the script, or for CJK/kana every 2-character run."""
    out = []
    for w in WORD.findall(text):
        if script_fraction(w, scripts) < 1.0:
            continue
        if cjk:
            out += [w[i:i + 2] for i in range(len(w) - 1)]
        elif len(w) >= 4:
            out.append(w.lower())
    return out


def make_prompts(corpus: Path, language: str, split: str, n: int, seed: int) -> list[PromptRecord]:
    """``n`` snippets (whole lines, 40-120 characters, mostly in the language's script) with a keyword each.

    The keyword is the snippet's word that the document's next lines repeat most: a reply that continues
    the text the way the document does can earn it.
    """
    scripts = language_scripts(language)
    cjk = bool(scripts & {"CJK", "HIRAGANA", "KATAKANA"})
    rows = []
    for line in (corpus / f"{language}.{split}.jsonl").read_text(encoding="utf-8").splitlines():
        lines = json.loads(line)["text"].splitlines()
        i = 0
        while i < len(lines):
            cur: list[str] = []
            while i < len(lines) and len("\n".join(cur)) < 40:
                cur.append(lines[i])
                i += 1
            text = "\n".join(cur)
            if len(text) > 120 or script_fraction(text, scripts) < 0.6:
                continue
            later = Counter(_words("\n".join(lines[i:i + 6]), scripts, cjk))
            candidates = sorted(w for w in set(_words(text, scripts, cjk)) if later[w])
            if candidates:
                keyword = max(candidates, key=lambda w: later[w])
                rows.append(PromptRecord(text + "\n", language, {"keyword": keyword}))
    if len(rows) < n:
        raise SystemExit(f"{corpus}/{language}.{split}.jsonl: only {len(rows)} usable snippets, {n} wanted")
    return random.Random(f"{language}-{split}-{seed}").sample(rows, n)


class RecordingReward:
    """The ``multilingual`` reward, keeping its two parts of the last call for the report."""

    __name__ = "multilingual"

    def __init__(self):
        self.parts: list[tuple[str, float, float]] = []

    def __call__(self, prompts, completions, **columns):
        script = script_reward(prompts, completions, **columns)
        keyword = keyword_reward(prompts, completions, **columns)
        self.parts = list(zip(columns["language"], script, keyword, strict=True))
        return [0.5 * s + 0.5 * k for s, k in zip(script, keyword, strict=True)]


def evaluate(policy, reference, tokenizer, rows, reward: RecordingReward, budget: Budget, device) -> dict:
    res = evaluate_policy(policy, reference, tokenizer, [r.prompt for r in rows], prompt_columns(rows),
                          reward, budget.eval_samples, budget.max_new_tokens,
                          batch_size=64 if device == "cuda" else 32)
    parts = defaultdict(lambda: [0.0, 0.0, 0])
    for lang, s, k in reward.parts:
        parts[lang][0] += s
        parts[lang][1] += k
        parts[lang][2] += 1
    for lang, (s, k, n) in parts.items():
        res["per_language"][lang].update(script=s / n, keyword=k / n)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--transfer-from", default="ru", choices=LANGUAGES,
                    help="The one language of the cross-lingual transfer run.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (1: on a shared 2-core machine two threads ran up to 10x slower).")
    ap.add_argument("--workdir", type=Path, default=None, help="Keep prompts, pairs and models here.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results as JSON.")
    for f, v in asdict(Budget()).items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=None, help=f"(preset: {v} on cpu)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    budget = Budget(**{**asdict(PRESETS[args.device]),
                       **{f: getattr(args, f) for f in asdict(Budget()) if getattr(args, f) is not None}})
    seed_dir, corpus = args.shared / "seeds" / "seed-s", args.shared / "corpus"
    if not (seed_dir / "config.json").is_file():
        raise SystemExit(f"{seed_dir}: no seed model (pass --shared)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="expertmix-align-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    train = [r for lang in LANGUAGES
             for r in make_prompts(corpus, lang, "train", budget.train_prompts, args.seed)]
    held = [r for lang in LANGUAGES
            for r in make_prompts(corpus, lang, "valid", budget.eval_prompts, args.seed)]
    write_prompts(work / "train.jsonl", train)
    write_prompts(work / "train.one.jsonl", [r for r in train if r.language == args.transfer_from])
    reward = RecordingReward()
    reference = load_reference(seed_dir, args.device)
    policy, tokenizer = load_policy(seed_dir, args.device)
    results, timings = {}, {}

    t = time.time()
    results["seed-s"] = evaluate(policy, reference, tokenizer, held, reward, budget, args.device)
    timings["eval"] = time.time() - t

    # DPO's data: the same number of sampled completions as RLOO draws (steps x prompts/step x k).
    draws = budget.steps * budget.prompts_per_step
    rng = random.Random(args.seed)
    dpo_prompts = [train[rng.randrange(len(train))] for _ in range(draws)] if draws > len(train) else \
        rng.sample(train, draws)
    t = time.time()
    pairs, pair_summary = generate_preferences(policy, tokenizer, dpo_prompts, reward, budget.k,
                                               budget.max_new_tokens, batch_size=budget.prompts_per_step,
                                               seed=args.seed, progress=False)
    write_preferences(work / "prefs.jsonl", pairs)
    timings["prefs generate"] = time.time() - t
    del policy

    common = dict(batch_size=budget.prompts_per_step, max_new_tokens=budget.max_new_tokens, seed=args.seed,
                  device=args.device, progress=sys.stderr.isatty(), steps=budget.steps)
    runs = {
        "RLOO (all)": AlignConfig(model=seed_dir, out=work / "rloo-all", method="rloo",
                                  prompts=work / "train.jsonl", reward=reward, k=budget.k,
                                  beta=budget.rloo_beta, lr=budget.rloo_lr, **common),
        "DPO (all)": AlignConfig(model=seed_dir, out=work / "dpo-all", method="dpo",
                                 prefs=work / "prefs.jsonl", beta=budget.dpo_beta, lr=budget.dpo_lr,
                                 monitor=False, **common),
        f"RLOO ({args.transfer_from} only)": AlignConfig(
            model=seed_dir, out=work / f"rloo-{args.transfer_from}", method="rloo",
            prompts=work / "train.one.jsonl", reward=reward, k=budget.k, beta=budget.rloo_beta,
            lr=budget.rloo_lr, **common),
    }
    for name, cfg in runs.items():
        t = time.time()
        summary = align(cfg, log=lambda m: print(f"  {m}", file=sys.stderr))
        timings[name] = time.time() - t
        aligned, _ = load_policy(cfg.out, args.device)
        results[name] = evaluate(aligned, reference, tokenizer, held, reward, budget, args.device)
        results[name]["train_reward_first_last"] = (summary["first_steps"].get("reward"),
                                                    summary["last_steps"].get("reward"))
        print(f"{name}: held-out reward {results[name]['reward']:.4f}, KL {results[name]['kl']:.3f} "
              f"({timings[name]:.1f}s)", file=sys.stderr)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    completions = draws * budget.k
    print(f"\n### seed-s, {device_name}, {time.time() - t_start:.0f}s in all\n")
    print(f"{len(train)} training prompts ({budget.train_prompts} per language), {len(held)} held-out "
          f"prompts x {budget.eval_samples} samples, {budget.max_new_tokens} new tokens. Each method sampled "
          f"{completions} completions ({budget.steps} steps x {budget.prompts_per_step} prompts "
          f"x k={budget.k}); "
          f"DPO kept {len(pairs)} pairs. RLOO lr {budget.rloo_lr} beta {budget.rloo_beta}; "
          f"DPO lr {budget.dpo_lr} beta {budget.dpo_beta}.\n")
    print("held-out reward (script / keyword parts) per language; KL to seed-s in nats per completion\n")
    print("| model | " + " | ".join(LANGUAGES) + " | mean | KL |")
    print("|---" * (len(LANGUAGES) + 3) + "|")
    for name, res in results.items():
        cells = []
        for lang in LANGUAGES:
            pl = res["per_language"][lang]
            cells.append(f"{pl['reward']:.3f} ({pl['script']:.2f} / {pl['keyword']:.2f})")
        print(f"| {name} | " + " | ".join(cells) + f" | {res['reward']:.3f} | {res['kl']:.2f} |")
    base = results["seed-s"]["per_language"]
    print("\nchange in held-out reward vs seed-s\n")
    print("| model | " + " | ".join(LANGUAGES) + " |")
    print("|---" * (len(LANGUAGES) + 1) + "|")
    for name, res in list(results.items())[1:]:
        print(f"| {name} | " + " | ".join(f"{res['per_language'][lang]['reward'] - base[lang]['reward']:+.3f}"
                                          for lang in LANGUAGES) + " |")
    print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print("pairs per language: "
          + ", ".join(f"{k} {v['pairs']}/{v['prompts']}" for k, v in pair_summary.items()))
    if args.json:
        args.json.write_text(json.dumps({"budget": asdict(budget), "device": device_name, "results": results,
                                         "timings": timings, "pairs": pair_summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
