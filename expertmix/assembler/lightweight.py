"""Lightweight mixtures (``expertmix assemble --kind mov|molora``): routed mixtures of PEFT experts.

A mix is built either from published PEFT experts (every contributor's (IA)³ or LoRA adapter becomes one
expert) or from scratch with N fresh experts, on any causal LM or T5-family encoder-decoder that peft adapts.
Only the routers and the experts train (the seed's weights stay bit-identical), through
:func:`expertmix.experts.training.fit`.

Routers start Nexus-style when the experts carry domain embeddings: each training source is embedded
with the experts' embedder and matched to the experts by similarity; an expert's router row at every
adapted projection is then the mean input of that projection over its matched domain (the domain
embedding, measured in the router's own input space), centred over the experts and scaled to unit logit
spread. Fresh experts get random rows at the same scale. With ``shared_router`` (``--shared-router``) the
adapted projections of a block that read inputs of one width share one router (its owner's rows are the ones
initialised and saved), which on small models frees most of the router's share of the trainable parameters.

A mix folder holds no base weights: ``experts/expertN/`` (peft adapter folders, router rows included),
``mix.json`` (seed signature and path, experts' provenance, parameter counts, history), ``README.md``
(a Hub card with the trainable-parameter share) and the tokenizer. Work happens in ``OUT.partial`` and
resumes like ``assemble``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCardData
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from ..checkpoints import require_context, require_float_weights, require_tokenizer_fits
from ..errors import ExpertmixError, IncompatibleExpertError
from ..experts.data import pack, read_documents
from ..experts.training import Blocks, DataSource, ResumableJob, TrainSettings, resumable_job
from ..fsutil import atomic_dir, remove_tree, sha256_file, write_json_atomic, write_text_atomic
from ..hub.card import check_compatible
from .assemble import budget_tokens, mixture_blocks, read_sources, train_stage
from .manifest import MIX_FILE, DataRef, SeedInfo, Standardisation, read_manifest
from .mixture_layers import (
    capture_routing,
    install_routers,
    routed_layers,
    router_owners,
    set_top_k,
    share_routers,
    unrouted_layers,
)
from .routing_report import EvalReport, eval_blocks
from .upcycling import ExpertSource, load_expert, seed_info

MixKind = Literal["mov", "molora"]
EXPERT_KINDS: dict[str, str] = {"mov": "ia3", "molora": "lora"}  # mixture kind -> the PEFT expert kind it mixes
LIGHTWEIGHT_FORMAT = "expertmix-lightweight-mix"
EXPERTS_DIR = "experts"
CARD_FILE = "README.md"
# Peak learning rates when none is given: the better of those tried with benchmarks/lightweight.py at 32K
# tokens (mov 1e-2 and 3e-2, molora 2e-3 and 5e-3); (IA)³ vectors need a large one.
DEFAULT_LEARNING_RATES: dict[str, float] = {"mov": 1e-2, "molora": 2e-3}
ASSIGNMENT_TEMPERATURE = 20.0  # softmax temperature over cosine similarities when matching experts to sources
EMBED_SAMPLE = 16  # documents per training source embedded to match it to the experts
CALIBRATION_TOKENS = 1024  # router inputs kept per layer and source to scale the initial logits


def adapter_name(i: int) -> str:
    """peft adapter names are module keys (no '.' or '/'); expert names live in mix.json."""
    return f"expert{i}"


# --------------------------------------------------------------------------------------------------
# Building the mixture
# --------------------------------------------------------------------------------------------------

@dataclass
class MixtureSpec:
    """The shape of a lightweight mix built from scratch (published experts bring their own adapter configs)."""

    kind: MixKind
    num_experts: int = 4
    top_k: int | None = None
    rank: int = 4  # MoLoRA: rank of each expert
    alpha: int = 16  # MoLoRA: scaling alpha / rank (the paper: 16 / r)
    target_modules: list[str] | None = None  # None: peft's default for the architecture
    shared_router: bool = False  # one router per block and input width (see mixture_layers.share_routers)


def is_seq2seq(config) -> bool:
    """Encoder-decoder (T5 family) rather than decoder-only."""
    return bool(getattr(config, "is_encoder_decoder", False))


def load_base(seed_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The seed as a causal LM or, for encoder-decoders, a seq2seq LM (float32 for training)."""
    seed_dir = Path(seed_dir)
    require_float_weights(seed_dir, "a seed")
    auto = AutoModelForSeq2SeqLM if is_seq2seq(AutoConfig.from_pretrained(seed_dir)) else AutoModelForCausalLM
    return auto.from_pretrained(seed_dir.resolve(), dtype=dtype)  # the adapters record it as their base


