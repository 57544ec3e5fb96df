"""A node's side of the federation, without Flower: its private data, one round of local training with the
expert-training loop (``experts.training.fit``), evaluation, and the summary it shares instead of text
(document and token counts, languages, the domain embedding of its documents).

Flower starts a fresh ClientApp process for every message, so what is slow to redo (tokenized blocks, the
domain embedding, the seed's fingerprint) is cached on the node, keyed by the files and settings it came from.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from ..errors import ExpertmixError
from ..experts.data import held_out_split, pack, read_documents, tokenize_documents
from ..experts.training import Blocks, TrainSettings, fit, peft_wrap, split_valid, token_nll
from ..fsutil import write_json_atomic
from ..hub.fingerprint import fingerprint_tokenizer, fingerprint_weights, weight_files
from ..hub.store import expertmix_home
from .local_optimizer import LocalOptimizerState, cache_key, moments_file
from .settings import FederationConfig, NodeConfig
from .weights import load_state, load_travelling_state, save_state, travelling_state


@dataclass
class NodeData:
    """A node's packed training and validation blocks and what it may tell about them."""

    train: Blocks
    valid: Blocks
    documents: int
    tokens: int
    languages: list[str]
    embedding: torch.Tensor
    embedder: str
    embedded: int


@dataclass
class RoundResult:
    """What a node sends back after a round: the trained state, metrics (with ``num-examples``), its summary."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    summary: dict = field(default_factory=dict)


def _files_stamp(path: Path) -> list:
    """Names, sizes and modification times of the files under ``path``: changes when the data changes."""
    if not path.exists():
        raise ExpertmixError(f"node data {path}: no such file or folder")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


class Node:
    """One node's view of the federation: its config, the seed it trains from, its data (loaded lazily)."""

    def __init__(self, fed: FederationConfig, node: NodeConfig, node_id: int = 0):
        self.fed, self.node, self.node_id = fed, node, node_id
        self.label = node.label(node_id)
        self.base = Path(node.base or fed.base)
        if not (self.base / "config.json").is_file():
            raise ExpertmixError(f"node {self.label}: seed folder {self.base} has no config.json "
                                 f"(set node config 'base' to this node's copy of the seed)")
        self.cache = Path(node.cache_dir) if node.cache_dir else expertmix_home() / "federation-cache"
        if node.threads:
            torch.set_num_threads(node.threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # -- the seed ----------------------------------------------------------------------------------
    def base_fingerprint(self) -> str:
        """The seed's weight fingerprint, cached by its files' sizes and times (hashing a big seed is slow)."""
        stamp = [_files_stamp(p) for p in weight_files(self.base)]
        path = self.cache / "fingerprints" / f"{cache_key(str(self.base.resolve()), stamp)}.json"
        if path.is_file():
            return json.loads(path.read_text())["fingerprint"]
        fp = fingerprint_weights(self.base)
        write_json_atomic(path, {"base": str(self.base), "fingerprint": fp})
        return fp

    def model(self, state: dict[str, torch.Tensor] | None = None):
        """The seed in float32, wrapped like the expert kind trains, holding ``state`` when given."""
        torch.manual_seed(self.fed.seed)  # the adapter's initial values, overwritten by the received state
        model = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32)
        if self.fed.kind != "dense":
            model = peft_wrap(model, self.fed.kind, self.fed.lora_r, 2 * self.fed.lora_r)
        if state is not None:
            load_travelling_state(model, state)
        return model.to(self.device)

    # -- data --------------------------------------------------------------------------------------
    def data(self) -> NodeData:
        """Tokenized, packed blocks of the node's data and its summary; built once, then read from the cache."""
        fed, node = self.fed, self.node
        valid_stamp = _files_stamp(Path(node.valid)) if node.valid else None
        key = cache_key("node-data-v1", _files_stamp(Path(node.data)), valid_stamp, node.text_field, fed.seq_len,
                   fed.valid_fraction, fed.seed, fed.embedder, fed.embed_sample,
                   fingerprint_tokenizer(self.tokenizer), str(self.base.resolve()))
        blocks_file, meta_file = self.cache / "data" / f"{key}.safetensors", self.cache / "data" / f"{key}.json"
        if blocks_file.is_file() and meta_file.is_file():
            t, meta = load_state(blocks_file), json.loads(meta_file.read_text())
        else:
            t, meta = self._build_data()
            save_state(blocks_file, t)
            write_json_atomic(meta_file, meta)
        return NodeData(train={"input_ids": t["train_input_ids"], "labels": t["train_labels"]},
                        valid={"input_ids": t["valid_input_ids"], "labels": t["valid_labels"]},
                        documents=meta["documents"], tokens=meta["tokens"], languages=meta["languages"],
                        embedding=t["embedding"], embedder=meta["embedder"], embedded=meta["embedded"])

    def _build_data(self) -> tuple[dict[str, torch.Tensor], dict]:
        from ..experts.embedding import domain_embedding, load_embedder

        fed, node = self.fed, self.node
        docs = read_documents(node.data, node.text_field or None)
        if node.valid or held_out_split(node.data) is not None:  # --valid, else a DatasetDict's held-out split
            train_docs, valid_docs = docs, read_documents(node.valid or node.data, node.text_field or None, role="eval")
        else:
            train_docs, valid_docs = split_valid(docs, fed.valid_fraction, fed.seed,
                                                 give_valid="give the node a validation file: 'valid' in its node "
                                                            "config, or --node-valid NAME=FILE locally")
        train = pack(tokenize_documents(train_docs, self.tokenizer), fed.seq_len)
        valid = pack(tokenize_documents(valid_docs, self.tokenizer), fed.seq_len, drop_last=False)
        embedder = load_embedder(fed.embedder, self.base)
        embedding, embedded = domain_embedding(train_docs, embedder, sample=fed.embed_sample, seed=fed.seed)
        tensors = {"train_input_ids": train["input_ids"], "train_labels": train["labels"],
                   "valid_input_ids": valid["input_ids"], "valid_labels": valid["labels"],
                   "embedding": embedding.float()}
        meta = {"documents": len(train_docs), "tokens": int((train["labels"] != -100).sum()),
                "languages": sorted({d.language for d in train_docs if d.language}),
                "embedder": embedder.name, "embedded": embedded}
        return tensors, meta

    def summary(self, data: NodeData) -> dict:
        """What the node tells the coordinator about its data: counts, languages, domain embedding; no text."""
        return {"name": self.label, "documents": data.documents, "tokens": data.tokens,
                "languages": list(data.languages), "embedder": data.embedder, "embedded": data.embedded,
                "embedding": [float(x) for x in data.embedding.tolist()]}

    # -- one round ---------------------------------------------------------------------------------
    def train_round(self, received: dict[str, torch.Tensor], server_round: int, proximal_mu: float = 0.0,
                    base_fingerprint: str | None = None, federation_id: str | None = None,
                    batch_size: int | None = None) -> RoundResult:
        """Train the received global state on the local data; return the new state, metrics and summary.

        Each local step takes the federation schedule's rate for its global step; with ``keep_optimizer`` the
        node continues its AdamW moments from its previous round in the federation ``federation_id``.
        ``batch_size`` is this node's share of the round's global batch (the coordinator's split; default: the run
        config's). ``num-examples`` is what the node trained on this round (the FedAvg weight). The
        metrics include the received state's summed validation loss on the node's validation data
        (``valid-nll-before``, with ``valid-tokens``): the evaluation of the previous round's global state.
        """
        if base_fingerprint and base_fingerprint != self.base_fingerprint():
            raise ExpertmixError(f"node {self.label}: seed {self.base} differs from the coordinator's "
                                 f"(fingerprint {self.base_fingerprint()[:16]}, expected {base_fingerprint[:16]})")
        data = self.data()
        model = self.model(received)
        nll_before, valid_tokens = token_nll(model, data.valid, self.fed.batch_size)
        self._debug_marker(server_round)
        fed = self.fed
        batch = batch_size or fed.batch_size
        settings = TrainSettings(max_steps=fed.local_steps, batch_size=batch, grad_accum=fed.grad_accum,
                                 learning_rate=fed.lr, warmup_ratio=0.0, lr_scheduler="constant",
                                 save_steps=0, logging_steps=max(1, fed.local_steps // 4),
                                 seed=fed.seed + server_round, progress=False)
        moments = self.optimizer_file(federation_id) if fed.keep_optimizer and federation_id else None
        callbacks = [LocalOptimizerState(model, lambda i: fed.local_lr(server_round, i), moments)]
        if proximal_mu > 0:
            callbacks.append(ProximalTerm(model, proximal_mu))
        with tempfile.TemporaryDirectory(prefix="expertmix-node-") as tmp:
            out = fit(model, data.train, None, settings, tmp, callbacks=callbacks)
        if moments is not None and server_round >= fed.rounds:
            moments.unlink(missing_ok=True)  # the federation's last round: nothing continues from them
        trained = travelling_state(model)
        state = {k: trained[k] for k in received}  # the received order: DP clipping pairs arrays by position
        n_examples = fed.local_steps * batch * fed.grad_accum  # the blocks trained on (with repeats when few)
        metrics = {"num-examples": n_examples, "batch-size": batch,
                   "train-loss": float(out.get("train_loss", math.nan)),
                   "train-tokens": int(out["tokens"]), "valid-tokens": int(valid_tokens),
                   "valid-nll-before": float(nll_before)}
        self._debug_save(server_round, state, n_examples)
        return RoundResult(state=state, metrics=metrics, summary=self.summary(data))

    def optimizer_file(self, federation_id: str) -> Path:
        """Where this node keeps its optimizer moments between the rounds of one federation."""
        return moments_file(self.cache, federation_id, self.label)

    def evaluate(self, received: dict[str, torch.Tensor]) -> dict[str, float | int]:
        """Validation loss of the received global state on the local validation blocks, weighted by tokens."""
        data = self.data()
        nll, tokens = token_nll(self.model(received), data.valid, self.fed.batch_size)
        return {"num-examples": int(tokens), "valid-loss": nll / max(tokens, 1)}

    # -- debugging: what the node sent -------------------------------------------------------------
    def _debug_dir(self) -> Path | None:
        return Path(self.node.debug_dir) / self.label if self.node.debug_dir else None

    def _debug_marker(self, server_round: int) -> None:
        if (d := self._debug_dir()) is not None:
            d.mkdir(parents=True, exist_ok=True)
            (d / f"round-{server_round:04d}.started").write_text(str(server_round))

    def _debug_save(self, server_round: int, state: dict[str, torch.Tensor], n_examples: int) -> None:
        if (d := self._debug_dir()) is not None:
            save_state(d / f"round-{server_round:04d}.safetensors", state,
                       {"num-examples": n_examples, "round": server_round, "node": self.label})


class ProximalTerm(TrainerCallback):
    """FedProx's proximal term on the node: adds the gradient of (mu/2)·||w − w_global||² to each trainable
    weight before every optimizer step.

    Written as a gradient step because the Trainer computes the loss itself; the gradient is added after the
    Trainer's clipping, so clipping bounds the data gradient only.
    """

    def __init__(self, model, mu: float):
        self.mu = mu
        self.params = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        with torch.no_grad():
            for p, anchor in self.params:
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=self.mu)
        return control
