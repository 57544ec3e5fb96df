"""Bits per byte per language and domain, and how far a quantized or exported model strays from its reference.

Bits per byte: the summed ``-log2 p(token)`` of a text's tokens over the text's UTF-8 bytes, so the number
compares across tokenizers (lm-evaluation-harness's ``bits_per_byte``). Each document is scored after a start
token (EOS, the separator documents were packed with; BOS when there is none), in non-overlapping windows of
``window`` tokens. Aya-layout rows (``inputs`` / ``targets`` / ``language`` / ``script``, the evaluation suite
included) score the targets given the inputs: the ``inputs`` tokens are context, only the targets count.

Against a reference (the float mix) each candidate (a torch-quantized mix, an ONNX export or its onnxruntime
int8/int4 variants) gets, per language, domain and script group (Latin vs non-Latin, after Marchisio et al.
2024, where non-Latin scripts lose most): the relative change of bits per byte with a 95% bootstrap interval over
windows, the KL divergence ``KL(p_ref || p)`` per scored token (nats) and the top-1 flip rate (share of tokens
whose most likely next token changes). Reports come as a table, a JSON file and a PNG bar chart.
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoints import require_model_weights
from ..errors import DataError, ExpertmixError
from ..experts.adapter import is_adapter_folder, load_adapter_expert
from ..experts.data import (
    IGNORE_INDEX,
    Document,
    language_key,
    language_names,
    read_documents,
    tokenize_documents,
    with_language_codes,
)
from ..fsutil import save_figure, write_json_atomic

LATIN, NON_LATIN = "Latin", "non-Latin"
LATIN_SCRIPT_CODES = {"latn", "latin"}
BOOTSTRAP_DRAWS = 1000


# -- scorers: anything that maps token ids to next-token logits ----------------------------------------

class Scorer(Protocol):
    """A model under evaluation: ``[B, S]`` ids and mask -> ``[B, S, V]`` float32 logits on the CPU."""

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


class TorchScorer:
    """A transformers causal LM (a mix, a quantized mix, a dense model)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.device = next(model.parameters(), None)
        self.device = self.device.device if self.device is not None else torch.device("cpu")

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
        return out.logits.float().cpu()


class OrtScorer:
    """An ONNX export run by onnxruntime (see ``onnx_export.OnnxCausalLM``)."""

    def __init__(self, model):
        self.model = model

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.model.logits(input_ids.numpy(), attention_mask.numpy()))


def open_scorer(path: str | Path, variant: str | None = None, device: str = "cpu",
                threads: int | None = None) -> Scorer:
    """A scorer for a model folder: an ONNX export (``variant`` fp32/int8/int4), a quantized mix or a float model."""
    from . import modeling_nexus, quantization  # noqa: F401  (register the Nexus model and the quantizer)
    from .lightweight import is_lightweight_mix, load_lightweight
    from .onnx_export import OnnxCausalLM, is_onnx_export

    path = Path(path)
    if is_onnx_export(path):
        return OrtScorer(OnnxCausalLM(path, variant or "fp32", threads=threads))
    if variant not in (None, "fp32"):
        raise ExpertmixError(f"{path}: --variant {variant} applies to ONNX exports only")
    if is_adapter_folder(path):  # a PEFT expert, on the seed its adapter config records
        return TorchScorer(load_adapter_expert(path).to(device))
    if is_lightweight_mix(path):  # MoV / MoLoRA, on the seed its mix.json records
        loaded = load_lightweight(path, device=device)
        if loaded.seq2seq:
            raise ExpertmixError(f"{path}: an encoder-decoder mix; bits per byte scores causal models: "
                                 f"evaluate it without --bpb/--reference")
        return TorchScorer(loaded.model)
    require_model_weights(path, "eval in bits per byte")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    quantized = getattr(model.config, "quantization_config", None) is not None
    return TorchScorer(model.to("cpu" if quantized else device))


# -- documents ---------------------------------------------------------------------------------------

def letter_counts(text: str, limit: int = 4000) -> tuple[int, int]:
    """``(Latin-script letters, other letters)`` among the first ``limit`` characters of ``text``."""
    letters = [c for c in text[:limit] if c.isalpha()]
    latin = sum(unicodedata.name(c, "").startswith("LATIN") for c in letters)
    return latin, len(letters) - latin


def script_of(text: str) -> str:
    """``Latin`` when most letters of ``text`` are Latin-script letters (or it has none), else ``non-Latin``."""
    latin, other = letter_counts(text)
    return LATIN if latin >= other else NON_LATIN


