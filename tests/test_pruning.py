"""Perplexity pruning: spec parsing, band selection, scoring with a real tiny Llama, and the file workflow."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from expertmix.errors import DataError, ExpertmixError
from expertmix.experts.data import Document, read_documents
from expertmix.experts.pruning import (
    PruneSpec,
    parse_prune_spec,
    prune_documents,
    prune_file,
    score_documents,
    select,
    write_scores,
)

EASY = "the cat sat on the mat. "


def easy_doc(r: random.Random) -> str:
    return (EASY * r.randint(3, 6)).strip()


def hard_doc(r: random.Random) -> str:
    return "".join(r.choice("qzxjkvwy0123456789#%&@") for _ in range(r.randint(40, 90)))


def medium_doc(r: random.Random) -> str:
    return " ".join(r.choice(EASY.split()) for _ in range(r.randint(15, 30)))  # easy words, shuffled


@pytest.fixture(scope="module")
def reference(llama_seed, tmp_path_factory) -> Path:
    """The tiny Llama seed, briefly trained on EASY: perplexity then orders easy < medium < hard documents."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(llama_seed)
    model = AutoModelForCausalLM.from_pretrained(llama_seed)
    ids = torch.tensor(tok(EASY * 40)["input_ids"][:256]).view(4, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("reference") / "ref"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(reference):
    return AutoModelForCausalLM.from_pretrained(reference).eval(), AutoTokenizer.from_pretrained(reference)


def graded_docs(per_group: int = 4) -> tuple[list[Document], dict[str, set[int]]]:
    """Easy, medium and hard documents interleaved; returns them and the indices of each group."""
    r = random.Random(7)
    makers = {"easy": easy_doc, "medium": medium_doc, "hard": hard_doc}
    docs, groups = [], {g: set() for g in makers}
    for _ in range(per_group):
        for g in ("hard", "easy", "medium"):
            groups[g].add(len(docs))
            docs.append(Document(text=makers[g](r), source="mem", line=len(docs) + 1))
    return docs, groups


@pytest.mark.parametrize("text,where,fraction", [
    ("middle:0.5", "middle", 0.5), ("top:0.3", "top", 0.3), (" Bottom : 1 ", "bottom", 1.0),
    ("bottom:.25", "bottom", 0.25)])
def test_parse_prune_spec_accepts_band_and_fraction(text, where, fraction):
    assert parse_prune_spec(text) == PruneSpec(where, fraction)


@pytest.mark.parametrize("text,needle", [("middle", "WHERE:FRACTION"), ("centre:0.5", "'centre:0.5'"),
                                         ("top:half", "'half' is not a number"), ("top:0", "outside (0, 1]"),
                                         ("top:1.5", "outside (0, 1]"), ("bottom:nan", "outside (0, 1]"),
                                         ("", "WHERE:FRACTION")])
def test_parse_prune_spec_rejects_bad_text_naming_value_and_syntax(text, needle):
    with pytest.raises(DataError) as err:
        parse_prune_spec(text)
    assert needle in str(err.value)
    assert isinstance(err.value, ExpertmixError)


def test_select_keeps_exact_count_from_the_requested_end_in_original_order():
    scores = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 10.0]  # index of score s: scores.index(s)
    assert select(scores, PruneSpec("bottom", 0.3)) == [1, 3, 5]  # scores 1, 2, 3
    assert select(scores, PruneSpec("top", 0.3)) == [2, 6, 9]  # scores 8, 9, 10
    assert select(scores, PruneSpec("middle", 0.4)) == [0, 4, 7, 8]  # scores 4..7
    assert select(scores, PruneSpec("middle", 0.5)) == [0, 3, 4, 7, 8]  # scores 3..7
    assert select(scores, PruneSpec("bottom", 1.0)) == list(range(10))
    assert select(scores, PruneSpec("top", 0.01)) == [9]  # at least one
    assert select([], PruneSpec("top", 0.5)) == []


