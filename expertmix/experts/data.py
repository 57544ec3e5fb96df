"""Reading domain data (text, JSONL, Aya layouts, saved ``datasets``) and packing it into token blocks.

Every reader yields :class:`Document` objects. Bad input fails early with the file, line and field.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import torch

from ..errors import DataError
from ..fsutil import sha256_file

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
AYA_INPUT, AYA_TARGET = "inputs", "targets"


@dataclass
class Document:
    """One training document. ``prompt`` is set for instruction data (Aya): its tokens are not trained on."""

    text: str
    prompt: str | None = None
    language: str | None = None
    script: str | None = None
    domain: str | None = None
    source: str = ""
    line: int = 0
    record: dict | None = field(default=None, repr=False, compare=False)  # the JSON row it was read from, whole

    @property
    def full_text(self) -> str:
        return f"{self.prompt}\n{self.text}" if self.prompt is not None else self.text


L = TypeVar("L")
LANGUAGE_FIELDS = ("language_code", "language")  # Aya rows carry both ("deu", "German"); the code comes first
BOM = b"\xef\xbb\xbf"
# Formats a folder may hold that expertmix does not read: refused by name rather than skipped in silence.
UNREAD_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".tgz", ".parquet", ".csv", ".tsv", ".arrow",
                   ".feather", ".json", ".lines", ".pkl", ".pickle", ".npy", ".npz"}
EVAL_SPLITS = ("validation", "valid", "test")


def row_language(row: dict) -> str | None:
    """A row's language: its ``language_code``, else its ``language``."""
    lang = next((row[k] for k in LANGUAGE_FIELDS if row.get(k) is not None), None)
    return str(lang) if lang is not None else None


def language_names(row: dict | None) -> frozenset[str]:
    """Every name a row gives its language (``language_code`` and ``language``), casefolded, for filters like
    ``--langs`` (compare with :func:`language_key`)."""
    return frozenset(language_key(row[k]) for k in LANGUAGE_FIELDS if row and row.get(k) is not None)


def language_codes(rows: Iterable[dict | None]) -> dict[str, str]:
    """Language name -> code (casefolded name keys), learnt from the rows that give both (an Aya row: ``German``
    and ``deu``), so that rows giving only the name can be grouped with those giving the code."""
    codes: dict[str, str] = {}
    for row in rows:
        if row and row.get("language") is not None and row.get("language_code") is not None:
            codes.setdefault(language_key(row["language"]), str(row["language_code"]))
    return codes


def with_language_codes(items: list[L], rows: Iterable[dict | None]) -> list[L]:
    """``items`` (records with a ``language``) whose language is a name that ``rows`` give a code for, with that
    code: one group per language, whichever of the two a row gave."""
    codes = language_codes(rows)
    return [replace(x, language=codes[language_key(x.language)])
            if x.language is not None and language_key(x.language) in codes else x for x in items]


def language_key(name: object) -> str:
    """A language name or code as filters compare it: ``German``, ``german`` and ``GERMAN`` are one."""
    return str(name).strip().casefold()


def data_digest(path: str | Path) -> str | None:
    """sha256 of a data file, or of a folder's files (names and contents); None where nothing is there."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _decode(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                        f"{exc.start + 1})") from exc


def _record_to_document(rec: dict, path: Path, line: int, text_field: str | None) -> Document:
    """A JSON record as a Document: the named field, ``text``, or the Aya ``inputs``/``targets`` pair."""
    extra = {"language": row_language(rec),
             "script": rec.get("script"), "domain": rec.get("domain"), "source": str(path), "line": line}
    if text_field is None and AYA_INPUT in rec and AYA_TARGET in rec:
        inputs, targets = rec[AYA_INPUT], rec[AYA_TARGET]
        if targets is None:  # a missing target (pandas and datasets write null): an empty row, skipped
            targets = ""
        for key, val in ((AYA_INPUT, inputs), (AYA_TARGET, targets)):
            if not isinstance(val, str):
                raise DataError(f"{path} line {line}: field '{key}' must be a string, got {type(val).__name__}")
        return Document(text=targets, prompt=inputs, record=rec, **extra)
    text_key = text_field or "text"
    if text_key not in rec:
        fields = ", ".join(sorted(rec)) or "none"
        raise DataError(f"{path} line {line}: no field '{text_key}' (fields: {fields}); "
                        f"name the text field with --text-field")
    val = "" if rec[text_key] is None else rec[text_key]  # null text (pandas and datasets write it): skipped
    if not isinstance(val, str):
        raise DataError(f"{path} line {line}: field '{text_key}' must be a string, got {type(val).__name__}")
    return Document(text=val, record=rec, **extra)


def iter_jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file; bad lines are errors naming them."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            line = _decode(raw.removeprefix(BOM), path, i).strip()  # a BOM on any line: files joined with cat
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {i}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(rec, dict):
                raise DataError(f"{path} line {i}: expected a JSON object, got {type(rec).__name__}")
            if SURROGATE_ESCAPE.search(line) and (found := _lone_surrogate(rec)) is not None:
                # valid JSON (text cut mid-emoji), but no tokenizer or UTF-8 writer takes it
                raise DataError(f"{path} line {i}: field '{found[0]}' is not valid Unicode (a lone surrogate "
                                f"\\u{ord(found[1]):04x}, e.g. half of an emoji cut off)")
            yield i, rec


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only lines that escape a surrogate can hold a lone one
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: object, where: str = "") -> tuple[str, str] | None:
    """The field (dotted path) of the first string holding a lone surrogate, and that surrogate; None if none."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return (where, m.group()) if m else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if (found := _lone_surrogate(item, f"{where}.{key}" if where else str(key))) is not None:
            return found
    return None


