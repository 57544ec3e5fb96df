"""Nexus in miniature on the shared corpus: experts, dense merge, linear-router MoE, Nexus MoE, extension.

From ``seed-s``: dense experts for code, de, ja and ru (``train_expert``, published to a local store);
a dense merge, a linear-router MoE and a Nexus MoE assembled from them through the hub with the same
token budget (the MoEs learn each domain's expert's distributions, ``--moe-distill``); validation perplexity
of every model on every domain and the routing matrices. Then an expert for a new domain (es), and both MoEs
extended with it by each ``--recipes`` entry on at most ``--ext-share`` of that expert's training tokens, with
perplexity on es and the old domains after.

Every stage's output is kept under ``--out`` and reused when the script runs again (``--fresh`` redoes
the mixes and extensions), so an interrupted run resumes and new recipes can be tried on the same mixes.

    # CPU, 2 cores (600 steps of 8 x 128 per model, 30 extension steps' data: 34 minutes on idle cores):
    python benchmarks/nexus_table.py --shared ../shared
    # GPU, the reference budget (300 steps of 32 x 512 tokens per model, 15 extension steps):
    python benchmarks/nexus_table.py --shared ../shared --device cuda --bf16 --reference
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OLD = ("code", "de", "ja", "ru")
NEW = "es"


@dataclass
class Budget:
    """Training and evaluation budget (the flags)."""

    expert_steps: int
    moe_steps: int
    ext_share: float
    batch_size: int
    seq_len: int
    lr_expert: float
    lr_moe: float
    lr_ext: float
    eval_blocks: int
    moe_train: str
    moe_distill: str
    merge_steps: int
    bf16: bool

    @property
    def ext_steps(self) -> int:
        """Extension steps: at most ``ext_share`` of an expert's training tokens (same batch and length)."""
        return max(1, math.floor(self.ext_share * self.expert_steps + 1e-9))


