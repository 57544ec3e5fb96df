"""Synthetic domains that the package generates itself, so ``quickstart`` needs no download.

Three domains with clearly different statistics: arithmetic, Python code (the standard library's own
sources on this machine) and structured records.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from ..fsutil import write_text_atomic

NAMES = ["Ada", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kofi", "Lena"]
CITIES = ["Lisbon", "Osaka", "Lagos", "Quito", "Riga", "Hanoi", "Perth", "Oslo", "Cairo", "Lima"]
ROLES = ["engineer", "teacher", "nurse", "pilot", "farmer", "chemist", "writer", "baker"]
STDLIB_MODULES = ["textwrap", "string", "bisect", "heapq", "fnmatch", "glob", "shlex", "colorsys", "calendar",
                  "difflib", "fractions", "statistics", "pprint", "queue", "random", "json/encoder",
                  "json/decoder", "csv", "tokenize", "dataclasses", "functools", "ipaddress", "copy", "operator"]


def arithmetic_documents(n: int, seed: int = 0) -> list[str]:
    """Worked sums, differences and products, a few per document."""
    r = random.Random(f"arith-{seed}")
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(r.randint(4, 10)):
            a, b, op = r.randint(0, 999), r.randint(0, 99), r.choice("+-*")
            val = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"{a} {op} {b} = {val}")
        docs.append("\n".join(lines))
    return docs


def code_documents(n: int, seed: int = 0, lines_per_doc: int = 30) -> list[str]:
    """Chunks of the Python standard library's own source files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for mod in STDLIB_MODULES:
        path = stdlib / f"{mod}.py"
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for i in range(0, len(lines), lines_per_doc):
            chunk = "\n".join(lines[i:i + lines_per_doc]).strip()
            if len(chunk) > 80:
                chunks.append(chunk)
    if not chunks:
        raise RuntimeError(f"no Python standard library sources found under {stdlib}")
    r = random.Random(f"code-{seed}")
    r.shuffle(chunks)
    return [chunks[i % len(chunks)] for i in range(n)]


def records_documents(n: int, seed: int = 0) -> list[str]:
    """Structured key: value records of people, jobs and places."""
    r = random.Random(f"records-{seed}")
    docs = []
    for _ in range(n):
        recs = []
        for _ in range(r.randint(2, 5)):
            recs.append(f"name: {r.choice(NAMES)}\nage: {r.randint(18, 90)}\ncity: {r.choice(CITIES)}\n"
                        f"role: {r.choice(ROLES)}\nid: {r.randint(1000, 9999)}")
        docs.append("\n---\n".join(recs))
    return docs


DOMAINS = {"arithmetic": arithmetic_documents, "code": code_documents, "records": records_documents}


def write_domain(path: Path, domain: str, texts: list[str]) -> Path:
    """Write a domain's documents as JSONL (``text``, ``domain``), atomically."""
    import json

    write_text_atomic(path, "".join(json.dumps({"text": t, "domain": domain}) + "\n" for t in texts))
    return path


def write_synthetic_corpus(root: Path, n_train: int = 400, n_valid: int = 40, seed: int = 0) -> dict[str, dict]:
    """Write ``root/{domain}.{train,valid}.jsonl`` for every synthetic domain; returns the paths."""
    out = {}
    for name, make in DOMAINS.items():
        docs = make(n_train + n_valid, seed)
        out[name] = {"train": write_domain(root / f"{name}.train.jsonl", name, docs[:n_train]),
                     "valid": write_domain(root / f"{name}.valid.jsonl", name, docs[n_train:])}
    return out
