"""``expertmix export MIX --format qwen2-moe``: the mix as a stock ``Qwen2MoeForCausalLM`` checkpoint.

At inference the expert embeddings ``E = P(D)`` do not depend on the input, so the Nexus router collapses
to a linear gate ``[E, H]`` (a linear router already is one). A Llama- or Qwen2-family mix maps exactly:

- attention, norms, embeddings and head are copied (Llama: ``qkv_bias=False``; Qwen2: ``qkv_bias=True``);
- routed experts keep transformers' fused layout; ``num_experts_per_tok`` as the mix, no renormalisation;
- the shared expert is always on and unweighted in Nexus, while Qwen2-MoE scales it by
  ``sigmoid(shared_expert_gate . x)``: the gate's weights are 0 (sigmoid 0.5) and its ``down_proj`` is
  doubled, which is exact in floating point.

The result loads in plain transformers with no custom code. More formats (``onnx``) plug into ``FORMATS``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2MoeConfig

from ..checkpoints import require_float_weights
from ..errors import ExpertmixError
from ..fsutil import atomic_dir, write_json_atomic
from .configuration_nexus import NexusConfig
from .manifest import MIX_FILE, read_manifest
from .modeling_nexus import ROUTERS
from .upcycling import COPIED_FILES, MoeLayout, require_mix_folder, save_checkpoint, stream_tensors

EXPORTABLE_FAMILIES = ("llama", "qwen2")
# An export reproduces the mix's float32 logits to rounding (measured 3e-6 for both formats); far beyond that the
# conversion is wrong, and it must not be written as if it had worked.
EXPORT_LOGIT_TOLERANCE = 1e-3
CHECK_FILE = "export_check.json"  # in every export: the logit check's result, or that it was skipped


def qwen2_moe_config(config: NexusConfig) -> Qwen2MoeConfig:
    """The Qwen2-MoE config that holds a Llama- or Qwen2-family mix exactly; refuses what does not map."""
    text = config.text_config
    family = text.model_type
    if family not in EXPORTABLE_FAMILIES:
        raise ExpertmixError(f"export --format qwen2-moe: the mix's seed is a '{family}' model; only "
                             f"{' and '.join(EXPORTABLE_FAMILIES)} seeds map onto Qwen2-MoE exactly")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    problems = []
    if family == "llama" and getattr(text, "attention_bias", False):
        problems.append("attention_bias=True (Qwen2-MoE has no o_proj bias)")
    if getattr(text, "mlp_bias", False):
        problems.append("mlp_bias=True")
    if getattr(text, "use_sliding_window", False):
        problems.append("use_sliding_window=True")
    if text.hidden_act not in ("silu", "swish"):
        problems.append(f"hidden_act={text.hidden_act}")
    if problems:
        raise ExpertmixError(f"export --format qwen2-moe: the seed's config does not map: {'; '.join(problems)}")
    return Qwen2MoeConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, hidden_act="silu",
        max_position_embeddings=text.max_position_embeddings, initializer_range=text.initializer_range,
        rms_norm_eps=text.rms_norm_eps, tie_word_embeddings=bool(text.tie_word_embeddings),
        rope_parameters=dict(text.rope_parameters), use_sliding_window=False,
        attention_dropout=float(getattr(text, "attention_dropout", 0.0)), decoder_sparse_step=1,
        moe_intermediate_size=config.moe_intermediate_size, shared_expert_intermediate_size=text.intermediate_size,
        num_experts_per_tok=config.num_experts_per_tok, num_experts=config.num_experts, norm_topk_prob=False,
        router_aux_loss_coef=config.router_aux_loss_coef, qkv_bias=family == "qwen2", mlp_only_layers=[],
        pad_token_id=text.pad_token_id, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        architectures=["Qwen2MoeForCausalLM"], dtype=torch.float32,
        # Qwen2-MoE reads head_dim where its config has one (else hidden / heads): set only where the seed's differs
        **({"head_dim": head_dim} if head_dim * text.num_attention_heads != text.hidden_size else {}))


@torch.no_grad()
def qwen2_moe_tensors(mix_dir: Path, config: NexusConfig) -> dict[str, torch.Tensor]:
    """Rename the mix's tensors to Qwen2-MoE's, collapsing each router to its linear gate."""
    layout = MoeLayout.for_config(config)
    prefix = layout.dense_prefix
    blocks = {p: i for i, p in enumerate(layout.block_prefix)}
    out: dict[str, torch.Tensor] = {}
    router_state: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(blocks))}
    for key, t in stream_tensors(mix_dir):  # one shard open at a time (save_pretrained shards big mixes)
        block = next((p for p in blocks if key.startswith(p + ".")), None)
        if block is None:
            out[key[len(prefix):]] = t
            continue
        rest = key[len(block) + 1:]
        dest = block[len(prefix):]
        if rest.startswith("router."):
            router_state[blocks[block]][rest[len("router."):]] = t
        elif rest == "shared_expert.down_proj.weight":
            out[f"{dest}.{rest}"] = t * 2  # cancels Qwen2-MoE's sigmoid(0) = 0.5 shared-expert gate
        else:  # shared_expert.{gate,up}_proj.weight, experts.gate_up_proj, experts.down_proj
            out[f"{dest}.{rest}"] = t
    for p, i in blocks.items():
        router = ROUTERS[config.router_type](config)
        router.load_state_dict(router_state[i])
        dest = p[len(prefix):]
        out[f"{dest}.gate.weight"] = router.expert_embeddings().detach().float().contiguous()
        out[f"{dest}.shared_expert_gate.weight"] = torch.zeros(1, config.text_config.hidden_size)
    return {k: v.float() for k, v in out.items()}


def require_new_output(out: str | Path) -> None:
    """Refuse an export's ``--out`` that exists, before anything is loaded (an export never replaces a folder)."""
    if Path(out).exists():
        raise ExpertmixError(f"output folder {out} already exists; choose another --out or remove it")