def safe_name(recipe: str) -> str:
    """A folder name for a recipe spec."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in recipe)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "nexus")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training (GPU)")
    p.add_argument("--reference", action="store_true",
                   help="the issue's reference budget: 300 steps of 32 x 512, eval on whole valid sets")
    p.add_argument("--expert-steps", type=int, default=600)
    p.add_argument("--moe-steps", type=int, default=None, help="default: --expert-steps")
    p.add_argument("--merge-steps", type=int, default=0, help="finetuning of the dense merge (0: plain average)")
    p.add_argument("--ext-share", type=float, default=0.05, help="extension tokens / es expert tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--min-lr-ratio", type=float, default=None,
                   help="cosine floor as a share of the peak rate (default 0; 0.3 with --reference, as the issue's)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr-expert", type=float, default=5e-4)
    p.add_argument("--lr-moe", type=float, default=3e-4)
    p.add_argument("--lr-ext", type=float, default=None, help="default: --lr-moe")
    p.add_argument("--eval-blocks", type=int, default=64,
                   help="validation blocks per domain, spread evenly over each file (0: all)")
    p.add_argument("--moe-train", choices=["all", "router"], default="all", help="what MoE training updates")
    p.add_argument("--moe-distill", choices=["experts", "none"], default="experts",
                   help="MoE training: each domain's rows learn its dense expert's distributions, or labels only")
    p.add_argument("--recipes", default="paper,paper-keep,targeted",
                   help="extension recipes, comma-separated: NAME or NAME:key=value;... (extension.parse_recipe)")
    p.add_argument("--linear-recipes", default="paper,targeted", help="recipes for the linear MoE")
    p.add_argument("--ext-seeds", default="0",
                   help="run seeds of every extension, comma-separated: which documents of the budget it reads, "
                        "its placement data, its shuffling; with several, a table of each recipe's spread follows")
    p.add_argument("--routers", default="merge,linear,nexus",
                   help="which mixes to build and extend, comma-separated (merge, linear, nexus)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="rebuild mixes and extensions (keeps the experts)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args()
    if a.reference:
        a.expert_steps, a.batch_size, a.seq_len, a.eval_blocks = 300, 32, 512, 0
    if a.min_lr_ratio is None:
        a.min_lr_ratio = 0.3 if a.reference else 0.0
    unknown = set(a.routers.split(",")) - {"merge", "linear", "nexus"}
    if unknown:
        p.error(f"--routers: unknown {', '.join(sorted(unknown))} (choose from merge, linear, nexus)")
    a.moe_steps = a.moe_steps if a.moe_steps is not None else a.expert_steps
    a.lr_ext = a.lr_ext if a.lr_ext is not None else a.lr_moe
    return a


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the Trainer and the embedder pick CUDA whenever they see it
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from expertmix.assembler.assemble import AssembleConfig, assemble
    from expertmix.assembler.extension import ExtendConfig, extend, parse_recipe
    from expertmix.assembler.routing_report import eval_blocks, evaluate
    from expertmix.experts.training import DataSource, ExpertTrainConfig, TrainSettings, train_expert
    from expertmix.hub.store import LocalStore

    hf_logging.set_verbosity_error()
    budget = Budget(expert_steps=args.expert_steps, moe_steps=args.moe_steps, ext_share=args.ext_share,
                    batch_size=args.batch_size, seq_len=args.seq_len, lr_expert=args.lr_expert,
                    lr_moe=args.lr_moe, lr_ext=args.lr_ext, eval_blocks=args.eval_blocks,
                    moe_train=args.moe_train, moe_distill=args.moe_distill, merge_steps=args.merge_steps,
                    bf16=args.bf16)
    recipes = {r.strip(): parse_recipe(r.strip()) for r in args.recipes.split(",") if r.strip()}
    ext_seeds = [int(x) for x in args.ext_seeds.split(",") if x.strip()] or [0]
    linear_recipes = {r.strip(): parse_recipe(r.strip()) for r in (args.linear_recipes or args.recipes).split(",")
                      if r.strip()}
    seed = args.shared / "seeds" / "seed-s"
    corpus = args.shared / "corpus"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    store = LocalStore(out / "store")
    timings: dict[str, float] = {}

    def settings(steps: int, lr: float, run_seed: int = 0) -> TrainSettings:
        return TrainSettings(max_steps=steps, batch_size=budget.batch_size, learning_rate=lr, warmup_ratio=0.1,
                             min_lr_ratio=args.min_lr_ratio, save_steps=10**9, logging_steps=max(1, steps // 5),
                             bf16=budget.bf16, progress=False, seed=run_seed)

    def log(msg: str) -> None:
        print(f"  {msg}", flush=True)

    # -- data ---------------------------------------------------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(seed)
    sources = {d: DataSource(d, corpus / f"{d}.valid.jsonl") for d in (*OLD, NEW)}
    valid = eval_blocks(list(sources.values()), tokenizer, budget.seq_len, budget.eval_blocks or None)
    small_valid = out / "valid-small"  # what train_expert measures before/after (kept small on CPU)
    small_valid.mkdir(exist_ok=True)
    for d, src in sources.items():
        lines = src.path.read_text(encoding="utf-8").splitlines()
        (small_valid / f"{d}.jsonl").write_text("\n".join(lines[:4 if budget.eval_blocks else None]) + "\n")

    device = torch.device(args.device)
    results: dict[str, dict[str, float]] = {}
    routing: dict[str, dict] = {}

    def save() -> None:  # after every measurement, so an interrupted run keeps what it measured
        payload = {"budget": asdict(budget), "device": args.device, "results": results, "routing": routing,
                   "timings": timings}
        (out / "results.json").write_text(json.dumps(payload, indent=2))
        if args.json:
            args.json.write_text(json.dumps(payload, indent=2))

    def measure(label: str, folder: Path, domains=(*OLD, NEW)) -> None:
        t = time.time()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        report = evaluate(model, {d: valid[d] for d in domains}, batch_size=8)
        results[label] = report.perplexity
        if report.routing is not None:
            routing[label] = {"experts": report.experts, "matrix": report.routing.tolist(),
                              "domains": report.domains}
        timings[f"eval {label}"] = time.time() - t
        save()
        print(f"{label:>34}: " + "  ".join(f"{d} {v:7.2f}" for d, v in report.perplexity.items()), flush=True)
        del model

    # -- experts ------------------------------------------------------------------------------------
    refs: dict[str, str] = {}
    for d in (*OLD, NEW):
        folder = out / "experts" / d
        if not folder.is_dir():
            t = time.time()
            print(f"training the {d} expert: {budget.expert_steps} steps of {budget.batch_size} x "
                  f"{budget.seq_len}", flush=True)
            train_expert(ExpertTrainConfig(
                base=seed, data=[DataSource(d, corpus / f"{d}.train.jsonl")], valid=small_valid / f"{d}.jsonl",
                domain=d, name=f"bench/{d}", base_id="seed-s", out=folder, seq_len=budget.seq_len,
                embedder="seed", embed_sample=64, resume=folder.with_name(d + ".partial").is_dir(),
                settings=settings(budget.expert_steps, budget.lr_expert)), log=log)
            timings[f"train expert {d}"] = time.time() - t
        entry = store.publish(folder)
        refs[d] = f"{entry.name}@{entry.revision}"

    measure("seed", seed)
    for d in (*OLD, NEW):
        measure(f"expert {d} (own domain)", out / "experts" / d, domains=(d,))

    # -- mixes --------------------------------------------------------------------------------------
    mixes = out / "mixes"
    if args.fresh:
        shutil.rmtree(mixes, ignore_errors=True)
    train_data = [DataSource(d, corpus / f"{d}.train.jsonl") for d in OLD]
    routers = [r for r in ("merge", "linear", "nexus") if r in args.routers.split(",")]
    for router in routers:
        folder = mixes / router
        steps = budget.merge_steps if router == "merge" else budget.moe_steps
        if not folder.is_dir():
            t = time.time()
            print(f"assembling {router}: {steps} steps", flush=True)
            assemble(AssembleConfig(
                seed=seed, experts=[refs[d] for d in OLD], data=train_data, out=folder, router=router,
                registry=str(out / "store"), seed_id="seed-s", train_all=budget.moe_train == "all",
                seq_len=budget.seq_len, resume=folder.with_name(router + ".partial").is_dir(),
                distill=budget.moe_distill, settings=settings(steps, budget.lr_moe)), log=log)
            timings[f"assemble {router}"] = time.time() - t
        measure({"merge": "dense merge", "linear": "MoE, linear router", "nexus": "MoE, Nexus router"}[router],
                folder)

    # -- extension ----------------------------------------------------------------------------------
    es_tokens = budget.expert_steps * budget.batch_size * budget.seq_len
    ext_tokens = budget.ext_steps * budget.batch_size * budget.seq_len
    print(f"extending with es: {budget.ext_steps} steps = {ext_tokens} tokens = {ext_tokens / es_tokens:.1%} "
          f"of the es expert's {es_tokens}", flush=True)
    spread: dict[str, list[str]] = {}  # router + recipe: its rows, one per seed
    for router, chosen in (("nexus", recipes), ("linear", linear_recipes)):
        if router not in routers:
            continue
        for name, recipe in chosen.items():
            for run_seed in ext_seeds:
                tag = f", seed {run_seed}" if run_seed else ""
                folder = mixes / (f"{router}+es-{safe_name(name)}" + (f"-seed{run_seed}" if run_seed else ""))
                if not folder.is_dir():
                    t = time.time()
                    extend(ExtendConfig(
                        mix=mixes / router, expert=refs[NEW], data=[DataSource(NEW, corpus / f"{NEW}.train.jsonl")],
                        out=folder, recipe=recipe, recipe_name=name, registry=str(out / "store"),
                        seq_len=budget.seq_len, resume=folder.with_name(folder.name + ".partial").is_dir(),
                        settings=settings(budget.ext_steps, budget.lr_ext, run_seed)), log=log)
                    timings[f"extend {router} {name}{tag}"] = time.time() - t
                measure(f"{router}, extended with es ({name}{tag})", folder)
                spread.setdefault(f"{router}, {name}", []).append(f"{router}, extended with es ({name}{tag})")

    # -- report -------------------------------------------------------------------------------------
    print()
    print(f"budget: {json.dumps(asdict(replace(budget)))}; device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}")
    print()
    print("| model | " + " | ".join((*OLD, NEW)) + " | mean of old four |")
    print("|---|" + "---|" * (len(OLD) + 2))
    experts_row = {d: results[f"expert {d} (own domain)"][d] for d in (*OLD, NEW)}
    rows = {"seed": results["seed"], "each dense expert on its own domain": experts_row}
    rows.update({k: v for k, v in results.items() if not k.startswith(("seed", "expert "))})
    for label, r in rows.items():
        mean_old = sum(r[d] for d in OLD) / len(OLD)
        print(f"| {label} | " + " | ".join(f"{r[d]:.1f}" for d in (*OLD, NEW)) + f" | {mean_old:.1f} |")
    for label, r in routing.items():
        print(f"\nrouting, {label} (share of each domain's tokens per expert, mean over layers)")
        print("| domain | " + " | ".join(e.split("/")[-1] for e in r["experts"]) + " |")
        print("|---|" + "---|" * len(r["experts"]))
        for d, row in zip(r["domains"], r["matrix"], strict=True):
            print(f"| {d} | " + " | ".join(f"{x:.0%}" for x in row) + " |")
    if len(ext_seeds) > 1:
        print(f"\nextensions over run seeds {', '.join(map(str, ext_seeds))}: mean (min-max)")
        print("| extension | mean of old four | " + NEW + " |")
        print("|---|---|---|")
        for key, labels in spread.items():
            olds = [sum(results[k][d] for d in OLD) / len(OLD) for k in labels]
            news = [results[k][NEW] for k in labels]
            print(f"| {key} | " + " | ".join(f"{sum(v) / len(v):.1f} ({min(v):.1f}-{max(v):.1f})"
                                             for v in (olds, news)) + " |")
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    save()


if __name__ == "__main__":
    main()
