"""Train a dense German expert from seed-s for a fixed token budget; print tokens/s and perplexities.

    python benchmarks/train_expert.py --shared ../shared [--max-tokens 500000] [--device cpu|cuda]

Runs the real ``expertmix train`` code path (``train_expert``) and reads its card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from expertmix.experts.training import DataSource, ExpertTrainConfig, TrainSettings, train_expert
from expertmix.hub.card import read_card

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--domain", default="de")
    ap.add_argument("--max-tokens", type=int, default=500_000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    args = ap.parse_args()

    seed = args.shared / "seeds" / "seed-s"
    corpus = args.shared / "corpus"
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        t0 = time.perf_counter()
        out = train_expert(ExpertTrainConfig(
            base=seed, base_id="seed-s", data=[DataSource(args.domain, corpus / f"{args.domain}.train.jsonl")],
            valid=corpus / f"{args.domain}.valid.jsonl", domain=args.domain, out=work / "expert",
            seq_len=args.seq_len,
            settings=TrainSettings(max_tokens=args.max_tokens, batch_size=args.batch_size, learning_rate=args.lr,
                                   save_steps=10**9, logging_steps=50)), log=lambda m: print(m, flush=True))
        wall = time.perf_counter() - t0
        e = read_card(out).expert
        import torch

        threads = torch.get_num_threads()
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({threads} threads)"
        row = {"device": device, "domain": args.domain, "tokens": e.training["tokens"], "steps": e.training["steps"],
               "train_seconds": e.training["runtime_seconds"],
               "tokens_per_second": e.training["tokens"] / e.training["runtime_seconds"],
               "seed_valid_ppl": e.metrics["valid_perplexity_before"],
               "expert_valid_ppl": e.metrics["valid_perplexity_after"], "wall_seconds_total": wall}
        print(f"\n| device | tokens | steps | tokens/s | seed ppl ({args.domain} valid) | expert ppl | total wall s |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {device} | {row['tokens']:,} | {row['steps']} | {row['tokens_per_second']:,.0f} | "
              f"{row['seed_valid_ppl']:.2f} | {row['expert_valid_ppl']:.2f} | {wall:.0f} |")
        if args.json:
            args.json.write_text(json.dumps(row, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