def _has_text(doc: Document) -> bool:
    """Whether a document has anything to learn from (an empty ``text`` row is skipped, not trained on)."""
    return bool(doc.text.strip())


def read_jsonl(path: Path, text_field: str | None = None) -> Iterator[Document]:
    for i, rec in iter_jsonl_records(path):
        doc = _record_to_document(rec, path, i, text_field)
        if _has_text(doc):
            yield doc


def read_text(path: Path, split: str = "paragraph") -> Iterator[Document]:
    """Plain text: one document per blank-line-separated paragraph, per line, or the whole file."""
    raw = path.read_bytes().removeprefix(BOM)
    for i, line in enumerate(raw.split(b"\n"), start=1):  # locate bad bytes by line
        _decode(line, path, i)
    text = raw.decode("utf-8").replace("\r\n", "\n")  # Windows line endings: no stray carriage returns
    if split == "file":
        if text.strip():
            yield Document(text=text.strip(), source=str(path), line=1)
        return
    if split not in ("paragraph", "line"):
        raise DataError(f"unknown text split {split!r}: use paragraph, line or file")
    para: list[str] = []
    first = 0
    for i, line in enumerate(text.split("\n"), start=1):
        if split == "line":
            if line.strip():
                yield Document(text=line.strip(), source=str(path), line=i)
            continue
        if line.strip():
            first = first or i
            para.append(line)
        elif para:
            yield Document(text="\n".join(para).strip(), source=str(path), line=first)
            para, first = [], 0
    if para:
        yield Document(text="\n".join(para).strip(), source=str(path), line=first)


def _dict_splits(path: Path) -> list[str] | None:
    """The splits of a saved ``DatasetDict`` folder (None for other data)."""
    if not (path / "dataset_dict.json").is_file():
        return None
    try:
        return list(json.loads((path / "dataset_dict.json").read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path / 'dataset_dict.json'}: not a datasets DatasetDict index ({exc})") from exc


def held_out_split(path: str | Path) -> str | None:
    """The held-out split (``validation``, ``valid`` or ``test``) of a saved ``DatasetDict`` folder, if it has one."""
    splits = _dict_splits(Path(path)) if Path(path).is_dir() else None
    return next((s for s in EVAL_SPLITS if s in splits), None) if splits else None


def dataset_dict_split(path: Path, role: str = "train") -> str | None:
    """The split of a saved ``DatasetDict`` folder that ``role`` reads (None for other data).

    ``train`` reads ``train``; ``eval`` reads ``validation``, ``valid`` or ``test`` (the first there), or the only
    split of a one-split dict. Anything else is an error naming the splits the folder has.
    """
    splits = _dict_splits(path)
    if splits is None:
        return None
    wanted = ("train",) if role == "train" else EVAL_SPLITS
    found = next((s for s in wanted if s in splits), None)
    if found is None and role != "train" and len(splits) == 1:
        found = splits[0]
    if found is None:
        raise DataError(f"{path}: no split {' or '.join(repr(s) for s in wanted)} to "
                        f"{'train on' if role == 'train' else 'evaluate on'} (splits: {', '.join(splits)})")
    return found


def read_saved_dataset(path: Path, text_field: str | None = None, role: str = "train") -> Iterator[Document]:
    """A folder written by ``datasets``' ``save_to_disk`` (Dataset or DatasetDict: the split ``role`` reads)."""
    import datasets

    split = dataset_dict_split(path, role)
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split]
    for i, rec in enumerate(ds, start=1):
        doc = _record_to_document(rec, path, i, text_field)
        if _has_text(doc):
            yield doc


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
        or (path / "state.json").is_file()


