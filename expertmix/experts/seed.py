"""Tiny seed models: a byte-level BPE tokenizer and a small random model of a real architecture.

``expertmix quickstart`` builds its seed with these, and the tests build theirs the same way, so
nothing needs a download.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
ARCHITECTURES = ("llama", "qwen2", "cohere")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (pad 0, bos 1, eos 2) trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, intermediate_size: int = 128,
                num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, max_positions: int = 512):
    """A small config of a real transformers architecture (Llama, Qwen2 or Cohere)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=True)
    return AutoConfig.for_model(arch, **kwargs)


def build_seed(out: str | Path, tokenizer: PreTrainedTokenizerFast, arch: str = "llama", seed: int = 0,
               **config_kwargs) -> Path:
    """Save a randomly initialised model of ``arch`` with ``tokenizer`` to ``out``.

    The embedding has a row for every token of the tokenizer as the folder loads it: the architecture's own
    tokenizer class may add one on load (Qwen2's adds ``<|endoftext|>``), which training would refuse as a
    tokenizer that does not fit the model."""
    out = Path(out)
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    config.save_pretrained(out)  # AutoTokenizer picks the tokenizer class from it
    tokenizer.save_pretrained(out)
    loaded = len(AutoTokenizer.from_pretrained(out))
    if loaded > config.vocab_size:
        config = tiny_config(arch, vocab_size=loaded, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    return out