def check_export(folder: Path, measure: Callable[[], float] | None, runtime: str) -> dict:
    """Measure an export written in ``folder`` (its temporary folder) against the mix and record the result in
    ``CHECK_FILE``; an export beyond ``EXPORT_LOGIT_TOLERANCE`` is refused, so it is never written. ``measure``
    None: the check was skipped, and the record says so."""
    if measure is None:
        record = {"checked": False}
    else:
        difference = measure()
        record = {"checked": True, "runtime": runtime, "max_logit_difference": difference,
                  "tolerance": EXPORT_LOGIT_TOLERANCE, "passed": difference <= EXPORT_LOGIT_TOLERANCE}  # NaN fails
        if not record["passed"]:
            raise ExpertmixError(f"the export does not reproduce the mix ({runtime}: max |logit difference| "
                                 f"{difference:.2e} > {EXPORT_LOGIT_TOLERANCE:g}); nothing was written (--no-check "
                                 f"writes it unchecked, for inspection)")
    write_json_atomic(folder / CHECK_FILE, record)
    return record


def read_export_check(folder: str | Path) -> dict | None:
    """The logit check an export recorded (None for exports made before it was recorded)."""
    path = Path(folder) / CHECK_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def export_qwen2_moe(mix: str | Path, out: str | Path, log: Callable[[str], None] = lambda _: None,
                     check: bool = True) -> Path:
    """Write ``out``: a Qwen2-MoE checkpoint of the mix that stock transformers loads, its logits checked against
    the mix's (``check``) before it appears."""
    require_new_output(out)
    require_float_weights(mix, "export --format qwen2-moe", needs="a Nexus or linear mix")
    mix_dir, out = require_mix_folder(mix), Path(out)
    manifest = read_manifest(mix_dir)
    if manifest.router == "merge":
        raise ExpertmixError(f"{mix_dir}: a dense merge is already a plain {manifest.seed.architecture} model; "
                             f"load it directly")
    config = AutoConfig.from_pretrained(mix_dir)
    q_config = qwen2_moe_config(config)
    with atomic_dir(out) as tmp:  # claimed before the tensors are read: a second run to the same --out waits for none
        tensors = qwen2_moe_tensors(mix_dir, config)
        log(f"exporting {config.num_experts} experts x {config.text_config.num_hidden_layers} layers to Qwen2-MoE")
        q_config.save_pretrained(tmp)
        save_checkpoint(tmp, tensors)
        del tensors
        AutoTokenizer.from_pretrained(mix_dir).save_pretrained(tmp)
        for name in (*COPIED_FILES, MIX_FILE):
            if (mix_dir / name).is_file():
                shutil.copyfile(mix_dir / name, tmp / name)
        check_export(tmp, (lambda: max_logit_difference(mix_dir, tmp)) if check else None, "float32")
    return out


@torch.no_grad()
def max_logit_difference(mix: str | Path, exported: str | Path, tokens: int = 64, seed: int = 0) -> float:
    """Max |logit difference| (float32) between the mix and its export on random token ids."""
    a = AutoModelForCausalLM.from_pretrained(mix, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, a.config.text_config.vocab_size, (2, tokens // 2), generator=gen)
    return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


FORMATS: dict[str, Callable[..., Path]] = {"qwen2-moe": export_qwen2_moe}


def export(mix: str | Path, out: str | Path, fmt: str = "qwen2-moe", log: Callable[[str], None] = lambda _: None,
           check: bool = True) -> Path:
    """Export a mix in format ``fmt`` (see ``FORMATS``), checked against the mix unless ``check`` is False."""
    if fmt not in FORMATS:
        raise ExpertmixError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    require_new_output(out)
    return FORMATS[fmt](mix, out, log=log, check=check)
