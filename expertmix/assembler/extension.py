"""``expertmix extend``: append a new expert to a trained mix and finetune briefly on new + replayed old data.

The new expert's FFN becomes routed expert ``n``; the old experts' weights never change (their gradients
are masked and their rows are restored bit-exactly after finetuning). A recipe says the rest:

- ``merge``: which non-FFN weights take in the new expert's, ``phi = (1 - lam) phi_mix + lam phi_new``:
  ``all`` of them (the paper, ``lam = 1/(n+1)``), ``none``, or ``token-rows``: only the token embedding /
  head rows, each with its own ``lam_v = f_new(v) / (f_new(v) + w max_old f_old(v))`` from token frequencies
  in the finetuning data (tokens only the new domain uses come from the new expert, shared ones stay; ``w`` is
  ``row_old_weight``: above 1, rows the old domains also use move less);
- ``train``: which parameter groups finetune (``experts`` = the new expert only);
- ``placement``: where the new expert sits in the router. Nexus ``project``: ``e_new = P(d_new)`` with the
  mix's standardisation (the paper); ``fit``: the router input of the new expert (an m-vector, no new
  router parameters) is fitted so that tokens of the new domain pick it and old tokens keep their experts;
  ``fit-layers``: the same with one router input per layer (each layer's router keeps its own copy of the
  inputs, so this too adds no parameters; it separates the new domain from a close old one, e.g. es from de,
  layer by layer). Linear ``reinit`` (the paper's baseline: a fresh router) or ``fit``/``fit-layers`` (a
  fitted new gate row per layer);
- ``ffn_init``: the new routed FFN is the expert's own FFN (``expert``), or that plus the mean update the old
  experts received while the mix trained (``transfer``: mix weights minus the published ones, pulled again at
  the revisions mix.json records), so the new expert starts in the regime "shared FFN + gated expert";
- ``learning_rate`` and ``new_share`` of the short finetuning;
- ``distill``: what the finetuning learns from. ``none``: the labels; ``replay``: replayed rows learn the mix's
  own next-token distributions before the extension (KL), so the few steps pull the old domains back to where
  they were; ``all``: new-domain rows also learn the new expert's distributions
  (``expertmix.assembler.distillation``). The teachers (the old mix, and the new expert for ``all``) stay frozen
  in memory beside the model being trained, in its precision (bf16 under bf16 training), and each step runs them
  forward once on their rows.
- ``routing_weight``: with distillation, replayed rows also learn the mix's routing (KL per layer between the
  old and the new router), which keeps old tokens away from the new expert at some cost to the new domain;
- ``min_documents``: the budget's reads span at least this many documents per source, long ones giving a window
  (a small budget otherwise lands on two or three long documents, and the result swings with which ones);
- ``passes``: how many times the finetuning goes over the data it read: the token budget bounds what is read
  (a few percent of the new expert's own data), the passes multiply the steps, not the tokens;
- ``fit_tokens``: how many tokens of each kind the fitted placements see (the last fifth is held out to report
  the shares it reaches).

Every document the extension learns from (token-row frequencies, placement, finetuning) is read up to the token
budget's share for its source, so ``--max-steps``/``--max-tokens`` bound all of it; ``mix.json`` records the
tokens read per source (``tokens_read``).

``RECIPES`` holds the paper's recipe, the paper without the merge, ``isolated`` (only the new FFN trains) and
``targeted``, the default, chosen by benchmarks/nexus_table.py (numbers in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer

from ..checkpoints import require_context, require_float_weights, require_tokenizer_fits
from ..errors import ExpertmixError
from ..experts.data import TokenizedDocument, count_tokens
from ..experts.training import DataSource, ResumableJob, TrainSettings, resumable_job, uses_bf16
from ..fsutil import remove_tree
from .assemble import (
    Blocks,
    budget_tokens,
    freeze_except,
    mixture_blocks,
    read_sources,
    save_mix,
    train_stage,
)
from .configuration_nexus import NexusConfig
from .distillation import DistillationTrainer, load_teachers
from .manifest import DataRef, MixManifest, read_manifest
from .modeling_nexus import NexusForCausalLM
from .upcycling import (
    ExpertSource,
    MoeLayout,
    check_experts,
    fresh_router_tensors,
    load_expert,
    read_tensors,
    require_mix_folder,
    save_checkpoint,
    stream_tensors,
)

MergeScope = Literal["all", "none", "token-rows"]
Placement = Literal["project", "fit", "fit-layers", "reinit"]
FITTED: tuple[Placement, ...] = ("fit", "fit-layers")
FfnInit = Literal["expert", "transfer"]
Distill = Literal["none", "replay", "all"]


@dataclass(frozen=True)
class ExtensionRecipe:
    """What an extension merges, what it trains and where it places the new expert in the router."""

    merge: MergeScope = "all"
    merge_lambda: float | None = None  # None: 1/(n+1) with n the old experts
    train: tuple[str, ...] = ("router", "experts", "shared", "dense")
    placement: Placement = "project"
    new_share: float = 0.5
    ffn_init: FfnInit = "expert"  # transfer: add the old experts' mean in-mix update to the new FFN
    learning_rate: float | None = None  # None: the run's learning rate
    fit_old_weight: float = 1.0  # placement fit: weight of "old tokens keep their expert" against the new domain
    row_old_weight: float = 1.0  # token-rows merge: weight of the old domains' token frequency against the new one's
    # placement fit: tokens of new-domain data, and of replay data, whose router inputs it sees (2 x fit_tokens x
    # hidden floats per layer, held for as many layers at once as PLACEMENT_MEMORY allows with fit-layers)
    fit_tokens: int = 32_768
    distill: Distill = "none"  # replay rows learn the mix's distributions; "all": new rows the new expert's too
    routing_weight: float = 0.0  # with distill: replay rows also learn the mix's routing (KL per layer), this much
    passes: int = 1  # finetuning passes over the data the budget reads: more steps, not more tokens
    min_documents: int = 1  # the budget's reads span at least this many documents per source (long ones: a window)

    def __post_init__(self) -> None:
        for name, kind in (("merge", MergeScope), ("placement", Placement), ("ffn_init", FfnInit),
                           ("distill", Distill)):
            if getattr(self, name) not in get_args(kind):
                raise ExpertmixError(f"recipe field {name}={getattr(self, name)!r}: choose one of "
                                     f"{', '.join(get_args(kind))}")
        if self.routing_weight < 0 or (self.routing_weight and self.distill == "none"):
            raise ExpertmixError(f"recipe field routing_weight={self.routing_weight}: must be >= 0, and > 0 only "
                                 "with distill=replay or distill=all (the mix's routing is taught on replay rows)")
        if self.min_documents < 1:
            raise ExpertmixError(f"recipe field min_documents={self.min_documents}: at least one document")
        if self.passes < 1:
            raise ExpertmixError(f"recipe field passes={self.passes}: at least one pass over the data")
        if self.row_old_weight < 0:
            raise ExpertmixError(f"recipe field row_old_weight={self.row_old_weight}: must be >= 0")
        if self.fit_tokens < 1:
            raise ExpertmixError(f"recipe field fit_tokens={self.fit_tokens}: the placement needs at least 1 token")

    def lam(self, n_old: int) -> float:
        return 1.0 / (n_old + 1) if self.merge_lambda is None else self.merge_lambda

    def for_router(self, router: str) -> ExtensionRecipe:
        """The paper re-initialises a linear router; Nexus projects. Map the other kind's placement."""
        if router == "linear" and self.placement == "project":
            return replace(self, placement="reinit")
        if router == "nexus" and self.placement == "reinit":
            return replace(self, placement="project")
        return self


