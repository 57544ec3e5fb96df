"""The contributor workflow driven through the CLI: train, publish, pull, load, and what goes wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from expertmix.cli import main
from expertmix.experts.seed import build_seed
from expertmix.hub.card import parse_card, read_card
from expertmix.hub.fingerprint import fingerprint_weights
from expertmix.hub.store import LocalStore

FAST = ["--max-steps", "6", "--seq-len", "32", "--batch-size", "4", "--lr", "5e-3", "--save-steps", "1000"]


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def dense_expert(tmp_path_factory, llama_seed, corpus) -> Path:
    out = tmp_path_factory.mktemp("experts") / "math"
    run("train", "--base", llama_seed, "--data", corpus["math"], "--domain", "math", "--name", "org/math",
        "--out", out, "--language", "en", *FAST)
    return out


def test_dense_expert_card_records_base_data_and_validation_perplexity(dense_expert, llama_seed):
    card = read_card(dense_expert).expert
    assert card.kind == "dense" and card.domain == "math" and card.name == "org/math"
    assert card.languages == ["en"]
    assert card.base_fingerprint == fingerprint_weights(llama_seed)
    assert card.architecture.startswith("llama(")
    assert card.embedding.model == "seed" and card.embedding.dim == 64
    assert card.data.documents > 0 and card.data.tokens > 0
    assert card.metrics["valid_perplexity_after"] < card.metrics["valid_perplexity_before"]
    assert card.training["steps"] == 6
    text = (dense_expert / "README.md").read_text()
    assert "base_model_relation: finetune" in text and "library_name: transformers" in text


def test_card_round_trips_through_markdown(dense_expert):
    card = read_card(dense_expert)
    again = parse_card(card.to_markdown())
    assert again.expert == card.expert and again.body == card.body and again.datasets == card.datasets
    # The Hub's 'language' field holds ISO 639 codes only; a language named in words stays in the expert block.
    card.expert.languages = ["de", "German", "zh-Hans"]
    text = card.to_markdown()
    front = yaml.safe_load(text.split("---")[1])
    assert front["language"] == ["de", "zh-Hans"] and front["expert"]["languages"] == ["de", "German", "zh-Hans"]
    assert parse_card(text).expert.languages == ["de", "German", "zh-Hans"]


def test_dense_expert_publishes_pulls_and_loads_with_plain_transformers(dense_expert, home):
    result = run("publish", dense_expert)
    assert result.output.startswith("published org/math@")
    revision = result.output.split("@")[1].strip()
    pulled = Path(run("pull", f"org/math@{revision[:10]}").output.strip())
    assert pulled.is_dir() and pulled.is_relative_to(home)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    a = AutoModelForCausalLM.from_pretrained(dense_expert)(ids).logits
    b = AutoModelForCausalLM.from_pretrained(pulled)(ids).logits
    assert torch.equal(a, b)
    listed = json.loads(run("list", "--json").output)
    assert [(e["name"], e["revision"], e["domain"]) for e in listed] == [("org/math", revision, "math")]
    shown = json.loads(run("show", "org/math").output)
    assert shown["card"]["base_fingerprint"] == read_card(dense_expert).expert.base_fingerprint
    assert {f["path"] for f in shown["files"]} >= {"config.json", "model.safetensors", "README.md",
                                                    "domain_embedding.safetensors", "tokenizer.json"}
    # The folder itself shows the same card and files before (or without) publishing.
    local = json.loads(run("show", dense_expert).output)
    assert local["revision"] is None and local["folder"] == str(dense_expert.resolve())
    assert local["card"] == shown["card"]
    assert {(f["path"], f["sha256"]) for f in local["files"]} == {(f["path"], f["sha256"]) for f in shown["files"]}
    # publishing the same folder again is a no-op; the store hands out the same revision
    assert run("publish", dense_expert).output.strip().endswith(revision)


def test_lora_expert_on_qwen2_trains_publishes_and_loads_with_peft(tmp_path, qwen2_seed, corpus, home,
                                                                  monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel

    out = tmp_path / "code-lora"
    monkeypatch.chdir(qwen2_seed.parent)  # the seed given as a relative path, as users type it
    run("train", "--base", qwen2_seed.name, "--data", corpus["code"], "--domain", "code", "--peft", "lora",
        "--lora-r", "4", "--out", out, *FAST)
    monkeypatch.chdir(tmp_path)
    # The adapter names its base by absolute path, so peft finds it from any directory.
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(qwen2_seed)
    assert AutoPeftModelForCausalLM.from_pretrained(out) is not None
    card = read_card(out).expert
    assert card.kind == "lora" and 0 < card.training["trainable_share"] < 1
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    run("publish", out)
    pulled = Path(run("pull", "code").output.strip())
    ids = torch.tensor([[1, 7, 11, 40, 2]])
    base = AutoModelForCausalLM.from_pretrained(qwen2_seed)
    plain = base(ids).logits
    adapted = PeftModel.from_pretrained(base, pulled)(ids).logits
    assert not torch.allclose(plain, adapted)  # the adapter was trained, so it changes the output
    # On a machine where the seed lives elsewhere, pull says how to load the adapter (its snapshot is immutable).
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/elsewhere/seed"}))
    run("publish", moved, "--name", "code-elsewhere")
    res = run("pull", "code-elsewhere")
    assert Path(res.stdout.strip()).is_dir()  # stdout stays the folder alone, for scripts
    assert "names its seed at /elsewhere/seed, which is not on this machine" in res.stderr
    assert "--seed SEED" in res.stderr and "not on this machine" not in run("pull", "code").stderr


def test_expert_from_another_seed_is_refused_by_field_name(dense_expert, tmp_path, tokenizer, qwen2_seed, home):
    run("publish", dense_expert)
    other = build_seed(tmp_path / "other-llama", tokenizer, arch="llama", seed=123)
    result = run("pull", "org/math", "--for-base", other, ok=False)
    assert result.exit_code == 1
    assert "expert 'org/math'" in result.output and "'base_fingerprint' differs" in result.output
    result = run("pull", "org/math", "--for-base", qwen2_seed, ok=False)
    assert "'base_fingerprint' differs" in result.output or "'architecture' differs" in result.output
    run("publish", dense_expert, "--name", "team/renamed")  # named apart from its card: the error names both
    result = run("pull", "team/renamed", "--for-base", other, ok=False)
    assert result.exit_code == 1 and "team/renamed: expert 'org/math'" in " ".join(result.output.split())


def test_mixed_and_pruned_training_records_shares_and_audit_scores(tmp_path, llama_seed, corpus):
    out = tmp_path / "mixed"
    run("train", "--base", llama_seed, "--data", f"math={corpus['math']}", "--data", f"prose={corpus['prose']}",
        "--mix", "math=0.25,prose=0.75", "--prune", "middle:0.5", "--domain", "mixed", "--out", out, *FAST)
    data = read_card(out).expert.data
    assert data.mix is not None and abs(data.mix["math"] - 0.25) < 0.02 and abs(data.mix["prose"] - 0.75) < 0.02
    assert data.pruning["where"] == "middle" and data.pruning["fraction"] == 0.5
    rows = [json.loads(line) for line in (out / "pruning_scores.jsonl").read_text().splitlines()]
    for name in ("math", "prose"):
        mine = [r for r in rows if r["source_name"] == name]
        assert sum(r["kept"] for r in mine) == round(0.5 * len(mine))


@pytest.mark.parametrize("case", ["missing-field", "empty", "not-utf8", "bad-mix", "unknown-mix-source", "exists",
                                  "longer-than-context"])
def test_bad_input_gives_a_clear_error_and_writes_nothing(case, tmp_path, llama_seed, corpus):
    data, extra = corpus["math"], []
    out = tmp_path / "out"
    if case == "missing-field":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"text": "ok"}\n{"content": "no text here"}\n')
        expect = [f"{data} line 2", "no field 'text'", "content"]
    elif case == "empty":
        data = tmp_path / "empty.jsonl"
        data.write_text("")
        expect = [str(data), "no documents"]
    elif case == "not-utf8":
        data = tmp_path / "latin1.txt"
        data.write_bytes("first line\nsecond line caf\xe9\n".encode("latin-1"))
        expect = [f"{data} line 2", "not valid UTF-8", "0xe9"]
    elif case == "bad-mix":
        extra = ["--mix", "math:0.5"]
        expect = ["math:0.5"]
    elif case == "unknown-mix-source":
        extra = ["--mix", "math=0.5,german=0.5"]
        expect = ["german", "known sources"]
    elif case == "longer-than-context":  # the seed's max_position_embeddings is 512
        extra = ["--seq-len", "100000"]
        expect = ["--seq-len 100000", "max_position_embeddings 512", "at most 512"]
    else:
        out.mkdir()
        expect = [str(out), "already exists"]
    result = run("train", "--base", llama_seed, "--data", f"math={data}", "--domain", "math", "--out", out,
                 *FAST, *extra, ok=False)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for piece in expect:
        assert piece in result.output, (piece, result.output)
    assert not out.exists() or case == "exists"
    assert not out.with_name("out.partial").exists() or case in ("bad-mix", "unknown-mix-source", "exists") \
        or not any(out.with_name("out.partial").rglob("*.safetensors"))


def test_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, llama_seed, corpus, home):
    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "expertmix", "train", "--base", str(llama_seed), "--data", str(corpus["prose"]),
            "--domain", "prose", "--out", str(out), "--max-steps", "100000", "--seq-len", "32", "--batch-size", "2",
            "--save-steps", "3", "--prune", "middle:0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "train.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT)
        checkpoints = out.with_name("resumed.partial") / "checkpoints"
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None \
                and not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
            time.sleep(0.2)
        assert proc.poll() is None, f"training ended before it could be killed:\n{log.read_text()[-3000:]}"
        # The same job started again while the first lives (a second terminal, a scheduler's retry) is refused:
        # two processes would overwrite each other's checkpoints.
        twice = run("train", "--base", llama_seed, "--data", corpus["prose"], "--domain", "prose", "--out", out,
                    "--max-steps", "7", "--seq-len", "32", "--batch-size", "2", "--save-steps", "3", "--resume",
                    "--prune", "middle:0.5", ok=False)
        assert twice.exit_code == 1 and f"in use by another expertmix process (pid {proc.pid})" in twice.output
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(checkpoints.glob("checkpoint-*")), f"no checkpoint appeared before the kill:\n{log.read_text()[-3000:]}"
    assert not out.exists()  # a killed run leaves no half-written expert
    again = run("train", "--base", llama_seed, "--data", corpus["prose"], "--domain", "prose", "--out", out,
                "--max-steps", "100000", "--seq-len", "32", "--batch-size", "2", "--save-steps", "3", "--prune",
                "middle:0.5", ok=False)
    assert again.exit_code == 1 and "--resume" in again.output
    from expertmix.experts.training import last_complete_checkpoint

    resume_from = Path(last_complete_checkpoint(checkpoints))
    target = int(resume_from.name.split("-")[1]) + 6
    resumed = run("train", "--base", llama_seed, "--data", corpus["prose"], "--domain", "prose", "--out", out,
                  "--max-steps", str(target), "--seq-len", "32", "--batch-size", "2", "--save-steps", "3", "--resume",
                  "--prune", "middle:0.5")
    # the pruning scores were journalled: the resumed run scores no document twice
    assert re.search(r"pruning: \d+ documents scored before the interruption", resumed.output), resumed.output
    assert (out / "pruning_scores.jsonl").is_file() and not list(out.glob("*.partial"))
    card = read_card(out).expert
    assert card.training["resumed_from"] == resume_from.name
    assert card.training["steps"] == target
    assert not out.with_name("resumed.partial").exists()
    assert LocalStore().list() == []


def test_quickstart_trains_publishes_and_prints_the_perplexity_table(tmp_path, home):
    result = run("quickstart", "--workdir", tmp_path / "qs", "--seed-steps", "4", "--expert-steps", "3",
                 "--align-steps", "2")
    for word in ("validation perplexity", "seed", "expert:arithmetic", "expert:code", "expert:records",
                 "aligned arithmetic expert (RLOO"):
        assert word in result.output
    names = sorted(e.name for e in LocalStore().list())
    assert names == ["quickstart/arithmetic", "quickstart/code", "quickstart/records"]
    table = json.loads((tmp_path / "qs" / "perplexity.json").read_text())
    assert set(table) == {"seed", "expert:arithmetic", "expert:code", "expert:records"}
    assert all(v > 1 for row in table.values() for v in row.values())
    assert (tmp_path / "qs" / "aligned" / "alignment.json").is_file()


def test_resume_skips_a_checkpoint_left_half_written_by_a_kill(tmp_path):
    from expertmix.experts.training import last_complete_checkpoint

    # 9: killed before its state was written; 12: killed while it was (the file is opened, then filled)
    for step, state in ((3, "{}"), (6, '{"global_step": 6}'), (9, None), (12, ""), (15, '{"global_step": 1')):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    assert Path(last_complete_checkpoint(tmp_path)).name == "checkpoint-6"
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_piped_list_prints_whole_names_and_a_narrow_terminal_folds_them(dense_expert, home):
    empty = run("list").output
    assert "no experts in the local store" in empty and str(home) in " ".join(empty.split())
    name = "a-rather-long-organisation/an-expert-name-that-overflows-80-columns"
    run("publish", dense_expert, "--name", name)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    piped = subprocess.run([sys.executable, "-m", "expertmix", "list"], env=env, capture_output=True, text=True,
                           check=True).stdout
    row = next(line for line in piped.splitlines() if "overflows" in line)
    assert name in row and "…" not in piped  # one line, nothing cut, though wider than 80 columns
    narrow = subprocess.run([sys.executable, "-m", "expertmix", "list"], env={**env, "COLUMNS": "60"},
                            capture_output=True, text=True, check=True).stdout
    assert max(len(line) for line in narrow.splitlines()) <= 60 and "…" not in narrow
    first_column = "".join(line.split("│")[1].strip() for line in narrow.splitlines() if line.startswith("│"))
    assert name in first_column  # folded over several lines, every character kept
    none = " ".join(run("search", "--domain", "no-such-domain", "--kind", "lora").output.split())
    assert "match --domain no-such-domain, --kind lora" in none and "┃" not in none


def test_training_runs_unlocked_on_a_filesystem_without_locks(tmp_path, llama_seed, corpus, monkeypatch):
    import errno

    from expertmix import fsutil

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fsutil.fcntl, "flock", no_locks)  # the work folder's lock and the output's alike
    out = tmp_path / "unlocked"
    run("train", "--base", llama_seed, "--data", corpus["math"], "--domain", "math", "--out", out, *FAST)
    assert read_card(out).expert.training["steps"] == 6 and not out.with_name("unlocked.partial").exists()


def test_an_aligned_expert_keeps_a_card_and_publishes_as_its_own_expert(dense_expert, tmp_path, home):
    """align on an expert folder writes the input's card under NAME-METHOD with the alignment recorded: the aligned
    expert publishes, shows and loads like any expert (it used to lose its card and be refused)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a} + {b} =", "language": "en"}) + "\n"
                               for a, b in ((1, 2), (30, 4), (7, 7), (12, 9))))
    out = tmp_path / "aligned"
    run("align", dense_expert, "--method", "rloo", "--prompts", prompts, "--reward", "arithmetic", "--k", "2",
        "--steps", "2", "--batch-size", "2", "--max-new-tokens", "4", "--eval-prompts", prompts, "--out", out)
    card, source = read_card(out).expert, read_card(dense_expert).expert
    assert card.name == "org/math-rloo" and card.domain == source.domain
    assert card.signature() == source.signature()  # the same seed: it mixes with the other experts of that seed
    alignment = card.training["alignment"]
    assert alignment["method"] == "rloo" and alignment["from"] == "org/math" and alignment["reward"] == "arithmetic"
    assert "valid_perplexity_after" not in card.metrics and "held_out_reward_after" in card.metrics
    published = run("publish", out).output
    assert published.startswith("published org/math-rloo@")
    shown = json.loads(run("show", "org/math-rloo").output)
    assert shown["card"]["training"]["alignment"]["steps"] == 2
    pulled = Path(run("pull", "org/math-rloo").output.strip())
    ids = torch.tensor([[1, 5, 9, 17]])
    assert torch.equal(AutoModelForCausalLM.from_pretrained(pulled)(ids).logits,
                       AutoModelForCausalLM.from_pretrained(out)(ids).logits)