def read_documents(path: str | Path, text_field: str | None = None, text_split: str = "paragraph",
                   domain: str | None = None, role: str = "train") -> list[Document]:
    """Read every document under ``path`` (a file or a folder of files); an empty result is an error.

    ``role`` (``train`` or ``eval``) picks a saved DatasetDict's split (see ``dataset_dict_split``). Rows whose text
    is empty are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir() and _is_saved_dataset(path):
        docs = list(read_saved_dataset(path, text_field, role))
    elif path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        if unread := [p for p in found if p.suffix.lower() in UNREAD_SUFFIXES]:
            raise DataError(f"{unread[0]}: a format expertmix does not read ('{unread[0].suffix}'), in the data "
                            f"folder {path}; convert it to .jsonl or move it out of the folder")
        files = [p for p in found if p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES]
        if not files:
            raise DataError(f"{path}: folder holds no .txt, .md or .jsonl files")
        docs = [d for f in files for d in _read_file(f, text_field, text_split)]
    else:
        docs = _read_file(path, text_field, text_split)
    if not docs:
        raise DataError(f"{path}: no documents (the file is empty, or every row's text is)")
    if domain is not None:
        for d in docs:
            d.domain = domain
    return docs


def _read_file(path: Path, text_field: str | None, text_split: str) -> list[Document]:
    if path.suffix.lower() in JSONL_SUFFIXES:
        return list(read_jsonl(path, text_field))
    if path.suffix.lower() in TEXT_SUFFIXES:
        return list(read_text(path, text_split))
    raise DataError(f"{path}: unknown data format '{path.suffix}' (expected .txt, .md, .jsonl or a "
                    f"datasets folder saved with save_to_disk)")


@dataclass
class TokenizedDocument:
    input_ids: list[int]
    labels: list[int]  # -100 where the loss is masked (instruction inputs)


IGNORE_INDEX = -100


def tokenize_documents(docs: Sequence[Document], tokenizer, add_eos: bool = True,
                       batch_size: int = 512) -> list[TokenizedDocument]:
    """Tokenize with the seed's tokenizer; instruction inputs get label -100 so only targets train."""
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    out: list[TokenizedDocument] = []
    for start in range(0, len(docs), batch_size):
        batch = docs[start:start + batch_size]
        texts = tokenizer([d.text for d in batch], add_special_tokens=False)["input_ids"]
        prompts = [d.prompt + "\n" if d.prompt is not None else "" for d in batch]
        has_prompt = [d.prompt is not None for d in batch]
        prompt_ids = tokenizer([p for p in prompts], add_special_tokens=False)["input_ids"] if any(has_prompt) \
            else [[] for _ in batch]
        for ids, pids in zip(texts, prompt_ids, strict=True):
            full = list(pids) + list(ids) + eos
            labels = [IGNORE_INDEX] * len(pids) + list(ids) + eos
            out.append(TokenizedDocument(full, labels))
    return out


def pack(tokenized: Iterable[TokenizedDocument], seq_len: int, drop_last: bool = True) -> dict[str, torch.Tensor]:
    """Concatenate documents and cut the stream into blocks of ``seq_len`` tokens.

    Returns ``input_ids`` and ``labels`` of shape [blocks, seq_len]. Without ``drop_last`` the final
    partial block is padded (labels -100 on the padding).
    """
    ids: list[int] = []
    labels: list[int] = []
    for t in tokenized:
        ids.extend(t.input_ids)
        labels.extend(t.labels)
    n_full = len(ids) // seq_len
    rem = len(ids) - n_full * seq_len
    if rem and not drop_last:
        pad = seq_len - rem
        ids.extend([0] * pad)
        labels.extend([IGNORE_INDEX] * pad)
        n_full += 1
    if n_full == 0:
        raise DataError(f"not enough text to fill one block of {seq_len} tokens ({len(ids)} tokens in all)")
    n = n_full * seq_len
    return {"input_ids": torch.tensor(ids[:n]).view(n_full, seq_len),
            "labels": torch.tensor(labels[:n]).view(n_full, seq_len)}


def count_tokens(tokenized: Iterable[TokenizedDocument]) -> int:
    return sum(len(t.input_ids) for t in tokenized)