def declared_script(doc: Document) -> str | None:
    """The script group a document declares in its ``script`` field (ISO 15924, e.g. ``Latn``), if any."""
    if not doc.script:
        return None
    return LATIN if doc.script.strip().lower() in LATIN_SCRIPT_CODES else NON_LATIN


@dataclass
class EvalDoc:
    """One scored document: context tokens, target tokens, the targets' UTF-8 bytes and its groups."""

    context: list[int]
    targets: list[int]
    n_bytes: int
    language: str
    domain: str
    script: str


def _cut(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` within ``max_bytes`` UTF-8 bytes, ending at a line break when there is one."""
    head = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    if len(head) == len(text) or text[len(head)] == "\n":
        return head
    line_end = head.rfind("\n")
    return head[:line_end] if line_end > 0 else head


def select_documents(docs: Sequence[Document], langs: Sequence[str] | None, max_bytes: int | None,
                     default_language: str) -> list[Document]:
    """Documents of the wanted languages, at most ``max_bytes`` bytes of scored text per language."""
    wanted = {language_key(lang) for lang in langs} if langs else None
    used: dict[str, int] = {}
    out = []
    for d in docs:
        lang = d.language or default_language
        if wanted is not None and language_key(lang) not in wanted and not language_names(d.record) & wanted:
            continue
        if max_bytes is not None:
            left = max_bytes - used.get(lang, 0)
            if left <= 0:
                continue
            size = len(d.text.encode("utf-8"))
            if size > left and d.prompt is None:  # plain text is cut; an instruction's target is kept whole
                text = _cut(d.text, left)
                if not text.strip():
                    continue
                d = Document(text=text, prompt=None, language=d.language, script=d.script, domain=d.domain,
                             source=d.source, line=d.line)
            used[lang] = used.get(lang, 0) + len(d.text.encode("utf-8"))
        out.append(d)
    return out


def prepare_documents(sources: Sequence, tokenizer, text_field: str | None = None,
                      langs: Sequence[str] | None = None, max_bytes: int | None = None) -> list[EvalDoc]:
    """Read named sources (``DataSource``: name, path), keep ``langs``, tokenize into scored documents.

    A document without a ``language`` field counts under its source's name; without a ``domain`` field, too.
    A row that names its language but gives no code counts under the code other rows give that name.
    """
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if start is None:
        raise ExpertmixError("the tokenizer has neither an EOS nor a BOS token to start documents with")
    out: list[EvalDoc] = []
    letters: dict[str, list[int]] = {}  # language -> [Latin, other] letters of documents that declare no script
    undeclared: list[EvalDoc] = []
    read = [(src, read_documents(src.path, text_field, role="eval")) for src in sources]
    rows = [d.record for _, docs in read for d in docs]
    read = [(src, with_language_codes(docs, rows)) for src, docs in read]
    for src, docs in read:
        docs = select_documents(docs, langs, max_bytes, default_language=src.name)
        tokenized = tokenize_documents(docs, tokenizer, add_eos=False)
        for doc, tok in zip(docs, tokenized, strict=True):
            n_context = sum(1 for label in tok.labels if label == IGNORE_INDEX)
            targets = tok.input_ids[n_context:]
            if not targets:
                continue
            item = EvalDoc(context=[start, *tok.input_ids[:n_context]], targets=targets,
                           n_bytes=len(doc.text.encode("utf-8")), language=doc.language or src.name,
                           domain=doc.domain or src.name, script=declared_script(doc) or "")
            if not item.script:
                counts = letters.setdefault(item.language, [0, 0])
                for i, n in enumerate(letter_counts(doc.text)):
                    counts[i] += n
                undeclared.append(item)
            out.append(item)
    # Without a script field a language's script is the majority over all its documents' letters: a Japanese
    # manual page full of Latin option names is still Japanese text.
    for item in undeclared:
        latin, other = letters[item.language]
        item.script = LATIN if latin >= other else NON_LATIN
    if not out:
        what = f" in language(s) {', '.join(langs)}" if langs else ""
        present = sorted({d.language or src.name for src, docs in read for d in docs})
        found = f" (languages there: {', '.join(present)})" if langs and present else ""
        raise DataError(f"no documents to evaluate{what} in {', '.join(str(s.path) for s in sources)}{found}")
    return out


@dataclass
class Chunk:
    """A window of one document: ``inputs`` predict ``targets``; ``scored`` marks the targets that count."""

    doc: int
    inputs: list[int]
    targets: list[int]
    scored: list[bool]


def chunk_documents(docs: Sequence[EvalDoc], window: int) -> list[Chunk]:
    """Cut every document into non-overlapping windows of at most ``window`` predictions."""
    if window < 1:
        raise ExpertmixError(f"--seq-len {window}: must be at least 1")
    chunks = []
    for i, d in enumerate(docs):
        seq = d.context + d.targets
        first_target = len(d.context)
        for a in range(0, len(seq) - 1, window):
            b = min(a + window, len(seq) - 1)
            chunks.append(Chunk(doc=i, inputs=seq[a:b], targets=seq[a + 1:b + 1],
                                scored=[p >= first_target for p in range(a + 1, b + 1)]))
    return [c for c in chunks if any(c.scored)]


def batches(chunks: Sequence[Chunk], batch_tokens: int, pad_id: int):
    """Padded batches (longest first) of about ``batch_tokens`` tokens: ids, mask, targets, scored, chunk ids."""
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i].inputs))
    i = 0
    while i < len(order):
        longest = len(chunks[order[i]].inputs)
        picked = order[i:i + max(1, batch_tokens // longest)]
        take = [chunks[j] for j in picked]
        i += len(take)
        ids = torch.full((len(take), longest), pad_id, dtype=torch.long)
        mask = torch.zeros(len(take), longest, dtype=torch.long)
        targets = torch.zeros(len(take), longest, dtype=torch.long)
        scored = torch.zeros(len(take), longest, dtype=torch.bool)
        for r, c in enumerate(take):
            n = len(c.inputs)
            ids[r, :n] = torch.tensor(c.inputs)
            mask[r, :n] = 1
            targets[r, :n] = torch.tensor(c.targets)
            scored[r, :n] = torch.tensor(c.scored)
        yield ids, mask, targets, scored, torch.tensor(picked)


# -- scoring -----------------------------------------------------------------------------------------

@dataclass
class Scores:
    """Sums per window (chunk): bits for every model; KL (nats) and top-1 flips for every candidate.

    Kept per window rather than per document so that the bootstrap has enough units where a language has
    few, long documents.
    """

    chunk_doc: np.ndarray  # document index of each window
    bits: dict[str, np.ndarray]
    kl: dict[str, np.ndarray] = field(default_factory=dict)
    flips: dict[str, np.ndarray] = field(default_factory=dict)


def score_documents(models: dict[str, Scorer], docs: Sequence[EvalDoc], reference: str | None = None,
                    window: int = 512, batch_tokens: int = 4096, pad_id: int = 0, progress: bool = True,
                    timings: dict[str, float] | None = None) -> Scores:
    """Run every model over the same batches; with ``reference``, compare the others with it token by token.

    ``timings`` (optional) accumulates each model's forward seconds.
    """
    if reference is not None and reference not in models:
        raise ExpertmixError(f"reference {reference!r} is not one of the models ({', '.join(models)})")
    order = [reference, *(m for m in models if m != reference)] if reference is not None else list(models)
    chunks = chunk_documents(docs, window)
    n = len(chunks)
    scores = Scores(chunk_doc=np.array([c.doc for c in chunks], dtype=np.int64), bits={m: np.zeros(n) for m in order})
    for m in order[1:] if reference is not None else []:
        scores.kl[m], scores.flips[m] = np.zeros(n), np.zeros(n)
    bar = tqdm(total=sum(sum(c.scored) for c in chunks), desc="scoring", unit="tok", disable=not progress)
    for ids, mask, targets, scored, chunk_ids in batches(chunks, batch_tokens, pad_id):
        row_chunk = chunk_ids[:, None].expand_as(targets)[scored].numpy()
        ref_logp = None
        for name in order:
            t = time.perf_counter()
            logits = models[name].logits(ids, mask)
            if timings is not None:
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
            logp = torch.log_softmax(logits.float(), dim=-1)[scored]  # [N, V] at the scored positions
            bits = -logp.gather(-1, targets[scored][:, None]).squeeze(-1).double() / math.log(2)
            np.add.at(scores.bits[name], row_chunk, bits.numpy())
            if name == reference:
                ref_logp = logp
            elif ref_logp is not None:
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).double().clamp_min(0)
                np.add.at(scores.kl[name], row_chunk, kl.numpy())
                np.add.at(scores.flips[name], row_chunk, (ref_logp.argmax(-1) != logp.argmax(-1)).double().numpy())
        bar.update(int(scored.sum()))
    bar.close()
    return scores


# -- reports -----------------------------------------------------------------------------------------

@dataclass
class GroupResult:
    """Numbers of one group of documents (a language, a domain, a script group or all)."""

    name: str
    kind: str  # language | domain | script | all
    script: str
    docs: int
    tokens: int
    bytes: int
    bpb: dict[str, float]
    relative_change: dict[str, float] = field(default_factory=dict)
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    kl_per_token: dict[str, float] = field(default_factory=dict)
    top1_flip_rate: dict[str, float] = field(default_factory=dict)


@dataclass
class QualityReport:
    """Bits per byte of every model per group and, against the reference, the change and divergences."""

    models: list[str]
    reference: str | None
    groups: list[GroupResult]

    @property
    def candidates(self) -> list[str]:
        return [m for m in self.models if m != self.reference]

    def group(self, name: str, kind: str | None = None) -> GroupResult:
        for g in self.groups:
            if g.name == name and (kind is None or g.kind == kind):
                return g
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"models": self.models, "reference": self.reference,
                "groups": [{**g.__dict__, "ci95": {k: list(v) for k, v in g.ci95.items()}} for g in self.groups]}

    def save_json(self, path: str | Path) -> Path:
        write_json_atomic(Path(path), self.to_dict())
        return Path(path)

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """A plain table: header and rows (strings) for the CLI and the benchmark."""
        header = ["group", "kind", "script", "docs", "tokens", "bytes"]
        if self.reference is None:
            header += [f"bpb {m}" for m in self.models]
        else:
            header += [f"bpb {self.reference}"]
            for m in self.candidates:
                header += [f"bpb {m}", f"Δ% {m}", f"95% CI {m}", f"KL {m}", f"flip% {m}"]
        rows = []
        for g in self.groups:
            row = [g.name, g.kind, g.script, str(g.docs), str(g.tokens), str(g.bytes)]
            if self.reference is None:
                row += [f"{g.bpb[m]:.4f}" for m in self.models]
            else:
                row += [f"{g.bpb[self.reference]:.4f}"]
                for m in self.candidates:
                    lo, hi = g.ci95[m]
                    row += [f"{g.bpb[m]:.4f}", f"{100 * g.relative_change[m]:+.2f}",
                            f"[{100 * lo:+.2f}, {100 * hi:+.2f}]", f"{g.kl_per_token[m]:.4f}",
                            f"{100 * g.top1_flip_rate[m]:.2f}"]
            rows.append(row)
        return header, rows

    def save_chart(self, path: str | Path, title: str | None = None) -> Path:
        """PNG bar chart per language (Latin first, then non-Latin, then the script groups): the relative
        change of bits per byte per candidate with its 95% interval, or bits per byte without a reference."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        langs = sorted((g for g in self.groups if g.kind == "language"), key=lambda g: (g.script != LATIN, g.name))
        shown = langs + [g for g in self.groups if g.kind == "script"]
        series = self.candidates if self.reference is not None else self.models
        width = 0.8 / max(len(series), 1)
        fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.45 * len(shown) * len(series) ** 0.5 + 2)), 4.5))
        x = np.arange(len(shown))
        for k, m in enumerate(series):
            if self.reference is not None:
                vals = np.array([100 * g.relative_change[m] for g in shown])
                lo = np.array([100 * g.ci95[m][0] for g in shown])
                hi = np.array([100 * g.ci95[m][1] for g in shown])
                err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
                ax.bar(x + (k - (len(series) - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=m)
            else:
                ax.bar(x + (k - (len(series) - 1) / 2) * width, [g.bpb[m] for g in shown], width, label=m)
        n_latin = sum(g.script == LATIN for g in langs)
        if 0 < n_latin < len(langs):
            ax.axvspan(n_latin - 0.5, len(langs) - 0.5, color="0.92", zorder=0, label="non-Latin script")
        if len(shown) > len(langs):
            ax.axvline(len(langs) - 0.5, color="0.5", linewidth=0.8)
        ax.set_xticks(x, [g.name for g in shown], rotation=30, ha="right")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel(f"bits per byte, % change vs {self.reference}" if self.reference else "bits per byte")
        ax.set_title(title or ("bits-per-byte change per language" if self.reference else "bits per byte per language"),
                     fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)


def bootstrap_ci(bits_model: np.ndarray, bits_ref: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                 seed: int = 0) -> tuple[float, float]:
    """95% interval of ``sum(model) / sum(ref) - 1`` resampling units (windows) with replacement."""
    if len(bits_ref) < 2:
        rel = float(bits_model.sum() / bits_ref.sum() - 1)
        return rel, rel
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(bits_ref), size=(draws, len(bits_ref)))
    rel = bits_model[idx].sum(1) / np.maximum(bits_ref[idx].sum(1), 1e-12) - 1
    lo, hi = np.percentile(rel, [2.5, 97.5])
    return float(lo), float(hi)


def build_report(docs: Sequence[EvalDoc], scores: Scores, models: Sequence[str],
                 reference: str | None) -> QualityReport:
    """Aggregate per-window scores by language, domain, script group and overall."""
    tokens = np.array([len(d.targets) for d in docs], dtype=np.float64)
    n_bytes = np.array([d.n_bytes for d in docs], dtype=np.float64)
    groupings: list[tuple[str, Callable[[EvalDoc], str]]] = [
        ("language", lambda d: d.language), ("domain", lambda d: d.domain), ("script", lambda d: d.script),
        ("all", lambda d: "all")]
    groups: list[GroupResult] = []
    for kind, key in groupings:
        names = list(dict.fromkeys(key(d) for d in docs))
        if kind == "domain" and len({(d.language, d.domain) for d in docs}) == len(names) == \
                len({d.language for d in docs}):
            continue  # one domain per language and back: the domain rows would repeat the language rows
        for name in names:
            sel = np.array([key(d) == name for d in docs])
            win = sel[scores.chunk_doc]
            scripts = {d.script for d, s in zip(docs, sel, strict=True) if s}
            g = GroupResult(name=name, kind=kind, script=scripts.pop() if len(scripts) == 1 else "mixed",
                            docs=int(sel.sum()), tokens=int(tokens[sel].sum()), bytes=int(n_bytes[sel].sum()),
                            bpb={m: float(scores.bits[m][win].sum() / n_bytes[sel].sum()) for m in models})
            if reference is not None:
                ref_bits = scores.bits[reference][win]
                for m in models:
                    if m == reference:
                        continue
                    g.relative_change[m] = float(scores.bits[m][win].sum() / ref_bits.sum() - 1)
                    g.ci95[m] = bootstrap_ci(scores.bits[m][win], ref_bits)
                    g.kl_per_token[m] = float(scores.kl[m][win].sum() / tokens[sel].sum())
                    g.top1_flip_rate[m] = float(scores.flips[m][win].sum() / tokens[sel].sum())
            groups.append(g)
    return QualityReport(models=list(models), reference=reference, groups=groups)


def compare_models(models: dict[str, Scorer], docs: Sequence[EvalDoc], reference: str | None = None,
                   window: int = 512, batch_tokens: int = 4096, pad_id: int = 0, progress: bool = True,
                   timings: dict[str, float] | None = None) -> QualityReport:
    """Score ``models`` on ``docs`` (the reference first) and build the report."""
    scores = score_documents(models, docs, reference, window, batch_tokens, pad_id, progress, timings)
    return build_report(docs, scores, list(scores.bits), reference)


def evaluate_quality(model: str | Path, sources: Sequence, reference: str | Path | None = None,
                     variant: str | None = None, reference_variant: str | None = None,
                     langs: Sequence[str] | None = None, max_bytes: int | None = None, window: int = 512,
                     batch_tokens: int = 4096, text_field: str | None = None, device: str = "cpu",
                     threads: int | None = None, progress: bool = True) -> QualityReport:
    """``expertmix eval``'s quality mode: bits per byte of ``model`` (and of ``reference``, compared)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    docs = prepare_documents(sources, tokenizer, text_field, langs, max_bytes)
    name = Path(model).name + (f" ({variant})" if variant else "")
    models: dict[str, Scorer] = {}
    ref_name = None
    if reference is not None:
        ref_name = Path(reference).name + (f" ({reference_variant})" if reference_variant else "")
        if ref_name == name:
            ref_name += " [reference]"
        models[ref_name] = open_scorer(reference, reference_variant, device, threads)
    models[name] = open_scorer(model, variant, device, threads)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return compare_models(models, docs, ref_name, window, batch_tokens, pad, progress)


__all__ = ["Scorer", "TorchScorer", "OrtScorer", "open_scorer", "EvalDoc", "prepare_documents", "script_of",
           "declared_script", "letter_counts",
           "chunk_documents", "score_documents", "build_report", "compare_models", "evaluate_quality",
           "QualityReport", "GroupResult", "bootstrap_ci", "LATIN", "NON_LATIN"]
