"""Upcycling: dense experts of one seed become a Nexus MoE checkpoint (or a dense weight average).

Tensors stream from the experts' safetensors one at a time, so peak memory is about the output plus one
tensor of one expert (never all experts at once):

- shared expert of layer l = the seed's FFN of layer l;
- routed expert i of layer l = expert i's FFN of layer l, fused into ``gate_up_proj[i]`` / ``down_proj[i]``;
- everything else (embeddings, attention, norms, head) = the average over the experts;
- router: freshly initialised; the Nexus router gets the experts' standardised domain embeddings.

Experts come through the hub interface (a registry ref, or a validated expert folder) and must share the
seed's weights fingerprint, architecture and tokenizer, else they are refused by name.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from ..checkpoints import require_float_weights
from ..errors import ExpertmixError, IncompatibleExpertError, StoreError
from ..fsutil import atomic_dir, atomic_path, sha256_file
from ..hub.card import BaseSignature, ExpertInfo, check_compatible
from ..hub.fingerprint import architecture_of, fingerprint_tokenizer, fingerprint_weights, weight_files
from ..hub.repo import load_domain_embedding, validate_expert_folder
from ..hub.store import open_registry
from .configuration_nexus import NexusConfig
from .manifest import MixExpert, MixManifest, SeedInfo, Standardisation
from .modeling_nexus import ROUTERS, NexusForCausalLM

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # beside the shards of a sharded checkpoint
FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
COPIED_FILES = ("generation_config.json",)


@dataclass
class ExpertSource:
    """A dense expert ready to be upcycled: its folder, card and provenance."""

    ref: str
    folder: Path
    info: ExpertInfo
    repo: str
    revision: str | None
    weights_sha256: dict[str, str]
    embedding: torch.Tensor

    def manifest_entry(self) -> MixExpert:
        return MixExpert(name=self.info.name, domain=self.info.domain, repo=self.repo, revision=self.revision,
                         weights_sha256=self.weights_sha256, embedding_model=self.info.embedding.model,
                         embedding=self.embedding.float().tolist())


def load_expert(ref: str, registry: str | None = None) -> ExpertSource:
    """Resolve ``NAME[@REV]`` through the registry (or read a local expert folder) and validate it."""
    path = Path(ref)
    if path.is_dir():
        folder = validate_expert_folder(path)
        info = folder.card.expert
        dense = info.kind == "dense"
        files = {p.name: sha256_file(p) for p in weight_files(path)} if dense else {}
        repo, revision = str(path.resolve()), None
    else:
        reg = open_registry(registry)
        entry = reg.show(ref)
        repo, revision = entry.name, entry.revision
        folder = validate_expert_folder(reg.pull(f"{entry.name}@{entry.revision}"))
        listed = {f.path: f.sha256 for f in entry.files}
        files = {p.name: listed.get(p.relative_to(folder.path).as_posix()) or sha256_file(p)
                 for p in weight_files(folder.path)} if folder.card.expert.kind == "dense" else {}
        # named as the registry names it (``publish --name`` may differ from the card): two repos, two experts
        info = folder.card.expert.model_copy(update={"name": entry.name})
    return ExpertSource(ref=ref, folder=folder.path, info=info, repo=repo, revision=revision,
                        weights_sha256=files, embedding=load_domain_embedding(folder.path).float())


def seed_info(seed_dir: str | Path, seed_id: str | None = None) -> SeedInfo:
    """The seed's signature (weights fingerprint, architecture, tokenizer) that every expert must match."""
    seed_dir = Path(seed_dir)
    require_float_weights(seed_dir, "a seed")
    return SeedInfo(id=seed_id or seed_dir.resolve().name, base_fingerprint=fingerprint_weights(seed_dir),
                    architecture=architecture_of(AutoConfig.from_pretrained(seed_dir)),
                    tokenizer_fingerprint=fingerprint_tokenizer(AutoTokenizer.from_pretrained(seed_dir)))


