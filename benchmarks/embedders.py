"""Which embedder separates the shared corpus's domains better: the seed model or all-MiniLM-L6-v2?

For every domain of ``<shared>/corpus`` it embeds ``--docs`` documents (the valid split, topped up
from the train split where valid holds fewer) with each embedder and reports, by cosine similarity
(what the registry's ``search --like`` ranks by):
- leave-one-out nearest-centroid accuracy of single documents (also over the valid documents alone),
- the same for centroids of ``--sample``-document samples (what a domain embedding is), with the mean
  margin (cosine to the own domain minus the best other domain),
- the silhouette score of the single documents, the closest pair of domain centroids, and speed.

    python benchmarks/embedders.py --shared ../shared
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.metrics import silhouette_score

from expertmix.experts.embedding import SeedEmbedder, embed_texts, load_embedder

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("code", "en", "de", "fr", "es", "it", "pl", "ja", "ru", "zh")


@dataclass
class Scores:
    """The separation measurements of one embedder."""

    doc_acc: float
    valid_doc_acc: float
    sample_acc: float
    sample_margin: float
    silhouette: float
    closest_pair: tuple[str, str, float]
    per_domain: dict[str, float]
    docs_per_s: float


def load_domain_texts(corpus: Path, domain: str, n: int, seed: int) -> tuple[list[str], int]:
    """``n`` texts of ``domain``: valid, topped up by a reproducible sample of train; and the valid count."""
    def texts(split: str) -> list[str]:
        with open(corpus / f"{domain}.{split}.jsonl", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]

    picked = texts("valid")[:n]
    n_valid = len(picked)
    if n_valid < n:
        train = texts("train")
        picked += random.Random(f"{seed}-{domain}").sample(train, min(n - n_valid, len(train)))
    return picked, n_valid


def score(x: torch.Tensor, labels: torch.Tensor, is_valid: torch.Tensor, names: list[str], sample: int,
          draws: int, seed: int, seconds: float) -> Scores:
    """Leave-one-out nearest-centroid accuracies, sample margin and silhouette of embeddings ``x``."""
    k = len(names)
    sums = torch.stack([x[labels == d].sum(0) for d in range(k)])
    counts = torch.stack([(labels == d).sum() for d in range(k)]).float()
    centroids = sums / counts[:, None]

    # single documents: each one against centroids that leave it out of its own domain's
    hits = torch.zeros(len(x), dtype=torch.bool)
    for i in range(len(x)):
        c = centroids.clone()
        d = int(labels[i])
        c[d] = (sums[d] - x[i]) / (counts[d] - 1)
        hits[i] = int(F.cosine_similarity(x[i][None], c).argmax()) == d
    per_domain = {names[d]: float(hits[labels == d].float().mean()) for d in range(k)}

    # domain embeddings: centroids of random `sample`-document draws against the rest
    rng = random.Random(seed)
    sample_hits, margins = [], []
    for d in range(k):
        members = torch.nonzero(labels == d).flatten().tolist()
        for _ in range(draws):
            picked = rng.sample(members, sample)
            c = centroids.clone()
            c[d] = (sums[d] - x[picked].sum(0)) / (counts[d] - sample)
            sims = F.cosine_similarity(x[picked].mean(0)[None], c)
            sample_hits.append(int(sims.argmax()) == d)
            margins.append(float(sims[d] - torch.cat([sims[:d], sims[d + 1:]]).max()))

    pair_sims = F.cosine_similarity(centroids[:, None], centroids[None], dim=-1) - 2 * torch.eye(k)
    a, b = divmod(int(pair_sims.argmax()), k)
    return Scores(doc_acc=float(hits.float().mean()), valid_doc_acc=float(hits[is_valid].float().mean()),
                  sample_acc=sum(sample_hits) / len(sample_hits),
                  sample_margin=sum(margins) / len(margins),
                  silhouette=float(silhouette_score(x.numpy(), labels.numpy(), metric="cosine")),
                  closest_pair=(names[a], names[b], float(pair_sims[a, b])), per_domain=per_domain,
                  docs_per_s=len(x) / seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO / ".." / "shared")
    ap.add_argument("--embedders", default="seed,minilm", help="comma-separated load_embedder specs")
    ap.add_argument("--docs", type=int, default=64, help="documents per domain")
    ap.add_argument("--sample", type=int, default=16, help="documents per domain-embedding sample")
    ap.add_argument("--draws", type=int, default=50, help="samples drawn per domain")
    ap.add_argument("--max-tokens", type=int, default=256, help="the seed embedder's truncation")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus, seed_dir = args.shared / "corpus", args.shared / "seeds" / "seed-s"

    texts, labels, is_valid, from_valid = [], [], [], {}
    for d, name in enumerate(DOMAINS):
        t, n_valid = load_domain_texts(corpus, name, args.docs, args.seed)
        texts += t
        labels += [d] * len(t)
        is_valid += [True] * n_valid + [False] * (len(t) - n_valid)
        from_valid[name] = n_valid
    labels_t = torch.tensor(labels)
    print(f"{len(texts)} documents, {args.docs} per domain (from valid: "
          + ", ".join(f"{k} {v}" for k, v in from_valid.items()) + "; the rest from train)")

    results: dict[str, Scores] = {}
    for spec in args.embedders.split(","):
        emb = SeedEmbedder(seed_dir, max_tokens=args.max_tokens) if spec == "seed" \
            else load_embedder(spec, seed_dir)
        start = time.perf_counter()
        x = embed_texts(texts, emb, batch_size=args.batch_size, desc=spec)
        results[spec] = score(x, labels_t, torch.tensor(is_valid), list(DOMAINS), args.sample, args.draws,
                              args.seed, time.perf_counter() - start)
        print(f"{spec}: dim {emb.dim}, {results[spec].docs_per_s:.1f} docs/s")

    specs = list(results)
    rows = [
        ("single-document nearest-centroid accuracy (LOO)", lambda s: f"{s.doc_acc:.3f}"),
        ("  the same, valid-split documents only (unseen by the seed)", lambda s: f"{s.valid_doc_acc:.3f}"),
        (f"{args.sample}-document domain-embedding accuracy (LOO)", lambda s: f"{s.sample_acc:.3f}"),
        (f"{args.sample}-document margin: cos(own) - cos(best other)", lambda s: f"{s.sample_margin:.3f}"),
        ("silhouette (cosine, single documents)", lambda s: f"{s.silhouette:.3f}"),
        ("closest pair of domain centroids (cosine)",
         lambda s: f"{s.closest_pair[0]}/{s.closest_pair[1]} {s.closest_pair[2]:.3f}"),
        ("documents per second", lambda s: f"{s.docs_per_s:.1f}"),
    ]
    print("\n| measure | " + " | ".join(specs) + " |")
    print("|---|" + "---|" * len(specs))
    for label, fmt in rows:
        print(f"| {label} | " + " | ".join(fmt(results[s]) for s in specs) + " |")
    print("\nsingle-document accuracy per domain\n\n| domain | " + " | ".join(specs) + " |")
    print("|---|" + "---|" * len(specs))
    for name in DOMAINS:
        print(f"| {name} | " + " | ".join(f"{results[s].per_domain[name]:.3f}" for s in specs) + " |")


if __name__ == "__main__":
    main()
