"""Alignment on a tiny random Llama: DPO loss on a hand-built batch, frozen reference, RLOO, DPO, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForSequenceClassification

from expertmix.alignment.align import AlignConfig, align
from expertmix.alignment.dpo import dpo_step
from expertmix.alignment.policy import load_policy, load_reference, pack_sequences, sequence_kl, token_logps
from expertmix.alignment.preferences import PreferencePair, PromptRecord, read_preferences, write_prompts
from expertmix.alignment.rloo import rloo_step
from expertmix.cli import main
from expertmix.experts.seed import tiny_config

# A verifiable reward the tiny random model can learn in a few steps: the share of digits in the reply
# (its tokenizer was trained on sums, code and prose, so digit tokens are common but not dominant).
DIGITS_REWARD = "def digits(prompts, completions, **columns):\n" \
                "    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]\n"
PROMPTS = [("the cat sat", "en"), ("def f1(x):", "py"), ("12 + 7 =", "en"), ("on a mat", "en"),
           ("return x *", "py"), ("the dog ran", "en"), ("def f4(x):", "py"), ("3 + 40 =", "en")]


def digits(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_prompts(path, [PromptRecord(p, lang) for p, lang in PROMPTS])
    return path


def _sequence_logp_by_hand(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log pi(completion | prompt), one token at a time from the model's logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    total = 0.0
    for j, tok in enumerate(completion_ids):
        total += torch.log_softmax(logits[len(prompt_ids) + j - 1], -1)[tok].item()
    return total


def test_dpo_step_loss_matches_the_formula_on_a_hand_built_batch(llama_seed):
    policy, tok = load_policy(llama_seed)
    reference = load_reference(llama_seed)
    with torch.no_grad():  # make the policy differ from its reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = [PreferencePair("the cat", " sat on a mat", " 12 + 7", "en"),
             PreferencePair("def f1(x):", "\n    return x * 2", " far home", "py")]
    beta = 0.3
    loss, metrics = dpo_step(policy, reference, tok, pairs, beta)
    eos = [tok.eos_token_id]
    expected = []
    for pair in pairs:
        p_ids = tok(pair.prompt)["input_ids"]
        c_ids = tok(pair.chosen, add_special_tokens=False)["input_ids"] + eos
        r_ids = tok(pair.rejected, add_special_tokens=False)["input_ids"] + eos
        pc, rc = (_sequence_logp_by_hand(m, p_ids, c_ids) for m in (policy, reference))
        pr, rr = (_sequence_logp_by_hand(m, p_ids, r_ids) for m in (policy, reference))
        margin = (pc - rc) - (pr - rr)
        expected.append(math.log1p(math.exp(-beta * margin)))
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-4)
    assert set(metrics["reward_per_language"]) == {"en", "py"}


def test_kl_uses_the_frozen_reference(llama_seed):
    policy, tok = load_policy(llama_seed)
    reference = load_reference(llama_seed)
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    assert not any(p.requires_grad for p in reference.parameters())
    prompts = [p for p, _ in PROMPTS[:4]]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    kls = []
    torch.manual_seed(0)
    for _ in range(4):
        loss, metrics = rloo_step(policy, reference, tok, prompts, {}, digits, k=4, beta=0.1,
                                  max_new_tokens=8)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        kls.append(metrics["kl"])
    assert kls[0] == 0.0  # the policy starts as its reference
    assert all(abs(kl) > 1e-4 for kl in kls[1:])  # updates to the policy move the KL
    for k, v in reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), f"reference weight {k} changed"
    # and the KL is the policy's log-ratio against that reference, not against itself
    ids, mask, cmask = pack_sequences([tok("the cat")["input_ids"]], [tok(" 12 3", add_special_tokens=False)
                                                                      ["input_ids"]], tok.pad_token_id)
    with torch.no_grad():
        pol, _ = token_logps(policy, ids, mask, cmask)
        ref, _ = token_logps(reference, ids, mask, cmask)
        self_kl = sequence_kl(pol, pol, cmask)
    assert self_kl.item() == 0.0 and sequence_kl(pol, ref, cmask).item() != 0.0


def test_rloo_raises_a_verifiable_reward_and_keeps_kl_bounded(llama_seed, prompt_file, tmp_path):
    out = tmp_path / "aligned"
    s = align(AlignConfig(model=llama_seed, out=out, method="rloo", prompts=prompt_file,
                          eval_prompts=prompt_file, reward=digits, k=4, beta=0.05, lr=5e-3, steps=30,
                          batch_size=4, max_new_tokens=8, eval_samples=8, progress=False), log=lambda m: None)
    before, after = s["eval_before"], s["eval_after"]
    assert before["kl"] == 0.0
    # measured over seeds 0-5: before 0.027-0.036, after 0.10-0.25 (KL 1.4-3.8)
    assert after["reward"] > before["reward"] + 0.04 and after["reward"] > 2 * before["reward"]
    assert 0.0 < after["kl"] < 10.0  # nats per completion of 8 tokens
    assert set(after["per_language"]) == {"en", "py"}
    assert s["last_steps"]["reward"] > s["first_steps"]["reward"]
    model = AutoModelForCausalLM.from_pretrained(out)  # a checkpoint the rest of the CLI loads
    assert type(model).__name__ == "LlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(out).get_vocab() == \
        AutoTokenizer.from_pretrained(llama_seed).get_vocab()
    log = [json.loads(line) for line in (out / "align_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert all({"reward", "kl", "reward_per_language", "loss"} <= set(r) for r in log)


def _reward_model(path, tokenizer):
    """A tiny random sequence-classification reward model saved like a real one."""
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_layers=1)
    cfg.num_labels = 1
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_prefs_generate_with_a_reward_model_then_dpo(llama_seed, tokenizer, prompt_file, tmp_path):
    runner = CliRunner()
    rm = _reward_model(tmp_path / "rm", tokenizer)
    prefs = tmp_path / "prefs.jsonl"
    res = runner.invoke(main, ["prefs", "generate", "--policy", str(llama_seed), "--prompts",
                               str(prompt_file), "--reward", str(rm), "--k", "3", "--max-new-tokens", "6",
                               "--out", str(prefs)])
    assert res.exit_code == 0, res.output
    pairs = read_preferences(prefs)
    assert len(pairs) == len(PROMPTS) and {p.language for p in pairs} == {"en", "py"}
    for p in pairs:
        scores = [s["score"] for s in p.samples]
        assert len(scores) == 3 and p.chosen_score == max(scores) > p.rejected_score == min(scores)
    out = tmp_path / "dpo"
    res = runner.invoke(main, ["align", str(llama_seed), "--method", "dpo", "--prefs", str(prefs), "--reward",
                               str(rm), "--steps", "3", "--batch-size", "4", "--lr", "1e-3", "--beta", "0.1",
                               "--max-new-tokens", "6", "--out", str(out)])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (out / "align_log.jsonl").read_text().splitlines()]
    assert len(log) == 3
    assert all({"reward", "kl", "sample_reward", "reward_per_language"} <= set(r) for r in log)
    assert json.loads((out / "alignment.json").read_text())["settings"]["method"] == "dpo"
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "LlamaForCausalLM"
    # --out never overwrites: not earlier pairs, not the prompt file itself
    before = prompt_file.read_bytes()
    again = runner.invoke(main, ["prefs", "generate", "--policy", str(llama_seed), "--prompts", str(prompt_file),
                                 "--reward", str(rm), "--out", str(prompt_file)])
    assert again.exit_code == 1 and "already exists" in again.output and prompt_file.read_bytes() == before
    # a built-in reward that DPO's monitoring cannot apply to a pair is named by the pair file's line, before training
    bad = tmp_path / "bad-pairs.jsonl"
    bad.write_text(json.dumps({"prompt": "12 + 30 =", "chosen": " 42", "rejected": " 17"}) + "\n"
                   + json.dumps({"prompt": "the capital?", "chosen": "Tokyo", "rejected": "London"}) + "\n")
    res = runner.invoke(main, ["align", str(llama_seed), "--method", "dpo", "--prefs", str(bad), "--reward",
                               "arithmetic", "--steps", "3", "--out", str(tmp_path / "never")])
    assert res.exit_code == 1 and "bad-pairs.jsonl line 2: no 'answer' field" in " ".join(res.output.split())
    assert "align: dpo" not in res.output and not (tmp_path / "never").exists()


def test_cli_rloo_with_a_python_reward_file_prints_per_language_results(llama_seed, prompt_file, tmp_path):
    reward_file = tmp_path / "rewards.py"
    reward_file.write_text(DIGITS_REWARD)
    out = tmp_path / "rloo"
    res = CliRunner().invoke(main, ["align", str(llama_seed), "--method", "rloo", "--prompts",
                                    str(prompt_file), "--reward", f"{reward_file}:digits", "--k", "2",
                                    "--steps", "2", "--batch-size", "2", "--max-new-tokens", "4",
                                    "--language", "py", "--eval-prompts", str(prompt_file),
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "held-out prompts" in res.output and "py" in res.output and "en" in res.output
    log = [json.loads(line) for line in (out / "align_log.jsonl").read_text().splitlines()]
    assert all(set(r["reward_per_language"]) == {"py"} for r in log)  # --language py trains on py only


@pytest.mark.parametrize("args,msg", [
    (["--method", "rloo", "--reward", "script"], "--method rloo needs --prompts"),
    (["--method", "dpo"], "--method dpo needs --prefs"),
    (["--method", "rloo", "--reward", "nope", "--prompts", "{prompts}"], "unknown reward 'nope'"),
    (["--method", "rloo", "--reward", "script", "--prompts", "{prompts}", "--k", "1"], "1 is not in the range x>=2"),
    (["--method", "rloo", "--reward", "script", "--prompts", "{prompts}", "--language", "xx"], "no rows in"),
    (["--method", "rloo", "--reward", "script", "--prompts", "{prompts}", "--beta", "-1"], "not in the range x>=0"),
    (["--method", "rloo", "--reward", "script", "--prompts", "{prompts}", "--max-new-tokens", "0"], "x>=1"),
    # The built-in arithmetic reward needs an answer or an 'a + b =' prompt: line 1 has neither, found up front.
    (["--method", "rloo", "--reward", "arithmetic", "--prompts", "{prompts}"], "prompts.jsonl line 1: no 'answer'"),
])
def test_cli_align_reports_bad_input_in_one_line(llama_seed, prompt_file, tmp_path, args, msg):
    args = [a.replace("{prompts}", str(prompt_file)) for a in args]
    res = CliRunner().invoke(main, ["align", str(llama_seed), *args, "--out", str(tmp_path / "o")])
    assert res.exit_code in (1, 2) and msg in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_prefs_generate_says_when_the_margin_left_no_pair(llama_seed, prompt_file, tmp_path):
    """Samples that differ, but by less than --min-margin, are reported as such (not as 'scored the same')."""
    reward_file = tmp_path / "rewards.py"
    reward_file.write_text(DIGITS_REWARD)
    base = ["prefs", "generate", "--policy", str(llama_seed), "--prompts", str(prompt_file), "--reward",
            f"{reward_file}:digits", "--k", "3", "--max-new-tokens", "8"]
    ok = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "p.jsonl")])
    assert ok.exit_code == 0 and "below margin" in ok.output, ok.output
    res = CliRunner().invoke(main, [*base, "--min-margin", "5", "--out", str(tmp_path / "q.jsonl")])
    message = " ".join(res.output.split())
    assert res.exit_code == 1 and "differ by more than --min-margin 5.0 (largest gap" in message, message
    assert not (tmp_path / "q.jsonl").exists()


def test_interrupted_prefs_generate_goes_on_and_a_new_margin_reuses_the_samples(llama_seed, prompt_file, tmp_path,
                                                                                 monkeypatch):
    """Sampling k completions per prompt is the long part: every batch is journalled beside --out, so Ctrl-C keeps
    what was sampled, the same command goes on from there, and the pairs equal one whole run's."""
    import expertmix.alignment.preferences as preferences
    from expertmix.journal import Journal

    reward_file = tmp_path / "rewards.py"  # samples of different lengths: every prompt makes a pair
    reward_file.write_text("def length(prompts, completions, **columns):\n"
                           "    return [float(len(c)) for c in completions]\n")
    base = ["prefs", "generate", "--policy", str(llama_seed), "--prompts", str(prompt_file), "--reward",
            f"{reward_file}:length", "--k", "3", "--max-new-tokens", "8", "--batch-size", "3"]
    whole = tmp_path / "whole.jsonl"
    assert CliRunner().invoke(main, [*base, "--out", str(whole)]).exit_code == 0

    out, partial = tmp_path / "p.jsonl", tmp_path / "p.jsonl.partial"
    real_add = Journal.add

    def interrupted(self, key, value):
        if len(self.done) == 2:
            raise KeyboardInterrupt
        real_add(self, key, value)

    monkeypatch.setattr(Journal, "add", interrupted)
    res = CliRunner().invoke(main, [*base, "--out", str(out)])
    assert res.exit_code == 1 and not out.exists() and partial.is_file()
    assert "2 batches of prompts sampled kept in" in " ".join(res.output.split())
    monkeypatch.setattr(Journal, "add", real_add)
    sampled = []
    real_sample = preferences.sample_completions
    monkeypatch.setattr(preferences, "sample_completions", lambda *a, **kw: sampled.append(1) or real_sample(*a, **kw))
    res = CliRunner().invoke(main, [*base, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(sampled) == 1  # 8 prompts in batches of 3: two batches came from the journal
    assert "resuming: 2 batches of prompts were sampled before" in res.output
    assert out.read_text() == whole.read_text() and not partial.exists()

    # a margin that leaves no pair keeps the samples: the rerun with a lower one samples nothing
    strict = tmp_path / "strict.jsonl"
    res = CliRunner().invoke(main, [*base, "--min-margin", "1000", "--out", str(strict)])
    assert res.exit_code == 1 and "strict.jsonl.partial" in "".join(res.output.split())
    sampled.clear()
    res = CliRunner().invoke(main, [*base, "--min-margin", "0", "--out", str(strict)])
    assert res.exit_code == 0 and sampled == [] and strict.read_text() == whole.read_text()
    # other settings would mix two runs' samples: refused by name, the journal kept
    monkeypatch.setattr(Journal, "add", interrupted)
    assert CliRunner().invoke(main, [*base, "--out", str(tmp_path / "r.jsonl")]).exit_code == 1
    res = CliRunner().invoke(main, [*base[:-2], "--batch-size", "4", "--out", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 1 and "other settings (batch_size)" in " ".join(res.output.split())
    assert (tmp_path / "r.jsonl.partial").is_file()


def test_quickstart_alignment_stage_scores_arithmetic_and_resumes(llama_seed, tmp_path):
    from expertmix.alignment.align import align_quickstart_stage

    s = align_quickstart_stage(llama_seed, tmp_path, steps=2, n_prompts=8, n_eval=4, log=lambda m: None)
    assert s["method"] == "rloo" and s["eval_before"]["samples"] == 4 * 4
    assert 0.0 <= s["eval_before"]["reward"] <= 1.0 and s["eval_after"]["kl"] > 0.0
    assert all(v["kl"] >= 0.0 for v in s["eval_after"]["per_language"].values())
    assert s["aux_loss_coef"] is None  # a dense expert has no router: no load-balancing weight is recorded
    prompt = json.loads((tmp_path / "align" / "eval.jsonl").read_text().splitlines()[0])
    assert prompt["prompt"].endswith("=") and isinstance(prompt["answer"], int)
    assert align_quickstart_stage(llama_seed, tmp_path, steps=2, log=lambda m: None) == s  # reused, not rerun


def test_cli_align_interrupted_then_resumed_ends_as_the_uninterrupted_run(llama_seed, prompt_file, tmp_path,
                                                                          monkeypatch):
    """A run stopped after its step-2 checkpoint and rerun with --resume gives the same weights, per-step log and
    held-out numbers as a run never stopped: the checkpoint carries the optimizer and the random state."""
    import expertmix.alignment.align as align_module

    reward_file = tmp_path / "rewards.py"  # varies with every sample, so each step has advantages and moves weights
    reward_file.write_text("def spread(prompts, completions, **columns):\n"
                           "    return [sum(map(ord, c)) % 13 / 13 for c in completions]\n")
    args = ["align", str(llama_seed), "--method", "rloo", "--prompts", str(prompt_file), "--reward",
            f"{reward_file}:spread", "--k", "2", "--steps", "4", "--batch-size", "2", "--max-new-tokens", "4",
            "--eval-prompts", str(prompt_file), "--lr", "1e-3", "--save-steps", "2"]
    whole = tmp_path / "whole"
    assert CliRunner().invoke(main, [*args, "--out", str(whole)]).exit_code == 0

    real_step, calls = align_module.rloo_step, []

    def stop_at_step_three(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    cut = tmp_path / "cut"
    monkeypatch.setattr(align_module, "rloo_step", stop_at_step_three)
    stopped = CliRunner().invoke(main, [*args, "--out", str(cut)])
    monkeypatch.setattr(align_module, "rloo_step", real_step)
    partial = tmp_path / "cut.partial"
    assert stopped.exit_code == 1 and "Aborted" in stopped.output
    assert "rerun the same command with --resume" in " ".join(stopped.output.split())
    assert not cut.exists() and (partial / "checkpoint-2").is_dir()

    again = CliRunner().invoke(main, [*args, "--out", str(cut)])
    assert again.exit_code == 1 and "rerun with --resume" in again.output
    changed = CliRunner().invoke(main, [*args, "--lr", "1e-4", "--resume", "--out", str(cut)])
    assert changed.exit_code == 1 and "differs in: lr" in " ".join(changed.output.split())
    resumed = CliRunner().invoke(main, [*args, "--resume", "--out", str(cut)])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and "step 2 of 4" in resumed.output
    assert not partial.exists()

    a = AutoModelForCausalLM.from_pretrained(whole).state_dict()
    b = AutoModelForCausalLM.from_pretrained(cut).state_dict()
    seed = AutoModelForCausalLM.from_pretrained(llama_seed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], seed[k]) for k in a)
    log = [json.loads(line) for line in (whole / "align_log.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in log)
    assert (cut / "align_log.jsonl").read_text() == (whole / "align_log.jsonl").read_text()
    summaries = [json.loads((d / "alignment.json").read_text())["summary"] for d in (whole, cut)]
    assert summaries[0] == summaries[1] and summaries[0]["eval_before"] is not None
