"""Checks on the model folders that stages read, made before any model is loaded."""

from __future__ import annotations

import json
from collections.abc import Sequence
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


DEFAULT_SEQ_LEN = 256  # tokens per block where the user names none and the model's context allows it


def model_config_folder(folder: str | Path, seed: str | Path | None = None) -> Path | None:
    """The folder whose ``config.json`` describes the model ``folder`` runs: the folder itself, or, for a PEFT
    adapter or a lightweight mix (no weights of their own), ``seed`` else the seed they record; ``None`` when none
    is here (the caller's own loading then says why)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    from .assembler.manifest import MIX_FILE  # lazily: the package registers the Nexus model with transformers

    recorded = (_read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path"),
                _read_json(folder / MIX_FILE).get("seed_path"))
    for candidate in [seed] if seed is not None else recorded:
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    return None


def text_config(folder: str | Path, seed: str | Path | None = None):
    """The text config of the model ``folder`` runs (a mix's seed family config; see ``model_config_folder``);
    ``None`` when no config is here."""
    where = model_config_folder(folder, seed)
    if where is None:
        return None
    from transformers import AutoConfig

    from .assembler import modeling_nexus  # noqa: F401  (a mix's config resolves through the Auto classes)

    return AutoConfig.from_pretrained(where).get_text_config()


def context_length(folder: str | Path, seed: str | Path | None = None) -> int | None:
    """The model's context: ``max_position_embeddings`` of its text config (a PEFT adapter's or lightweight mix's
    seed's); ``None`` when the folder or the field is not there."""
    config = text_config(folder, seed)
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def _context_error(folder: str | Path, seq_len: int, limit: int, option: str,
                   seed: str | Path | None) -> ExpertmixError:
    where = model_config_folder(folder, seed)
    of = f" of its seed {where}" if where is not None and Path(where) != Path(folder) else ""
    return ExpertmixError(f"{option} {seq_len} is longer than the context of {folder} (max_position_embeddings "
                          f"{limit}{of}): use at most {limit}")


def require_context(folder: str | Path, seq_len: int, option: str = "--seq-len",
                    seed: str | Path | None = None) -> None:
    """Refuse blocks of fewer than 2 tokens or longer than the model's context.

    Positions past ``max_position_embeddings`` were never trained, and attention over them costs quadratic time
    (a 100k-token block of a 512-token seed took minutes per step and learnt nothing).
    """
    if seq_len < 2:
        raise ExpertmixError(f"{option} {seq_len}: a block needs at least 2 tokens (a token and its successor)")
    limit = context_length(folder, seed)
    if limit is not None and seq_len > limit:
        raise _context_error(folder, seq_len, limit, option, seed)


def fit_seq_len(folders: Sequence[str | Path], seq_len: int | None, option: str = "--seq-len",
                seed: str | Path | None = None, default: int = DEFAULT_SEQ_LEN) -> int:
    """The block length for models that all read the same blocks: ``seq_len`` when every model's context holds it
    (refused naming both numbers otherwise), or, when ``None``, ``default`` cut to the shortest context.

    ``seed`` applies to the first folder only (the model evaluated; a reference is a model of its own).
    """
    limits = [(f, context_length(f, seed if i == 0 else None), seed if i == 0 else None)
              for i, f in enumerate(folders)]
    if seq_len is None:
        return min([default, *(limit for _, limit, _ in limits if limit is not None)])
    if seq_len < 2:
        raise ExpertmixError(f"{option} {seq_len}: a block needs at least 2 tokens (a token and its successor)")
    for folder, limit, folder_seed in limits:
        if limit is not None and seq_len > limit:
            raise _context_error(folder, seq_len, limit, option, folder_seed)
    return seq_len


def embedding_rows(model) -> int:
    """Rows of a model's input embedding: a loaded model's, else ``vocab_size`` of a config's (or a model folder's)
    text config."""
    if isinstance(model, str | Path):
        config = text_config(model)
        if config is None:
            raise ExpertmixError(f"{model}: not a model folder (no config.json)")
        return int(config.vocab_size)
    if hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
        return int(model.get_input_embeddings().weight.shape[0])
    config = model.get_text_config() if hasattr(model, "get_text_config") else model
    return int(config.vocab_size)


def require_tokenizer_fits(tokenizer, model, where: str) -> None:
    """Refuse a tokenizer with ids the model has no embedding row for (``model``: a model, a config or a model
    folder), naming the numbers.

    Such an id makes the embedding lookup fail mid-run (an index error on the CPU, a device assert on CUDA), long
    after the data was read; a tokenizer from another model or tokens added without resizing the embeddings are
    the usual causes.
    """
    rows = embedding_rows(model)
    problems = []
    if len(tokenizer) > rows:
        problems.append(f"it has {len(tokenizer)} tokens but the model's embedding has {rows} rows")
    for name in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(token_id, int) and token_id >= rows:
            problems.append(f"its {name} token id {token_id} is past the embedding's {rows} rows")
    if problems:
        raise ExpertmixError(f"{where}: the tokenizer does not fit the model: {'; '.join(problems)} (a tokenizer of "
                             f"another model, or tokens added without resizing the embeddings)")