def fresh_expert_config(spec: MixtureSpec, model) -> PeftConfig:
    """The peft config of one fresh expert: (IA)³ vectors (start at ones) or a LoRA adapter (B starts at 0)."""
    task = "SEQ_2_SEQ_LM" if is_seq2seq(model.config) else "CAUSAL_LM"
    targets = list(spec.target_modules) if spec.target_modules else None
    if spec.kind == "mov":
        feedforward = None
        if targets is not None:  # the targets that sit on a feed-forward input, as peft knows them
            known = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model.config.model_type, [])
            feedforward = [t for t in targets if t in known]
        return IA3Config(task_type=task, target_modules=targets, feedforward_modules=feedforward)
    if spec.rank < 1:
        raise ExpertmixError(f"--rank must be at least 1, got {spec.rank}")
    return LoraConfig(task_type=task, r=spec.rank, lora_alpha=spec.alpha, target_modules=targets, lora_dropout=0.0)


def build_mixture(model, configs: Sequence[PeftConfig], top_k: int | None = None,
                  shared_router: bool = False) -> PeftModel:
    """Wrap ``model`` in one peft adapter per expert config and route them (only adapters and routers train).

    ``shared_router``: the adapted projections of a block that read inputs of one width share one router."""
    if not configs:
        raise ExpertmixError("a mixture needs at least one expert")
    kinds = {c.peft_type.value for c in configs}
    if len(kinds) > 1 or not kinds <= {"IA3", "LORA"}:
        raise ExpertmixError(f"experts of one mixture must all be (IA)³ or all LoRA adapters, got {sorted(kinds)}")
    if top_k is not None and not 1 <= top_k <= len(configs):
        raise ExpertmixError(f"--top-k {top_k}: choose 1..{len(configs)} (the number of experts)")
    configs = [copy.deepcopy(c) for c in configs]
    for c in configs:
        c.inference_mode = False
    names = [adapter_name(i) for i in range(len(configs))]
    try:
        peft_model = get_peft_model(model, configs[0], adapter_name=names[0])
    except ValueError as exc:  # peft's NoMatchingPeftModuleError and bad settings: name what the user chose
        targets = configs[0].target_modules
        raise ExpertmixError(f"the experts' adapter settings do not fit the seed (target modules "
                             f"{sorted(targets) if isinstance(targets, (set, list)) else targets}): {exc}") from exc
    install_routers(peft_model, names[0], peft_model.peft_config[names[0]])
    for name, cfg in zip(names[1:], configs[1:], strict=True):
        peft_model.add_adapter(name, cfg)
    peft_model.base_model.set_adapter(names)
    extra = unrouted_layers(peft_model)
    if extra:
        raise IncompatibleExpertError(f"{extra[0]}: adapted by some experts but not by {names[0]}; "
                                      f"the experts of a mixture must adapt the same modules")
    for layer_name, layer in routed_layers(peft_model):
        if layer.experts() != names:
            missing = sorted(set(names) - set(layer.experts()))
            raise IncompatibleExpertError(f"{layer_name}: adapted by some experts but not by {', '.join(missing)}; "
                                          f"the experts of a mixture must adapt the same modules")
    if shared_router:
        share_routers(peft_model)
    set_top_k(peft_model, top_k)
    return peft_model


