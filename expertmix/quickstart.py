"""``expertmix quickstart``: the whole contributor workflow on a fresh machine, with nothing downloaded.

Stages (each skipped when its output already exists, so an interrupted quickstart resumes):
synthetic domains → tokenizer and tiny seed → seed pretraining → one dense expert per domain →
publish to the local store → a perplexity table of every expert on every domain next to the seed →
a short RLOO alignment of the arithmetic expert on a verifiable reward (correct sums).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from .experts.data import pack, read_documents, tokenize_documents
from .experts.seed import build_seed, train_tokenizer
from .experts.synthetic import write_synthetic_corpus
from .experts.training import DataSource, ExpertTrainConfig, TrainSettings, fit, perplexity, train_expert
from .fsutil import atomic_dir
from .hub.store import Registry


@dataclass
class QuickstartConfig:
    workdir: Path
    seed_steps: int = 300
    expert_steps: int = 150
    seq_len: int = 128
    batch_size: int = 8
    vocab_size: int = 1024
    hidden_size: int = 128
    layers: int = 4
    namespace: str = "quickstart"
    align_steps: int = 80  # 20 left the held-out reward where it was (benchmarks/RESULTS.md, "Quickstart alignment")


def _pretrain_seed(cfg: QuickstartConfig, corpus: dict[str, dict], log) -> Path:
    seed_dir = cfg.workdir / "seed"
    if (seed_dir / "model.safetensors").is_file():
        log(f"seed: reusing {seed_dir}")
        return seed_dir
    texts = [d.text for c in corpus.values() for d in read_documents(c["train"])]
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    with atomic_dir(seed_dir) as tmp:
        build_seed(tmp, tokenizer, arch="llama", hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
                   num_layers=cfg.layers, num_heads=4, num_kv_heads=4)
        model = AutoModelForCausalLM.from_pretrained(tmp)
        # The seed sees a little of every domain, as a shared pretrained seed would.
        docs = [d for c in corpus.values() for d in read_documents(c["train"])[:60]]
        blocks = pack(tokenize_documents(docs, tokenizer), cfg.seq_len)
        log(f"seed: pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama "
            f"for {cfg.seed_steps} steps")
        fit(model, blocks, None, TrainSettings(max_steps=cfg.seed_steps, batch_size=cfg.batch_size,
                                               learning_rate=2e-3, save_steps=10**9), cfg.workdir / "seed-work")
        model.save_pretrained(tmp)
    return seed_dir


def run_quickstart(cfg: QuickstartConfig, registry: Registry, log=print) -> dict:
    """Run every stage; returns the perplexity table ``{model: {domain: ppl}}`` and what was published."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    corpus = write_synthetic_corpus(cfg.workdir / "data")
    seed_dir = _pretrain_seed(cfg, corpus, log)

    published = {}
    for domain, paths in corpus.items():
        out = cfg.workdir / "experts" / domain
        if not out.is_dir():
            log(f"expert {domain}: training for {cfg.expert_steps} steps")
            train_expert(ExpertTrainConfig(
                base=seed_dir, data=[DataSource(domain, paths["train"])], valid=paths["valid"], domain=domain,
                name=f"{cfg.namespace}/{domain}", base_id="quickstart-seed", out=out, seq_len=cfg.seq_len,
                resume=(out.with_name(out.name + ".partial")).is_dir(), embed_sample=32,
                settings=TrainSettings(max_steps=cfg.expert_steps, batch_size=cfg.batch_size, learning_rate=2e-3,
                                       save_steps=50)), log=log)
        entry = registry.publish(out)
        published[domain] = f"{entry.name}@{entry.revision[:12]}"
        log(f"published {published[domain]}")

    tokenizer = AutoTokenizer.from_pretrained(seed_dir)
    valid = {d: pack(tokenize_documents(read_documents(p["valid"]), tokenizer), cfg.seq_len, drop_last=False)
             for d, p in corpus.items()}
    table: dict[str, dict[str, float]] = {}
    for label, path in [("seed", seed_dir)] + [(f"expert:{d}", cfg.workdir / "experts" / d) for d in corpus]:
        model = AutoModelForCausalLM.from_pretrained(path)
        table[label] = {d: perplexity(model, blocks) for d, blocks in valid.items()}
    (cfg.workdir / "perplexity.json").write_text(json.dumps(table, indent=2))

    alignment = None
    if cfg.align_steps > 0:
        from .alignment.align import align_quickstart_stage

        log(f"align: RLOO on arithmetic correctness for {cfg.align_steps} steps")
        summary = align_quickstart_stage(cfg.workdir / "experts" / "arithmetic", cfg.workdir, steps=cfg.align_steps,
                                         log=log)
        alignment = {"reward_before": summary["eval_before"]["reward"],
                     "reward_after": summary["eval_after"]["reward"], "kl": summary["eval_after"]["kl"]}
    return {"table": table, "published": published, "workdir": str(cfg.workdir), "alignment": alignment}
