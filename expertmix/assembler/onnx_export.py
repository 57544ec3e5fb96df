"""``expertmix export MIX --format onnx``: the mix as an ONNX decoder with a KV cache, run by onnxruntime.

Routing that traces for any input: the eager experts loop visits only the experts the example input hit
(``torch.where`` + Python ``continue``), so a naive trace drops the others. Each MoE block is swapped for
:class:`OnnxMoeBlock` before export, which has one of two static forms:

- ``sparse`` (default): a fixed loop over all experts; each expert's rows are picked in the graph
  (``NonZero`` / ``Gather``), run through its FFN and added back (``ScatterND``): only routed tokens are computed,
  an expert nobody picked runs on zero rows;
- ``dense``: every expert runs on every token and the gate (zero outside the top-k) masks the sum.

The Nexus router collapses to a constant ``[H, E]`` gate (``E = P(D)`` does not depend on the input) and every
expert's gate/up/down projection becomes its own 2-D constant feeding a ``MatMul``, so onnxruntime's
quantizers (``quantize_dynamic`` int8, ``MatMulNBitsQuantizer`` 4-bit) see every expert weight. The attention,
norms, rotary embeddings and cache handling stay the seed family's own transformers code, exported with the
dynamo exporter (``torch.onnx.export(dynamo=True)``).

Graph interface (the layout of transformers/optimum decoder exports): inputs ``input_ids [B, S]``,
``attention_mask [B, P+S]``, ``position_ids [B, S]``, ``past_key_values.{i}.key|value [B, kv, P, d]``; outputs
``logits [B, S, V]`` and ``present.{i}.key|value [B, kv, P+S, d]``. :class:`OnnxCausalLM` runs it (full
forward, greedy generation with the cache).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from ..checkpoints import require_float_weights
from ..errors import ExpertmixError
from ..fsutil import atomic_dir, write_json_atomic
from .export import FORMATS, check_export, require_new_output
from .routed_experts import router_topk

MANIFEST = "onnx_export.json"
MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "int4": "model.int4.onnx"}
ONNX_QUANT = ("int8", "int4")
Routing = Literal["sparse", "dense"]
COPIED_FILES = ("generation_config.json", "mix.json")
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to an external data file (protobuf's 2 GiB limit)


@dataclass
class OnnxExportSettings:
    """How to export: routing form, opset, onnxruntime quantized variants to add, the export example."""

    routing: Routing = "sparse"
    opset: int = 18
    quantize: tuple[str, ...] = ()
    block_size: int = 128  # MatMulNBits block (int4)
    accuracy_level: int | None = None  # MatMulNBits accuracy_level (4: int8 activations, faster, can flip tokens)
    example_ids: list[list[int]] | None = None  # the export example's tokens [B >= 2][S >= 2]; default: fixed ids

    def __post_init__(self) -> None:
        if self.routing not in ("sparse", "dense"):
            raise ExpertmixError(f"--routing {self.routing!r}: choose sparse or dense")
        bad = [q for q in self.quantize if q not in ONNX_QUANT]
        if bad:
            raise ExpertmixError(f"--onnx-quantize {', '.join(bad)}: choose from {', '.join(ONNX_QUANT)}")


# -- export-time modules ----------------------------------------------------------------------------

class OnnxMoeBlock(nn.Module):
    """A Nexus MoE block in a traceable static form: constant gate, per-expert 2-D weights (see module doc)."""

    def __init__(self, block: nn.Module, routing: Routing):
        super().__init__()
        self.routing, self.top_k = routing, block.top_k
        self.shared_expert = block.shared_expert
        with torch.no_grad():
            gate = block.router.expert_embeddings().detach().float()  # [E, H]
            self.register_buffer("router_gate", gate.t().contiguous())
            gate_up, down = block.experts.gate_up_proj.detach().float(), block.experts.down_proj.detach().float()
        self.num_experts, inter = gate_up.shape[0], down.shape[2]
        for e in range(self.num_experts):  # transposed so the graph has MatMul(x, W) with a constant [in, out] W
            self.register_buffer(f"expert{e}_gate", gate_up[e, :inter].t().contiguous())
            self.register_buffer(f"expert{e}_up", gate_up[e, inter:].t().contiguous())
            self.register_buffer(f"expert{e}_down", down[e].t().contiguous())

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate = torch.matmul(x, getattr(self, f"expert{e}_gate"))
        up = torch.matmul(x, getattr(self, f"expert{e}_up"))
        return torch.matmul(torch.nn.functional.silu(gate) * up, getattr(self, f"expert{e}_down"))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        weights, index = router_topk(torch.matmul(x, self.router_gate), self.top_k)
        weights = weights.to(x.dtype)
        if self.routing == "dense":
            mask = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype).scatter(1, index, weights)
            routed = sum(mask[:, e:e + 1] * self.expert(e, x) for e in range(self.num_experts))
        else:
            routed = torch.zeros_like(x)
            for e in range(self.num_experts):
                token, slot = torch.nonzero(index == e, as_tuple=True)
                y = self.expert(e, x.index_select(0, token)) * weights[token, slot].unsqueeze(-1)
                routed = routed.index_add(0, token, y)
        return (self.shared_expert(x) + routed).reshape(shape)


class ConstMatMul(nn.Module):
    """``nn.Linear`` as ``x @ W + b`` with ``W`` stored transposed ``[in, out]``: a constant MatMul input in the graph.

    (The exporter would otherwise emit a runtime Transpose where its constant folding stops at large weights,
    such as a tied output head, and onnxruntime's quantizers only take constant MatMul weights.)
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().float().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def pretranspose_linears(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` by :class:`ConstMatMul` (export only); returns the count."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, child, ConstMatMul(getattr(holder, child)))
    return len(names)


class KvCacheDecoder(nn.Module):
    """Flat-tensor interface around a causal LM: ``(ids, mask, positions, *past) -> (logits, *present)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.text_config = model.config.get_text_config()
        self.num_layers = self.text_config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.text_config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers[:self.num_layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def cache_shape(config) -> tuple[int, int]:
    """``(kv_heads, head_dim)`` of a causal LM config (the text config of a mix)."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_key_value_heads, head_dim


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the exported decoder graph."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _example(model, settings: OnnxExportSettings, past_len: int = 2):
    """Export example: sizes >= 2 in every dynamic dimension (torch.export specialises sizes 0 and 1)."""
    text = model.config.get_text_config()
    kv, head_dim = cache_shape(model.config)
    if settings.example_ids is not None:
        ids = torch.tensor(settings.example_ids, dtype=torch.long)
    else:
        ids = (torch.arange(6, dtype=torch.long).reshape(2, 3) * 7 + 3) % text.vocab_size
    if ids.dim() != 2 or min(ids.shape) < 2:
        raise ExpertmixError(f"the export example must be [batch >= 2, seq >= 2] token ids, got {list(ids.shape)}")
    batch, seq = ids.shape
    gen = torch.Generator().manual_seed(0)
    past = [torch.randn(batch, kv, past_len, head_dim, generator=gen) for _ in range(2 * text.num_hidden_layers)]
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    return (ids, mask, positions, *past)


def onnx_unsupported(text) -> list[str]:
    """What in a (text) config the exported graph cannot express: sliding-window attention (the cache would be cut
    to the window, the graph's cache grows without end) and RoPE scaling that transformers recomputes from each
    input's length in Python (``dynamic``: the trace would freeze the frequencies of the export example)."""
    problems = []
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None) or []
    enabled = getattr(text, "use_sliding_window", True) is not False  # Qwen2's switch; Mistral's has none
    if window and enabled and (not types or "sliding_attention" in types):
        problems.append(f"sliding-window attention (sliding_window {window})")
    rope = getattr(text, "rope_parameters", None) or {}
    # one dict, or one per attention type ({"full_attention": {...}, "sliding_attention": {...}})
    for params in rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]:
        kind = str(params.get("rope_type", "default"))
        if "dynamic" in kind:
            problems.append(f"rope_type '{kind}' (RoPE frequencies recomputed from each input's length)")
            break
    return problems


def require_onnx_exportable(mix: str | Path) -> None:
    """Refuse, reading only config files, a folder the ONNX export cannot handle: no float model of its own (a PEFT
    adapter, a lightweight mix, a quantized model: said first, by ``require_float_weights``), or a config whose
    attention or RoPE the graph cannot express (``onnx_unsupported``)."""
    from ..checkpoints import text_config

    require_float_weights(mix, "export --format onnx", then="quantize its graph with --onnx-quantize int8/int4")
    problems = onnx_unsupported(text_config(mix))
    if problems:
        raise ExpertmixError(f"{mix}: export --format onnx cannot express {' and '.join(problems)}: the graph would "
                             f"not reproduce the model on long inputs; nothing was written")


def load_for_export(mix: str | Path, routing: Routing = "sparse") -> KvCacheDecoder:
    """Load a mix (or a dense model folder) in float32 and swap its MoE blocks for :class:`OnnxMoeBlock`."""
    from . import modeling_nexus  # noqa: F401  (Auto-class registration)

    require_float_weights(mix, "export --format onnx", then="quantize its graph with --onnx-quantize int8/int4")
    model = AutoModelForCausalLM.from_pretrained(mix, dtype=torch.float32).eval()
    if hasattr(model, "moe_blocks"):
        for layer in model.language_model.base_model.layers:
            layer.mlp = OnnxMoeBlock(layer.mlp, routing)
    pretranspose_linears(model)
    return KvCacheDecoder(model).eval()


def export_graph(decoder: KvCacheDecoder, path: Path, settings: OnnxExportSettings) -> Path:
    """Export ``decoder`` to ``path`` with dynamic batch, sequence and cache lengths."""
    names_in, names_out = io_names(decoder.num_layers)
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "seq", "past", "total"))
    dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                      "position_ids": {0: batch, 1: seq},
                      "past": tuple({0: batch, 2: past} for _ in range(2 * decoder.num_layers))}
    big = sum(t.numel() * t.element_size() for t in decoder.state_dict().values()) > EXTERNAL_DATA_BYTES
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it warns about every torchvision op it cannot register
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Known noise of the exporter: dims that share constraints get one name; a pytree deprecation.
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            torch.onnx.export(decoder, _example(decoder.model, settings), str(path), dynamo=True,
                              dynamic_shapes=dynamic_shapes, input_names=names_in, output_names=names_out,
                              opset_version=settings.opset, external_data=big, verbose=False)
    finally:
        exporter_log.setLevel(level)
    _strip_debug_metadata(path)
    return path


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debug strings (Python class paths, FX nodes): about half a small model's file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))


# -- onnxruntime quantization -----------------------------------------------------------------------

def weight_matmuls(model) -> list[tuple[str, str, list[int]]]:
    """``(node name, weight name, weight dims)`` of every MatMul whose second input is a constant 2-D weight."""
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    return [(n.name, n.input[1], inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]]) == 2]


def float_matmuls(model, vocab_size: int) -> list[str]:
    """MatMul nodes kept float, as in torch quantization: the routers' gates and the output head."""
    return [name for name, weight, dims in weight_matmuls(model)
            if weight.endswith("router_gate") or dims[-1] == vocab_size]


def quantize_onnx(folder: str | Path, scheme: str, block_size: int = 128, accuracy_level: int | None = None) -> Path:
    """Add ``model.int8.onnx`` (``quantize_dynamic``, per-tensor) or ``model.int4.onnx`` (MatMulNBits) to an export."""
    import onnx

    folder = Path(folder)
    manifest = read_onnx_manifest(folder)
    source, target = folder / manifest["files"]["fp32"], folder / MODEL_FILES[scheme]
    model = onnx.load(str(source))
    keep = float_matmuls(model, manifest["vocab_size"])
    big = manifest.get("external_data", False)
    with _quiet_quantizers():
        _quantize(scheme, model, source, target, keep, big, block_size, accuracy_level)
    manifest["files"][scheme] = target.name
    manifest.setdefault("float_matmuls", keep)
    write_json_atomic(folder / MANIFEST, manifest)
    return target


@contextmanager
def _quiet_quantizers():
    """onnxruntime's quantizers log every node at INFO through the root logger, and importing the 4-bit one
    calls ``logging.basicConfig(level=INFO)``: keep both out of the process's logging."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its basicConfig runs now, undone below)

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(logging.ERROR)  # also its advice to run pre-processing (meant for CNNs)
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize(scheme: str, model, source: Path, target: Path, keep: list[str], big: bool, block_size: int,
              accuracy_level: int | None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if scheme == "int8":
        # Per-tensor weight scales: per-channel int8 MatMulInteger (onnxruntime 1.32) gave a 0.44 relative logit error
        # on an AVX2-only CPU without VNNI (AMD EPYC) where per-tensor gave under 0.1, so per-channel files
        # would be wrong on part of the hardware they are shipped to.
        quantize_dynamic(str(source), str(target), per_channel=False, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=keep, use_external_data_format=big,
                         extra_options={"MatMulConstBOnly": True})
    elif scheme == "int4":
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False,
                                         accuracy_level=accuracy_level, nodes_to_exclude=keep,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=big)
    else:
        raise ExpertmixError(f"unknown onnxruntime quantization {scheme!r}: choose from {', '.join(ONNX_QUANT)}")


# -- the export command -----------------------------------------------------------------------------

def export_onnx(mix: str | Path, out: str | Path, settings: OnnxExportSettings | None = None,
                log: Callable[[str], None] = lambda _: None, check: bool = True) -> Path:
    """Write ``out``: ``model.onnx`` (+ quantized variants), the tokenizer, config and ``onnx_export.json``; the
    fp32 graph's logits are checked against the mix's (``check``) before it appears."""
    settings = settings or OnnxExportSettings()
    mix, out = Path(mix), Path(out)
    require_new_output(out)
    require_onnx_exportable(mix)  # before any loading: adapters and quantized models first, then the config
    decoder = load_for_export(mix, settings.routing)
    config = decoder.model.config
    text = config.get_text_config()
    kv, head_dim = cache_shape(config)
    log(f"exporting {type(decoder.model).__name__} ({text.num_hidden_layers} layers, "
        f"{getattr(config, 'num_experts', 0)} routed experts, {settings.routing} routing) to ONNX")
    with atomic_dir(out) as tmp:
        export_graph(decoder, tmp / MODEL_FILES["fp32"], settings)
        del decoder
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(mix).save_pretrained(tmp)
        for name in COPIED_FILES:
            if (mix / name).is_file():
                shutil.copyfile(mix / name, tmp / name)
        manifest = {"format": "expertmix-onnx", "source": str(mix.resolve()), "routing": settings.routing,
                    "opset": settings.opset, "num_layers": text.num_hidden_layers, "num_kv_heads": kv,
                    "head_dim": head_dim, "vocab_size": text.vocab_size, "eos_token_id": text.eos_token_id,
                    "pad_token_id": text.pad_token_id, "files": {"fp32": MODEL_FILES["fp32"]},
                    "external_data": (tmp / (MODEL_FILES["fp32"] + ".data")).is_file(),
                    "inputs": io_names(text.num_hidden_layers)[0], "outputs": io_names(text.num_hidden_layers)[1]}
        write_json_atomic(tmp / MANIFEST, manifest)
        for scheme in settings.quantize:
            log(f"quantizing the graph's MatMul weights with onnxruntime: {scheme}")
            quantize_onnx(tmp, scheme, settings.block_size, settings.accuracy_level)
        check_export(tmp, (lambda: max_logit_difference_onnx(mix, tmp)) if check else None, "onnxruntime fp32")
    return out


def _format_entry(mix: str | Path, out: str | Path, log: Callable[[str], None] = lambda _: None,
                  check: bool = True) -> Path:
    return export_onnx(mix, out, log=log, check=check)


FORMATS.setdefault("onnx", _format_entry)  # export(mix, out, "onnx") reaches this exporter once it is imported


# -- running the export with onnxruntime ------------------------------------------------------------

def read_onnx_manifest(folder: str | Path) -> dict:
    """``onnx_export.json`` of an export folder; errors name the folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ExpertmixError(f"{folder}: not an ONNX export of expertmix (no {MANIFEST})")
    return json.loads(path.read_text(encoding="utf-8"))


def is_onnx_export(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


@dataclass
class OrtOutput:
    """One decoder step: ``logits [B, S, V]`` and the cache after it (numpy arrays)."""

    logits: np.ndarray
    present: list[np.ndarray] = field(default_factory=list)


class OnnxCausalLM:
    """An exported mix under onnxruntime: forward with or without a cache, and greedy generation."""

    def __init__(self, folder: str | Path, variant: str = "fp32", threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = read_onnx_manifest(self.folder)
        files = self.manifest["files"]
        if variant not in files:
            hint = (f"; add it with expertmix export --format onnx --onnx-quantize {variant}" if variant in ONNX_QUANT
                    else f"; variants are fp32 and {', '.join(ONNX_QUANT)}")
            raise ExpertmixError(f"{self.folder}: no '{variant}' model (has {', '.join(files)}){hint}")
        self.variant = variant
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.folder / files[variant]), options,
                                            providers=["CPUExecutionProvider"])
        self.num_layers = self.manifest["num_layers"]
        self.kv_heads, self.head_dim = self.manifest["num_kv_heads"], self.manifest["head_dim"]
        self.eos_token_id = self.manifest.get("eos_token_id")
        self.vocab_size = self.manifest["vocab_size"]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
                for _ in range(2 * self.num_layers)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: Sequence[np.ndarray] | None = None) -> OrtOutput:
        """One call of the graph; ``attention_mask`` covers the cache and the new tokens."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        past = list(past) if past is not None else self.empty_cache(input_ids.shape[0])
        names = self.manifest["inputs"]
        feeds = {names[0]: input_ids, names[1]: np.asarray(attention_mask, dtype=np.int64),
                 names[2]: np.asarray(position_ids, dtype=np.int64)}
        feeds.update(zip(names[3:], past, strict=True))
        logits, *present = self.session.run(None, feeds)
        return OrtOutput(logits=logits, present=present)

    def logits(self, input_ids: np.ndarray | torch.Tensor, attention_mask: np.ndarray | torch.Tensor | None = None
               ) -> np.ndarray:
        """Logits of whole sequences (no cache); right padding is fine, left padding shifts positions."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        return self.step(ids, mask, positions).logits

    def generate(self, input_ids: np.ndarray | torch.Tensor, max_new_tokens: int = 32,
                 attention_mask: np.ndarray | torch.Tensor | None = None,
                 eos_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding with the KV cache: the prompt once, then one token per step; stops at EOS."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        out = self.step(ids, mask, positions)
        done = np.zeros(ids.shape[0], dtype=bool)
        tokens = ids
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            if eos is not None:
                nxt = np.where(done, eos, nxt)
                done |= nxt == eos
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
            if done.all():
                break
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((ids.shape[0], 1), dtype=np.int64)], axis=1)
            out = self.step(nxt[:, None], mask, positions, out.present)
        return tokens


def export_summary(folder: str | Path) -> dict:
    """Files and sizes of an export, for the CLI."""
    folder = Path(folder)
    manifest = read_onnx_manifest(folder)
    sizes = {}
    for variant, name in manifest["files"].items():
        files = [folder / name, folder / (name + ".data")]
        sizes[variant] = sum(p.stat().st_size for p in files if p.is_file())
    return {"routing": manifest["routing"], "files": manifest["files"], "bytes": sizes}


@torch.no_grad()
def max_logit_difference_onnx(mix: str | Path, folder: str | Path, ids: torch.Tensor | None = None,
                              variant: str = "fp32") -> float:
    """Max |logit difference| between the mix in transformers and its ONNX export on ``ids`` (random by default)."""
    from . import modeling_nexus  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(mix, dtype=torch.float32).eval()
    if ids is None:
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids).logits.numpy()
    got = OnnxCausalLM(folder, variant).logits(ids.numpy())
    return float(np.abs(want - got).max())


__all__ = ["OnnxExportSettings", "OnnxMoeBlock", "KvCacheDecoder", "export_onnx", "quantize_onnx", "OnnxCausalLM",
           "load_for_export", "require_onnx_exportable", "is_onnx_export", "read_onnx_manifest",
           "max_logit_difference_onnx", "export_summary",
           "io_names"]