def load_expert_weights(model: PeftModel, folders: Sequence[Path]) -> None:
    """Load each adapter folder's weights into its expert (router rows too, when the folder has them)."""
    for i, folder in enumerate(folders):
        name = adapter_name(i)
        result = set_peft_model_state_dict(model, load_peft_weights(str(folder)), adapter_name=name)
        if result.unexpected_keys:
            raise IncompatibleExpertError(f"{folder}: adapter tensors with no place in the mixture "
                                          f"({', '.join(result.unexpected_keys[:3])})")
        missing = [k for k in result.missing_keys if f".{name}" in k and ".mix_router." not in k]
        if missing:
            raise IncompatibleExpertError(f"{folder}: adapter lacks tensors the mixture needs "
                                          f"({', '.join(missing[:3])})")


def parameter_counts(model: PeftModel) -> dict[str, Any]:
    """Trainable parameters (routers, experts) against all of the model's parameters."""
    routers = experts = total = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            if ".mix_router." in name:
                routers += p.numel()
            else:
                experts += p.numel()
    trainable = routers + experts
    return {"trainable": trainable, "routers": routers, "experts": experts, "total": total,
            "trainable_share": trainable / max(total, 1)}


# --------------------------------------------------------------------------------------------------
# Router initialisation
# --------------------------------------------------------------------------------------------------

def as_seq2seq(blocks: Blocks) -> Blocks:
    """Packed blocks as encoder-decoder examples: the first half is the input, the second half the target."""
    half = blocks["input_ids"].shape[1] // 2
    if half < 1:
        raise ExpertmixError("--seq-len must be at least 2 for an encoder-decoder seed")
    return {"input_ids": blocks["input_ids"][:, :half].contiguous(), "labels": blocks["labels"][:, half:].contiguous()}