def test_train_reads_a_dataset_dicts_splits_and_a_hive_style_path(tmp_path, llama_seed, corpus):
    """A DatasetDict trains on 'train' and validates on its own 'validation' split (it trained and validated on
    'train' before); --data accepts a path holding '=' (lang=de/part-0.jsonl was split as NAME=PATH)."""
    import datasets

    rows = [json.loads(line) for line in corpus["prose"].read_text().splitlines()]
    saved = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:40]),
                          "validation": datasets.Dataset.from_list(rows[40:50])}).save_to_disk(str(saved))
    res = run("train", "--base", llama_seed, "--data", saved, "--domain", "prose", "--out", tmp_path / "e",
              "--max-steps", "1", "--seq-len", "32", "--batch-size", "2")
    assert f"validation: the 'validation' split of {saved}" in res.output
    assert read_card(tmp_path / "e").expert.data.documents == 40  # every train row trained on, none held out
    hive = tmp_path / "lang=en" / "part-0.jsonl"
    hive.parent.mkdir()
    hive.write_text(corpus["prose"].read_text())
    res = run("train", "--base", llama_seed, "--data", hive, "--domain", "prose", "--out", tmp_path / "h",
              "--max-steps", "1", "--seq-len", "32", "--batch-size", "2")
    assert read_card(tmp_path / "h").expert.data.sources == [str(hive)]


