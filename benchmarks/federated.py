"""Federated vs central expert training on German, from seed-s, with the same total training tokens.

    python benchmarks/federated.py --shared ../shared [--tokens 100000] [--rounds 16] [--seeds 0,1,2]
        [--kinds dense,lora] [--in-process]

``de.train`` is shuffled and split into three shards of different sizes (``--shares``), one per node. The
federated experts run through ``expertmix federate``'s code path (a local SuperLink, three SuperNode
processes, ``flwr run``; FedAvg weighted by the examples each node trained on). The central experts train on
all of ``de.train`` with ``experts.training.fit`` for as many tokens as all nodes together, with the same global
batch (``--batch-size``; the nodes split it by their data, ``--node-batch-size`` being their mean) and so the
same number of sequential optimizer steps and the same warm-up + cosine schedule. Everything is evaluated
on ``de.valid``. Prints validation perplexity of both, the relative gap (target: federated within 5%), and
the bytes sent per round (coordinator to nodes, nodes to coordinator) for dense vs LoRA.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from expertmix.client.settings import FederationConfig
from expertmix.experts.data import pack, read_documents, tokenize_documents
from expertmix.experts.training import TrainSettings, fit, peft_wrap, perplexity
from expertmix.server.local_federation import LocalFederation, LocalNode, run_local_federation

ROOT = Path(__file__).resolve().parent.parent


def write_shards(train: Path, shares: list[float], out: Path, seed: int) -> dict[str, Path]:
    """Shuffle the training documents and cut them into disjoint shards of the given shares."""
    lines = [line for line in train.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(lines)
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + round(share / sum(shares) * len(lines)))
    bounds[-1] = len(lines)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    names = [f"node-{chr(ord('a') + i)}" for i in range(len(shares))]
    for name, a, b in zip(names, bounds[:-1], bounds[1:], strict=True):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("\n".join(lines[a:b]) + "\n", encoding="utf-8")
    return paths


def valid_ppl(model, tokenizer, valid: Path, seq_len: int, batch_size: int) -> float:
    blocks = pack(tokenize_documents(read_documents(valid), tokenizer), seq_len, drop_last=False)
    return perplexity(model, blocks, batch_size)


def central(args, seed: Path, valid: Path, kind: str, steps: int, work: Path, label: str = "central") -> dict:
    """All of de.train on one machine for ``steps`` optimizer steps (the federation's total tokens, or, as a
    reference, its number of sequential steps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(seed)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32)
    if kind != "dense":
        model = peft_wrap(model, kind, args.lora_r, 2 * args.lora_r)
    blocks = pack(tokenize_documents(read_documents(args.shared / "corpus" / "de.train.jsonl"), tok), args.seq_len)
    t0 = time.perf_counter()
    settings = TrainSettings(max_steps=steps, batch_size=args.batch_size, learning_rate=args.central_lr or args.lr,
                             warmup_ratio=args.warmup, lr_scheduler="cosine" if args.lr_schedule == "cosine"
                             else "constant_with_warmup", save_steps=0, logging_steps=max(1, steps // 5),
                             seed=args.seed)
    out = fit(model, blocks, None, settings, work / f"{label}-{kind}")
    return {"run": label, "kind": kind, "tokens": out["tokens"], "sequential_steps": steps,
            "valid_ppl": valid_ppl(model, tok, valid, args.seq_len, args.batch_size),
            "wall_s": time.perf_counter() - t0, "bytes_to_nodes": None, "bytes_from_nodes": None}


def payload(seed: Path, kind: str, lora_r: int, seed_value: int) -> dict:
    """What one transfer of the global state costs for an expert kind, by the code the coordinator uses."""
    from flwr.app import ArrayRecord
    from transformers import AutoModelForCausalLM

    from expertmix.client.weights import state_bytes, travelling_state

    torch.manual_seed(seed_value)
    model = AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32)
    if kind != "dense":
        model = peft_wrap(model, kind, lora_r, 2 * lora_r)
    state = travelling_state(model)
    return {"kind": kind, "tensors": len(state), "parameters": sum(v.numel() for v in state.values()),
            "payload_bytes": state_bytes(state), "record_bytes": ArrayRecord(state).count_bytes()}


