"""Bits per byte and the damage report: hand-built numbers, the Aya layout, and ``expertmix eval`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from nexus_helpers import make_expert

from expertmix.assembler.evaluation import (
    LATIN,
    NON_LATIN,
    EvalDoc,
    compare_models,
    prepare_documents,
    script_of,
)
from expertmix.assembler.quantization import QuantSpec, quantize_mix
from expertmix.assembler.upcycling import load_expert, upcycle
from expertmix.cli import main
from expertmix.errors import DataError
from expertmix.experts.seed import build_seed
from expertmix.experts.training import DataSource

P_REF = [0.4, 0.2, 0.2, 0.2]
P_BAD = [0.1, 0.6, 0.2, 0.1]


class FixedScorer:
    """The same next-token distribution at every position (so the numbers can be worked out by hand)."""

    def __init__(self, probs: list[float]):
        self.logp = torch.log(torch.tensor(probs))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.logp.expand(*input_ids.shape, -1).clone()


def _bits(probs: list[float], tokens: list[int]) -> float:
    return sum(-math.log2(probs[t]) for t in tokens)


def test_report_numbers_on_a_hand_built_case():
    docs = [EvalDoc(context=[0], targets=[0, 1, 2], n_bytes=6, language="en", domain="web", script=LATIN),
            EvalDoc(context=[0, 3], targets=[1, 1], n_bytes=8, language="ru", domain="web", script=NON_LATIN),
            EvalDoc(context=[0], targets=[3, 0, 0, 1, 2], n_bytes=10, language="en", domain="books", script=LATIN)]
    models = {"same": FixedScorer(P_REF), "ref": FixedScorer(P_REF), "bad": FixedScorer(P_BAD)}
    # window 2: documents are cut into several windows; a position-free scorer must not notice.
    report = compare_models(models, docs, reference="ref", window=2, batch_tokens=4, progress=False)
    assert report.reference == "ref" and report.candidates == ["same", "bad"]

    en, ru = report.group("en", "language"), report.group("ru", "language")
    assert (en.docs, en.tokens, en.bytes, en.script) == (2, 8, 16, LATIN)
    assert (ru.docs, ru.tokens, ru.bytes, ru.script) == (1, 2, 8, NON_LATIN)
    targets = [d.targets for d in docs]
    ref_en = _bits(P_REF, targets[0]) + _bits(P_REF, targets[2])
    bad_en = _bits(P_BAD, targets[0]) + _bits(P_BAD, targets[2])
    assert en.bpb["ref"] == pytest.approx(ref_en / 16)
    assert en.bpb["bad"] == pytest.approx(bad_en / 16)
    assert ru.bpb["ref"] == pytest.approx(2 * -math.log2(0.2) / 8)
    assert ru.relative_change["bad"] == pytest.approx(math.log2(0.6) / math.log2(0.2) - 1)  # bits 0.74 vs 2.32
    assert en.relative_change["bad"] == pytest.approx(bad_en / ref_en - 1)
    kl = sum(p * math.log(p / q) for p, q in zip(P_REF, P_BAD, strict=True))
    for group in report.groups:
        assert group.kl_per_token["bad"] == pytest.approx(kl)
        assert group.top1_flip_rate["bad"] == 1.0  # argmax 0 -> 1 everywhere
        assert group.kl_per_token["same"] == pytest.approx(0, abs=1e-9)
        assert group.top1_flip_rate["same"] == 0 and group.relative_change["same"] == pytest.approx(0, abs=1e-12)
        lo, hi = group.ci95["bad"]
        assert lo <= group.relative_change["bad"] + 1e-12 and group.relative_change["bad"] <= hi + 1e-12
    # Script groups and the whole set; domains are a different partition here, so they get rows too.
    assert report.group(LATIN, "script").bpb == en.bpb
    assert report.group(NON_LATIN, "script").bpb == ru.bpb
    everything = report.group("all")
    assert everything.bpb["bad"] == pytest.approx((bad_en + _bits(P_BAD, targets[1])) / 24)
    web = report.group("web", "domain")
    assert (web.docs, web.bytes, web.script) == (2, 14, "mixed")
    header, rows = report.rows()
    assert len(rows) == len(report.groups) and "Δ% bad" in header


def test_documents_score_aya_targets_given_inputs_and_cut_plain_text_by_bytes(tmp_path, tokenizer):
    aya = tmp_path / "aya.jsonl"
    rows = [{"inputs": "Translate: cat", "targets": "кошка", "language": "rus", "script": "Cyrl"},
            {"inputs": "Add 2 and 3", "targets": "5", "language": "eng", "script": "Latn"}]
    aya.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    docs = prepare_documents([DataSource("aya", aya)], tokenizer)
    assert [d.language for d in docs] == ["rus", "eng"] and [d.script for d in docs] == [NON_LATIN, LATIN]
    eos = tokenizer.eos_token_id
    for d, r in zip(docs, rows, strict=True):
        assert d.context == [eos, *tokenizer(r["inputs"] + "\n", add_special_tokens=False)["input_ids"]]
        assert d.targets == tokenizer(r["targets"], add_special_tokens=False)["input_ids"]
        assert d.n_bytes == len(r["targets"].encode("utf-8"))
    assert docs[0].n_bytes == 10  # five Cyrillic letters, two bytes each

    text = tmp_path / "mixed.jsonl"
    lines = [{"text": "the cat sat\non the mat\nand ran far", "language": "en"},
             {"text": "Привет мир", "language": "ru"}, {"text": "a second english doc", "language": "en"}]
    text.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\n", encoding="utf-8")
    docs = prepare_documents([DataSource("web", text)], tokenizer, max_bytes=22)
    en = [d for d in docs if d.language == "en"]
    assert len(en) == 1 and en[0].n_bytes == len(b"the cat sat\non the mat")  # cut at a line end
    assert [d.script for d in docs if d.language == "ru"] == [NON_LATIN]
    assert [d.language for d in prepare_documents([DataSource("web", text)], tokenizer, langs=["ru"])] == ["ru"]
    # --langs matches an Aya row's language name as well as its code
    named = tmp_path / "named.jsonl"
    named.write_text(json.dumps({"inputs": "q", "targets": "Antwort", "language": "German", "language_code": "deu"})
                     + "\n" + json.dumps({"text": "other", "language": "en"}) + "\n")
    for langs in (["German"], ["deu"], ["german"], ["DEU"]):  # by name or code, in any case
        assert [d.language for d in prepare_documents([DataSource("n", named)], tokenizer, langs=langs)] == ["deu"]
    # a row that names its language without a code groups under the code other rows (any source) give that name
    name_only = tmp_path / "name-only.jsonl"
    name_only.write_text(json.dumps({"text": "noch ein Text", "language": "german"}) + "\n"
                         + json.dumps({"text": "texte", "language": "French"}) + "\n")
    both = prepare_documents([DataSource("n", named), DataSource("o", name_only)], tokenizer)
    assert [d.language for d in both] == ["deu", "en", "deu", "French"]
    assert [d.language for d in prepare_documents([DataSource("o", name_only)], tokenizer)] == ["german", "French"]
    with pytest.raises(DataError, match=r"in language\(s\) ja, jpn in .* \(languages there: French, deu, en\)"):
        prepare_documents([DataSource("n", named), DataSource("o", name_only)], tokenizer, langs=["ja", "jpn"])
    # Without a script field, a language's script is the majority of all its documents' letters.
    ja = tmp_path / "ja.jsonl"
    ja.write_text(json.dumps({"text": "ls --all --long --human", "language": "ja"}) + "\n"
                  + json.dumps({"text": "ファイルの一覧を表示します。詳しい説明は下にあります", "language": "ja"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    assert [d.script for d in prepare_documents([DataSource("ja", ja)], tokenizer)] == [NON_LATIN, NON_LATIN]
    assert script_of("def f(x): return x") == LATIN and script_of("日本語のテキスト") == NON_LATIN


@pytest.fixture(scope="module")
def mix_and_int8(llama_seed, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval-mix")
    experts = [make_expert(llama_seed, root / f"e{i}", f"e{i}", seed=i + 1, ffn_scale=0.2) for i in range(3)]
    mix = upcycle(llama_seed, [load_expert(str(e)) for e in experts], root / "mix", progress=False)
    return mix, quantize_mix(mix, root / "mix-int8", QuantSpec("int8")).out


def test_eval_command_reports_a_quantized_mix_against_its_reference(mix_and_int8, tmp_path):
    mix, int8 = mix_and_int8
    data = tmp_path / "docs.jsonl"
    docs = [{"text": f"the cat sat on the mat {i}\ndef f(x):\n    return x * {i}", "language": "en"} for i in range(4)]
    docs += [{"text": f"кошка сидит на коврике {i}", "language": "ru"} for i in range(3)]
    docs += [{"text": "ignored language", "language": "fr"}]
    data.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    aya = tmp_path / "aya.jsonl"
    aya.write_text(json.dumps({"inputs": "2 + 3 =", "targets": "5", "language": "en", "script": "Latn"}) + "\n")
    report_path, chart = tmp_path / "report.json", tmp_path / "chart.png"
    result = CliRunner().invoke(main, ["eval", str(int8), "--data", f"web={data}", "--data", f"aya={aya}",
                                       "--reference", str(mix), "--langs", "en,ru", "--seq-len", "16",
                                       "--report-json", str(report_path), "--chart", str(chart)])
    assert result.exit_code == 0, result.output
    assert "bits per byte" in result.output
    report = json.loads(report_path.read_text())
    assert report["reference"] == "mix" and report["models"] == ["mix", "mix-int8"]
    groups = {(g["kind"], g["name"]): g for g in report["groups"]}
    assert {n for k, n in groups if k == "language"} == {"en", "ru"}  # fr filtered out
    assert {n for k, n in groups if k == "script"} == {LATIN, NON_LATIN}
    assert {n for k, n in groups if k == "domain"} == {"web", "aya"}
    for g in groups.values():
        assert g["relative_change"]["mix-int8"] == pytest.approx(g["bpb"]["mix-int8"] / g["bpb"]["mix"] - 1)
        assert abs(g["relative_change"]["mix-int8"]) < 0.02  # int8: small damage
        assert 0 <= g["kl_per_token"]["mix-int8"] < 0.01 and 0 <= g["top1_flip_rate"]["mix-int8"] <= 0.2
    assert groups[("language", "en")]["bytes"] == sum(len(d["text"].encode()) for d in docs[:4]) + 1
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The reference alone (bits-per-byte mode) gives the same numbers as the reference column.
    alone = CliRunner().invoke(main, ["eval", str(mix), "--bpb", "--data", f"web={data}", "--data", f"aya={aya}",
                                      "--langs", "en,ru", "--seq-len", "16", "--json"])
    assert alone.exit_code == 0, alone.output
    single = {(g["kind"], g["name"]): g for g in json.loads(alone.output[alone.output.index("{"):])["groups"]}
    assert single[("all", "all")]["bpb"]["mix"] == pytest.approx(groups[("all", "all")]["bpb"]["mix"])


def test_eval_refuses_a_variant_for_a_torch_model(mix_and_int8, tmp_path):
    mix, _ = mix_and_int8
    data = tmp_path / "t.txt"
    data.write_text("hello there\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["eval", str(mix), "--data", f"x={data}", "--variant", "int8"])
    assert result.exit_code == 1 and "ONNX exports only" in result.output



@pytest.mark.parametrize("bpb", [False, True])
def test_two_data_sources_under_one_name_are_refused_not_dropped(mix_and_int8, tmp_path, bpb):
    """Two files named alike (dd/code/valid.jsonl, dd/math/valid.jsonl) both took the name 'valid': one result was
    silently dropped and the other reported under the shared name."""
    mix, _ = mix_and_int8
    paths = []
    for domain in ("code", "math"):
        (tmp_path / domain).mkdir()
        paths.append(tmp_path / domain / "valid.jsonl")
        paths[-1].write_text(json.dumps({"text": f"{domain} text " * 20}) + "\n")
    for data in ([str(p) for p in paths], [f"code={p}" for p in paths]):
        args = ["eval", str(mix), *(a for d in data for a in ("--data", d)), *(["--bpb"] if bpb else [])]
        res = CliRunner().invoke(main, args)
        message = " ".join(res.output.split())
        assert res.exit_code == 2 and f"is given to both {paths[0]} and {paths[1]}" in message, res.output


def test_eval_blocks_default_to_the_models_context_and_a_longer_seq_len_is_refused(llama_seed, tokenizer, corpus,
                                                                                 tmp_path):
    """Without --seq-len the blocks are 256 tokens, or the model's context where it is shorter (a 48-position
    model was scored on positions it never had); a longer --seq-len is refused naming both numbers, the
    reference's context included."""
    short = build_seed(tmp_path / "short", tokenizer, max_positions=48)
    data = ["--data", f"prose={corpus['prose']}"]

    def ppl(model: Path, *extra: str) -> float:
        res = CliRunner().invoke(main, ["eval", str(model), *data, "--max-blocks", "6", *extra, "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["perplexity"]["prose"]

    assert ppl(short) == pytest.approx(ppl(short, "--seq-len", "48"), rel=1e-6)
    assert ppl(short) != pytest.approx(ppl(short, "--seq-len", "32"), rel=1e-3)  # the block length matters
    assert ppl(llama_seed) == pytest.approx(ppl(llama_seed, "--seq-len", "256"), rel=1e-6)  # 512 positions: 256
    refusals = [(["eval", short, *data, "--seq-len", "49"], short, 49),
                (["eval", llama_seed, *data, "--reference", short, "--seq-len", "100"], short, 100)]
    for args, model, asked in refusals:
        res = CliRunner().invoke(main, [str(a) for a in args])
        message = " ".join(res.output.split())
        assert res.exit_code == 1, res.output
        assert (f"--seq-len {asked} is longer than the context of {model} (max_position_embeddings 48): use at "
                f"most 48") in message, message