@torch.no_grad()
def router_input_statistics(model: PeftModel, calibration: dict[str, Blocks], batch_size: int = 8,
                            keep: int = CALIBRATION_TOKENS) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per routed layer: the mean input over each source ``[sources, d]`` and a sample of inputs ``[n, d]``.

    Measured on the seed itself (adapters disabled), so the result does not depend on the routers.
    """
    layers = list(routed_layers(model))
    sums = {n: torch.zeros(len(calibration), layer.in_features, dtype=torch.float64) for n, layer in layers}
    counts = {n: torch.zeros(len(calibration), dtype=torch.float64) for n, _ in layers}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n, _ in layers}
    kept = {n: [0] * len(calibration) for n, _ in layers}
    current = {"source": 0}

    def hook(name: str):
        def record(_module, args):
            j = current["source"]
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu()
            sums[name][j] += x.double().sum(0)
            counts[name][j] += x.shape[0]
            take = x[: keep - kept[name][j]]
            kept[name][j] += take.shape[0]
            samples[name].append(take)
        return record

    handles = [layer.register_forward_pre_hook(hook(n)) for n, layer in layers]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            for j, blocks in enumerate(calibration.values()):
                current["source"] = j
                for s in range(0, blocks["input_ids"].shape[0], batch_size):
                    batch = {k: v[s:s + batch_size].to(device) for k, v in blocks.items()}
                    model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    means = {n: (sums[n] / counts[n].clamp_min(1).unsqueeze(1)).float() for n in sums}
    return means, {n: torch.cat(v) for n, v in samples.items()}


def embedding_assignment(experts: Sequence[ExpertSource], sources: Sequence[DataSource], seed_dir: Path,
                         text_field: str | None = None, seed: int = 0) -> torch.Tensor:
    """``[experts, sources]``: how much each expert's router starts from each training source.

    The sources are embedded with the experts' own embedder; similarity to each expert's published domain
    embedding (both standardised together) goes through a sharp softmax, so an expert takes its own domain.
    """
    from ..experts.embedding import domain_embedding, load_embedder

    embedder = load_embedder(experts[0].info.embedding.model, seed_dir)
    src = torch.stack([domain_embedding(read_documents(s.path, text_field, domain=s.name), embedder,
                                        sample=EMBED_SAMPLE, seed=seed)[0] for s in sources])
    exp = torch.stack([e.embedding.float() for e in experts])
    standard = Standardisation.fit(torch.cat([exp, src]))
    cos = F.normalize(standard.apply(exp), dim=-1) @ F.normalize(standard.apply(src), dim=-1).T
    return torch.softmax(ASSIGNMENT_TEMPERATURE * cos, dim=-1)


@torch.no_grad()
def init_routers(model: PeftModel, means: dict[str, torch.Tensor] | None, samples: dict[str, torch.Tensor] | None,
                 assignment: torch.Tensor | None = None, seed: int = 0) -> None:
    """Set every router's rows: from the assigned sources' mean inputs (centred over the experts), else random;
    with calibration samples, rows are scaled so that the initial logits have unit standard deviation."""
    gen = torch.Generator().manual_seed(seed)
    for name, layer in router_owners(model):  # a shared router starts from its owner's input
        experts = layer.experts()
        rows = None
        if assignment is not None and means is not None:
            rows = assignment.to(means[name].dtype) @ means[name]
            rows = rows - rows.mean(0, keepdim=True)
            if rows.abs().max() == 0:  # one source, or identical ones: nothing tells the experts apart
                rows = None
        if rows is None:
            rows = torch.randn(len(experts), layer.in_features, generator=gen) / math.sqrt(layer.in_features)
        if samples is not None and samples[name].numel():
            spread = (samples[name] @ rows.T).std()
            if torch.isfinite(spread) and spread > 1e-8:
                rows = rows / spread
        for e, row in zip(experts, rows, strict=True):
            layer.mix_router[e].copy_(row.to(layer.mix_router[e]))


# --------------------------------------------------------------------------------------------------
# The mix folder
# --------------------------------------------------------------------------------------------------

class LightweightExpert(BaseModel):
    """One expert of a lightweight mix: its name, its adapter folder, and where it came from."""

    model_config = ConfigDict(extra="allow")

    name: str
    domain: str | None = None
    adapter: str = Field(description="folder of its peft adapter inside the mix, e.g. experts/expert0")
    repo: str | None = Field(default=None, description="registry name or folder it was read from; None: fresh")
    revision: str | None = None
    adapter_sha256: str | None = None
    embedding_model: str | None = None
    embedding: list[float] | None = None


class LightweightManifest(BaseModel):
    """``mix.json`` of a lightweight mix."""

    model_config = ConfigDict(extra="allow")

    format: Literal["expertmix-lightweight-mix"] = LIGHTWEIGHT_FORMAT
    version: int = 1
    kind: MixKind
    task: Literal["causal", "seq2seq"]
    seed: SeedInfo
    seed_path: str
    top_k: int | None = None
    shared_router: bool = False
    experts: list[LightweightExpert]
    router_init: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[DataRef] = Field(default_factory=list)
    history: list[dict[str, Any]] = Field(default_factory=list)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / MIX_FILE
        write_json_atomic(path, self.model_dump(mode="json"))
        return path


def is_lightweight_mix(folder: str | Path) -> bool:
    """Whether ``folder`` holds a lightweight (MoV / MoLoRA) mix rather than a Nexus one."""
    path = Path(folder) / MIX_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == LIGHTWEIGHT_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def read_lightweight_manifest(folder: str | Path) -> LightweightManifest:
    """Read and validate a lightweight mix's ``mix.json``; errors name the file and the field."""
    return read_manifest(folder, LightweightManifest)