def test_a_stopped_run_says_how_to_resume_and_resume_refuses_what_would_mix_two_runs(tmp_path, llama_seed, corpus,
                                                                                     home, monkeypatch):
    """SIGTERM stops a run like Ctrl-C and says where its checkpoints are; --resume then refuses, by name, a changed
    setting, rewritten data, a budget below the checkpoint and a work folder whose settings were lost; the same
    file by another path is the same data."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(corpus["prose"], "prose.jsonl")
    out = tmp_path / "stopped"
    common = ["--base", str(llama_seed), "--domain", "prose", "--out", str(out), "--seq-len", "32",
              "--batch-size", "2", "--save-steps", "2"]
    work = out.with_name("stopped.partial")
    proc = subprocess.Popen([sys.executable, "-m", "expertmix", "train", "--data", "prose.jsonl", *common,
                             "--max-steps", "100000"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list(work.glob("checkpoints/*/trainer_state.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert f"interrupted: the checkpoints in {work} are kept; rerun the same command with --resume" in err
    from expertmix.experts.training import last_complete_checkpoint

    done = int(Path(last_complete_checkpoint(work / "checkpoints")).name.split("-")[1])  # a newer one may be half-saved

    absolute = str(tmp_path / "prose.jsonl")
    refusals = [
        (["--data", "prose.jsonl", "--lr", "1e-2", "--max-steps", "50"], "differs in: settings.learning_rate"),
        (["--data", absolute, "--max-steps", "1"], f"has trained {done} steps, past this run's budget of 1"),
    ]
    for extra, message in refusals:
        res = run("train", *common, *extra, "--resume", ok=False)
        assert res.exit_code == 1 and message in " ".join(res.output.split()), res.output
    with open("prose.jsonl", "a") as f:
        f.write(json.dumps({"text": "a line added after the interruption"}) + "\n")
    res = run("train", "--data", absolute, *common, "--max-steps", "50", "--resume", ok=False)
    assert res.exit_code == 1 and "differs in: data_contents.prose" in res.output, res.output
    shutil.copyfile(corpus["prose"], "prose.jsonl")
    run("train", "--data", absolute, *common, "--max-steps", str(done + 1), "--resume")  # the same file, by path
    assert read_card(out).expert.training["resumed_from"] == f"checkpoint-{done}" and not work.exists()

    (work / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # a leftover without run.json
    shutil.rmtree(out)
    res = run("train", "--data", absolute, *common, "--max-steps", "4", "--resume", ok=False)
    assert res.exit_code == 1 and "holds checkpoints but no run.json" in res.output


class _StopAt:
    """Ctrl-C at the end of training step ``step`` (a TrainerCallback by duck typing)."""

    def __init__(self, step: int):
        self.step = step

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _interrupt_training_at(monkeypatch, step: int) -> None:
    from expertmix.experts import training

    real_fit = training.fit
    monkeypatch.setattr(training, "fit", lambda *a, **k: real_fit(*a, **k, callbacks=[_StopAt(step)]))


def test_an_interrupt_before_the_first_checkpoint_keeps_nothing_and_one_after_says_how_to_resume(
        tmp_path, llama_seed, corpus, monkeypatch):
    """Ctrl-C before any checkpoint left an OUT.partial with nothing to resume, which the next run refused without
    --resume; now it is removed and the note says nothing was kept. After a checkpoint the note says how to resume."""
    out = tmp_path / "early"
    args = ["train", "--base", llama_seed, "--data", corpus["math"], "--domain", "math", "--out", out,
            "--max-steps", "6", "--seq-len", "32", "--batch-size", "4"]
    _interrupt_training_at(monkeypatch, 1)
    stopped = CliRunner().invoke(main, [str(a) for a in [*args, "--save-steps", "1000"]])
    text = " ".join(stopped.output.split())
    assert stopped.exit_code == 1 and "Aborted" in stopped.output
    assert f"interrupted before the first checkpoint: nothing was kept (no {out.with_name('early.partial')} is " \
           f"left); rerun the same command, without --resume, to start over" in text
    assert "are kept" not in text and not out.exists() and not out.with_name("early.partial").exists()

    monkeypatch.undo()
    _interrupt_training_at(monkeypatch, 2)  # after checkpoint-1 (a step's checkpoint is saved after its callbacks)
    stopped = CliRunner().invoke(main, [str(a) for a in [*args, "--save-steps", "1"]])
    text = " ".join(stopped.output.split())
    work = out.with_name("early.partial")
    assert stopped.exit_code == 1 and f"interrupted: the checkpoints in {work} are kept; rerun the same command " \
                                      f"with --resume" in text
    assert "nothing was kept" not in text and (work / "checkpoints" / "checkpoint-1").is_dir()


def test_a_moved_or_renamed_work_folder_resumes_but_other_input_paths_do_not(tmp_path, llama_seed, corpus,
                                                                               monkeypatch):
    """run.json recorded OUT's absolute path, so a work folder moved with its parent (or renamed with --out) was
    refused as 'other settings'; the inputs' paths still count."""
    first = tmp_path / "here" / "job" / "expert"
    common = ["--data", f"math={corpus['math']}", "--domain", "math", "--max-steps", "5", "--seq-len", "32",
              "--batch-size", "4", "--save-steps", "2"]
    _interrupt_training_at(monkeypatch, 3)
    stopped = CliRunner().invoke(main, ["train", "--base", str(llama_seed), *common, "--out", str(first)])
    assert stopped.exit_code == 1 and (first.with_name("expert.partial") / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.undo()

    (tmp_path / "here").rename(tmp_path / "there")  # the parent moved ...
    moved = tmp_path / "there" / "job"
    (moved / "expert.partial").rename(moved / "renamed.partial")  # ... and the work folder renamed
    copy = tmp_path / "math-copy.jsonl"
    shutil.copyfile(corpus["math"], copy)
    other_path = run("train", "--base", llama_seed, *[f"math={copy}" if a.startswith("math=") else a for a in common],
                     "--out", moved / "renamed", "--resume", ok=False)
    assert other_path.exit_code == 1 and "differs in: data" in " ".join(other_path.output.split())
    run("train", "--base", llama_seed, *common, "--out", moved / "renamed", "--resume")
    card = read_card(moved / "renamed").expert
    assert card.training["resumed_from"] == "checkpoint-2" and card.training["steps"] == 5
    assert not (moved / "renamed.partial").exists()


def test_a_cohere_seed_trains_an_ia3_expert_with_targets_from_its_own_module_names(tmp_path, tokenizer, corpus):
    """peft has no (IA)³ defaults for Cohere (Aya 23's architecture) and refused to build the adapter; the targets
    now come from the model's module names."""
    from peft import PeftConfig

    from expertmix.experts.adapter import default_targets, load_adapter_expert

    seed = build_seed(tmp_path / "cohere", tokenizer, arch="cohere")
    out = tmp_path / "ia3"
    run("train", "--base", seed, "--data", corpus["prose"], "--domain", "prose", "--out", out, "--peft", "ia3", *FAST)
    card = read_card(out).expert
    assert card.kind == "ia3" and card.architecture.startswith("cohere(")
    config = PeftConfig.from_pretrained(str(out))
    assert set(config.target_modules) == {"k_proj", "v_proj", "down_proj"}
    assert set(config.feedforward_modules) == {"down_proj"}
    merged = load_adapter_expert(out, seed)
    assert torch.isfinite(merged(torch.tensor([[1, 5, 9]])).logits).all()
    model = AutoModelForCausalLM.from_pretrained(seed)
    assert default_targets(model, "lora") == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                              "v_proj"]


