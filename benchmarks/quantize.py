"""Quantization and ONNX export of a Nexus mix of ``seed-s``: damage per language, CPU speed, sizes on disk.

Builds (or takes with ``--mix``) a Nexus mix from ``../shared/seeds/seed-s``: dense experts for ``--experts``
(small budgets), published to a local store and assembled with a trained router. Then:

- torch weight-only int8 and int4 (group 128) of every linear layer and the fused experts (``quantize_mix``);
- an ONNX export (sparse routing) with onnxruntime int8 (``quantize_dynamic``) and 4-bit (MatMulNBits) graphs;
- bits per byte of every variant against the float mix on the valid split of every language in
  ``../shared/corpus`` (at most ``--max-bytes`` per language), with KL per token and top-1 flip rates, per
  language and per script group, and the issue's targets (int8 <= 1%, int4 <= 5% for every language);
- greedy decoding tokens/s of torch fp32, torch int8, onnxruntime fp32 and onnxruntime int8 (and the int4s),
  measured in interleaved rounds in one process with the same thread count;
- model sizes on disk.

Every stage's output is kept under ``--out`` and reused on a rerun (``--fresh`` rebuilds the variants).

    python benchmarks/quantize.py --shared ../shared            # CPU, about 10-15 minutes on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LANGUAGES = ("code", "en", "de", "fr", "es", "it", "pl", "ja", "ru", "zh")
TARGETS = {"torch int8": 0.01, "torch int4": 0.05, "ort int8": 0.01, "ort int4": 0.05}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--out", type=Path, default=REPO / "bench-out" / "quantize")
    p.add_argument("--mix", type=Path, default=None, help="use this mix instead of building one")
    p.add_argument("--experts", default="code,de,ja,ru", help="domains of the experts to build the mix from")
    p.add_argument("--expert-steps", type=int, default=20)
    p.add_argument("--moe-steps", type=int, default=20, help="router training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length")
    p.add_argument("--window", type=int, default=256, help="evaluation window (tokens)")
    p.add_argument("--max-bytes", type=int, default=12000, help="valid-split bytes per language (0: all)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group / MatMulNBits block size")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    p.add_argument("--fresh", action="store_true", help="rebuild the quantized and exported variants")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    unknown = [d for d in (x.strip() for x in args.experts.split(",")) if d and d not in LANGUAGES]
    if unknown:
        p.error(f"--experts: unknown domain(s) {', '.join(unknown)}; the corpus has {', '.join(LANGUAGES)}")
    return args


def build_mix(args, out: Path, log) -> Path:
    """Dense experts (small budgets) published to a local store, assembled into a Nexus mix (router trained)."""
    from expertmix.assembler.assemble import AssembleConfig, assemble
    from expertmix.experts.training import DataSource, ExpertTrainConfig, TrainSettings, train_expert
    from expertmix.hub.store import LocalStore

    seed, corpus = args.shared / "seeds" / "seed-s", args.shared / "corpus"
    domains = [d.strip() for d in args.experts.split(",") if d.strip()]
    store = LocalStore(out / "store")

    def settings(steps: int, lr: float) -> TrainSettings:
        return TrainSettings(max_steps=steps, batch_size=args.batch_size, learning_rate=lr, warmup_ratio=0.1,
                             save_steps=0, logging_steps=max(1, steps // 2), progress=False)

    refs = []
    for d in domains:
        folder = out / "experts" / d
        if not folder.is_dir():
            log(f"training the {d} expert: {args.expert_steps} steps of {args.batch_size} x {args.seq_len}")
            small_valid = out / "valid-small" / f"{d}.jsonl"
            small_valid.parent.mkdir(parents=True, exist_ok=True)
            lines = (corpus / f"{d}.valid.jsonl").read_text(encoding="utf-8").splitlines()[:4]
            small_valid.write_text("\n".join(lines) + "\n", encoding="utf-8")
            train_expert(ExpertTrainConfig(
                base=seed, data=[DataSource(d, corpus / f"{d}.train.jsonl")], valid=small_valid, domain=d,
                name=f"bench/{d}", base_id="seed-s", out=folder, seq_len=args.seq_len, embedder="seed",
                embed_sample=16, settings=settings(args.expert_steps, 5e-4)), log=log)
        entry = store.publish(folder)
        refs.append(f"{entry.name}@{entry.revision}")
    mix = out / "mix"
    if not mix.is_dir():
        log(f"assembling a Nexus mix of {', '.join(domains)}: {args.moe_steps} router steps")
        assemble(AssembleConfig(seed=seed, experts=refs, data=[DataSource(d, corpus / f"{d}.train.jsonl")
                                                               for d in domains],
                                out=mix, router="nexus", registry=str(out / "store"), seed_id="seed-s",
                                seq_len=args.seq_len, resume=mix.with_name("mix.partial").is_dir(),
                                settings=settings(args.moe_steps, 1e-3)), log=log)
    return mix


def decode_speed(generate, prompt, n_new: int) -> float:
    t = time.perf_counter()
    produced = generate(prompt, n_new)
    return produced / (time.perf_counter() - t)


def main() -> None:
    args = parse_args()
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark: the Trainer must not pick a GPU
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from expertmix.assembler.evaluation import (
        LATIN,
        NON_LATIN,
        OrtScorer,
        TorchScorer,
        compare_models,
        prepare_documents,
    )
    from expertmix.assembler.onnx_export import OnnxCausalLM, OnnxExportSettings, export_onnx
    from expertmix.assembler.quantization import QuantSpec, load_quantized, quantize_mix, weights_bytes
    from expertmix.experts.training import DataSource

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def log(msg: str) -> None:
        print(f"  {msg}", flush=True)

    t = time.time()
    mix = args.mix or build_mix(args, out, log)
    timings["build mix"] = time.time() - t

    # -- variants -----------------------------------------------------------------------------------
    variants = {"torch int8": out / "mix-int8", "torch int4": out / "mix-int4", "onnx": out / "onnx"}
    if args.fresh:
        for folder in variants.values():
            shutil.rmtree(folder, ignore_errors=True)
    for scheme in ("int8", "int4"):
        folder = variants[f"torch {scheme}"]
        if not folder.is_dir():
            t = time.time()
            quantize_mix(mix, folder, QuantSpec(scheme, group_size=args.group_size), log=log)
            timings[f"quantize torch {scheme}"] = time.time() - t
    if not variants["onnx"].is_dir():
        t = time.time()
        export_onnx(mix, variants["onnx"], OnnxExportSettings(quantize=("int8", "int4"), block_size=args.group_size),
                    log=log)
        timings["export onnx + ort quantization"] = time.time() - t

    onnx_dir = variants["onnx"]
    manifest = json.loads((onnx_dir / "onnx_export.json").read_text())
    sizes = {"torch fp32": weights_bytes(mix), "torch int8": weights_bytes(variants["torch int8"]),
             "torch int4": weights_bytes(variants["torch int4"])}
    for v, name in manifest["files"].items():
        sizes[f"ort {v}"] = sum(p.stat().st_size for p in (onnx_dir / name, onnx_dir / (name + ".data"))
                                if p.is_file())

    # -- quality --------------------------------------------------------------------------------------
    fp32 = AutoModelForCausalLM.from_pretrained(mix, dtype=torch.float32).eval()
    torch_models = {"torch fp32": fp32, "torch int8": load_quantized(variants["torch int8"]),
                    "torch int4": load_quantized(variants["torch int4"])}
    ort_models = {f"ort {v}": OnnxCausalLM(onnx_dir, v, threads=args.threads) for v in ("fp32", "int8", "int4")}
    scorers = {**{k: TorchScorer(m) for k, m in torch_models.items()},
               **{k: OrtScorer(m) for k, m in ort_models.items()}}
    tokenizer = AutoTokenizer.from_pretrained(mix)
    sources = [DataSource(lang, args.shared / "corpus" / f"{lang}.valid.jsonl") for lang in LANGUAGES]
    docs = prepare_documents(sources, tokenizer, max_bytes=args.max_bytes or None)
    print(f"scoring {len(docs)} documents, {sum(len(d.targets) for d in docs)} tokens, "
          f"{sum(d.n_bytes for d in docs)} bytes with {len(scorers)} models", flush=True)
    t = time.time()
    forward_seconds: dict[str, float] = {}
    report = compare_models(scorers, docs, reference="torch fp32", window=args.window, batch_tokens=2048,
                            pad_id=tokenizer.pad_token_id or 0, progress=False, timings=forward_seconds)
    timings["quality"] = time.time() - t
    report.save_json(out / "quality.json")
    report.save_chart(out / "quality.png", title="seed-s Nexus mix: bits-per-byte change vs float32")

    # -- speed ----------------------------------------------------------------------------------------
    prompt_text = (args.shared / "corpus" / "en.valid.jsonl").read_text(encoding="utf-8").splitlines()[0]
    prompt_ids = tokenizer(json.loads(prompt_text)["text"], add_special_tokens=False)["input_ids"][:args.prompt_tokens]
    prompt = torch.tensor([prompt_ids])

    def torch_gen(model):
        def run(p, n):
            with torch.no_grad():
                g = model.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
            return g.shape[1] - p.shape[1]
        return run

    def ort_gen(model):
        def run(p, n):
            return model.generate(p.numpy(), max_new_tokens=n, eos_token_id=-1).shape[1] - p.shape[1]
        return run

    speed_runs = {**{k: torch_gen(m) for k, m in torch_models.items()},
                  **{k: ort_gen(m) for k, m in ort_models.items()}}
    for run in speed_runs.values():  # warm-up
        run(prompt, 4)
    speeds: dict[str, list[float]] = {k: [] for k in speed_runs}
    t = time.time()
    for _ in range(args.rounds):
        for k, run in speed_runs.items():
            speeds[k].append(decode_speed(run, prompt, args.gen_tokens))
    timings["speed"] = time.time() - t
    speed = {k: statistics.median(v) for k, v in speeds.items()}

    # -- report ---------------------------------------------------------------------------------------
    cands = report.candidates
    langs = sorted((g for g in report.groups if g.kind == "language"), key=lambda g: (g.script != LATIN, g.name))
    print(f"\nmix: {mix}; machine: CPU, {os.cpu_count()} cores, {args.threads} thread(s) for torch and onnxruntime")
    print(f"evaluation: valid split of each language, <= {args.max_bytes} bytes each, windows of {args.window}")
    print("\nbits per byte (float32) and relative change per variant (%, 95% bootstrap interval over windows)\n")
    print("| language | script | bytes | bpb fp32 | " + " | ".join(f"{c} Δ%" for c in cands) + " |")
    print("|---|---|---|---|" + "---|" * len(cands))
    script_rows = [report.group(s, "script") for s in (LATIN, NON_LATIN)]
    for g in [*langs, *script_rows, report.group("all")]:
        cells = [f"{100 * g.relative_change[c]:+.2f} [{100 * g.ci95[c][0]:+.2f}, {100 * g.ci95[c][1]:+.2f}]"
                 for c in cands]
        print(f"| {g.name} | {g.script} | {g.bytes} | {g.bpb['torch fp32']:.4f} | " + " | ".join(cells) + " |")
    print("\nKL per token (nats) and top-1 flip rate (%) per script group\n")
    print("| group | " + " | ".join(f"{c} KL | {c} flip%" for c in cands) + " |")
    print("|---|" + "---|---|" * len(cands))
    for g in [*script_rows, report.group("all")]:
        print(f"| {g.name} | " + " | ".join(f"{g.kl_per_token[c]:.5f} | {100 * g.top1_flip_rate[c]:.2f}"
                                             for c in cands) + " |")
    print("\ntargets (every language)")
    verdicts = {}
    for c, limit in TARGETS.items():
        worst = max(langs, key=lambda g: abs(g.relative_change[c]))
        verdicts[c] = abs(worst.relative_change[c]) <= limit
        print(f"  {c}: worst {worst.name} {100 * worst.relative_change[c]:+.2f}% (limit {100 * limit:.0f}%): "
              f"{'met' if verdicts[c] else 'NOT met'}")
    ratio = speed["ort int8"] / speed["torch fp32"]
    print(f"  onnxruntime int8 vs torch fp32 decoding: {ratio:.2f}x (target 1.5x): "
          f"{'met' if ratio >= 1.5 else 'NOT met'}")
    print(f"\ngreedy decoding, batch 1, {args.prompt_tokens}-token prompt, {args.gen_tokens} new tokens, median of "
          f"{args.rounds} interleaved rounds\n")
    print("| variant | tokens/s | vs torch fp32 | size on disk (MB) | scoring forward (s) |")
    print("|---|---|---|---|---|")
    for k in speed_runs:
        print(f"| {k} | {speed[k]:.1f} | {speed[k] / speed['torch fp32']:.2f}x | {sizes[k] / 1e6:.1f} | "
              f"{forward_seconds.get(k, 0):.1f} |")
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    results = {"mix": str(mix), "threads": args.threads, "max_bytes": args.max_bytes, "window": args.window,
               "quality": report.to_dict(), "speed_tokens_per_s": speed, "speed_rounds": speeds, "sizes": sizes,
               "targets_met": {**verdicts, "ort int8 >= 1.5x torch fp32": ratio >= 1.5},
               "forward_seconds": forward_seconds, "timings": timings}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(f"\nreport: {out / 'quality.json'}, chart: {out / 'quality.png'}, results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
