"""Domain mixing by token share: spec parsing, share accuracy, repetition, reproducibility and errors."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from expertmix.errors import DataError
from expertmix.experts.data import IGNORE_INDEX, Document, TokenizedDocument, tokenize_documents
from expertmix.experts.mixing import mix_sources, parse_mix_spec


def make_source(tag: int, n: int, seed: int, prompt_len: int = 0) -> list[TokenizedDocument]:
    """``n`` documents of random length whose ids all equal ``tag`` (so a mixed token tells its source)."""
    r = random.Random(seed)
    docs = []
    for _ in range(n):
        length = r.randint(5, 120)
        labels = [IGNORE_INDEX] * min(prompt_len, length) + [tag] * max(0, length - prompt_len)
        docs.append(TokenizedDocument([tag] * length, labels))
    return docs


SOURCES = {"code": make_source(1, 40, 1), "de": make_source(2, 150, 2, prompt_len=3),
           "fr": make_source(3, 90, 3)}


def token_counts(docs: list[TokenizedDocument]) -> Counter:
    c: Counter = Counter()
    for d in docs:
        assert len(d.input_ids) == len(d.labels)
        c[d.input_ids[0]] += len(d.input_ids)
    return c


def test_parse_mix_spec_reads_names_and_shares():
    assert parse_mix_spec("code=0.25,de=0.75") == {"code": 0.25, "de": 0.75}
    assert parse_mix_spec(" code = .1 , de=0.6,fr=0.3 ") == {"code": 0.1, "de": 0.6, "fr": 0.3}
    assert parse_mix_spec("code=1,de=0") == {"code": 1.0, "de": 0.0}


@pytest.mark.parametrize("text,needle", [
    ("code:0.25,de=0.75", "mix part 'code:0.25'"),
    ("code=0.25,,de=0.75", "mix part ''"),
    ("=0.5,de=0.5", "mix part '=0.5'"),
    ("code=0.5=1,de=0.5", "mix part 'code=0.5=1'"),
    ("code=quarter,de=0.75", "share 'quarter' is not a number"),
    ("code=-0.25,de=1.25", "mix part 'code=-0.25': share must be a finite number >= 0"),
    ("code=nan,de=1", "finite"),
    ("code=0.25,code=0.75", "names source 'code' twice"),
    ("code=0.25,de=0.7", "sum to 1, they sum to 0.95"),
    ("", "empty mix spec"),
])
def test_parse_mix_spec_rejects_bad_specs_naming_the_bad_part(text, needle):
    with pytest.raises(DataError) as err:
        parse_mix_spec(text)
    assert needle in str(err.value)


def test_parse_mix_spec_sum_tolerance_is_1e6():
    assert parse_mix_spec("a=0.3333333,b=0.6666667") == {"a": 0.3333333, "b": 0.6666667}
    with pytest.raises(DataError, match="sum to 1"):
        parse_mix_spec("a=0.33333,b=0.66666")


@pytest.mark.parametrize("shares", [{"code": 0.25, "de": 0.75}, {"code": 0.1, "de": 0.6, "fr": 0.3},
                                    {"code": 0.5, "fr": 0.5}, {"code": 0.9, "de": 0.1}])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("total", [None, 3000, 25000])
def test_mix_hits_requested_token_shares_within_two_percent(shares, seed, total):
    mixed, report = mix_sources(SOURCES, shares, total_tokens=total, seed=seed)
    counts = token_counts(mixed)
    n = sum(counts.values())
    if total is not None:
        assert abs(n - total) <= len(shares)  # rounding of each source's target
    tag = {"code": 1, "de": 2, "fr": 3}
    for name, share in shares.items():
        assert abs(counts[tag[name]] / n - share) <= 0.02 * share + 1e-9
        assert report[name]["tokens"] == counts[tag[name]]
        assert report[name]["target_share"] == share
        assert report[name]["actual_share"] == pytest.approx(counts[tag[name]] / n)
        assert report[name]["documents"] == sum(1 for d in mixed if d.input_ids[0] == tag[name])
    for name in set(SOURCES) - set(shares):
        assert counts[tag[name]] == 0 and report[name]["tokens"] == 0


def test_mix_without_total_uses_the_largest_total_that_repeats_nothing():
    shares = {"code": 0.25, "de": 0.75}
    mixed, report = mix_sources(SOURCES, shares, seed=3)
    code_tokens = sum(len(d.input_ids) for d in SOURCES["code"])
    assert report["code"]["tokens"] == code_tokens  # the binding source is used whole
    assert report["code"]["repeats"] == 0 and report["de"]["repeats"] == 0
    assert report["de"]["tokens"] == round(0.75 * (code_tokens / 0.25))
    assert report["code"]["documents"] == len(SOURCES["code"])


def test_mix_repeats_a_source_when_the_total_asks_for_more_than_it_holds():
    code_tokens = sum(len(d.input_ids) for d in SOURCES["code"])
    total = 4 * code_tokens  # half of it code: two passes over the code source
    mixed, report = mix_sources(SOURCES, {"code": 0.5, "de": 0.5}, total_tokens=total, seed=0)
    assert report["code"]["tokens"] == round(0.5 * total)
    assert report["code"]["repeats"] >= len(SOURCES["code"]) - 1
    assert report["code"]["epochs"] == pytest.approx(2.0)
    assert report["de"]["repeats"] == 0


def test_truncated_documents_keep_labels_aligned_with_ids():
    # 50-token instruction documents: ids 0..49 offset by a per-document base; the first 3 labels masked
    inst = [TokenizedDocument(list(range(b, b + 50)), [IGNORE_INDEX] * 3 + list(range(b + 3, b + 50)))
            for b in range(1000, 1020)]
    mixed, report = mix_sources({"inst": inst, "fr": SOURCES["fr"]}, {"inst": 0.5, "fr": 0.5},
                                total_tokens=2 * 321, seed=5)
    drawn = [d for d in mixed if d.input_ids[0] >= 1000]
    assert sum(len(d.input_ids) for d in drawn) == report["inst"]["tokens"] == 321
    assert sorted(len(d.input_ids) for d in drawn) == [21] + [50] * 6  # the last one cut to land on 321
    for d in drawn:
        assert d.labels[:3] == [IGNORE_INDEX] * 3
        assert d.labels[3:] == d.input_ids[3:]  # labels still line up with their ids


def test_mix_is_reproducible_for_a_seed_and_differs_across_seeds():
    shares = {"code": 0.1, "de": 0.6, "fr": 0.3}

    def ids(seed):
        mixed, _ = mix_sources(SOURCES, shares, 20000, seed=seed)
        return [tuple(d.input_ids) + tuple(d.labels) for d in mixed]

    assert ids(4) == ids(4)
    assert ids(4) != ids(5)
    assert sorted(ids(4)) != sorted(ids(5))  # different documents are drawn, not only a different order
    tags_a, tags_b = ([d.input_ids[0] for d in mix_sources(SOURCES, shares, 20000, seed=s)[0]]
                      for s in (4, 5))
    assert tags_a != tags_b  # the sources interleave differently


def test_mix_is_shuffled_across_sources():
    mixed, _ = mix_sources(SOURCES, {"code": 0.5, "fr": 0.5}, seed=0)
    tags = [d.input_ids[0] for d in mixed]
    switches = sum(a != b for a, b in zip(tags, tags[1:], strict=False))
    assert switches > len(tags) // 4


def test_mix_of_real_tokenized_documents(tokenizer):
    code = tokenize_documents([Document(text=f"def f{i}(x):\n    return x * {i}") for i in range(30)],
                              tokenizer)
    prose = tokenize_documents([Document(text="the cat sat on the mat " * (1 + i % 4)) for i in range(30)],
                               tokenizer)
    mixed, report = mix_sources({"code": code, "prose": prose}, {"code": 0.25, "prose": 0.75}, seed=0)
    assert report["code"]["actual_share"] == pytest.approx(0.25, rel=0.02)
    assert sum(len(d.input_ids) for d in mixed) == report["code"]["tokens"] + report["prose"]["tokens"]


@pytest.mark.parametrize("shares,needle", [
    ({"code": 0.5, "es": 0.5}, "unknown source(s) 'es'; known sources: code, de, fr"),
    ({"code": 0.5, "de": 0.4}, "sum to 1"),
    ({"code": 1.5, "de": -0.5}, "share of source 'de' must be a finite number >= 0"),
])
def test_mix_rejects_bad_shares_clearly(shares, needle):
    with pytest.raises(DataError) as err:
        mix_sources(SOURCES, shares)
    assert needle in str(err.value)


def test_mix_rejects_an_empty_source_with_a_share():
    with pytest.raises(DataError, match="source 'empty' has a share of 0.5 but holds no tokens"):
        mix_sources({"empty": [], "code": SOURCES["code"]}, {"empty": 0.5, "code": 0.5})
    with pytest.raises(DataError, match="total_tokens=0"):
        mix_sources(SOURCES, {"code": 1.0}, total_tokens=0)
