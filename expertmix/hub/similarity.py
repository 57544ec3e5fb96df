"""Find the experts nearest to a data set: embed the data with each embedder the experts' cards name,
then rank the experts by cosine similarity of domain embeddings (``expertmix search --like DATA``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ExpertmixError
from .fingerprint import fingerprint_weights
from .store import ExpertEntry, Registry

SEED_EMBEDDER = "seed"
ALL = 100_000


def search_like(registry: Registry, data: str | Path, seed_dir: str | Path | None = None,
                domain: str | None = None, language: str | None = None, kind: str | None = None,
                base_fingerprint: str | None = None, limit: int = 20, sample: int = 64,
                text_field: str | None = None) -> list[tuple[ExpertEntry, float]]:
    """Experts matching the filters, nearest first to the domain embedding of ``data``.

    An expert embedded with the seed model ('seed') is compared only when ``seed_dir`` is that expert's
    seed (same weight fingerprint): seed embeddings of different seeds live in different spaces.
    """
    from ..experts.embedding import embed_file, load_embedder

    filters = {"domain": domain, "language": language, "kind": kind, "base_fingerprint": base_fingerprint}
    candidates = [entry for entry, _ in registry.search(**filters, limit=ALL)]
    specs = sorted({e.card.expert.embedding.model for e in candidates})
    seed_fp = fingerprint_weights(seed_dir) if seed_dir is not None else None
    hits: list[tuple[ExpertEntry, float]] = []
    for spec in specs:
        if spec == SEED_EMBEDDER and seed_fp is None:
            continue
        vector, _ = embed_file(data, load_embedder(spec, seed_dir), sample=sample, text_field=text_field)
        for entry, score in registry.search(**filters, like=vector, limit=ALL):
            e = entry.card.expert
            if e.embedding.model != spec or score is None:
                continue
            if spec == SEED_EMBEDDER and e.base_fingerprint != seed_fp:
                continue
            hits.append((entry, score))
    if not hits and SEED_EMBEDDER in specs and seed_fp is None:
        raise ExpertmixError("the matching experts were embedded with their seed model: pass the seed folder "
                             "(--base SEED) so your data can be embedded the same way")
    hits.sort(key=lambda h: -h[1])
    return hits[:limit]