def test_train_refuses_a_tokenizer_with_more_tokens_than_the_seed_has_embedding_rows(tmp_path, llama_seed, corpus):
    """Tokens added to a seed's tokenizer without resizing its embeddings failed mid-run with an index error."""
    from transformers import AutoTokenizer

    seed = tmp_path / "grown"
    shutil.copytree(llama_seed, seed)
    tok = AutoTokenizer.from_pretrained(seed)
    rows = AutoModelForCausalLM.from_pretrained(seed).get_input_embeddings().weight.shape[0]
    tok.add_tokens(["<new-1>", "<new-2>"])
    tok.save_pretrained(seed)
    out = tmp_path / "e"
    res = run("train", "--base", seed, "--data", corpus["math"], "--domain", "math", "--out", out, *FAST, ok=False)
    message = " ".join(res.output.split())
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"train --base {seed}: the tokenizer does not fit the model: it has {rows + 2} tokens but the model's " \
           f"embedding has {rows} rows" in message
    assert not out.exists() and not out.with_name("e.partial").exists()


def test_training_that_raises_validation_perplexity_says_so_and_what_to_try(tmp_path, llama_seed, corpus, home):
    """A few steps at a high rate can leave an expert worse than its base: the summary line alone reads as
    success, so the command warns, naming the rate."""
    res = run("train", "--base", llama_seed, "--data", corpus["prose"], "--domain", "prose", "--out",
              tmp_path / "hot", "--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1")
    before, after = (float(x) for x in re.search(r"validation perplexity ([\d.]+) → ([\d.]+)", res.output).groups())
    assert after > before
    assert "warning: validation perplexity rose" in res.output and "--lr (now 1)" in " ".join(res.output.split())
    calm = run("train", "--base", llama_seed, "--data", corpus["prose"], "--domain", "prose", "--out",
               tmp_path / "calm", "--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-7")
    assert "warning" not in calm.output