def card_markdown(manifest: LightweightManifest, metrics: dict[str, float] | None = None) -> str:
    """A Hub model card: standard front matter plus a ``mixture:`` block with the trainable-parameter share."""
    p = manifest.parameters
    block = {"kind": manifest.kind, "task": manifest.task, "top_k": manifest.top_k,
             "experts": [{"name": e.name, "domain": e.domain, "repo": e.repo, "revision": e.revision}
                         for e in manifest.experts],
             "trainable_parameters": p.get("trainable"), "total_parameters": p.get("total"),
             "trainable_share": p.get("trainable_share"), "metrics": metrics or {}}
    data = ModelCardData(license="apache-2.0", library_name="peft", base_model=manifest.seed.id,
                         base_model_relation="adapter", tags=["expertmix", "mixture", manifest.kind],
                         datasets=[d.name for d in manifest.data] or None, mixture=block)
    title = {"mov": "MoV (mixture of (IA)³ vectors)", "molora": "MoLoRA (mixture of LoRA adapters)"}[manifest.kind]
    lines = [f"# {title} on `{manifest.seed.id}`", "",
             f"{len(manifest.experts)} experts, routed per token at every adapted projection"
             f"{'' if manifest.top_k is None else f' (top-{manifest.top_k})'}; built with expertmix.", "",
             "| | parameters |", "|---|---|",
             f"| trainable (routers + experts) | {p.get('trainable', 0):,} |",
             f"| of which routers | {p.get('routers', 0):,} |",
             f"| whole model | {p.get('total', 0):,} |",
             f"| trainable share | {100 * p.get('trainable_share', 0.0):.3f}% |", "",
             "Experts: " + ", ".join(f"`{e.name}`" for e in manifest.experts) + "."]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def save_lightweight(model: PeftModel, manifest: LightweightManifest, tokenizer, out: str | Path,
                     metrics: dict[str, float] | None = None) -> Path:
    """Write the mix folder atomically: one peft adapter folder per expert, tokenizer, mix.json, card."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(str(tmp / EXPERTS_DIR))
        tokenizer.save_pretrained(tmp)
        manifest.save(tmp)
        write_text_atomic(tmp / CARD_FILE, card_markdown(manifest, metrics))
    return out


@dataclass
class LoadedMix:
    """A lightweight mix ready to run."""

    model: PeftModel
    manifest: LightweightManifest
    tokenizer: Any

    @property
    def seq2seq(self) -> bool:
        return self.manifest.task == "seq2seq"


def load_lightweight(folder: str | Path, seed: str | Path | None = None, device: str | None = None) -> LoadedMix:
    """Rebuild a lightweight mix on its seed (``seed``, else the folder in mix.json), checked by fingerprint."""
    from ..hub.fingerprint import model_signature

    folder = Path(folder)
    manifest = read_lightweight_manifest(folder)
    seed_dir = Path(seed) if seed is not None else Path(manifest.seed_path)
    if seed is not None and not (seed_dir / "config.json").is_file():
        raise ExpertmixError(f"--seed {seed_dir}: not a model folder (no config.json); give the seed of the mix "
                             f"{folder}")
    if not (seed_dir / "config.json").is_file():
        raise ExpertmixError(f"{folder}: its seed folder {seed_dir} (field 'seed_path' of {MIX_FILE}) is not here; "
                             f"pass the seed folder (--seed)")
    signature = model_signature(seed_dir)
    for name in ("base_fingerprint", "architecture", "tokenizer_fingerprint"):
        if getattr(signature, name) != getattr(manifest.seed, name):
            raise IncompatibleExpertError(f"{seed_dir} is not the seed of the mix {folder}: field 'seed.{name}' "
                                          f"of {MIX_FILE} differs ({getattr(manifest.seed, name)[:16]} there, "
                                          f"{getattr(signature, name)[:16]} here)")
    adapters = [folder / e.adapter for e in manifest.experts]
    for a in adapters:
        if not (a / "adapter_config.json").is_file():
            raise ExpertmixError(f"{a}: expert adapter folder missing (no adapter_config.json)")
    model = build_mixture(load_base(seed_dir), [PeftConfig.from_pretrained(str(a)) for a in adapters],
                          manifest.top_k, manifest.shared_router)
    load_expert_weights(model, adapters)
    model.eval()
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return LoadedMix(model=model, manifest=manifest, tokenizer=AutoTokenizer.from_pretrained(folder))


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate_lightweight(model: PeftModel, blocks: dict[str, Blocks], expert_names: Sequence[str],
                         seq2seq: bool = False, batch_size: int = 8) -> EvalReport:
    """Perplexity per domain and the routing matrix: each domain's mean merging weight per expert, per router."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    layer_names = [n for n, _ in routed_layers(model)]
    ppl: dict[str, float] = {}
    per_layer = torch.zeros(len(layer_names), len(blocks), len(expert_names), dtype=torch.float64)
    for d, (domain, b) in enumerate(tqdm(blocks.items(), desc="evaluating", unit="domain", disable=len(blocks) < 4)):
        data = as_seq2seq(b) if seq2seq else b
        nll, count = 0.0, 0
        weight = torch.zeros(len(layer_names), dtype=torch.float64)
        for s in range(0, data["input_ids"].shape[0], batch_size):
            ids = data["input_ids"][s:s + batch_size].to(device)
            labels = data["labels"][s:s + batch_size].to(device)
            with capture_routing(model) as sinks:
                if seq2seq:
                    logits, target = model(input_ids=ids, labels=labels).logits.float(), labels
                else:
                    logits, target = model(input_ids=ids).logits[:, :-1].float(), labels[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                         ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
            label_mask = (labels != -100).double()
            for i, name in enumerate(layer_names):
                for probs in sinks[name]:
                    probs = probs.double().reshape(ids.shape[0], -1, probs.shape[-1])
                    mask = label_mask if probs.shape[1] == labels.shape[1] else torch.ones(probs.shape[:2],
                                                                                           device=probs.device,
                                                                                           dtype=torch.float64)
                    per_layer[i, d] += (probs * mask.unsqueeze(-1)).sum((0, 1)).cpu()
                    weight[i] += float(mask.sum())
        ppl[domain] = math.exp(nll / max(count, 1))
        per_layer[:, d] /= weight.clamp_min(1).unsqueeze(1)
    model.train(was_training)
    routing = per_layer.float()
    return EvalReport(domains=list(blocks), perplexity=ppl, experts=list(expert_names),
                      routing=routing.mean(0) if layer_names else None,
                      routing_per_layer=routing if layer_names else None)


def evaluate_lightweight_mix(mix: str | Path, sources: Sequence[DataSource], seq_len: int = 256,
                             max_blocks: int | None = 32, batch_size: int = 8, text_field: str | None = None,
                             seed: str | Path | None = None, device: str | None = None) -> EvalReport:
    """Load a lightweight mix and evaluate it on named data sources (what ``expertmix eval`` shows)."""
    loaded = load_lightweight(mix, seed=seed, device=device)
    blocks = eval_blocks(sources, loaded.tokenizer, seq_len, max_blocks, text_field)
    return evaluate_lightweight(loaded.model, blocks, [e.name for e in loaded.manifest.experts],
                                seq2seq=loaded.seq2seq, batch_size=batch_size)


# --------------------------------------------------------------------------------------------------
# Assembling
# --------------------------------------------------------------------------------------------------

@dataclass
class LightweightConfig(ResumableJob):
    """Everything ``expertmix assemble --kind mov|molora`` needs."""

    seed: Path
    kind: MixKind
    data: list[DataSource]
    out: Path
    experts: list[str] = field(default_factory=list)  # registry refs or folders; empty: fresh experts
    num_experts: int = 4
    top_k: int | None = None
    rank: int = 4
    alpha: int = 16
    target_modules: list[str] | None = None
    shared_router: bool = False
    router_init: Literal["auto", "domain", "random"] = "auto"
    registry: str | None = None
    seed_id: str | None = None
    mix: str | None = None
    seq_len: int = 256
    text_field: str | None = None
    calibration_blocks: int = 4
    resume: bool = False
    settings: TrainSettings = field(default_factory=TrainSettings)

    def spec(self) -> MixtureSpec:
        return MixtureSpec(kind=self.kind, num_experts=self.num_experts, top_k=self.top_k, rank=self.rank,
                           alpha=self.alpha, target_modules=self.target_modules, shared_router=self.shared_router)


def check_lightweight_experts(seed: SeedInfo, experts: Sequence[ExpertSource], kind: str) -> None:
    """Refuse experts of another PEFT kind, of another seed, given twice, or with incomparable embeddings."""
    want = EXPERT_KINDS[kind]
    names = [e.info.name for e in experts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExpertmixError(f"expert(s) {', '.join(dupes)} given more than once")
    for e in experts:
        check_compatible(seed, e.info, f"the seed '{seed.id}'")
        if e.info.kind != want:
            raise IncompatibleExpertError(f"expert '{e.info.name}' is a {e.info.kind} expert: --kind {kind} mixes "
                                          f"{want} adapters (field 'expert.kind' must be '{want}')")
    first = experts[0]
    for e in experts[1:]:
        if (e.info.embedding.model, e.embedding.numel()) != (first.info.embedding.model, first.embedding.numel()):
            raise IncompatibleExpertError(
                f"expert '{e.info.name}' has a domain embedding from '{e.info.embedding.model}' "
                f"({e.embedding.numel()} values) but '{first.info.name}' has one from "
                f"'{first.info.embedding.model}' ({first.embedding.numel()}): field 'expert.embedding' differs")


def _calibration(tokenized: dict, seq_len: int, n_blocks: int, seq2seq: bool) -> dict[str, Blocks]:
    out = {}
    for name, docs in tokenized.items():
        blocks = pack(docs[:256], seq_len, drop_last=False)
        blocks = {k: v[:n_blocks] for k, v in blocks.items()}
        out[name] = as_seq2seq(blocks) if seq2seq else blocks
    return out


@resumable_job
def assemble_lightweight(cfg: LightweightConfig, log: Callable[[str], None] = print) -> Path:
    """Build a MoV / MoLoRA mix (from published PEFT experts or fresh ones), train routers and experts, save it."""
    if cfg.kind not in EXPERT_KINDS:
        raise ExpertmixError(f"--kind {cfg.kind!r}: choose mov or molora")
    if not cfg.data:
        raise ExpertmixError("no training data given (--data NAME=PATH, one per domain)")
    if not cfg.experts and cfg.num_experts < 1:
        raise ExpertmixError(f"--num-experts must be at least 1, got {cfg.num_experts}")
    if cfg.router_init not in ("auto", "domain", "random"):
        raise ExpertmixError(f"--router-init {cfg.router_init!r}: choose auto, domain or random")
    if cfg.router_init == "domain" and not cfg.experts:
        raise ExpertmixError("--router-init domain needs published experts (their domain embeddings); "
                             "fresh experts start from random routers")
    from ..experts.mixing import parse_mix_spec

    shares = parse_mix_spec(cfg.mix) if cfg.mix else None
    if cfg.out.exists():
        raise ExpertmixError(f"output folder {cfg.out} already exists; choose another --out or remove it")
    seed = seed_info(cfg.seed, cfg.seed_id)
    require_context(cfg.seed, cfg.seq_len)
    tokenizer = AutoTokenizer.from_pretrained(cfg.seed)
    require_tokenizer_fits(tokenizer, cfg.seed, f"assemble --kind {cfg.kind} --seed {cfg.seed}")
    experts = [load_expert(ref, cfg.registry) for ref in cfg.experts]
    if experts:  # refused before any work folder exists
        check_lightweight_experts(seed, experts, cfg.kind)
    work = cfg.work_dir
    cfg.start_work_dir()
    torch.manual_seed(cfg.settings.seed)
    base = load_base(cfg.seed)
    seq2seq = is_seq2seq(base.config)
    if experts:
        configs = [PeftConfig.from_pretrained(str(e.folder)) for e in experts]
        log(f"experts: {', '.join(f'{e.info.name} ({e.info.domain})' for e in experts)}")
    else:
        configs = [fresh_expert_config(cfg.spec(), base) for _ in range(cfg.num_experts)]
        log(f"{cfg.num_experts} fresh {EXPERT_KINDS[cfg.kind]} experts")
    model = build_mixture(base, configs, cfg.top_k, cfg.shared_router)
    if experts:
        load_expert_weights(model, [e.folder for e in experts])

    needed = budget_tokens(cfg.settings, cfg.seq_len)
    tokenized = read_sources(cfg.data, tokenizer, cfg.text_field, max_tokens=needed, seed=cfg.settings.seed)
    blocks, report = mixture_blocks(tokenized, shares, needed, cfg.seq_len, cfg.settings.seed)
    if seq2seq:
        blocks = as_seq2seq(blocks)

    method = "domain" if cfg.router_init == "domain" or (cfg.router_init == "auto" and experts) else "random"
    assignment = None
    if method == "domain":
        assignment = embedding_assignment(experts, cfg.data, Path(cfg.seed), cfg.text_field, cfg.settings.seed)
        for e, row in zip(experts, assignment, strict=True):
            best = int(row.argmax())
            log(f"router init: expert '{e.info.name}' starts from source '{cfg.data[best].name}' "
                f"(weight {float(row[best]):.2f})")
    means, samples = router_input_statistics(
        model, _calibration(tokenized, cfg.seq_len, cfg.calibration_blocks, seq2seq), cfg.settings.batch_size)
    init_routers(model, means, samples, assignment, cfg.settings.seed)

    counts = parameter_counts(model)
    log(f"training routers and experts: {counts['trainable']:,} of {counts['total']:,} parameters "
        f"({100 * counts['trainable_share']:.2f}%) on {blocks['input_ids'].shape[0]} blocks from "
        f"{', '.join(tokenized)}")
    # The Trainer gets the transformers model with the mixture inside (not the PeftModel): its checkpoints
    # then hold every expert and router, and --resume restores them all (peft's resume restores one adapter).
    metrics = train_stage(model.get_base_model(), blocks, cfg.settings, work, cfg.resume)

    names = [e.info.name for e in experts] or [adapter_name(i) for i in range(cfg.num_experts)]
    manifest = LightweightManifest(
        kind=cfg.kind, task="seq2seq" if seq2seq else "causal", seed=seed, seed_path=str(Path(cfg.seed).resolve()),
        top_k=cfg.top_k, shared_router=cfg.shared_router,
        experts=[LightweightExpert(name=name, adapter=f"{EXPERTS_DIR}/{adapter_name(i)}",
                                   **(_provenance(experts[i]) if experts else {}))
                 for i, name in enumerate(names)],
        router_init={"method": method,
                     "assignment": {names[i]: {s.name: float(w) for s, w in zip(cfg.data, row, strict=True)}
                                    for i, row in enumerate(assignment)} if assignment is not None else None},
        parameters=counts,
        data=[DataRef(name=s.name, path=str(Path(s.path).resolve())) for s in cfg.data],
        history=[{"stage": "assemble", "kind": cfg.kind, "train": ["routers", "experts"], "seq_len": cfg.seq_len,
                  "settings": asdict(cfg.settings), "metrics": metrics, "parameters": counts,
                  "mix": {k: v["actual_share"] for k, v in report.items()}}])
    save_lightweight(model, manifest, tokenizer, cfg.out,
                     metrics={k: float(v) for k, v in metrics.items() if k == "train_loss"})
    remove_tree(work)  # gone at once: a kill now leaves nothing that looks resumable
    return cfg.out


def _provenance(e: ExpertSource) -> dict:
    weights = e.folder / "adapter_model.safetensors"
    return {"domain": e.info.domain, "repo": e.repo, "revision": e.revision,
            "adapter_sha256": sha256_file(weights) if weights.is_file() else None,
            "embedding_model": e.info.embedding.model, "embedding": e.embedding.float().tolist()}
