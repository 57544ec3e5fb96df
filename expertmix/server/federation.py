"""The Flower ``ServerApp`` of a federated expert: FedAvg or FedProx over the nodes' updates, weighted
validation metrics per round, a checkpoint after every round, and at the end an expert repo (same layout and
card as ``expertmix train``, plus a ``federation`` block) published to the configured registry.

The rounds use the strategy's own ``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` /
``aggregate_evaluate``; the loop around them is written here rather than taken from ``Strategy.start``
because ``start`` always begins at round 1 and cannot resume from a checkpoint, and because the coordinator
also records each node's reply (losses, sizes, its summary) before aggregation.
"""

from __future__ import annotations

import math
import re
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import MessageType, log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)

from ..checkpoints import require_float_weights
from ..client.settings import FederationConfig, node_title
from ..client.weights import load_travelling_state, travelling_state
from ..errors import ExpertmixError
from ..hub.card import DataInfo, EmbeddingInfo, ExpertCard, ExpertInfo
from ..hub.fingerprint import model_signature
from ..hub.repo import validate_name
from .federation_state import FederationRecord, FederationStore

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls on the coordinator (``flwr run``)."""
    cfg = FederationConfig.from_run_config(dict(context.run_config))
    try:
        run_federation(grid, cfg)
    except ExpertmixError as exc:  # the coordinator (local mode) shows it as one line instead of Flower's dump
        FederationStore(cfg.work_dir).record_failure(str(exc))
        raise


def build_strategy(cfg: FederationConfig) -> Strategy:
    """FedAvg, FedProx or FedAvgM (server step size and momentum) with the configured sampling; wrapped for
    central DP when ``dp-clip`` is set."""
    common = dict(fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate,
                  min_train_nodes=cfg.min_nodes, min_evaluate_nodes=cfg.min_nodes, min_available_nodes=cfg.min_nodes)
    strategy: Strategy
    if cfg.strategy == "fedprox":
        strategy = FedProx(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.strategy == "fedavgm":
        strategy = FedAvgM(server_learning_rate=cfg.server_lr, server_momentum=cfg.server_momentum, **common)
    else:
        strategy = FedAvg(**common)
    if cfg.dp_clip > 0:
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=cfg.dp_noise,
                                                              clipping_norm=cfg.dp_clip,
                                                              num_sampled_clients=cfg.min_nodes)
    return strategy


def _seed_model(cfg: FederationConfig):
    """The seed in float32, wrapped like the nodes wrap it (same adapter initialisation from the same seed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..experts.training import peft_wrap

    require_float_weights(cfg.base, "federated training")
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(Path(cfg.base).resolve(), dtype=torch.float32)  # see train
    if cfg.kind != "dense":
        model = peft_wrap(model, cfg.kind, cfg.lora_r, 2 * cfg.lora_r)
    return model, AutoTokenizer.from_pretrained(cfg.base)


_FLOWER_REASON = re.compile(r"^<class '(?:[\w.]+\.)?(\w+)'>:<(['\"])(.*)\2>$", re.DOTALL)


def _reason(reason: str) -> str:
    """A node's error as its message: Flower reports ``<class 'pkg.Error'>:<'message'>``."""
    match = _FLOWER_REASON.match(reason)
    if match is None:
        return reason
    kind, text = match.group(1), match.group(3)
    return text if kind == ExpertmixError.__name__ else f"{kind}: {text}"


def _errors(messages: list[Message], replies: list[Message], labels: dict[int, str]) -> list[str]:
    """One line per failed or missing reply, naming the node the message went to."""
    def title(node: int) -> str:
        return node_title(labels.get(node, f"node-{node}"))

    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    out = []
    for m in replies:
        if m.has_error():
            text = _reason(m.error.reason)  # a node names itself first (see the ClientApp)
            out.append(text if text.startswith("node") else
                       f"{title(dst.get(m.metadata.reply_to_message_id, m.metadata.src_node_id))}: {text}")
    replied = {m.metadata.reply_to_message_id for m in replies}
    out += [f"{title(n)}: no reply in time" for mid, n in dst.items() if mid not in replied]
    return out


def _node_rows(replies: list[Message]) -> tuple[list[dict], dict[str, dict]]:
    """Per-node metrics of a round's train replies and the summaries the nodes sent."""
    rows, summaries = [], {}
    for m in replies:
        if m.has_error():
            continue
        metrics = dict(next(iter(m.content.metric_records.values())))
        summary = dict(m.content["node"]) if "node" in m.content.config_records else {}
        label = str(summary.get("name") or f"node-{m.metadata.src_node_id}")
        arrays = next(iter(m.content.array_records.values()))
        rows.append({"name": label, "node_id": int(m.metadata.src_node_id), "bytes": int(arrays.count_bytes()),
                     **{k.replace("-", "_"): v for k, v in metrics.items()}})
        if summary:
            summaries[label] = summary
    return rows, summaries


def _with_batches(messages: list[Message], cfg: FederationConfig, grid: Grid, record: FederationRecord,
                  labels: dict[int, str]) -> list[Message]:
    """The round's train messages, each with its node's ``batch-size``: the global batch split over the sampled
    nodes by their training tokens (``cfg.node_batches``). Nodes the coordinator has no summary of yet (the first
    round, a node that joined, a restarted coordinator) are asked for one first (a query message: counts and
    the domain embedding, no text); one that does not answer takes the default batch and is dealt with in the
    round itself."""
    def size(node_id: int) -> int | None:
        return record.nodes.get(labels.get(node_id, ""), {}).get("tokens")

    dst = [m.metadata.dst_node_id for m in messages]
    if cfg.batch_split == "by-data" and (unknown := [n for n in dst if size(n) is None]):
        queries = [Message(content=RecordDict({"config": ConfigRecord({"server-round": 0})}), dst_node_id=n,
                           message_type=MessageType.QUERY) for n in unknown]
        replies = list(grid.send_and_receive(queries, timeout=cfg.round_timeout))
        for m in replies:
            if not m.has_error() and "node" in m.content.config_records:
                summary = dict(m.content["node"])
                label = str(summary.get("name") or f"node-{m.metadata.src_node_id}")
                record.nodes[label], labels[int(m.metadata.src_node_id)] = summary, label
        for e in _errors(queries, replies, labels):
            log(WARNING, "asking for the node's data size: %s", e)
    batches = cfg.node_batches({n: size(n) for n in dst})
    out = []
    for m in messages:  # the strategy's messages share one RecordDict: give each its own config
        content = RecordDict(dict(m.content.items()))
        content["config"] = ConfigRecord({**dict(m.content["config"]), "batch-size": batches[m.metadata.dst_node_id]})
        out.append(Message(content=content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type))
    return out


def _pooled(rows: list[dict], nll_key: str) -> float | None:
    tokens = sum(r.get("valid_tokens", 0) for r in rows)
    return sum(r[nll_key] for r in rows) / tokens if rows and tokens else None


def run_federation(grid: Grid, cfg: FederationConfig) -> dict:
    """Run (or resume) the federation's rounds on ``grid``, then write and publish the expert; returns the result."""
    store = FederationStore(cfg.work_dir)
    if (done := store.result()) is not None:
        raise ExpertmixError(f"the federation in {cfg.work_dir} has already finished (expert at {done['expert']}); "
                             f"choose another work-dir")
    store.clear_failure()
    validate_name(cfg.expert_name)
    model, tokenizer = _seed_model(cfg)
    signature = model_signature(cfg.base)
    record, state = store.load(cfg)
    if state is None:
        state = travelling_state(model)
    else:
        log(INFO, "resuming the federation in %s after round %d", cfg.work_dir, record.rounds_done)
    strategy = build_strategy(cfg)
    strategy.summary()
    arrays = ArrayRecord(state)
    inner = getattr(strategy, "strategy", strategy)  # the aggregating strategy inside a DP wrapper
    if isinstance(inner, FedAvgM) and (momentum := store.load_momentum(record)) is not None:
        inner.momentum_vector = [momentum[k].numpy() for k in arrays]
    labels: dict[int, str] = {}  # node id -> the name the node reported

    for rnd in range(record.rounds_done + 1, cfg.rounds + 1):
        started = time.time()
        log(INFO, "[expertmix] round %d/%d", rnd, cfg.rounds)
        config = ConfigRecord({"lr": cfg.round_lr(rnd), "base-fingerprint": signature.base_fingerprint,
                               "federation-id": record.federation_id})
        sent_bytes = int(arrays.count_bytes())
        messages = _with_batches(list(strategy.configure_train(rnd, arrays, config, grid)), cfg, grid, record, labels)
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        rows, summaries = _node_rows(replies)  # before aggregation: a DP wrapper clips the replies in place
        labels.update({r["node_id"]: r["name"] for r in rows})
        errors = _errors(messages, replies, labels)
        if not rows:
            raise ExpertmixError(f"round {rnd}: no node returned an update ({'; '.join(errors) or 'no replies'})")
        for e in errors:
            log(WARNING, "round %d: %s; continuing with the other nodes", rnd, e)
        if len(rows) < cfg.min_nodes:  # an average of fewer nodes than agreed would expose too few nodes' updates
            log(WARNING, "round %d: %d node(s) returned an update, fewer than min-nodes=%d: not aggregated, the "
                "global state stays as it was", rnd, len(rows), cfg.min_nodes)
            new_arrays, train_metrics = None, None
        else:
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
            if new_arrays is None:
                log(WARNING, "round %d: the strategy skipped aggregation; the global state stays as it was", rnd)
        if new_arrays is not None:
            arrays = new_arrays
        record.nodes.update(summaries)
        entry = {"round": rnd, "lr": cfg.round_lr(rnd), "sampled": len(messages), "aggregated": new_arrays is not None,
                 "nodes": rows, "errors": errors, "train": dict(train_metrics or {}),
                 "valid_loss_before": _pooled(rows, "valid_nll_before"),
                 "bytes_to_nodes": len(messages) * sent_bytes,
                 "bytes_from_nodes": int(sum(r["bytes"] for r in rows))}
        if rnd == cfg.rounds or (cfg.evaluate_every and rnd % cfg.evaluate_every == 0):
            entry["evaluate"] = _evaluate(strategy, grid, rnd, arrays, cfg, labels)
        entry["seconds"] = time.time() - started
        record.history.append(entry)
        record.rounds_done = rnd
        momentum = getattr(inner, "momentum_vector", None)
        store.save_round(record, arrays.to_torch_state_dict(),
                         None if momentum is None else {k: torch.from_numpy(v) for k, v in zip(arrays, momentum,
                                                                                               strict=True)})
        log(INFO, "[expertmix] round %d done: %d node(s), validation loss before %s, after %s", rnd, len(rows),
            _fmt(entry["valid_loss_before"]), _fmt((entry.get("evaluate") or {}).get("valid_loss")))

    if not any(h["aggregated"] for h in record.history):
        failures = record.history[-1]["errors"] if record.history else []
        raise ExpertmixError(f"no round produced an aggregate (min-nodes={cfg.min_nodes}); the expert would be the "
                             f"seed itself{'. Last round: ' + '; '.join(failures) if failures else ''}")
    load_travelling_state(model, arrays.to_torch_state_dict())
    return _finish(cfg, store, record, model, tokenizer, signature)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _evaluate(strategy: Strategy, grid: Grid, rnd: int, arrays: ArrayRecord, cfg: FederationConfig,
              labels: dict[int, str]) -> dict:
    """Federated evaluation of the global state: validation loss pooled over the nodes' tokens."""
    messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    for e in _errors(messages, replies, labels):
        log(WARNING, "round %d evaluation: %s", rnd, e)
    metrics = strategy.aggregate_evaluate(rnd, replies)
    ok = [m for m in replies if not m.has_error()]
    tokens = sum(int(next(iter(m.content.metric_records.values()))["num-examples"]) for m in ok)
    out = {"nodes": len(ok), "tokens": tokens}
    if metrics is not None and "valid-loss" in metrics:
        out.update(valid_loss=float(metrics["valid-loss"]), valid_perplexity=math.exp(float(metrics["valid-loss"])))
    return out


def _aggregate_embedding(nodes: dict[str, dict]) -> tuple[torch.Tensor, str, int]:
    """The expert's domain embedding: the nodes' embeddings averaged with their document counts as weights."""
    embedders = {s["embedder"] for s in nodes.values()}
    dims = {len(s["embedding"]) for s in nodes.values()}
    if len(embedders) != 1 or len(dims) != 1:
        raise ExpertmixError(f"nodes sent domain embeddings of different embedders or sizes "
                             f"({sorted(embedders)}, dims {sorted(dims)}); they must use the same run config")
    weights = torch.tensor([float(s["documents"]) for s in nodes.values()])
    vectors = torch.tensor([list(s["embedding"]) for s in nodes.values()], dtype=torch.float32)
    embedding = (weights[:, None] * vectors).sum(0) / weights.sum()
    return embedding, embedders.pop(), int(sum(int(s["embedded"]) for s in nodes.values()))


def _finish(cfg: FederationConfig, store: FederationStore, record: FederationRecord, model, tokenizer,
            signature) -> dict:
    """Write the expert repo with its federation card, publish it, and record the result."""
    from ..experts.training import _saved_dtype, parameter_counts, write_expert_repo

    out = cfg.out_dir
    trained = {r["name"] for h in record.history for r in h["nodes"]}
    nodes = {k: v for k, v in record.nodes.items() if k in trained}  # not a node that was asked but never trained
    if record.expert is None:
        if out.exists():
            raise ExpertmixError(f"expert folder {out} already exists; set run config 'out' to a new folder")
        embedding, embedder, embedded = _aggregate_embedding(nodes)
        history = record.history
        last_eval = next((h["evaluate"] for h in reversed(history) if h.get("evaluate", {}).get("valid_loss")), {})
        last_train = history[-1]["train"]
        metrics = {}
        if (before := history[0]["valid_loss_before"]) is not None and history[0]["round"] == 1:
            metrics["valid_perplexity_before"] = math.exp(before)
        if last_eval:
            metrics["valid_perplexity_after"] = last_eval["valid_perplexity"]
            metrics["valid_loss_after"] = last_eval["valid_loss"]
        if "train-loss" in last_train:
            metrics["train_loss"] = float(last_train["train-loss"])
        trainable, total = parameter_counts(model)
        examples = {}
        for h in history:
            for r in h["nodes"]:
                examples[r["name"]] = examples.get(r["name"], 0) + int(r["num_examples"])
        federation = {
            "framework": "flower", "strategy": cfg.strategy, "rounds": record.rounds_done,
            "proximal_mu": cfg.proximal_mu if cfg.strategy == "fedprox" else None,
            "server_optimizer": {"learning_rate": cfg.server_lr, "momentum": cfg.server_momentum}
            if cfg.strategy == "fedavgm" else None,
            "nodes": len(nodes), "node_names": sorted(nodes), "examples_per_node": examples,
            "documents_per_node": {k: int(s["documents"]) for k, s in nodes.items()},
            "tokens_per_node": {k: int(s["tokens"]) for k, s in nodes.items()},
            "local_steps": cfg.local_steps, "batch_split": cfg.batch_split,
            "batch_per_node": {r["name"]: int(r["batch_size"]) for h in history for r in h["nodes"]
                               if "batch_size" in r},  # the latest round each node trained in
            "fraction_train": cfg.fraction_train, "min_nodes": cfg.min_nodes,
            "differential_privacy": {"clipping_norm": cfg.dp_clip, "noise_multiplier": cfg.dp_noise}
            if cfg.dp_clip > 0 else None,
            "rounds_log": [{"round": h["round"], "nodes": [r["name"] for r in h["nodes"]],
                            "aggregated": h["aggregated"], "valid_loss_before": h["valid_loss_before"],
                            "valid_loss_after": (h.get("evaluate") or {}).get("valid_loss"),
                            "bytes_to_nodes": h["bytes_to_nodes"], "bytes_from_nodes": h["bytes_from_nodes"],
                            **({"failed": h["errors"]} if h.get("errors") else {})}
                           for h in history],
        }
        info = ExpertInfo(
            name=cfg.expert_name, domain=cfg.domain,
            languages=sorted({lang for s in nodes.values() for lang in s.get("languages", [])}),
            kind=cfg.kind, base_model=cfg.base_id or Path(cfg.base).resolve().name,
            **signature.model_dump(),
            embedding=EmbeddingInfo(model=embedder, dim=int(embedding.numel()), documents=embedded),
            data=DataInfo(documents=sum(int(s["documents"]) for s in nodes.values()),
                          tokens=sum(int(s["tokens"]) for s in nodes.values()),
                          sources=[f"federated:{k}" for k in sorted(nodes)]),
            metrics=metrics,
            training={"rounds": record.rounds_done, "local_steps": cfg.local_steps, "batch_size": cfg.batch_size,
                      "grad_accum": cfg.grad_accum, "seq_len": cfg.seq_len, "learning_rate": cfg.lr,
                      "lr_schedule": cfg.lr_schedule, "warmup": cfg.warmup, "keep_optimizer": cfg.keep_optimizer,
                      "tokens": sum(int(r.get("train_tokens", 0)) for h in history for r in h["nodes"]),
                      "trainable_parameters": int(trainable), "total_parameters": int(total),
                      "trainable_share": trainable / total},
            federation=federation,
        )
        write_expert_repo(out, model, tokenizer, ExpertCard(expert=info, tags=["federated"]), embedding, embedder,
                          embedded, _saved_dtype(Path(cfg.base)))
        record.expert = store.relative(out)  # inside the work folder: relative, so a moved one still finds it
        store.save_record(record)
        log(INFO, "[expertmix] expert written to %s", out)
    published = None
    if cfg.publish:
        from ..hub.store import open_registry

        entry = open_registry(cfg.registry or None).publish(out)
        published = f"{entry.name}@{entry.revision}"
        log(INFO, "[expertmix] published %s", published)
    result = {"expert": str(out), "published": published, "registry": cfg.registry or None,
              "rounds": record.rounds_done}
    store.finish(result)
    return store.result()