def federated(args, seed: Path, valid: Path, kind: str, shards: dict[str, Path], local_steps: int,
              work: Path) -> dict:
    """The same budget over three nodes with Flower; the published-style expert is read back and evaluated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = FederationConfig(base=str(seed), base_id="seed-s", domain="de", name=f"de-federated-{kind}",
                           work_dir=str(work / f"fed-{kind}"), kind=kind, rounds=args.rounds, local_steps=local_steps,
                           batch_size=args.node_batch_size, batch_split=args.batch_split, seq_len=args.seq_len,
                           lr=args.lr, lr_schedule=args.lr_schedule, warmup=args.warmup,
                           keep_optimizer=args.keep_optimizer,
                           local_warmup=args.local_warmup,
                           min_nodes=len(shards), lora_r=args.lora_r, seed=args.seed,
                           strategy=args.strategy, proximal_mu=args.proximal_mu, server_lr=args.server_lr,
                           server_momentum=args.server_momentum, publish=False)
    nodes = [LocalNode(name=n, data=p) for n, p in shards.items()]  # each holds out its own validation share
    t0 = time.perf_counter()
    result = run_local_federation(LocalFederation(cfg, nodes, threads_per_node=args.threads_per_node),
                                  log=lambda m: print(m, flush=True))
    wall = time.perf_counter() - t0
    state = json.loads((Path(cfg.work_dir) / "state.json").read_text())
    tok = AutoTokenizer.from_pretrained(seed)
    if kind == "dense":
        model = AutoModelForCausalLM.from_pretrained(result["expert"], dtype=torch.float32)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32),
                                          result["expert"])
    history = state["history"]
    tokens = sum(int(r["train_tokens"]) for h in history for r in h["nodes"])
    return {"run": "federated", "kind": kind, "tokens": tokens, "sequential_steps": args.rounds * local_steps,
            "valid_ppl": valid_ppl(model, tok, valid, args.seq_len, args.batch_size), "wall_s": wall,
            "bytes_to_nodes": sum(h["bytes_to_nodes"] for h in history) / len(history),
            "bytes_from_nodes": sum(h["bytes_from_nodes"] for h in history) / len(history),
            "round_seconds": [round(h["seconds"], 1) for h in history]}


def federated_in_process(args, seed: Path, valid: Path, kind: str, shards: dict[str, Path], local_steps: int,
                         work: Path) -> dict:
    """The same rounds without Flower: each node's real training code (``client.node.Node.train_round``) in this
    process, FedAvg weighted like the ServerApp's. Minutes instead of a quarter hour, for trying settings."""
    from transformers import AutoTokenizer

    from expertmix.client.node import Node
    from expertmix.client.settings import NodeConfig
    from expertmix.client.weights import travelling_state

    cfg = FederationConfig(base=str(seed), domain="de", work_dir=str(work / f"fed-{kind}"), kind=kind,
                           rounds=args.rounds, local_steps=local_steps, batch_size=args.node_batch_size,
                           batch_split=args.batch_split, seq_len=args.seq_len, lr=args.lr,
                           lr_schedule=args.lr_schedule, warmup=args.warmup,
                           keep_optimizer=args.keep_optimizer, local_warmup=args.local_warmup, lora_r=args.lora_r,
                           seed=args.seed, publish=False)
    nodes = [Node(cfg, NodeConfig(data=str(p), name=n, cache_dir=str(work / "node-cache")), i)
             for i, (n, p) in enumerate(shards.items())]
    batches = cfg.node_batches({node.label: node.data().tokens for node in nodes})  # as the coordinator splits
    state, tokens, t0 = travelling_state(nodes[0].model()), 0, time.perf_counter()
    momentum: dict[str, torch.Tensor] = {}
    for rnd in range(1, cfg.rounds + 1):
        results = [node.train_round(state, rnd, federation_id=f"bench-{kind}-{args.seed}",
                                    batch_size=batches[node.label]) for node in nodes]
        weights = [r.metrics["num-examples"] for r in results]
        mean = {k: sum(w / sum(weights) * r.state[k] for w, r in zip(weights, results, strict=True)) for k in state}
        if args.strategy == "fedavgm":  # as Flower's FedAvgM: a server step on the averaged update
            for k in state:
                momentum[k] = args.server_momentum * momentum.get(k, 0) + (state[k] - mean[k])
            mean = {k: state[k] - args.server_lr * momentum[k] for k in state}
        state = mean
        tokens += sum(int(r.metrics["train-tokens"]) for r in results)
    return {"run": "federated (in process)", "kind": kind, "tokens": tokens,
            "sequential_steps": args.rounds * local_steps,
            "valid_ppl": valid_ppl(nodes[0].model(state), AutoTokenizer.from_pretrained(seed), valid, args.seq_len,
                                   args.batch_size),
            "wall_s": time.perf_counter() - t0, "bytes_to_nodes": None, "bytes_from_nodes": None}


