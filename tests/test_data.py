"""Reading domain data: text, JSONL, Aya layouts, saved datasets; tokenizing and packing."""

from __future__ import annotations

import json

import pytest

from expertmix.errors import DataError
from expertmix.experts.data import IGNORE_INDEX, pack, read_documents, tokenize_documents


def test_jsonl_reads_the_named_field_and_language(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"body": "hallo welt", "language": "de"}) + "\n\n" +
                 json.dumps({"body": "guten tag", "language_code": "deu"}) + "\n")
    docs = read_documents(p, text_field="body")
    assert [(d.text, d.language, d.line) for d in docs] == [("hallo welt", "de", 1), ("guten tag", "deu", 3)]


def test_aya_rows_become_prompt_and_target_with_the_prompt_loss_masked(tmp_path, tokenizer):
    p = tmp_path / "aya.jsonl"
    rows = [{"inputs": "what is 2 + 2", "targets": "4", "language": "English", "language_code": "eng",
             "script": "Latn", "annotation_type": "original-annotations", "user_id": "u1"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    [doc] = read_documents(p)
    assert (doc.prompt, doc.text, doc.language, doc.script) == ("what is 2 + 2", "4", "eng", "Latn")
    [tok] = tokenize_documents([doc], tokenizer)
    n_prompt = len(tokenizer("what is 2 + 2\n", add_special_tokens=False)["input_ids"])
    assert tok.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.labels[n_prompt:] == tok.input_ids[n_prompt:]
    assert tok.input_ids[-1] == tokenizer.eos_token_id


def test_plain_text_splits_into_paragraphs_with_their_line_numbers(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("first paragraph\nstill first\n\nsecond one\n\n\nthird\n")
    docs = read_documents(p)
    assert [d.text for d in docs] == ["first paragraph\nstill first", "second one", "third"]
    assert [d.line for d in docs] == [1, 4, 7]
    assert [d.text for d in read_documents(p, text_split="file")] == [p.read_text().strip()]


def test_saved_datasets_folder_is_read(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b c", "d e f"],
                                                                     "language": ["en", "en"]})})
    ds.save_to_disk(str(tmp_path / "saved"))
    docs = read_documents(tmp_path / "saved")
    assert [d.text for d in docs] == ["a b c", "d e f"]


def test_folder_of_files_is_read_in_order(tmp_path):
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.jsonl").write_text('{"text": "ay"}\n')
    assert [d.text for d in read_documents(tmp_path)] == ["ay", "bee"]


