"""Perplexity pruning (Marion et al. 2023, "When Less is More"): keep one band of a reference LM's scores.

Every document is scored by a reference causal LM's perplexity over its first ``max_tokens`` tokens; the
bottom (easiest), middle or top (hardest) fraction is kept. An instruction row (Aya ``inputs``/``targets``) is
scored on its targets given its inputs, the tokens training learns from. Documents too short to score (fewer
than two tokens) get perplexity +inf and are never kept; the fraction applies to the documents that could be
scored.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from ..checkpoints import require_model_weights
from ..errors import DataError, ExpertmixError
from ..fsutil import atomic_path
from ..journal import Journal, weights_identity
from .data import IGNORE_INDEX, JSONL_SUFFIXES, Document, data_digest, read_documents, tokenize_documents

Where = Literal["bottom", "middle", "top"]
WHERES: tuple[str, ...] = get_args(Where)
SCORE_TOKENS = 512  # tokens of each document a reference model scores
SPEC_SYNTAX = "WHERE:FRACTION with WHERE one of bottom, middle, top and 0 < FRACTION <= 1 (e.g. middle:0.5)"


@dataclass(frozen=True)
class PruneSpec:
    """Which band of the perplexity distribution to keep, and how much of it."""

    where: Where
    fraction: float

    def __post_init__(self) -> None:
        if self.where not in WHERES:
            raise DataError(f"pruning band {self.where!r} is not one of {', '.join(WHERES)}")
        if not (isinstance(self.fraction, int | float) and 0 < self.fraction <= 1):
            raise DataError(f"pruning fraction {self.fraction!r} must be a number with 0 < fraction <= 1")

    def __str__(self) -> str:
        return f"{self.where}:{self.fraction:g}"


def parse_prune_spec(text: str) -> PruneSpec:
    """Parse ``middle:0.5``-style text into a PruneSpec; bad text names the value and the syntax."""
    where, sep, frac = text.strip().partition(":")
    where = where.strip().lower()
    if not sep or where not in WHERES:
        raise DataError(f"invalid pruning spec {text!r}: expected {SPEC_SYNTAX}")
    try:
        fraction = float(frac)
    except ValueError:
        raise DataError(f"invalid pruning spec {text!r}: fraction {frac.strip()!r} is not a number; "
                        f"expected {SPEC_SYNTAX}") from None
    if not (0 < fraction <= 1):  # also rejects nan
        raise DataError(f"invalid pruning spec {text!r}: fraction {fraction:g} is outside (0, 1]; "
                        f"expected {SPEC_SYNTAX}")
    return PruneSpec(where, fraction)  # type: ignore[arg-type]


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def scoring_windows(docs: Sequence[Document], tokenizer: Any, max_tokens: int) -> list[tuple[list[int], int]]:
    """Each document's tokens to score and the position of its first scored token.

    Plain text: its first ``max_tokens`` tokens, scored from the second. An instruction row: its inputs as
    context and its targets scored, tokenized as training tokenizes them; inputs longer than half the window
    keep their end, so the window always holds targets.
    """
    out: list[tuple[list[int], int]] = [([], 0)] * len(docs)
    plain = [i for i, d in enumerate(docs) if d.prompt is None]
    if plain:
        encoded = tokenizer([docs[i].text for i in plain], truncation=True, max_length=max_tokens)["input_ids"]
        for i, ids in zip(plain, encoded, strict=True):
            out[i] = (list(ids), 1)
    rows = [i for i, d in enumerate(docs) if d.prompt is not None]
    for i, tok in zip(rows, tokenize_documents([docs[i] for i in rows], tokenizer, add_eos=False), strict=True):
        n_context = sum(1 for label in tok.labels if label == IGNORE_INDEX)
        start = max(0, n_context - max_tokens // 2)
        out[i] = (tok.input_ids[start:start + max_tokens], max(n_context - start, 1))
    return out


@torch.no_grad()
def score_documents(docs: Sequence[Document], model: Any, tokenizer: Any, max_tokens: int = SCORE_TOKENS,
                    batch_size: int = 8, progress: bool = True, journal: Journal | None = None) -> list[float]:
    """Each document's perplexity under ``model``: exp of mean token NLL over its first ``max_tokens`` tokens
    (an instruction row's: over its targets, see :func:`scoring_windows`).

    Documents are batched by similar length with right padding and an attention mask; a document with no
    token to score (plain text of fewer than two tokens, a row without targets) gets +inf. With an open
    ``journal`` (one reference model, one ``max_tokens``), scores it holds are reused and new ones recorded
    batch by batch, keyed by the scored tokens, so an interrupted run loses at most one batch.
    """
    # Hand-written rather than `evaluate`'s perplexity metric: that one loads its own model by hub id,
    # and we score with the caller's (already loaded, possibly local) reference model.
    if max_tokens < 2:
        raise DataError(f"max_tokens={max_tokens}: at least 2 tokens are needed to score a document")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: must be at least 1")
    scores = [math.inf] * len(docs)
    if not docs:
        return scores
    windows = scoring_windows(docs, tokenizer, max_tokens)
    keys = [_window_key(ids, first) for ids, first in windows] if journal is not None else []
    order = []
    for i, (ids, first) in enumerate(windows):
        if len(ids) <= first:
            continue
        if journal is not None and keys[i] in journal.done:
            scores[i] = float(journal.done[keys[i]])
        else:
            order.append(i)
    # Longest first so memory problems show at once; similar lengths share a batch to waste little padding.
    order.sort(key=lambda i: -len(windows[i][0]))
    device = _model_device(model)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(docs), desc="perplexity", unit="doc", disable=not progress)
    bar.update(len(docs) - len(order))
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = [torch.tensor(windows[i][0], dtype=torch.long) for i in idx]
            # The padding value never reaches the loss (masked), so no pad token is required of the tokenizer.
            ids = pad_sequence(seqs, batch_first=True, padding_value=0).to(device)
            ones = [torch.ones_like(s) for s in seqs]
            mask = pad_sequence(ones, batch_first=True, padding_value=0).to(device)
            scored = mask.clone()  # tokens whose NLL counts: not padding, not an instruction's inputs
            for row, i in enumerate(idx):
                scored[row, :windows[i][1]] = 0
            # A batch without padding needs no mask (same result); attention may use its plain causal kernel.
            logits = model(input_ids=ids, attention_mask=None if bool(mask.all()) else mask).logits[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1),
                                  reduction="none").view(ids.size(0), -1)
            target_mask = scored[:, 1:].float()
            mean_nll = (nll * target_mask).sum(1) / target_mask.sum(1)
            for i, v in zip(idx, mean_nll.tolist(), strict=True):
                scores[i] = math.exp(v)
            if journal is not None:
                journal.add_many({keys[i]: scores[i] for i in idx})
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return scores


def _window_key(ids: Sequence[int], first: int) -> str:
    """A scored window's identity in a journal: the same tokens from the same position score the same."""
    return hashlib.sha1(json.dumps([first, list(ids)]).encode()).hexdigest()


def scoring_journal(out: str | Path, data: str | Path | None, reference: str | Path, max_tokens: int,
                    text_field: str | None = None) -> Journal:
    """The progress journal of scoring ``data`` with ``reference`` for output ``out`` (``OUT.partial``): a rerun
    with the same data, model and window reuses what was scored; the band kept may change."""
    return Journal(out, {"job": "perplexity scores", "reference": weights_identity(reference),
                         "max_tokens": max_tokens, "text_field": text_field,
                         **({"data": str(Path(data).resolve()), "data_contents": data_digest(data)} if data else {})},
                   "scored documents")


def select(scores: Sequence[float], spec: PruneSpec) -> list[int]:
    """Indices of the kept scores, ``round(fraction * n)`` of them (at least one), in their original order.

    Ties are broken by position; +inf ranks above every finite score; NaN is an error.
    """
    n = len(scores)
    if n == 0:
        return []
    for i, s in enumerate(scores):
        if math.isnan(s):
            raise DataError(f"perplexity of document {i} is NaN: the reference model's output is not finite")
    k = min(n, max(1, round(spec.fraction * n)))
    ranked = sorted(range(n), key=lambda i: (scores[i], i))
    if spec.where == "bottom":
        kept = ranked[:k]
    elif spec.where == "top":
        kept = ranked[n - k:]
    else:
        lo = (n - k) // 2
        kept = ranked[lo:lo + k]
    return sorted(kept)


def prune_documents(docs: Sequence[Document], model: Any, tokenizer: Any, spec: PruneSpec,
                    **kw: Any) -> tuple[list[Document], list[dict]]:
    """Score ``docs`` and keep the band ``spec`` asks for; also return one audit record per input document.

    Extra keywords go to :func:`score_documents`. Unscorable documents are dropped and recorded with
    perplexity ``None``.
    """
    scores = score_documents(docs, model, tokenizer, **kw)
    scorable = [i for i, s in enumerate(scores) if math.isfinite(s)]
    if docs and not scorable:
        raise DataError(f"none of the {len(docs)} documents has two tokens or more: nothing to score")
    kept = {scorable[j] for j in select([scores[i] for i in scorable], spec)}
    records = [{"index": i, "source": d.source, "line": d.line,
                "perplexity": scores[i] if math.isfinite(scores[i]) else None, "kept": i in kept}
               for i, d in enumerate(docs)]
    return [docs[i] for i in sorted(kept)], records


def _dump_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")  # datasets rows may hold dates


def _write_jsonl(path: str | Path, rows: Sequence[dict]) -> None:
    with atomic_path(path, ".jsonl") as tmp:
        _dump_jsonl(tmp, rows)


def write_scores(path: str | Path, records: Sequence[dict]) -> None:
    """Write the audit records as JSONL, atomically."""
    _write_jsonl(path, records)


def document_record(doc: Document) -> dict:
    """A document as a JSONL row that ``read_documents`` reads back: the row it was read from, every field kept
    (ids, ``language_code``, metadata), or for plain text a ``text`` row."""
    if doc.record is not None:
        return doc.record
    row: dict[str, Any] = {"inputs": doc.prompt, "targets": doc.text} if doc.prompt is not None \
        else {"text": doc.text}
    for key in ("language", "script", "domain"):
        if getattr(doc, key) is not None:
            row[key] = getattr(doc, key)
    return row


def scores_path_for(out_path: str | Path) -> Path:
    """Where the audit scores of ``out_path`` go: ``<out stem>.scores.jsonl`` beside it."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.scores.jsonl")


def _band(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def prune_file(data_path: str | Path, out_path: str | Path, reference_model_dir: str | Path,
               spec: PruneSpec | str, text_field: str | None = None, *, max_tokens: int = SCORE_TOKENS,
               batch_size: int = 8, device: str | None = None, progress: bool = True,
               log: Callable[[str], None] = lambda _: None) -> dict:
    """Prune a data file by a reference model's perplexity; write the kept documents and the scores beside."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(spec, str):
        spec = parse_prune_spec(spec)
    out_path = Path(out_path)
    if out_path.exists():
        raise DataError(f"{out_path} already exists: choose another output path or remove it")
    if out_path.suffix.lower() not in JSONL_SUFFIXES:  # read back as plain text, the rows would be one document
        raise DataError(f"--out {out_path}: prune writes the kept rows as JSONL (whole, with their fields); give a "
                        f".jsonl path")
    scores_path = scores_path_for(out_path)
    if scores_path.exists():  # the scores go beside --out: never over another file (the data itself, even)
        raise DataError(f"{scores_path} already exists (prune writes --out's scores there); choose another --out "
                        f"or remove it")
    require_model_weights(reference_model_dir, "prune's --reference")  # a folder, not a download: one line
    docs = read_documents(data_path, text_field=text_field)
    journal = scoring_journal(out_path, data_path, reference_model_dir, max_tokens, text_field)
    if resumed := len(journal.open()):
        log(f"resuming: {resumed} documents were scored before the interruption ({journal.path})")
    try:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(reference_model_dir))
            model = AutoModelForCausalLM.from_pretrained(str(reference_model_dir), dtype=dtype).to(device)
        except (OSError, ValueError) as exc:
            raise ExpertmixError(f"cannot load the reference model from {reference_model_dir}: {exc}") from exc
        kept, records = prune_documents(docs, model, tokenizer, spec, max_tokens=max_tokens,
                                        batch_size=batch_size, progress=progress, journal=journal)
        # both written whole before either appears: an interruption while writing leaves neither, and the journal
        with atomic_path(scores_path, ".jsonl") as scores_tmp, atomic_path(out_path, ".jsonl") as out_tmp:
            _dump_jsonl(scores_tmp, records)
            _dump_jsonl(out_tmp, [document_record(d) for d in kept])
    except BaseException as exc:
        journal.stopped(exc)  # what was scored is kept: a rerun of the same command scores only what is left
        raise
    journal.finish()
    scored = [r["perplexity"] for r in records if r["perplexity"] is not None]
    return {"spec": str(spec), "reference_model": str(reference_model_dir), "data": str(data_path),
            "out": str(out_path), "scores": str(scores_path), "documents": len(docs), "kept": len(kept),
            "unscorable": len(docs) - len(scored), "max_tokens": max_tokens, "scores_reused": resumed,
            "perplexity_all": _band(scored),
            "perplexity_kept": _band([r["perplexity"] for r in records if r["kept"]])}