RECIPES: dict[str, ExtensionRecipe] = {
    # Gritsch et al. 2024: merge every non-FFN weight with 1/(n+1), project the embedding, finetune all.
    "paper": ExtensionRecipe(),
    # The paper's finetuning without the merge (lambda = 0).
    "paper-keep": ExtensionRecipe(merge_lambda=0.0),
    # Take the new domain's own token rows, fit the new expert's router input, train the new expert only.
    # Only the new expert's FFN trains (every old weight stays), with the new domain's token rows and a fitted
    # router placement.
    "isolated": ExtensionRecipe(merge="token-rows", train=("experts",), placement="fit"),
    # Measured best here (benchmarks/RESULTS.md, "Nexus"): the new domain's own token rows (rows the old domains
    # use too move little), a placement fitted per layer that keeps old tokens with their experts, the new FFN
    # shifted by the old experts' mean in-mix update, then everything finetuned gently for eight passes over the
    # budget's data (spread over at least 32 documents per source), replayed rows distilled from the mix (its
    # distributions and its routing) and new rows from the new expert.
    "targeted": ExtensionRecipe(merge="token-rows", row_old_weight=16.0, placement="fit-layers", fit_old_weight=8.0,
                                ffn_init="transfer", learning_rate=1e-4, distill="all", routing_weight=0.3, passes=8,
                                min_documents=32),
}
DEFAULT_RECIPE = "targeted"


