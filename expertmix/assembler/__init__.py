"""Nexus MoE assembly: model, upcycling, router training, extension and export.

Importing this package registers the Nexus model with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(MIX)`` loads a mix.
"""

from . import modeling_nexus  # noqa: F401