def check_experts(seed: BaseSignature, experts: Sequence[ExpertSource], what: str) -> None:
    """Refuse experts that are not dense, do not share the seed, or whose embeddings do not compare."""
    names = [e.info.name for e in experts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExpertmixError(f"expert(s) {', '.join(dupes)} given more than once")
    for e in experts:
        check_compatible(seed, e.info, what)
        if e.info.kind != "dense":
            raise IncompatibleExpertError(f"expert '{e.info.name}' is a {e.info.kind} adapter: Nexus "
                                          f"upcycles dense experts (field 'expert.kind' must be 'dense')")
    first = experts[0]
    for e in experts[1:]:
        if (e.info.embedding.model, e.embedding.numel()) != \
                (first.info.embedding.model, first.embedding.numel()):
            raise IncompatibleExpertError(
                f"expert '{e.info.name}' has a domain embedding from '{e.info.embedding.model}' "
                f"({e.embedding.numel()} values) but '{first.info.name}' has one from "
                f"'{first.info.embedding.model}' ({first.embedding.numel()}): "
                f"field 'expert.embedding' differs")


def stream_tensors(folder: Path, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a model folder's safetensors, one tensor in memory at a time."""
    for f in weight_files(folder):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                if names is None or k in names:
                    yield k, sf.get_tensor(k)


@dataclass
class MoeLayout:
    """Where each dense tensor goes in the MoE: FFN tensors per layer, and everything else."""

    model: NexusForCausalLM  # on the meta device: names and shapes only
    block_prefix: list[str]  # MoE key prefix of each layer's block, e.g. 'language_model.model.layers.0.mlp'
    dense_prefix: str  # the prefix dense keys lack: 'language_model.'

    @classmethod
    def for_config(cls, config: NexusConfig) -> MoeLayout:
        with torch.device("meta"):
            model = NexusForCausalLM(config)
        names = {id(m): n for n, m in model.named_modules()}
        prefixes = [names[id(b)] for b in model.moe_blocks()]
        for b, p in zip(model.moe_blocks(), prefixes, strict=True):
            got = sorted(n for n, _ in b.shared_expert.named_parameters())
            want = sorted(f"{x}.weight" for x in FFN_PROJECTIONS)
            if got != want:
                raise ExpertmixError(f"{p}: the seed's FFN has parameters {got}; Nexus needs a SwiGLU FFN "
                                     f"with exactly {want} (no biases)")
        return cls(model=model, block_prefix=prefixes, dense_prefix=f"{NexusForCausalLM.base_model_prefix}.")

    def ffn_key(self, dense_key: str) -> tuple[int, str] | None:
        """``(layer, projection)`` when ``dense_key`` is an FFN weight, else None."""
        for layer, p in enumerate(self.block_prefix):
            base = p[len(self.dense_prefix):] + "."
            if dense_key.startswith(base):
                proj = dense_key[len(base):].removesuffix(".weight")
                if proj in FFN_PROJECTIONS:
                    return layer, proj
        return None

    def expected_keys(self) -> set[str]:
        """Every tensor the checkpoint must hold (tied copies excluded: transformers re-ties them)."""
        tied = set(self.model.get_expanded_tied_weights_keys(all_submodels=True))
        return {k for k in self.model.state_dict() if k not in tied}


def _check_complete(tensors: dict[str, torch.Tensor], layout: MoeLayout, what: str) -> None:
    missing = sorted(layout.expected_keys() - set(tensors))
    extra = sorted(set(tensors) - set(layout.model.state_dict()))
    if missing or extra:
        raise ExpertmixError(f"{what}: checkpoint does not match the MoE layout "
                             f"(missing {missing[:4]}, unexpected {extra[:4]})")


def nexus_config(seed_config, experts: Sequence[ExpertSource], router: str, aux_coef: float,
                 impl: str = "auto") -> NexusConfig:
    """The MoE's config for ``experts`` on the seed's architecture."""
    return NexusConfig(text_config=seed_config.to_dict(), num_experts=len(experts), router_type=router,
                       embedding_dim=int(experts[0].embedding.numel()) if router == "nexus" else 0,
                       router_aux_loss_coef=aux_coef, routed_experts_impl=impl,
                       expert_names=[e.info.name for e in experts], architectures=["NexusForCausalLM"])


def fresh_router_tensors(config: NexusConfig, layout: MoeLayout, embeddings: torch.Tensor | None,
                         seed: int) -> dict[str, torch.Tensor]:
    """Newly initialised router weights for every layer; the Nexus router gets the standardised embeddings."""
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        out = {}
        for p in layout.block_prefix:
            router = ROUTERS[config.router_type](config)
            if embeddings is not None:
                router.domain_embeddings.copy_(embeddings)
            out.update({f"{p}.router.{k}": v.detach().clone() for k, v in router.state_dict().items()})
    return out


def _average_into(acc: dict[str, torch.Tensor], name: str, t: torch.Tensor, n: int) -> None:
    """Running mean (float32) of a non-FFN tensor over ``n`` experts."""
    t = t.float() / n
    if name in acc:
        if acc[name].shape != t.shape:
            raise IncompatibleExpertError(f"tensor {name}: shape {tuple(t.shape)} differs from "
                                          f"{tuple(acc[name].shape)} in an earlier expert")
        acc[name] += t
    else:
        acc[name] = t.clone()


def upcycle_tensors(seed_dir: Path, experts: Sequence[ExpertSource], config: NexusConfig, layout: MoeLayout,
                    dtype: torch.dtype, progress: bool = True) -> dict[str, torch.Tensor]:
    """The MoE's tensors (router excluded), streamed from the seed's and the experts' safetensors."""
    text = config.text_config
    n, h, i_size = len(experts), text.hidden_size, config.moe_intermediate_size
    out: dict[str, torch.Tensor] = {}
    for p in layout.block_prefix:
        out[f"{p}.experts.gate_up_proj"] = torch.empty(n, 2 * i_size, h, dtype=dtype)
        out[f"{p}.experts.down_proj"] = torch.empty(n, h, i_size, dtype=dtype)
    acc: dict[str, torch.Tensor] = {}
    known = set(layout.model.state_dict())
    bar = tqdm(experts, desc="upcycling experts", unit="expert", disable=not progress)
    for e_idx, expert in enumerate(bar):
        seen: set[tuple[int, str]] = set()
        for name, t in stream_tensors(expert.folder):
            where = layout.ffn_key(name)
            if where is None:
                if layout.dense_prefix + name not in known:
                    raise IncompatibleExpertError(f"expert '{expert.info.name}': tensor {name} has no place "
                                                  f"in the {text.model_type} MoE layout")
                _average_into(acc, layout.dense_prefix + name, t, n)
                continue
            layer, proj = where
            _put_ffn(out, layout.block_prefix[layer], e_idx, proj, t, expert.info.name, name)
            seen.add(where)
        missing = [f"layer {lyr} {proj}" for lyr in range(len(layout.block_prefix))
                   for proj in FFN_PROJECTIONS if (lyr, proj) not in seen]
        if missing:
            raise IncompatibleExpertError(f"expert '{expert.info.name}': FFN weights missing "
                                          f"({', '.join(missing[:3])})")
    shared = {p[len(layout.dense_prefix):] + f".{x}.weight": (p, x)
              for p in layout.block_prefix for x in FFN_PROJECTIONS}
    for name, t in stream_tensors(seed_dir, set(shared)):
        p, x = shared.pop(name)
        out[f"{p}.shared_expert.{x}.weight"] = t.to(dtype)
    if shared:
        raise ExpertmixError(f"seed {seed_dir}: FFN weights missing ({', '.join(sorted(shared)[:3])})")
    out.update({k: v.to(dtype) for k, v in acc.items()})
    return out


def _put_ffn(out: dict[str, torch.Tensor], prefix: str, e_idx: int, proj: str, t: torch.Tensor,
             expert: str, name: str) -> None:
    gate_up, down = out[f"{prefix}.experts.gate_up_proj"], out[f"{prefix}.experts.down_proj"]
    i_size = down.shape[2]
    target = down[e_idx] if proj == "down_proj" else \
        gate_up[e_idx, :i_size] if proj == "gate_proj" else gate_up[e_idx, i_size:]
    if tuple(t.shape) != tuple(target.shape):
        raise IncompatibleExpertError(f"expert '{expert}': {name} has shape {tuple(t.shape)}, the MoE "
                                      f"expects {tuple(target.shape)}")
    target.copy_(t)


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``model.safetensors`` atomically (contiguous tensors, transformers' metadata)."""
    with atomic_path(folder / WEIGHTS_FILE, ".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})


def _copy_seed_files(seed_dir: Path, dest: Path) -> None:
    AutoTokenizer.from_pretrained(seed_dir).save_pretrained(dest)
    for name in COPIED_FILES:
        if (seed_dir / name).is_file():
            shutil.copyfile(seed_dir / name, dest / name)


def upcycle(seed_dir: str | Path, experts: Sequence[ExpertSource], out: str | Path, router: str = "nexus",
            seed: SeedInfo | None = None, aux_coef: float = 0.05, dtype: torch.dtype = torch.float32,
            init_seed: int = 0, impl: str = "auto", progress: bool = True,
            log: Callable[[str], None] = lambda _: None) -> Path:
    """Write an untrained mix to ``out``: a Nexus/linear MoE checkpoint, or a dense average for ``merge``."""
    seed_dir, out = Path(seed_dir), Path(out)
    if not experts:
        raise ExpertmixError("no experts given")
    seed = seed or seed_info(seed_dir)
    check_experts(seed, experts, f"the seed '{seed.id}'")
    seed_config = AutoConfig.from_pretrained(seed_dir)
    standard = Standardisation.fit(torch.stack([e.embedding for e in experts])) if router == "nexus" else None
    manifest = MixManifest(router=router, seed=seed, experts=[e.manifest_entry() for e in experts],
                           standardisation=standard)
    with atomic_dir(out) as tmp:
        if router == "merge":
            log(f"averaging all weights of {len(experts)} experts into a dense {seed_config.model_type}")
            tensors = merge_tensors(experts, dtype, progress)
            seed_config.dtype = dtype
            seed_config.save_pretrained(tmp)
        else:
            config = nexus_config(seed_config, experts, router, aux_coef, impl)
            config.dtype = dtype
            layout = MoeLayout.for_config(config)
            log(f"upcycling {len(experts)} experts into a {router} MoE on the seed's "
                f"{seed_config.model_type} architecture ({len(layout.block_prefix)} layers)")
            tensors = upcycle_tensors(seed_dir, experts, config, layout, dtype, progress)
            embeddings = standard.apply(manifest.embeddings()) if standard is not None else None
            tensors.update(fresh_router_tensors(config, layout, embeddings, init_seed))
            _check_complete(tensors, layout, str(out))
            config.save_pretrained(tmp)
        save_checkpoint(tmp, tensors)
        del tensors
        _copy_seed_files(seed_dir, tmp)
        manifest.save(tmp)
    return out


def merge_tensors(experts: Sequence[ExpertSource], dtype: torch.dtype,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Dense merging: the plain average of every weight over the experts (a model of the seed's class)."""
    acc: dict[str, torch.Tensor] = {}
    names: set[str] | None = None
    for expert in tqdm(experts, desc="averaging experts", unit="expert", disable=not progress):
        seen = set()
        for name, t in stream_tensors(expert.folder):
            _average_into(acc, name, t, len(experts))
            seen.add(name)
        if names is not None and seen != names:
            raise IncompatibleExpertError(f"expert '{expert.info.name}' holds other tensors than the first "
                                          f"expert ({sorted(seen ^ names)[:3]})")
        names = seen
    return {k: v.to(dtype) for k, v in acc.items()}


def require_mix_folder(folder: str | Path) -> Path:
    """A mix folder must hold config.json and its weights: model.safetensors, or the shards its
    model.safetensors.index.json names (as ``save_pretrained`` writes a big mix), every one of them here."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise StoreError(f"{folder}: not a mix folder (no config.json)")
    if not (folder / WEIGHTS_FILE).is_file() and not (folder / WEIGHTS_INDEX).is_file():
        raise StoreError(f"{folder}: not a mix folder (no {WEIGHTS_FILE} nor {WEIGHTS_INDEX})")
    try:
        files = weight_files(folder)
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{folder}/{WEIGHTS_INDEX}: not a safetensors index (no 'weight_map' of tensor names to "
                         f"shard files): {exc}") from None
    if missing := [f.name for f in files if not f.is_file()]:
        raise StoreError(f"{folder}: shard(s) {', '.join(missing[:3])} named by {WEIGHTS_INDEX} are missing")
    return folder


def read_tensors(folder: str | Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a model folder, whole file or shards (each shard opened once, only the tensors it
    holds read); a name the folder lacks is refused by name."""
    folder, wanted = Path(folder), set(names)
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        with safe_open(str(f), framework="pt") as sf:
            for k in wanted.intersection(sf.keys()):
                out[k] = sf.get_tensor(k)
    if missing := sorted(wanted - set(out)):
        raise ExpertmixError(f"{folder}: tensor(s) {', '.join(missing[:3])} not in its weights")
    return out