def parse_recipe(spec: str) -> ExtensionRecipe:
    """``NAME`` or ``NAME:key=value;key=value`` (train groups joined by '+'), e.g. ``isolated:learning_rate=1e-3``."""
    name, _, rest = spec.partition(":")
    if name not in RECIPES:
        raise ExpertmixError(f"unknown extension recipe {name!r}: choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    annotations = {f.name: f.type for f in fields(ExtensionRecipe)}  # strings: "int", "float | None", ...
    overrides: dict = {}
    for part in filter(None, (x.strip() for x in rest.split(";"))):
        key, sep, value = part.partition("=")
        if not sep or key not in annotations:
            raise ExpertmixError(f"recipe {spec!r}: {part!r} is not KEY=VALUE with KEY one of "
                                 f"{', '.join(annotations)}")
        kind = annotations[key]
        if key == "train":
            overrides[key] = tuple(g for g in value.split("+") if g)
        elif kind.endswith("| None") and value == "none":
            overrides[key] = None
        elif kind in ("int", "float", "float | None"):
            number = int if kind == "int" else float
            try:
                overrides[key] = number(value)
            except ValueError:
                raise ExpertmixError(f"recipe {spec!r}: {key}={value!r} is not "
                                     f"{'a whole number' if number is int else 'a number'}") from None
        else:
            overrides[key] = value
    return replace(recipe, **overrides)


@dataclass
class ExtendConfig(ResumableJob):
    """Everything ``expertmix extend`` needs."""

    mix: Path
    expert: str
    data: list[DataSource]
    out: Path
    replay: list[DataSource] | None = None  # default: the data the mix was trained on (mix.json)
    recipe: ExtensionRecipe = field(default_factory=lambda: RECIPES[DEFAULT_RECIPE])
    recipe_name: str = DEFAULT_RECIPE
    registry: str | None = None
    seq_len: int = 256
    text_field: str | None = None
    resume: bool = False
    settings: TrainSettings = field(default_factory=lambda: TrainSettings(max_steps=15))


# -- merging -----------------------------------------------------------------------------------------

def token_row_lambdas(new: Sequence[TokenizedDocument], old: dict[str, Sequence[TokenizedDocument]],
                      vocab_size: int, old_weight: float = 1.0) -> torch.Tensor:
    """Per-token merge weight ``f_new / (f_new + old_weight * max_d f_d)`` (0 for tokens no data uses)."""
    def freq(docs: Sequence[TokenizedDocument]) -> torch.Tensor:
        ids = torch.tensor([t for d in docs for t in d.input_ids], dtype=torch.long)
        f = torch.bincount(ids, minlength=vocab_size).double()
        return f / max(f.sum().item(), 1.0)

    f_new = freq(new)
    f_old = torch.stack([freq(d) for d in old.values()]).amax(0) if old else torch.zeros_like(f_new)
    total = f_new + old_weight * f_old
    return torch.where(total > 0, f_new / total.clamp_min(1e-30), torch.zeros_like(total)).float()


def token_row_keys(layout: MoeLayout) -> set[str]:
    """Checkpoint keys of the token embedding and the LM head (one key when they are tied)."""
    model = layout.model
    rows = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        rows.add(id(model.get_output_embeddings().weight))
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in rows}


# -- the extended checkpoint ---------------------------------------------------------------------------

def extended_config(config: NexusConfig, name: str) -> NexusConfig:
    d = config.to_dict()
    d.update(num_experts=config.num_experts + 1, expert_names=[*config.expert_names, name])
    for key in ("model_type", "transformers_version"):
        d.pop(key, None)
    return NexusConfig(**d)