@pytest.mark.parametrize("content,message", [
    (b'{"text": 3}\n', "line 1: field 'text' must be a string"),
    (b'{"text": "ok"}\n{oops\n', "line 2: not valid JSON"),
    (b'[1, 2]\n', "line 1: expected a JSON object"),
    (b'{"inputs": "q", "targets": ["a"]}\n', "line 1: field 'targets' must be a string"),
    (b'{"text": "caf\xe9"}\n', "line 1: not valid UTF-8"),
])
def test_malformed_jsonl_names_the_file_and_line(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_documents(p)
    assert str(p) in str(err.value)


def test_unknown_format_and_missing_path_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_documents(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        read_documents(tmp_path / "x.csv")


def test_pack_cuts_the_stream_into_blocks_and_pads_the_tail_on_request(tokenizer):
    from expertmix.experts.data import TokenizedDocument

    docs = [TokenizedDocument([1, 2, 3], [1, 2, 3]), TokenizedDocument([4, 5, 6, 7], [-100, 5, 6, 7])]
    blocks = pack(docs, 3)
    assert blocks["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert blocks["labels"].tolist() == [[1, 2, 3], [-100, 5, 6]]
    padded = pack(docs, 3, drop_last=False)
    assert padded["labels"].tolist()[-1] == [7, -100, -100]
    with pytest.raises(DataError, match="one block of 10 tokens"):
        pack(docs, 10)


def test_a_byte_order_mark_and_windows_line_endings_leave_no_trace_in_the_text(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "eins"}\r\n' + bom + b'{"text": "zwei"}\r\n')  # cat a b
    (tmp_path / "b.txt").write_bytes(bom + b"line one\r\nline two\r\n\r\nsecond\r\n")
    assert [d.text for d in read_documents(tmp_path / "a.jsonl")] == ["eins", "zwei"]
    assert [d.text for d in read_documents(tmp_path / "b.txt")] == ["line one\nline two", "second"]


def test_rows_with_empty_text_are_skipped_and_a_file_of_them_is_named(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text('{"text": "kept"}\n{"text": ""}\n{"text": "   "}\n{"inputs": "q", "targets": ""}\n'
                 '{"text": null}\n{"inputs": "q", "targets": null}\n')
    assert [(d.text, d.line) for d in read_documents(p)] == [("kept", 1)]
    p.write_text('{"text": ""}\n' * 3)
    with pytest.raises(DataError, match="e.jsonl: no documents .*every row's text is"):
        read_documents(p)


def test_a_data_folder_holding_a_format_that_is_not_read_is_refused_by_name(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ay"}\n')
    (tmp_path / "b.jsonl.gz").write_bytes(b"\x1f\x8b")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.parquet").write_bytes(b"PAR1")  # hidden folders are not data
    with pytest.raises(DataError, match=r"b.jsonl.gz: a format expertmix does not read \('.gz'\)"):
        read_documents(tmp_path)
    (tmp_path / "b.jsonl.gz").unlink()
    (tmp_path / "c.json").write_text('[{"text": "a JSON array, not JSONL"}]')
    with pytest.raises(DataError, match=r"c.json: a format expertmix does not read \('.json'\)"):
        read_documents(tmp_path)
    (tmp_path / "c.json").unlink()
    assert [d.text for d in read_documents(tmp_path)] == ["ay"]


def test_a_dataset_dict_is_read_by_split_training_reads_train_evaluation_the_held_out_one(tmp_path):
    import datasets

    def save(name, **splits):
        datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
            str(tmp_path / name))
        return tmp_path / name

    both = save("both", train=["t1", "t2"], validation=["v1"])
    assert [d.text for d in read_documents(both)] == ["t1", "t2"]
    assert [d.text for d in read_documents(both, role="eval")] == ["v1"]
    only_valid = save("only-valid", validation=["v1", "v2"])
    assert [d.text for d in read_documents(only_valid, role="eval")] == ["v1", "v2"]
    with pytest.raises(DataError, match="no split 'train' to train on \\(splits: validation\\)"):
        read_documents(only_valid)
    only_train = save("only-train", train=["t1"])
    assert [d.text for d in read_documents(only_train, role="eval")] == ["t1"]  # the one split there is
    two = save("two", train=["t1"], extra=["x"])
    with pytest.raises(DataError, match="no split 'validation' or 'valid' or 'test' to evaluate on"):
        read_documents(two, role="eval")


def test_an_output_folder_has_one_writer_and_a_killed_writers_leftovers_are_cleared(tmp_path):
    from expertmix.errors import OutputExistsError
    from expertmix.fsutil import atomic_dir

    out = tmp_path / "out"
    stale = tmp_path / ".out.killed.tmp"  # left by a process killed mid-write: nobody holds it
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")
    with atomic_dir(out) as tmp:
        assert not stale.exists()
        (tmp / "a.txt").write_text("a")
        with pytest.raises(OutputExistsError, match="being written by another expertmix process"):
            with atomic_dir(out):
                pass
        assert tmp.is_dir()  # the refused writer did not touch the live one's folder
    assert (out / "a.txt").read_text() == "a"
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_dir(out):
            pass


def test_outputs_get_the_modes_the_umask_gives_not_private_temporary_ones(tmp_path, llama_seed):
    """Output folders and files are made as temporary ones (0700 / 0600) and renamed into place; they end with the
    modes the user's umask gives, so a shared folder's other users (a registry's service account) can read them."""
    import os
    import stat
    import subprocess
    import sys

    cases = ((0o022, 0o755, 0o644), (0o077, 0o700, 0o600))
    runs = [subprocess.Popen([sys.executable, "-m", "expertmix", "quantize", str(llama_seed), "--scheme", "int8",
                              "--out", str(tmp_path / f"q{mask:o}")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, preexec_fn=lambda m=mask: os.umask(m))
            for mask, _, _ in cases]  # side by side: each run costs its imports
    for proc, (mask, folder_mode, file_mode) in zip(runs, cases, strict=True):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        out = tmp_path / f"q{mask:o}"
        assert stat.S_IMODE(out.stat().st_mode) == folder_mode
        assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {file_mode}


def test_a_lone_surrogate_is_named_by_file_line_and_field_and_a_refused_train_leaves_nothing(tmp_path, llama_seed):
    """Text cut mid-emoji is valid JSON ("\\ud83d") that no tokenizer takes: it crashed deep inside tokenization and
    left an OUT.partial that blocked the corrected command."""
    from click.testing import CliRunner

    from expertmix.cli import main

    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "a whole emoji \\ud83d\\ude00 is fine"}\n'
                    '{"text": "ok", "meta": {"tags": ["x", "half \\ud83d"]}}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"cut.jsonl line 2: field 'meta.tags.1' is not valid Unicode .*\\ud83d"):
        read_documents(path)
    res = CliRunner().invoke(main, ["train", "--base", str(llama_seed), "--data", str(path), "--valid", str(path),
                                    "--domain", "d", "--out", str(tmp_path / "out"), "--max-steps", "1"])
    assert res.exit_code == 1 and "line 2: field 'meta.tags.1'" in " ".join(res.output.split())
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
