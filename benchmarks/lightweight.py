"""Lightweight experts from seed-s on code+de+ja+ru: full finetuning, LoRA, (IA)³, MoLoRA, MoV at one token budget.

    python benchmarks/lightweight.py --shared ../shared [--max-tokens 49152] [--device cpu|cuda]

Every method trains on the same equal-share mixture of the domains' train splits for the same number of
tokens (same batches, same order, same schedule) with ``expertmix.experts.training.fit``; each is then
scored on every domain's valid split. Printed: trainable parameters and their share of the model, mean and
per-domain validation perplexity, the share of the seed→full-finetuning gap each method closes (on mean
log-perplexity), training time, and for the mixtures the routing (mean merging weight per expert and domain).
The share counts against all parameters of the trained model (seed plus adapters), as the mix's card does.
The default budget fits about 20 minutes on a shared 2-core CPU; on a GPU give far more tokens.
Mixtures are built from scratch (fresh experts, routers random at unit logit spread), as ``expertmix
assemble --kind mov|molora`` does without ``--experts``. ``--ia3-targets`` / ``--targets`` place the (IA)³ /
LoRA adapters (single and mixture alike), ``--shared-router`` gives each block one router per input width
(``assemble --shared-router``), and ``--lr METHOD=LR`` given several times for one method sweeps its rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("full", "lora", "ia3", "molora", "mov")
# Also offered: the mixture built from one adapter per domain (contributors' experts): half the budget
# trains them (an equal share each, on their own domain), half trains the mixture, routers starting from
# each expert's domain.
DOMAIN_METHODS = ("molora-domain", "mov-domain")
# A diagnostic, not a lightweight method: full finetuning with the (tied) embeddings frozen, i.e. how much of the
# gap is reachable by changing only the transformer blocks, where the adapters sit.
DIAGNOSTIC_METHODS = ("full-body",)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--domains", default="code,de,ja,ru")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {', '.join(METHODS + DOMAIN_METHODS + DIAGNOSTIC_METHODS)}")
    ap.add_argument("--max-tokens", type=int, default=49_152, help="training tokens per method")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4, help="experts of MoV and MoLoRA")
    ap.add_argument("--rank", type=int, default=2, help="LoRA rank (single LoRA and every MoLoRA expert)")
    ap.add_argument("--targets", default=None, help="LoRA target modules (default: peft's for the model: q,v)")
    ap.add_argument("--ia3-targets", default=None,
                    help="(IA)3 target modules (default: peft's for the model: k,v,down, down on its input)")
    ap.add_argument("--shared-router", action="store_true",
                    help="MoV/MoLoRA: one router per block and input width (mixture_layers.share_routers)")
    ap.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                    help="peak learning rate of a method (defaults: full 2e-4, lora/molora 2e-3, ia3/mov 1e-2); "
                         "give a method several times to sweep it (one row per rate, named METHOD@LR)")
    ap.add_argument("--eval-blocks", type=int, default=16, help="validation blocks per domain")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the Trainer would otherwise pick a GPU
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoTokenizer

    from expertmix.assembler.assemble import mixture_blocks, read_sources
    from expertmix.assembler.lightweight import (
        DEFAULT_LEARNING_RATES,
        MixtureSpec,
        build_mixture,
        evaluate_lightweight,
        fresh_expert_config,
        init_routers,
        load_base,
        parameter_counts,
        router_input_statistics,
    )
    from expertmix.assembler.routing_report import eval_blocks
    from expertmix.experts.data import pack
    from expertmix.experts.training import DataSource, TrainSettings, fit, perplexity

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    machine = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    seed_dir = args.shared / "seeds" / "seed-s"
    corpus = args.shared / "corpus"
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS + DOMAIN_METHODS + DIAGNOSTIC_METHODS):
        sys.exit(f"unknown method(s): {', '.join(sorted(unknown))}")
    lrs = {"full": 2e-4, "lora": DEFAULT_LEARNING_RATES["molora"], "ia3": DEFAULT_LEARNING_RATES["mov"],
           **DEFAULT_LEARNING_RATES}
    sweeps: dict[str, list[float]] = {}
    for spec in args.lr:
        name, _, value = spec.partition("=")
        sweeps.setdefault(name, []).append(float(value))
    lrs.update({name: values[0] for name, values in sweeps.items()})
    for m in DOMAIN_METHODS + DIAGNOSTIC_METHODS:
        lrs.setdefault(m, lrs[m.split("-")[0]])
    # One run per method and rate: (row name, method, rate).
    runs = [(f"{m}@{r:g}" if len(sweeps.get(m, [])) > 1 else m, m, r)
            for m in methods for r in (sweeps[m] if len(sweeps.get(m, [])) > 1 else [lrs[m]])]
    targets = [t.strip() for t in args.targets.split(",")] if args.targets else None
    ia3_targets = [t.strip() for t in args.ia3_targets.split(",")] if args.ia3_targets else None

    tokenizer = AutoTokenizer.from_pretrained(seed_dir)
    settings = TrainSettings(max_tokens=args.max_tokens, batch_size=args.batch_size, save_steps=0, seed=args.seed,
                             logging_steps=25, progress=True)
    train_src = [DataSource(d, corpus / f"{d}.train.jsonl") for d in domains]
    tokenized = read_sources(train_src, tokenizer, max_tokens=args.max_tokens, seed=args.seed)
    train_blocks, report = mixture_blocks(tokenized, None, args.max_tokens, args.seq_len, args.seed)
    calibration = {d: {k: v[:4] for k, v in pack(tokenized[d][:64], args.seq_len).items()} for d in domains}
    valid = eval_blocks([DataSource(d, corpus / f"{d}.valid.jsonl") for d in domains], tokenizer, args.seq_len,
                        args.eval_blocks)
    shares = ", ".join(f"{k} {v['actual_share']:.2f}" for k, v in report.items())
    n_valid = ", ".join(f"{d} {b['input_ids'].shape[0]}" for d, b in valid.items())
    print(f"{machine}; train: {train_blocks['input_ids'].shape[0]} blocks of {args.seq_len} ({shares}); "
          f"valid blocks: {n_valid}", flush=True)

    def evaluate(model) -> dict[str, float]:
        model.to(device)
        return {d: perplexity(model, b, args.batch_size) for d, b in valid.items()}

    rows: dict[str, dict] = {}
    seed_model = load_base(seed_dir)
    total_params = sum(p.numel() for p in seed_model.parameters())
    rows["seed"] = {"trainable": 0, "share": 0.0, "ppl": evaluate(seed_model), "seconds": 0.0}
    del seed_model
    work = Path(tempfile.mkdtemp(prefix="bench-lightweight-"))
    try:
        for row, method, lr in runs:
            torch.manual_seed(args.seed)
            base = load_base(seed_dir)
            routing = None
            if method == "full":
                model = train_model = base
            elif method == "full-body":
                base.get_input_embeddings().requires_grad_(False)
                base.get_output_embeddings().requires_grad_(False)
                model = train_model = base
            elif method in ("lora", "ia3"):
                kind = "molora" if method == "lora" else "mov"
                model = get_peft_model(base, fresh_expert_config(MixtureSpec(
                    kind, rank=args.rank, target_modules=targets if kind == "molora" else ia3_targets), base))
                train_model = model.get_base_model()
            elif method in DOMAIN_METHODS:
                kind = method.split("-")[0]
                spec = MixtureSpec(kind, rank=args.rank, target_modules=targets if kind == "molora" else ia3_targets)
                t0 = time.perf_counter()
                states, pre_tokens = [], 0
                for d in domains:  # each contributor trains an adapter on its own domain
                    torch.manual_seed(args.seed)
                    b = load_base(seed_dir)
                    single = get_peft_model(b, fresh_expert_config(spec, b))
                    own = mixture_blocks({d: tokenized[d]}, None, args.max_tokens // (2 * len(domains)),
                                         args.seq_len, args.seed)[0]
                    pre_tokens += fit(single.get_base_model(), own, None, TrainSettings(**{
                        **settings.__dict__, "learning_rate": lr, "progress": False,
                        "max_tokens": args.max_tokens // (2 * len(domains))}), work / f"{method}-{d}")["tokens"]
                    states.append(get_peft_model_state_dict(single))
                pre_seconds = time.perf_counter() - t0
                model = build_mixture(base, [fresh_expert_config(spec, base)] * len(domains),
                                      shared_router=args.shared_router)
                for i, state in enumerate(states):
                    set_peft_model_state_dict(model, state, adapter_name=f"expert{i}")
                init_routers(model, *router_input_statistics(model, calibration),
                             assignment=torch.eye(len(domains)), seed=args.seed)
                train_model = model.get_base_model()
            else:
                spec = MixtureSpec(method, rank=args.rank,
                                   target_modules=targets if method == "molora" else ia3_targets)
                model = build_mixture(base, [fresh_expert_config(spec, base)] * args.experts,
                                      shared_router=args.shared_router)
                init_routers(model, *router_input_statistics(model, calibration), seed=args.seed)
                train_model = model.get_base_model()
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            everything = sum(p.numel() for p in model.parameters())  # the share's base, as in the mix's card
            extra = ""
            mixture = method in ("molora", "mov") + DOMAIN_METHODS
            if mixture:
                counts = parameter_counts(model)
                extra = f" (routers {counts['routers']:,})"
            print(f"\n== {row}: {trainable:,} trainable parameters ({100 * trainable / everything:.3f}%)"
                  f"{extra}, lr {lr:g}", flush=True)
            s = TrainSettings(**{**settings.__dict__, "learning_rate": lr})
            if method in DOMAIN_METHODS:  # the other half of the budget went to the domain adapters
                s.max_tokens = args.max_tokens - len(domains) * (args.max_tokens // (2 * len(domains)))
            t0 = time.perf_counter()
            metrics = fit(train_model, train_blocks, None, s, work / row)
            seconds = time.perf_counter() - t0 + (pre_seconds if method in DOMAIN_METHODS else 0.0)
            if mixture:
                model.to(device)
                names = domains if method in DOMAIN_METHODS else [f"e{i}" for i in range(args.experts)]
                rep = evaluate_lightweight(model, valid, names,
                                           batch_size=args.batch_size)
                ppl = rep.perplexity
                routing = {d: [round(float(x), 3) for x in rep.routing[i]] for i, d in enumerate(rep.domains)}
            else:
                ppl = evaluate(model)
            tokens = metrics["tokens"] + (pre_tokens if method in DOMAIN_METHODS else 0)
            rows[row] = {"trainable": trainable, "share": trainable / everything, "ppl": ppl, "seconds": seconds,
                         "lr": lr, "tokens": tokens, "train_loss": metrics.get("train_loss"),
                         "routing": routing}
            print(f"{row}: " + ", ".join(f"{d} {v:.2f}" for d, v in ppl.items()) + f" ({seconds:.0f} s)", flush=True)
            del model, train_model, base
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mean_log(r):
        return sum(math.log(v) for v in r["ppl"].values()) / len(r["ppl"])

    seed_log = mean_log(rows["seed"])
    fulls = [mean_log(r) for name, r in rows.items() if name.split("@")[0] == "full"]
    full_log = min(fulls) if fulls else None  # the best full finetuning when its rate was swept
    print(f"\nseed-s ({total_params:,} parameters), {args.max_tokens:,} training tokens per method "
          f"(seq {args.seq_len}, batch {args.batch_size}), {machine}; MoV/MoLoRA: {args.experts} experts, "
          f"LoRA rank {args.rank}\n")
    head = "| method | trainable | share | mean ppl | " + " | ".join(domains) + " | gap closed | lr | train s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, r in rows.items():
        mean = sum(r["ppl"].values()) / len(r["ppl"])
        gap = (seed_log - mean_log(r)) / (seed_log - full_log) if full_log is not None and full_log < seed_log \
            else float("nan")
        r.update(mean_ppl=mean, gap_closed=gap)
        print(f"| {name} | {r['trainable']:,} | {100 * r['share']:.3f}% | {mean:.2f} | "
              + " | ".join(f"{r['ppl'][d]:.2f}" for d in domains)
              + f" | {'' if name == 'seed' else f'{100 * gap:.0f}%'} | {r.get('lr', '')} | {r['seconds']:.0f} |")
    for name, r in rows.items():
        if r.get("routing"):
            print(f"\n{name} routing (mean merging weight per expert, averaged over routers):")
            for d, w in r["routing"].items():
                print(f"  {d}: " + " ".join(f"{x:.2f}" for x in w))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
