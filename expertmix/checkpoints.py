"""Checks on the model folders that stages read, made before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ExpertmixError

ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes beside an adapter's weights


def _read_json(path: Path) -> dict:
    """A JSON object file's content; ``{}`` when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def quantization_config(folder: str | Path) -> dict | None:
    """The ``quantization_config`` of a model folder's ``config.json``; ``None`` for float weights or no model
    (not a model folder: the caller's own loading says so)."""
    return _read_json(Path(folder) / "config.json").get("quantization_config") or None


def require_model_weights(folder: str | Path, action: str, needs: str = "a full model or a Nexus mix") -> None:
    """Refuse a folder that holds no model of its own where ``action`` loads one, saying what the folder is.

    A PEFT adapter and a lightweight (MoV/MoLoRA) mix look like models to a user but have no ``config.json``:
    naming them, with the base they run on, tells the user which folder to give instead.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return
    if not folder.is_dir():
        raise ExpertmixError(f"{folder}: no such folder; {action} needs a model folder")
    from .assembler.lightweight import LIGHTWEIGHT_FORMAT  # only on this error path: it loads peft
    from .assembler.manifest import MIX_FILE

    mix = _read_json(folder / MIX_FILE)
    if mix.get("format") == LIGHTWEIGHT_FORMAT:
        raise ExpertmixError(
            f"{folder}: a {mix.get('kind', 'lightweight')} mix of PEFT adapters, with no weights of its own (it runs "
            f"over its seed {mix.get('seed_path', '?')}); {action} needs {needs}")
    adapter = _read_json(folder / ADAPTER_CONFIG)
    if adapter:
        kind = str(adapter.get("peft_type", "PEFT")).lower()
        base = adapter.get("base_model_name_or_path")
        raise ExpertmixError(
            f"{folder}: a {kind} adapter{f' of {base}' if base else ''}, not a full model; {action} needs a full "
            f"model: give its base{f' ({base})' if base else ''}, or merge the adapter into it first")
    raise ExpertmixError(f"{folder}: not a model folder (no config.json); {action} needs a model folder")


def require_float_weights(folder: str | Path, action: str, then: str = "quantize the result afterwards",
                          needs: str = "a full model or a Nexus mix") -> None:
    """Refuse a folder without a model, or a quantized one, where ``action`` needs float weights.

    A quantized model is refused naming the float one it came from. Reads only ``config.json`` (and
    ``quantization.json``, which ``expertmix quantize`` writes), so it runs before any model is loaded: loaded
    without its quantizer, a quantized checkpoint's layers are silently left random.
    """
    folder = Path(folder)
    require_model_weights(folder, action, needs)
    quantization = quantization_config(folder)
    if quantization is None:
        return
    source = _read_json(folder / "quantization.json").get("source")
    scheme = quantization.get("scheme") or quantization.get("quant_method", "?")
    raise ExpertmixError(
        f"{folder}: a quantized model ({scheme}); {action} needs float weights: use the float model it was quantized "
        f"from{f' ({source})' if source else ''} and {then}")


def require_context(folder: str | Path, seq_len: int, option: str = "--seq-len") -> None:
    """Refuse training blocks of fewer than 2 tokens or longer than the model's context.

    Positions past ``max_position_embeddings`` were never trained, and attention over them costs quadratic time
    (a 100k-token block of a 512-token seed took minutes per step and learnt nothing).
    """
    from transformers import AutoConfig

    if seq_len < 2:
        raise ExpertmixError(f"{option} {seq_len}: a block needs at least 2 tokens (a token and its successor)")
    from .assembler import modeling_nexus  # noqa: F401  (a mix's config resolves through the Auto classes)

    limit = getattr(AutoConfig.from_pretrained(folder).get_text_config(), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ExpertmixError(f"{option} {seq_len} is longer than the context of {folder} (max_position_embeddings "
                             f"{limit}): use at most {limit}")