def mix_update_of_old_experts(tensors: dict[str, torch.Tensor], layout: MoeLayout, manifest: MixManifest,
                              n_old: int, registry: str | None) -> dict[str, torch.Tensor]:
    """Mean over the old experts of (FFN in the trained mix - FFN as published): what mix training taught them.

    Old experts are pulled again through the registry at the revision mix.json names, and refused when their
    weights no longer match the recorded sha256.
    """
    delta = {k: torch.zeros_like(tensors[k][0], dtype=torch.float32) for p in layout.block_prefix
             for k in (f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj")}
    for i, entry in enumerate(manifest.experts[:n_old]):
        src = load_expert(f"{entry.repo}@{entry.revision}" if entry.revision else entry.repo, registry)
        if src.weights_sha256 != entry.weights_sha256:
            raise ExpertmixError(f"expert '{entry.name}' ({entry.repo}@{entry.revision}): weights differ from the "
                                 f"sha256 recorded in mix.json; cannot compute its in-mix update")
        for name, t in stream_tensors(src.folder):
            where = layout.ffn_key(name)
            if where is None:
                continue
            layer, proj = where
            p = layout.block_prefix[layer]
            mixed, i_size = tensors[f"{p}.experts.gate_up_proj"][i], tensors[f"{p}.experts.down_proj"].shape[2]
            if proj == "down_proj":
                delta[f"{p}.experts.down_proj"] += (tensors[f"{p}.experts.down_proj"][i].float() - t.float()) / n_old
            else:
                rows = slice(0, i_size) if proj == "gate_proj" else slice(i_size, 2 * i_size)
                delta[f"{p}.experts.gate_up_proj"][rows] += (mixed[rows].float() - t.float()) / n_old
    return delta


def extend_tensors(mix_dir: Path, config: NexusConfig, new_config: NexusConfig, expert: ExpertSource,
                   manifest: MixManifest, recipe: ExtensionRecipe, row_lambdas: torch.Tensor | None,
                   init_seed: int = 0, registry: str | None = None) -> dict[str, torch.Tensor]:
    """The mix's tensors with the new expert appended and the recipe's merge applied (streamed expert)."""
    layout = MoeLayout.for_config(new_config)
    tensors = dict(stream_tensors(mix_dir))  # model.safetensors or its shards
    n_old = config.num_experts
    lam = recipe.lam(n_old)
    rows = token_row_keys(layout)
    new_ffn: dict[str, dict[str, torch.Tensor]] = {p: {} for p in layout.block_prefix}
    for name, t in stream_tensors(expert.folder):
        where = layout.ffn_key(name)
        key = layout.dense_prefix + name
        if where is not None:
            layer, proj = where
            new_ffn[layout.block_prefix[layer]][proj] = t
            continue
        if key not in tensors:
            raise ExpertmixError(f"expert '{expert.info.name}': tensor {name} is not in the mix {mix_dir}")
        mine = tensors[key]
        t = t.to(mine.dtype)
        if recipe.merge == "all" and lam:
            tensors[key] = (1 - lam) * mine + lam * t
        elif recipe.merge == "token-rows" and key in rows:
            w = row_lambdas.to(mine.dtype).unsqueeze(1)
            tensors[key] = mine + w * (t - mine)
    delta = mix_update_of_old_experts(tensors, layout, manifest, n_old, registry) \
        if recipe.ffn_init == "transfer" else {}
    for p in layout.block_prefix:
        got = new_ffn[p]
        if set(got) != {"gate_proj", "up_proj", "down_proj"}:
            raise ExpertmixError(f"expert '{expert.info.name}': FFN weights of {p} incomplete ({sorted(got)})")
        gu, dn = f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj"
        dtype = tensors[gu].dtype
        new_gu, new_dn = torch.cat([got["gate_proj"], got["up_proj"]]).float(), got["down_proj"].float()
        if delta:
            new_gu, new_dn = new_gu + delta[gu], new_dn + delta[dn]
        tensors[gu] = torch.cat([tensors[gu], new_gu.to(dtype)[None]])
        tensors[dn] = torch.cat([tensors[dn], new_dn.to(dtype)[None]])
    if config.router_type == "nexus":
        d_new = manifest.standardisation.apply(expert.embedding[None])
        for p in layout.block_prefix:
            k = f"{p}.router.domain_embeddings"
            tensors[k] = torch.cat([tensors[k], d_new.to(tensors[k].dtype)])
    elif recipe.placement == "reinit":
        tensors.update(fresh_router_tensors(new_config, layout, None, init_seed))
    else:  # linear, fit: a new gate row per layer, fitted later; starts at zero
        for p in layout.block_prefix:
            k = f"{p}.router.weight"
            tensors[k] = torch.cat([tensors[k], torch.zeros_like(tensors[k][:1])])
    return tensors


# -- placement: fit the new expert's router input ---------------------------------------------------------

# bytes of recorded router inputs a per-layer placement fit holds at once; more layers go in groups
PLACEMENT_MEMORY = 2 << 30


class _Collected(Exception):
    """Ends a forward pass once the last wanted MoE block's input is recorded."""


@torch.no_grad()
def collect_router_inputs(model: NexusForCausalLM, blocks: Blocks, max_blocks: int = 16, batch_size: int = 4,
                          layers: Sequence[int] | None = None) -> list[torch.Tensor]:
    """The input of each MoE block in ``layers`` (all by default): the hidden states it routes, ``[tokens, H]``
    float32 on the CPU. The forward stops at the last of them."""
    moe = model.moe_blocks()
    layers = list(range(len(moe))) if layers is None else list(layers)
    grabbed: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def grab(i: int, x: torch.Tensor) -> None:
        grabbed[i].append(x.reshape(-1, x.shape[-1]).float().cpu())
        if i == layers[-1]:
            raise _Collected

    hooks = [moe[i].register_forward_pre_hook(lambda _m, args, i=i: grab(i, args[0])) for i in layers]
    device = next(model.parameters()).device
    try:
        was = model.training
        model.eval()
        ids = blocks["input_ids"][:max_blocks]
        for s in range(0, ids.shape[0], batch_size):
            try:
                model(input_ids=ids[s:s + batch_size].to(device))
            except _Collected:
                pass
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(grabbed[i]) for i in layers]


def place_new_expert(model: NexusForCausalLM, new_blocks: Blocks, old_blocks: Blocks, recipe: ExtensionRecipe,
                     seq_len: int, progress: bool = True, memory: int | None = None) -> dict[str, float]:
    """Fit the new expert's placement (``fit_placement``) on up to ``recipe.fit_tokens`` tokens of each kind.

    A per-layer fit is separable, so it goes through the layers in groups whose recorded inputs stay within
    ``memory`` bytes (default ``PLACEMENT_MEMORY``; all layers of an 8B model at the default ``fit_tokens`` would
    hold about 34 GB); one router input shared by all layers needs all of them at once.
    """
    memory = PLACEMENT_MEMORY if memory is None else memory
    n_layers, n = len(model.moe_blocks()), model.config.num_experts
    fit_blocks = math.ceil(recipe.fit_tokens / seq_len)
    per_layer = recipe.placement == "fit-layers"
    tokens = seq_len * sum(min(fit_blocks, b["input_ids"].shape[0]) for b in (new_blocks, old_blocks))
    group = max(1, memory // max(1, tokens * model.config.text_config.hidden_size * 4)) if per_layer else n_layers
    # the new expert's row of each router: its router input (Nexus) or its gate row (linear)
    rows = [b.router.domain_embeddings if model.config.router_type == "nexus" else b.router.weight
            for b in model.moe_blocks()]
    placed, fits = [r[n - 1].detach().clone() for r in rows], []
    for start in range(0, n_layers, group):
        layers = range(start, min(start + group, n_layers))
        fits.append((len(layers), fit_placement(
            model, collect_router_inputs(model, new_blocks, fit_blocks, layers=layers),
            collect_router_inputs(model, old_blocks, fit_blocks, layers=layers), old_weight=recipe.fit_old_weight,
            per_layer=per_layer, layers=layers, progress=progress)))
        with torch.no_grad():  # later groups record their inputs under the starting placement, as one fit would
            for i in layers:
                placed[i], rows[i][n - 1] = rows[i][n - 1].detach().clone(), placed[i]
    with torch.no_grad():
        for row, value in zip(rows, placed, strict=True):
            row[n - 1] = value
    return {k: sum(size * fit[k] for size, fit in fits) / n_layers for k in fits[0][1]}


def fit_placement(model: NexusForCausalLM, new_inputs: list[torch.Tensor], old_inputs: list[torch.Tensor],
                  steps: int = 300, lr: float = 0.05, old_weight: float = 1.0, per_layer: bool = False,
                  progress: bool = True, layers: Sequence[int] | None = None) -> dict[str, float]:
    """Place the new (last) expert so that new-domain tokens pick it and old tokens keep their experts.

    Nexus: only the new expert's router input moves (its standardised domain embedding, one for all layers,
    or one per layer with ``per_layer``); linear: the new gate row of each layer. Old experts' router
    embeddings stay fixed. The loss is a cross-entropy over experts on the recorded block inputs: target = new
    expert for new-domain tokens, the current top-1 old expert for old tokens (so their routing does not change).
    The shares it reports are measured on the last fifth of the tokens, held out of the fit: in-sample shares
    flatter a fit on a few blocks (2% of old tokens to the new expert, against 30% on validation data).
    With ``layers`` (a per-layer fit only), the inputs are those layers' and only their placements move.
    """
    def held_out(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] < 2:  # nothing to hold out: report in-sample
            return x, x
        cut = min(x.shape[0] - 1, max(1, round(0.8 * x.shape[0])))
        return x[:cut], x[cut:]

    dev = next(model.parameters()).device  # the recorded inputs wait on the CPU; the fit runs beside the model
    new_inputs, new_check = zip(*(held_out(x.to(dev)) for x in new_inputs), strict=True)
    old_inputs, old_check = zip(*(held_out(x.to(dev)) for x in old_inputs), strict=True)
    everything = layers is None or len(layers) == len(model.moe_blocks())
    if not (per_layer or everything):
        raise ExpertmixError("a router input shared by all layers is fitted on all of them at once")
    blocks = [model.moe_blocks()[i] for i in (layers if layers is not None else range(len(model.moe_blocks())))]
    n = model.config.num_experts
    nexus = model.config.router_type == "nexus"
    with torch.no_grad():
        old_e = [b.router.expert_embeddings()[: n - 1].float() for b in blocks]
        targets_old = [(x @ e.T).argmax(-1) for x, e in zip(old_inputs, old_e, strict=True)]
    if nexus:
        routers = [b.router for b in blocks]
        start = routers[0].domain_embeddings[n - 1].detach().float()
        params = [start.clone().requires_grad_(True) for _ in (routers if per_layer else routers[:1])]
        proj = [(r.up_proj.weight.detach().float(), r.down_proj.weight.detach().float()) for r in routers]

        def router_input(layer: int) -> torch.Tensor:
            return params[layer if per_layer else 0]

        def new_embedding(layer: int) -> torch.Tensor:
            w1, w2 = proj[layer]
            gate, value = (w1 @ router_input(layer)).chunk(2)
            return w2 @ (F.silu(gate) * value)
    else:
        rows = [torch.zeros(old_e[0].shape[1], device=dev, requires_grad=True) for _ in blocks]
        params = rows

        def new_embedding(layer: int) -> torch.Tensor:
            return rows[layer]
    opt = torch.optim.Adam(params, lr=lr)
    new_target = [torch.full((x.shape[0],), n - 1, dtype=torch.long, device=dev) for x in new_inputs]
    last = {}
    for _ in tqdm(range(steps), desc="placing the new expert", unit="step", disable=not progress):
        loss = torch.zeros((), device=dev)
        for layer in range(len(blocks)):
            e = torch.cat([old_e[layer], new_embedding(layer)[None]])
            loss = loss + F.cross_entropy(new_inputs[layer] @ e.T, new_target[layer]) \
                + old_weight * F.cross_entropy(old_inputs[layer] @ e.T, targets_old[layer])
        opt.zero_grad()
        loss.backward()
        opt.step()
        last["loss"] = loss.item() / len(blocks)
    with torch.no_grad():
        share_new, share_old = [], []
        for layer, b in enumerate(blocks):
            if nexus:
                b.router.domain_embeddings[n - 1] = router_input(layer).to(b.router.domain_embeddings.dtype)
            else:
                b.router.weight[n - 1] = rows[layer].to(b.router.weight.dtype)
            e = b.router.expert_embeddings().float()
            share_new.append(float(((new_check[layer] @ e.T).argmax(-1) == n - 1).float().mean()))
            share_old.append(float(((old_check[layer] @ e.T).argmax(-1) == n - 1).float().mean()))
    return {"placement_loss": last.get("loss", math.nan), "new_tokens_to_new": sum(share_new) / len(share_new),
            "old_tokens_to_new": sum(share_old) / len(share_old)}


# -- finetuning with the old experts frozen ---------------------------------------------------------------

def mask_old_experts(model: NexusForCausalLM, n_old: int) -> list:
    """Zero the gradient of the old experts' rows, so only the new expert's FFN moves."""
    handles = []
    for b in model.moe_blocks():
        for p in (b.experts.gate_up_proj, b.experts.down_proj):
            if p.requires_grad:
                mask = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype, device=p.device)
                mask[n_old:] = 1
                handles.append(p.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype)))
    return handles


