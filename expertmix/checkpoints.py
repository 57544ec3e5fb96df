"""Checks on the model folders that stages read, made before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ExpertmixError


def quantization_config(folder: str | Path) -> dict | None:
    """The ``quantization_config`` of a model folder's ``config.json``; ``None`` for float weights or no model."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # not a model folder: the caller's own loading says so
    return config.get("quantization_config") or None


def require_float_weights(folder: str | Path, action: str, then: str = "quantize the result afterwards") -> None:
    """Refuse a quantized model folder where ``action`` needs float weights, naming the float one it came from.

    Reads only ``config.json`` (and ``quantization.json``, which ``expertmix quantize`` writes), so it runs before any
    model is loaded: loaded without its quantizer, a quantized checkpoint's layers are silently left random.
    """
    folder = Path(folder)
    quantization = quantization_config(folder)
    if quantization is None:
        return
    try:
        source = json.loads((folder / "quantization.json").read_text()).get("source")
    except (OSError, ValueError):
        source = None
    scheme = quantization.get("scheme") or quantization.get("quant_method", "?")
    raise ExpertmixError(
        f"{folder}: a quantized model ({scheme}); {action} needs float weights: use the float model it was quantized "
        f"from{f' ({source})' if source else ''} and {then}")