def test_select_ranks_inf_highest_breaks_ties_by_position_and_refuses_nan():
    assert select([math.inf, 2.0, 1.0], PruneSpec("top", 0.34)) == [0]
    assert select([1.0, 1.0, 1.0, 1.0], PruneSpec("bottom", 0.5)) == [0, 1]
    with pytest.raises(DataError, match="document 1 is NaN"):
        select([1.0, math.nan], PruneSpec("top", 0.5))


def test_score_documents_matches_model_loss_whatever_the_batching(loaded):
    model, tok = loaded
    docs, _ = graded_docs(2)
    batched = score_documents(docs, model, tok, batch_size=4, progress=False)
    single = score_documents(docs, model, tok, batch_size=1, progress=False)
    for d, b, s in zip(docs, batched, single, strict=True):
        ids = torch.tensor([tok(d.full_text)["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=ids, labels=ids).loss.exp().item()
        assert b == pytest.approx(expected, rel=1e-4)
        assert s == pytest.approx(expected, rel=1e-4)


def test_score_documents_truncates_to_max_tokens_and_marks_too_short_docs_inf(loaded):
    model, tok = loaded
    r = random.Random(1)
    long_doc = Document(text=EASY * 3 + hard_doc(r) * 3)
    short = Document(text="t")  # one token: nothing to predict
    s_trunc, s_short = score_documents([long_doc, short], model, tok, max_tokens=12, progress=False)
    (s_full,) = score_documents([long_doc], model, tok, progress=False)
    assert len(tok(long_doc.text)["input_ids"]) > 12
    assert s_trunc < s_full  # the first 12 tokens are the easy part
    assert s_short == math.inf


def test_instruction_rows_are_scored_on_their_targets_given_their_inputs(loaded):
    """An Aya row's score is the perplexity of what training learns (targets), with the inputs as context; a
    prompt longer than the window keeps its end."""
    model, tok = loaded
    r = random.Random(3)
    easy_answer = EASY.strip()
    hard_prompt, easy_prompt = hard_doc(r) * 2, EASY * 2
    rows = [Document(text=easy_answer, prompt=hard_prompt), Document(text=easy_answer, prompt=easy_prompt),
            Document(text=hard_doc(r), prompt=easy_prompt)]
    scores = score_documents(rows, model, tok, progress=False)
    for d, got in zip(rows, scores, strict=True):
        context = tok(d.prompt + "\n", add_special_tokens=False)["input_ids"]
        target = tok(d.text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + target])
        labels = torch.tensor([[-100] * len(context) + target])
        with torch.no_grad():
            expected = model(input_ids=ids, labels=labels).loss.exp().item()
        assert got == pytest.approx(expected, rel=1e-4)
    assert scores[1] < scores[2]  # one prompt: the easy answer ranks easy
    # a prompt longer than the window: its last half-window is context, the targets are still scored
    (windowed,) = score_documents(rows[:1], model, tok, max_tokens=16, progress=False)
    assert math.isfinite(windowed)


@pytest.mark.parametrize("where,group", [("bottom", "easy"), ("middle", "medium"), ("top", "hard")])
def test_prune_documents_keeps_the_requested_end_of_the_perplexity_distribution(loaded, where, group):
    model, tok = loaded
    docs, groups = graded_docs(4)
    kept, records = prune_documents(docs, model, tok, PruneSpec(where, 1 / 3), batch_size=5, progress=False)
    assert len(kept) == 4
    assert {r["index"] for r in records if r["kept"]} == groups[group]
    assert kept == [docs[i] for i in sorted(groups[group])]
    assert [r["index"] for r in records] == list(range(len(docs)))
    assert all(r["source"] == "mem" and r["line"] == r["index"] + 1 for r in records)
    ppl = {g: [records[i]["perplexity"] for i in idx] for g, idx in groups.items()}
    assert max(ppl["easy"]) < min(ppl["medium"]) and max(ppl["medium"]) < min(ppl["hard"])


def test_prune_documents_drops_unscorable_docs_and_applies_fraction_to_the_rest(loaded):
    model, tok = loaded
    docs, groups = graded_docs(2)
    docs.insert(0, Document(text="", source="mem", line=0))
    kept, records = prune_documents(docs, model, tok, PruneSpec("top", 0.5), progress=False)
    assert len(kept) == 3 and records[0] == {"index": 0, "source": "mem", "line": 0, "perplexity": None,
                                              "kept": False}
    with pytest.raises(DataError, match="nothing to score"):
        prune_documents(docs[:1], model, tok, PruneSpec("top", 0.5), progress=False)


def test_write_scores_writes_jsonl_atomically(tmp_path):
    path = tmp_path / "sub" / "s.scores.jsonl"
    recs = [{"index": 0, "source": "a", "line": 1, "perplexity": 2.5, "kept": True}]
    write_scores(path, recs)
    assert [json.loads(x) for x in path.read_text().splitlines()] == recs
    assert [p.name for p in path.parent.iterdir()] == ["s.scores.jsonl"]  # no temporary left behind


def test_prune_file_writes_kept_docs_and_complete_audit(reference, tmp_path):
    docs, groups = graded_docs(4)
    data = tmp_path / "data.jsonl"
    rows = [{"text": d.text, "language": "en", "domain": "toy", "extra": 1} for d in docs]
    rows[1] = {"inputs": EASY.strip(), "targets": rows[1]["text"], "language_code": "en", "script": "Latn"}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "pruned" / "data.bottom.jsonl"

    summary = prune_file(data, out, reference, "bottom:0.34", progress=False)

    assert summary["documents"] == 12 and summary["kept"] == 4 and summary["unscorable"] == 0
    assert summary["spec"] == "bottom:0.34"
    assert summary["perplexity_kept"]["max"] < summary["perplexity_all"]["median"]
    scores_file = out.with_name("data.bottom.scores.jsonl")
    assert summary["scores"] == str(scores_file)
    audit = [json.loads(x) for x in scores_file.read_text().splitlines()]
    assert [a["index"] for a in audit] == list(range(12))
    assert all(a["source"] == str(data) and a["line"] == a["index"] + 1 for a in audit)
    assert {a["index"] for a in audit if a["kept"]} == groups["easy"]
    written = [json.loads(x) for x in out.read_text().splitlines()]
    # The kept rows are the input rows, every field kept (an Aya row's language_code, an unknown 'extra').
    assert written == [rows[i] for i in sorted(groups["easy"])] and 1 in groups["easy"]
    back = read_documents(out)
    assert sorted(d.full_text for d in back) == sorted(
        (EASY.strip() + "\n" if i == 1 else "") + docs[i].text for i in groups["easy"])

    with pytest.raises(DataError, match="already exists"):
        prune_file(data, out, reference, "top:0.5", progress=False)
    # A .txt output would read back as one document of JSON syntax: refused, nothing written.
    with pytest.raises(DataError, match="give a .jsonl path"):
        prune_file(data, tmp_path / "kept.txt", reference, "top:0.5", progress=False)
    assert not (tmp_path / "kept.txt").exists() and not (tmp_path / "kept.scores.jsonl").exists()
    # the scores file beside --out is never written over another file: here, the data itself
    named = tmp_path / "rows.scores.jsonl"
    named.write_bytes(data.read_bytes())
    with pytest.raises(DataError, match="rows.scores.jsonl already exists"):
        prune_file(named, tmp_path / "rows.jsonl", reference, "top:0.5", progress=False)
    assert named.read_bytes() == data.read_bytes() and not (tmp_path / "rows.jsonl").exists()


def test_prune_file_reports_missing_reference_model_as_one_error(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello there"}) + "\n")
    with pytest.raises(ExpertmixError, match="no-such-model: no such folder; prune's --reference needs a model"):
        prune_file(data, tmp_path / "out.jsonl", tmp_path / "no-such-model", "top:0.5", progress=False)


def test_an_interrupted_prune_keeps_its_scores_and_the_same_command_scores_only_the_rest(reference, tmp_path,
                                                                                        monkeypatch):
    """Scoring a large file with a large reference takes hours: Ctrl-C between batches keeps every batch scored
    (``OUT.partial``) and rerunning the command goes on from there, with the same result as one whole run."""
    from click.testing import CliRunner

    from expertmix.cli import main
    from expertmix.journal import Journal

    docs, _ = graded_docs(14)  # 42 documents: 6 batches of 8
    data = tmp_path / "data.jsonl"
    # (numbered: the journal is keyed by the scored tokens, so twin documents would share one entry)
    data.write_text("".join(json.dumps({"text": f"{d.text} {i}"}) + "\n" for i, d in enumerate(docs)),
                    encoding="utf-8")
    whole, out = tmp_path / "whole.jsonl", tmp_path / "kept.jsonl"
    partial = tmp_path / "kept.jsonl.partial"
    assert CliRunner().invoke(main, ["prune", "--data", str(data), "--reference", str(reference), "--keep",
                                     "middle:0.5", "--out", str(whole)]).exit_code == 0

    real_add, calls = Journal.add_many, []

    def interrupted(self, items):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(items))
        real_add(self, items)

    monkeypatch.setattr(Journal, "add_many", interrupted)
    args = ["prune", "--data", str(data), "--reference", str(reference), "--keep", "middle:0.5", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and not out.exists() and partial.is_file()
    said = "".join(res.output.split())  # the console folds long paths
    assert f"16scoreddocumentskeptin{partial}:rerunthesamecommand" in said
    monkeypatch.setattr(Journal, "add_many", real_add)
    with open(partial, "a") as f:
        f.write('{"key": "cut sho')  # a kill mid-write leaves half a line: dropped, not an error

    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{\n"):])["scores_reused"] == 16
    assert "resuming: 16 documents were scored before the interruption" in res.output and not partial.exists()
    assert out.read_text() == whole.read_text()
    assert out.with_name("kept.scores.jsonl").read_text() == whole.with_name("whole.scores.jsonl").read_text()

    # a rerun with another reference (its weights rewritten) would mix two runs' scores: refused by name
    monkeypatch.setattr(Journal, "add_many", interrupted)
    calls.clear()
    again = tmp_path / "again.jsonl"
    assert CliRunner().invoke(main, [*args[:-1], str(again)]).exit_code == 1
    weights = next(reference.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())
    res = CliRunner().invoke(main, [*args[:-1], str(again)])
    assert res.exit_code == 1 and "holds an interrupted run with other settings (reference)" in res.output
    assert not again.exists() and again.with_name("again.jsonl.partial").is_file()


def test_a_prune_that_fails_before_scoring_leaves_no_journal(tmp_path, llama_seed):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello there"}) + "\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in llama_seed.iterdir():
        if f.name != "config.json":
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ExpertmixError):
        prune_file(data, tmp_path / "out.jsonl", broken, "top:0.5", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "d.jsonl"]


def test_a_second_prune_to_the_same_out_while_the_first_runs_is_refused(reference, tmp_path):
    """Two processes appending to one journal would interleave their lines: the second is refused until the
    first ends (the kernel's lock, so a killed first run leaves none)."""
    from click.testing import CliRunner

    from expertmix.cli import main
    from expertmix.experts.pruning import scoring_journal

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in graded_docs(2)[0]), encoding="utf-8")
    out = tmp_path / "kept.jsonl"
    first = scoring_journal(out, data, reference, 512)
    first.open()
    args = ["prune", "--data", str(data), "--reference", str(reference), "--keep", "top:0.5", "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "is in use by another expertmix process" in " ".join(res.output.split())
    first.close()
    assert CliRunner().invoke(main, args).exit_code == 0 and out.is_file()
    assert not out.with_name("kept.jsonl.partial").exists()