@torch.no_grad()
def restore_old_experts(model: NexusForCausalLM, source: Path, n_old: int) -> None:
    """Copy the old experts' rows back from ``source`` (bit-exact; guards against weight decay)."""
    names = {id(m): n for n, m in model.named_modules()}
    params = {f"{names[id(b)]}.experts.{attr}": getattr(b.experts, attr)
              for b in model.moe_blocks() for attr in ("gate_up_proj", "down_proj")}
    for key, saved in read_tensors(source, params).items():
        params[key][:n_old] = saved[:n_old].to(params[key].dtype)


def replay_sources(cfg: ExtendConfig, manifest: MixManifest) -> list[DataSource]:
    if cfg.replay is not None:
        return cfg.replay
    missing = [d.path for d in manifest.data if not Path(d.path).exists()]
    if not manifest.data or missing:
        raise ExpertmixError(f"{cfg.mix}/mix.json: the mix's training data "
                             f"{'is not recorded' if not manifest.data else 'is gone: ' + ', '.join(missing)}; "
                             f"give the old domains' data with --replay NAME=PATH")
    return [DataSource(d.name, Path(d.path)) for d in manifest.data]


def share_cap(needed: int | None, share: float, sources: int, all_sources: int, seq_len: int) -> int | None:
    """Tokens to read from each of ``sources`` sources that hold ``share`` of a ``needed``-token budget together.

    What ``mixture_blocks`` draws from each, its margin blocks included; ``None`` (read all) without a budget.
    """
    if needed is None:
        return None
    return math.ceil(share * (needed + seq_len * all_sources) / max(sources, 1)) + seq_len


