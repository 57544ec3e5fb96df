"""Domain mixing by token share (Aryabumi et al. 2024): sample sources so each gets its share of tokens.

The mix is reproducible for a seed: each source's documents are drawn from its own seeded permutation (a
fresh permutation each time a source runs out and must repeat), the last document drawn from a source is
truncated to land on its token target, and the result is shuffled.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from ..errors import DataError
from .data import TokenizedDocument, count_tokens

SHARE_TOLERANCE = 1e-6
MIX_SYNTAX = "NAME=SHARE[,NAME=SHARE...] with shares summing to 1 (e.g. code=0.25,de=0.75)"


def parse_mix_spec(text: str) -> dict[str, float]:
    """Parse ``code=0.25,de=0.75`` into ``{source: share}``; errors name the bad part."""
    shares: dict[str, float] = {}
    if not text.strip():
        raise DataError(f"empty mix spec: expected {MIX_SYNTAX}")
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value or "=" in value:
            raise DataError(f"mix part {part.strip()!r} of {text!r} is not NAME=SHARE: expected {MIX_SYNTAX}")
        try:
            share = float(value)
        except ValueError:
            raise DataError(f"mix part {part.strip()!r}: share {value!r} is not a number") from None
        if not math.isfinite(share) or share < 0:
            raise DataError(f"mix part {part.strip()!r}: share must be a finite number >= 0, got {value}")
        if name in shares:
            raise DataError(f"mix spec {text!r} names source {name!r} twice")
        shares[name] = share
    _check_sum(shares)
    return shares


def _check_sum(shares: Mapping[str, float]) -> None:
    total = sum(shares.values())
    if abs(total - 1.0) > SHARE_TOLERANCE:
        listed = ", ".join(f"{k}={v:g}" for k, v in shares.items())
        raise DataError(f"mix shares must sum to 1, they sum to {total:.6g} ({listed})")


def _draw(docs: Sequence[TokenizedDocument], target: int,
          rng: random.Random) -> tuple[list[TokenizedDocument], int]:
    """Draw seeded permutations of ``docs`` up to ``target`` tokens; returns the docs and the repeat count."""
    # Hand-written rather than `datasets.interleave_datasets`: that samples by example probability, not by
    # token count, and cannot truncate the last example to land on a token target.
    out: list[TokenizedDocument] = []
    seen: set[int] = set()
    repeats = taken = 0
    while taken < target:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            if taken >= target:
                break
            doc = docs[i]
            if not doc.input_ids:
                continue
            need = target - taken
            if len(doc.input_ids) > need:  # keep labels aligned with the ids we keep
                doc = TokenizedDocument(doc.input_ids[:need], doc.labels[:need])
            repeats += i in seen
            seen.add(i)
            out.append(doc)
            taken += len(doc.input_ids)
    return out, repeats


def mix_sources(sources: dict[str, list[TokenizedDocument]], shares: dict[str, float],
                total_tokens: int | None = None, seed: int = 0) -> tuple[list[TokenizedDocument], dict]:
    """Sample ``sources`` so each holds its ``shares`` of the tokens; returns the shuffled docs and a report.

    ``total_tokens=None`` takes the largest total that repeats no document. Sources without a share are
    left out. The report maps each source to its target and actual share, tokens, documents and repeats.
    """
    drawn, report = draw_sources(sources, shares, total_tokens, seed)
    mixed = [doc for docs in drawn.values() for doc in docs]
    random.Random(f"{seed}:shuffle").shuffle(mixed)
    return mixed, report


def draw_sources(sources: dict[str, list[TokenizedDocument]], shares: dict[str, float],
                 total_tokens: int | None = None, seed: int = 0) -> tuple[dict[str, list[TokenizedDocument]], dict]:
    """``mix_sources`` with each source's sample kept apart (``{source: docs}``), for callers that pack by source."""
    unknown = [name for name in shares if name not in sources]
    if unknown:
        raise DataError(f"mix names unknown source(s) {', '.join(map(repr, unknown))}; known sources: "
                        f"{', '.join(sources) or 'none'}")
    for name, share in shares.items():
        if not math.isfinite(share) or share < 0:
            raise DataError(f"share of source {name!r} must be a finite number >= 0, got {share}")
    _check_sum(shares)
    available = {name: count_tokens(docs) for name, docs in sources.items()}
    active = {name: share for name, share in shares.items() if share > 0}
    for name in active:
        if available[name] == 0:
            raise DataError(f"source {name!r} has a share of {shares[name]:g} but holds no tokens")
    if total_tokens is None:
        total_tokens = math.floor(min(available[n] / s for n, s in active.items()) + 1e-9)
    if total_tokens < 1:
        raise DataError(f"total_tokens={total_tokens}: the mix needs at least one token")

    out: dict[str, list[TokenizedDocument]] = {}
    report: dict[str, dict] = {}
    for name, docs in sources.items():
        share = shares.get(name, 0.0)
        target = round(share * total_tokens)
        # One generator per source, seeded by (seed, name): a source's sample does not depend on the others.
        drawn, repeats = _draw(docs, target, random.Random(f"{seed}:{name}")) if target else ([], 0)
        out[name] = drawn
        report[name] = {"target_share": share, "tokens": count_tokens(drawn), "documents": len(drawn),
                        "repeats": repeats, "available_tokens": available[name],
                        "epochs": count_tokens(drawn) / available[name] if available[name] else 0.0}
    total = sum(r["tokens"] for r in report.values())
    for r in report.values():
        r["actual_share"] = r["tokens"] / total if total else 0.0
    return out, report
