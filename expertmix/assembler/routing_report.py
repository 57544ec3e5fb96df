"""``expertmix eval``: per-domain perplexity of a mix and its routing matrix (as a table and a PNG heatmap).

The routing matrix holds, for each domain, the share of its tokens whose top-1 routed expert is each
expert, averaged over the MoE layers (per-layer matrices are kept too). Any transformers MoE that returns
``router_logits`` has one: a Nexus mix, and its stock Qwen2-MoE export (whose routing should match the mix's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..experts.adapter import is_adapter_folder, load_adapter_expert
from ..experts.data import pack, read_documents, tokenize_documents
from ..experts.training import Blocks, DataSource, perplexity
from ..fsutil import save_figure
from .manifest import MIX_FILE, read_manifest
from .upcycling import require_mix_folder


@dataclass
class EvalReport:
    """Perplexity per domain and, for MoE mixes, the routing matrix ``[domains, experts]``."""

    domains: list[str]
    perplexity: dict[str, float]
    experts: list[str] = field(default_factory=list)
    routing: torch.Tensor | None = None  # [domains, experts], rows sum to 1
    routing_per_layer: torch.Tensor | None = None  # [layers, domains, experts]

    def to_dict(self) -> dict:
        out = {"perplexity": self.perplexity}
        if self.routing is not None:
            out["experts"] = self.experts
            out["routing"] = {d: dict(zip(self.experts, map(float, self.routing[i]), strict=True))
                              for i, d in enumerate(self.domains)}
        return out


def eval_blocks(sources: Sequence[DataSource], tokenizer, seq_len: int, max_blocks: int | None,
                text_field: str | None = None) -> dict[str, Blocks]:
    """Each source's documents packed into blocks (last one padded); at most ``max_blocks`` of them, spread evenly.

    The blocks are taken at even strides over the whole file, not from its start: the first blocks are only the
    first few documents, whose perplexity can be far from the file's (a 12-block prefix once read 17 where the
    whole file reads 53).
    """
    out = {}
    for src in sources:
        docs = tokenize_documents(read_documents(src.path, text_field, domain=src.name, role="eval"), tokenizer)
        blocks = pack(docs, seq_len, drop_last=False)
        n = blocks["input_ids"].shape[0]
        if max_blocks and n > max_blocks:
            rows = torch.linspace(0, n - 1, max_blocks).round().long()
            blocks = {k: v[rows] for k, v in blocks.items()}
        out[src.name] = blocks
    return out


def num_routed_experts(model) -> int | None:
    """How many routed experts a transformers MoE has (Nexus, Qwen2-MoE: ``num_experts``; Mixtral's naming too);
    ``None`` for a dense model."""
    config = model.config
    return getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or None


@torch.no_grad()
def routing_counts(model, blocks: Blocks, batch_size: int = 8) -> torch.Tensor:
    """Top-1 expert counts per MoE layer ``[layers, experts]`` over the blocks' real (label != -100) tokens."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    experts = num_routed_experts(model)
    counts: torch.Tensor | None = None
    for s in range(0, blocks["input_ids"].shape[0], batch_size):
        ids = blocks["input_ids"][s:s + batch_size].to(device)
        keep = (blocks["labels"][s:s + batch_size] != -100).reshape(-1)
        router_logits = model(input_ids=ids, output_router_logits=True).router_logits
        if counts is None:
            counts = torch.zeros(len(router_logits), experts)
        for layer, logits in enumerate(router_logits):
            top = logits.reshape(-1, experts).argmax(-1).cpu()[keep]
            counts[layer] += torch.bincount(top, minlength=experts).float()
    model.train(was)
    return counts if counts is not None else torch.zeros(0, experts)


def evaluate(model, blocks: dict[str, Blocks], batch_size: int = 8,
             expert_names: Sequence[str] | None = None) -> EvalReport:
    """Perplexity on each domain's blocks, plus the routing matrix when ``model`` is an MoE.

    Experts are named by the mix's config, else by ``expert_names``, else ``expert0``, ``expert1``, ...
    """
    ppl = {d: perplexity(model, b, batch_size) for d, b in blocks.items()}
    report = EvalReport(domains=list(blocks), perplexity=ppl)
    experts = num_routed_experts(model)
    if experts:
        per_layer = torch.stack([routing_counts(model, b, batch_size) for b in blocks.values()], dim=1)
        per_layer = per_layer / per_layer.sum(-1, keepdim=True).clamp_min(1)
        names = getattr(model.config, "expert_names", None) or expert_names
        report.experts = list(names) if names and len(names) == experts else [f"expert{i}" for i in range(experts)]
        report.routing_per_layer = per_layer
        report.routing = per_layer.mean(0)
    return report


def evaluate_mix(mix: str | Path, sources: Sequence[DataSource], seq_len: int = 256, max_blocks: int | None = 32,
                 batch_size: int = 8, device: str | None = None, text_field: str | None = None,
                 seed: str | Path | None = None) -> EvalReport:
    """Evaluate a mix folder (MoE or dense merge, a mix's stock export, a model, or a PEFT expert on its ``seed``)."""
    mix = Path(mix)
    if is_adapter_folder(mix):
        model = load_adapter_expert(mix, seed)
        tokenizer = AutoTokenizer.from_pretrained(mix if (mix / "tokenizer_config.json").is_file()
                                                  else model.name_or_path)
    else:
        mix = require_mix_folder(mix)
        tokenizer = AutoTokenizer.from_pretrained(mix)
        model = AutoModelForCausalLM.from_pretrained(mix, dtype=torch.float32)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # an export carries its mix's mix.json: name the experts as the mix does
    names = [e.name for e in read_manifest(mix).experts] if (mix / MIX_FILE).is_file() else None
    return evaluate(model, eval_blocks(sources, tokenizer, seq_len, max_blocks, text_field), batch_size,
                    expert_names=names)


def save_heatmap(report: EvalReport, path: str | Path, title: str = "tokens routed to each expert") -> Path:
    """Write the routing matrix as a PNG heatmap (rows: domains, columns: experts, cells: share)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.routing is None:
        raise ValueError("this model has no router (a dense merge or model): there is no routing matrix to draw")
    m = report.routing.numpy()
    # at least 4.5 x 3 inches: a two-expert matrix otherwise cuts its title and overlaps its labels
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 0.9 * m.shape[1]), max(3.0, 1.0 + 0.6 * m.shape[0])))
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(m.shape[1]), report.experts, rotation=30, ha="right")
    ax.set_yticks(range(m.shape[0]), report.domains)
    ax.set_xlabel("expert")
    ax.set_ylabel("domain")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.0%}", ha="center", va="center", color="white" if m[i, j] < 0.6 else "black",
                    fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