@resumable_job
def extend(cfg: ExtendConfig, log: Callable[[str], None] = print) -> Path:
    """Append the expert ``cfg.expert`` to the mix ``cfg.mix`` by ``cfg.recipe`` and write ``cfg.out``."""
    require_float_weights(cfg.mix, "extend")
    require_context(cfg.mix, cfg.seq_len)
    mix_dir = require_mix_folder(cfg.mix)
    tokenizer = AutoTokenizer.from_pretrained(mix_dir)
    require_tokenizer_fits(tokenizer, mix_dir, f"extend {mix_dir}")
    manifest = read_manifest(mix_dir)
    if manifest.router == "merge":
        raise ExpertmixError(f"{mix_dir}: a dense merge has no experts to extend; extend a nexus or linear mix")
    config = AutoConfig.from_pretrained(mix_dir)
    recipe = cfg.recipe.for_router(manifest.router)
    if not 0 < recipe.new_share <= 1:
        raise ExpertmixError(f"new-domain share {recipe.new_share} must lie in (0, 1]")
    if recipe.placement == "reinit" and "router" not in recipe.train:
        raise ExpertmixError("placement 'reinit' starts a fresh router: it must train (add 'router' to --train)")
    work = cfg.work_dir
    cfg.start_work_dir()
    expert = load_expert(cfg.expert, cfg.registry)
    check_experts(manifest.seed, [expert], f"the mix {mix_dir} (seed '{manifest.seed.id}')")
    if expert.info.name in config.expert_names:
        raise ExpertmixError(f"the mix {mix_dir} already holds an expert named '{expert.info.name}'")
    if manifest.router == "nexus" and expert.embedding.numel() != config.embedding_dim:
        raise ExpertmixError(f"expert '{expert.info.name}': domain embedding has {expert.embedding.numel()} "
                             f"values, the mix's router takes {config.embedding_dim}")
    n_old = config.num_experts
    needed = budget_tokens(cfg.settings, cfg.seq_len)
    replay = replay_sources(cfg, manifest)
    if cfg.replay is not None:  # an explicit --replay whose names match no old domain replays none of them
        domains = {e.domain for e in manifest.experts} | {d.name for d in manifest.data}
        if unknown := sorted(s.name for s in cfg.replay if s.name not in domains):
            log(f"warning: --replay {', '.join(unknown)} names no domain of the mix "
                f"({', '.join(sorted(domains))}); replay data is best named after the old domains it stands for")
    # Everything the extension learns from (token-row frequencies, placement, finetuning) comes from the
    # documents read here, so a token budget bounds all of it: each source is read up to its share of the budget.
    n_sources = len(cfg.data) + len(replay)
    new_docs = read_sources(cfg.data, tokenizer, cfg.text_field, seed=cfg.settings.seed,
                            max_tokens=share_cap(needed, recipe.new_share, len(cfg.data), n_sources, cfg.seq_len),
                            min_documents=recipe.min_documents)
    old_docs = read_sources(replay, tokenizer, cfg.text_field, seed=cfg.settings.seed,
                            max_tokens=share_cap(needed, 1 - recipe.new_share, len(replay), n_sources, cfg.seq_len),
                            min_documents=recipe.min_documents)
    tokens_read = {k: count_tokens(docs) for k, docs in {**new_docs, **old_docs}.items()}
    clash = set(new_docs) & set(old_docs)
    if clash:
        raise ExpertmixError(f"data source name(s) {', '.join(sorted(clash))} used for both new and replay data")

    init = work / "init"
    if not init.is_dir():
        new_config = extended_config(config, expert.info.name)
        lambdas = None
        if recipe.merge == "token-rows":
            lambdas = token_row_lambdas([d for v in new_docs.values() for d in v], old_docs,
                                        config.text_config.vocab_size, recipe.row_old_weight)
        log(f"appending '{expert.info.name}' as expert {n_old} (merge: {recipe.merge}, "
            f"lambda {recipe.lam(n_old):.3g}; placement: {recipe.placement})")
        tensors = extend_tensors(mix_dir, config, new_config, expert, manifest, recipe, lambdas,
                                 cfg.settings.seed, cfg.registry)
        tmp = work / "init.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        new_config.save_pretrained(tmp)
        save_checkpoint(tmp, tensors)
        del tensors
        tokenizer.save_pretrained(tmp)
        tmp.rename(init)

    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    trainer_class: Callable[..., Trainer] = Trainer
    shares = {k: recipe.new_share / len(new_docs) for k in new_docs}
    shares.update({k: (1 - recipe.new_share) / len(old_docs) for k in old_docs})
    teacher_of = None
    if recipe.distill != "none":
        # Replay rows learn from teacher 0 (the mix as it was); new-domain rows from teacher 1 (the new expert)
        # with distill "all", else from their labels.
        teachers = load_teachers([mix_dir, *([expert.folder] if recipe.distill == "all" else [])],
                                 uses_bf16(cfg.settings.bf16))
        teacher_of = {**{k: 1 if recipe.distill == "all" else -1 for k in new_docs}, **{k: 0 for k in old_docs}}
        trainer_class = partial(DistillationTrainer, teachers=teachers, routing_weight=recipe.routing_weight)
    blocks, report = mixture_blocks({**new_docs, **old_docs}, shares, needed, cfg.seq_len, cfg.settings.seed,
                                    teachers=teacher_of)
    placement = {}
    if recipe.placement in FITTED:
        # the data read above, no document repeated; on the accelerator the Trainer will use anyway
        new_blocks, _ = mixture_blocks(new_docs, None, None, cfg.seq_len, cfg.settings.seed)
        old_blocks, _ = mixture_blocks(old_docs, None, None, cfg.seq_len, cfg.settings.seed)
        model.to("cuda" if torch.cuda.is_available() else "cpu")
        placement = place_new_expert(model, new_blocks, old_blocks, recipe, cfg.seq_len, cfg.settings.progress)
        log(f"placement: {placement['new_tokens_to_new']:.0%} of held-out new-domain tokens pick the new expert, "
            f"{placement['old_tokens_to_new']:.0%} of held-out old tokens")
    trainable = freeze_except(model, recipe.train)
    handles = mask_old_experts(model, n_old)
    settings = replace(cfg.settings, learning_rate=recipe.learning_rate or cfg.settings.learning_rate)
    if recipe.passes > 1 and settings.trains:
        # the budget bounded the tokens read above; the passes repeat them
        steps = settings.steps_for(blocks["input_ids"].shape[0], cfg.seq_len) * recipe.passes
        settings = replace(settings, max_steps=steps, max_tokens=None)
    n_blocks = blocks["input_ids"].shape[0]
    epochs = (settings.max_steps or 0) * settings.batch_size * settings.grad_accum / max(n_blocks, 1)
    log(f"finetuning {', '.join(recipe.train)} ({trainable / 1e6:.2f}M parameters, old experts frozen) on "
        f"{n_blocks} blocks: {recipe.new_share:.0%} new domain, the rest replay"
        + (f"; {recipe.passes} x the step budget: {settings.max_steps} steps, {epochs:.1f} passes over the blocks"
           if recipe.passes > 1 else ""))
    metrics = train_stage(model, blocks, settings, work, cfg.resume, trainer_class=trainer_class)
    for h in handles:
        h.remove()
    restore_old_experts(model, init, n_old)

    entry = expert.manifest_entry()
    if recipe.placement in FITTED and manifest.router == "nexus":
        inputs = [b.router.domain_embeddings[n_old].float().tolist() for b in model.moe_blocks()]
        entry.router_input = inputs if recipe.placement == "fit-layers" else inputs[0]
    manifest.experts.append(entry)
    # The mix's data now holds the new domain too (and any --replay given), so the next extend replays it.
    used = {s.name: DataRef(name=s.name, path=str(Path(s.path).resolve())) for s in [*replay, *cfg.data]}
    manifest.data = [*(d for d in manifest.data if d.name not in used), *used.values()]
    manifest.history.append({"stage": "extend", "expert": expert.info.name, "recipe": cfg.recipe_name,
                             "data": {k: d.path for k, d in used.items()},
                             **asdict(recipe), "lambda": recipe.lam(n_old), "placement_fit": placement,
                             "settings": asdict(settings), "metrics": metrics, "seq_len": cfg.seq_len,
                             # the user's budget; settings hold the steps the passes derived from it
                             "budget": {"max_steps": cfg.settings.max_steps, "max_tokens": cfg.settings.max_tokens},
                             "tokens_read": tokens_read,
                             "mix": {k: v["actual_share"] for k, v in report.items()}})
    save_mix(model, init, manifest, cfg.out)
    remove_tree(work)  # gone at once: a kill now leaves nothing that looks resumable
    return cfg.out
