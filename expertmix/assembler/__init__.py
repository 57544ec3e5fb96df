"""Nexus MoE assembly: model, upcycling, router training, extension and export.

Importing this package registers the Nexus model with transformers' Auto classes and expertmix's weight-only
quantizer with transformers' quantizers, so ``AutoModelForCausalLM.from_pretrained(MIX)`` loads a mix, quantized
(``expertmix quantize``) or not.
"""

from . import modeling_nexus, quantization  # noqa: F401