def _mb(b: float | None) -> str:
    return "-" if b is None else f"{b / 1e6:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--tokens", type=int, default=100_000, help="Total training tokens of each run.")
    ap.add_argument("--rounds", type=int, default=16, help="Rounds (local steps = the budget split over them).")
    ap.add_argument("--shares", default="0.5,0.3,0.2", help="Shard sizes, one per node.")
    ap.add_argument("--kinds", default="dense", help="Expert kinds to train both ways (dense,lora on a GPU); "
                    "the bytes per round of dense and LoRA are reported either way.")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=6, help="Central batch = the federation's global batch.")
    ap.add_argument("--node-batch-size", type=int, default=None,
                    help="Each node's batch per step (default: --batch-size / nodes, the same global batch).")
    ap.add_argument("--lr", type=float, default=5e-4, help="Federated learning rate (peak of the schedule).")
    ap.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--warmup", type=float, default=0.1, help="Warm-up share of all steps (both runs).")
    ap.add_argument("--fresh-optimizer", dest="keep_optimizer", action="store_false",
                    help="Nodes restart AdamW every round instead of keeping their moments.")
    ap.add_argument("--local-warmup", type=float, default=0.0, help="Warm-up share of each round's local steps.")
    ap.add_argument("--central-lr", type=float, default=None, help="Central learning rate (default: --lr).")
    ap.add_argument("--strategy", choices=["fedavg", "fedprox", "fedavgm"], default="fedavg")
    ap.add_argument("--proximal-mu", type=float, default=0.01)
    ap.add_argument("--server-lr", type=float, default=1.0, help="fedavgm: server step size.")
    ap.add_argument("--server-momentum", type=float, default=0.0, help="fedavgm: server momentum.")
    ap.add_argument("--batch-split", choices=["by-data", "equal"], default="by-data",
                    help="Split the global batch over the nodes by their data, or give each --node-batch-size.")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads-per-node", type=int, default=1)
    ap.add_argument("--in-process", action="store_true", help="Run the nodes' training in this process without "
                    "Flower (same node code and weighting; no bytes measured): quick for trying settings.")
    ap.add_argument("--seeds", default="0,1,2", help="Training seeds; both runs are repeated for each and the "
                    "means compared (one run's data order moves perplexity by a few percent).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    ap.add_argument("--work", type=Path, default=None, help="Keep the runs (logs, experts) here (default: a "
                    "temporary folder, removed).")
    args = ap.parse_args()

    seed, valid = args.shared / "seeds" / "seed-s", args.shared / "corpus" / "de.valid.jsonl"
    shares = [float(x) for x in args.shares.split(",")]
    n_nodes = len(shares)
    args.node_batch_size = args.node_batch_size or max(1, args.batch_size // n_nodes)
    per_step = args.node_batch_size * args.seq_len
    local_steps = max(1, round(args.tokens / (args.rounds * n_nodes * per_step)))
    fed_tokens = args.rounds * n_nodes * local_steps * per_step
    central_steps = max(1, round(fed_tokens / (args.batch_size * args.seq_len)))  # the same number of tokens
    seeds = [int(x) for x in args.seeds.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-federated-"))
    rows = []
    try:
        shards = write_shards(args.shared / "corpus" / "de.train.jsonl", shares, work / "shards", seeds[0])
        from transformers import AutoModelForCausalLM, AutoTokenizer

        seed_ppl = valid_ppl(AutoModelForCausalLM.from_pretrained(seed, dtype=torch.float32),
                             AutoTokenizer.from_pretrained(seed), valid, args.seq_len, args.batch_size)
        payloads = [payload(seed, kind, args.lora_r, seeds[0]) for kind in ("dense", "lora")]
        for kind in args.kinds.split(","):
            for s in seeds:  # training seeds (data order, adapter init); the shards stay the same
                run_args, run_work = argparse.Namespace(**{**vars(args), "seed": s}), work / f"seed-{s}"
                rows.append({**central(run_args, seed, valid, kind, central_steps, run_work), "seed": s})
                print(json.dumps(rows[-1]), flush=True)
                run = federated_in_process if args.in_process else federated
                rows.append({**run(run_args, seed, valid, kind, shards, local_steps, run_work), "seed": s})
                print(json.dumps(rows[-1]), flush=True)
                if central_steps != args.rounds * local_steps:
                    rows.append({**central(run_args, seed, valid, kind, args.rounds * local_steps, run_work,
                                           label="central, same sequential steps"), "seed": s})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nseed-s on de.valid: perplexity {seed_ppl:.2f}; {args.rounds} rounds x {local_steps} local steps x "
          f"{n_nodes} nodes (shares {args.shares}, node batch {args.node_batch_size}, "
          f"{'kept' if args.keep_optimizer else 'fresh'} AdamW) vs {central_steps} central steps (batch "
          f"{args.batch_size}); seq {args.seq_len}, lr {args.lr} ({args.lr_schedule}, warm-up {args.warmup}), "
          f"central lr {args.central_lr or args.lr}")
    print("\n| run | kind | seed | tokens | sequential steps | de.valid ppl | vs central | MB to nodes / round | "
          "MB from nodes / round | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    central_ppl = {(r["kind"], r["seed"]): r["valid_ppl"] for r in rows if r["run"] == "central"}
    for r in rows:
        gap = (r["valid_ppl"] / central_ppl[r["kind"], r["seed"]] - 1) * 100
        print(f"| {r['run']} | {r['kind']} | {r['seed']} | {r['tokens']:,} | {r['sequential_steps']} | "
              f"{r['valid_ppl']:.2f} | {gap:+.1f}% | {_mb(r['bytes_to_nodes'])} | {_mb(r['bytes_from_nodes'])} | "
              f"{r['wall_s']:.0f} |")
    print(f"\nMean over seeds {args.seeds} (the target: federated within 5% of central):\n")
    print("| run | kind | de.valid ppl, mean | min – max | vs central |")
    print("|---|---|---|---|---|")
    means = {}
    for (run, kind) in dict.fromkeys((r["run"], r["kind"]) for r in rows):
        ppl = [r["valid_ppl"] for r in rows if (r["run"], r["kind"]) == (run, kind)]
        means[run, kind] = sum(ppl) / len(ppl)
        gap = (means[run, kind] / means["central", kind] - 1) * 100
        print(f"| {run} | {kind} | {means[run, kind]:.2f} | {min(ppl):.2f} – {max(ppl):.2f} | {gap:+.1f}% |")
    measured = {r["kind"]: r["bytes_from_nodes"] for r in rows if r["run"] == "federated"}
    print(f"\n| kind | tensors sent | parameters sent | MB per transfer | MB per round ({n_nodes} nodes, each way) "
          "| measured in the run above |")
    print("|---|---|---|---|---|---|")
    for pl in payloads:
        per_round = pl["record_bytes"] * n_nodes
        seen = measured.get(pl["kind"])
        print(f"| {pl['kind']} | {pl['tensors']} | {pl['parameters']:,} | {pl['record_bytes'] / 1e6:.3f} | "
              f"{per_round / 1e6:.3f} | {'-' if seen is None else f'{seen / 1e6:.3f}'} |")
    if args.json:
        args.json.write_text(json.dumps({"seed_ppl": seed_ppl, "rows": rows, "payloads": payloads,
                                         "args": vars(args)}, indent=2, default=str))


if __name__ == "__main__":
    main()
