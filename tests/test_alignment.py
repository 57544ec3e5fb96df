"""Alignment math and data: RLOO advantages, KL-penalised reward, DPO loss, rewards, preference files."""

from __future__ import annotations

import json
import math
import unicodedata
from types import SimpleNamespace

import pytest
import torch

from expertmix.alignment.dpo import dpo_loss
from expertmix.alignment.policy import pack_sequences, router_aux_loss, sequence_kl
from expertmix.alignment.preferences import (
    PreferencePair,
    prompt_columns,
    read_preferences,
    read_prompts,
    write_preferences,
)
from expertmix.alignment.rewards import (
    arithmetic_answer,
    arithmetic_reward,
    keyword_reward,
    load_reward,
    multilingual_reward,
    score,
    script_reward,
)
from expertmix.alignment.rloo import kl_penalized_rewards, rloo_advantages, rloo_loss
from expertmix.errors import DataError, ExpertmixError


def test_rloo_advantage_is_reward_minus_mean_of_the_other_samples():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]])
    # by hand: 1 - (2+3+6)/3, 2 - (1+3+6)/3, 3 - (1+2+6)/3, 6 - (1+2+3)/3; then 0 - 4/3 (x3), 4 - 0
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3], [-4 / 3, -4 / 3, -4 / 3, 4.0]])
    assert torch.allclose(rloo_advantages(rewards), expected)


def test_rloo_needs_two_samples_per_prompt():
    with pytest.raises(ExpertmixError, match="at least 2"):
        rloo_advantages(torch.tensor([[1.0], [2.0]]))


def test_kl_penalty_is_subtracted_inside_the_reward_before_the_baseline():
    rewards, kl = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    penalized = kl_penalized_rewards(rewards, kl, beta=0.1)
    assert torch.allclose(penalized, torch.tensor([0.95, 2.1]))
    # with k=2 the baseline of each sample is the other's penalised reward
    assert torch.allclose(rloo_advantages(penalized.view(1, 2)), torch.tensor([[0.95 - 2.1, 2.1 - 0.95]]))


def test_rloo_loss_gradient_is_minus_advantage_over_batch_size():
    logps = torch.tensor([-3.0, -1.0, -2.0, -5.0], requires_grad=True)
    adv = torch.tensor([0.5, -1.5, 2.0, -1.0])
    rloo_loss(logps, adv).backward()
    assert torch.allclose(logps.grad, -adv / 4)


def test_dpo_loss_equals_the_formula():
    pc, pr = torch.tensor([-4.0, -10.0]), torch.tensor([-6.0, -7.0])
    rc, rr = torch.tensor([-5.0, -9.0]), torch.tensor([-5.5, -8.0])
    beta = 0.2
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(2):
        margin = (pc[i] - rc[i]) - (pr[i] - rr[i])
        assert losses[i].item() == pytest.approx(math.log1p(math.exp(-beta * margin.item())), rel=1e-6)
        assert chosen_r[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert rejected_r[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())


def test_completion_mask_covers_exactly_the_completion_targets():
    ids, attn, cmask = pack_sequences([[5, 6, 7], [8]], [[9, 2], [10, 11, 2]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 9, 2], [8, 10, 11, 2, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position t predicts token t+1: completions start at index 3 (row 0) and 1 (row 1)
    assert cmask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


def test_router_logits_without_aux_loss_give_the_switch_load_balancing_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])  # 3 tokens, 2 experts, top-1
    model = SimpleNamespace(config=SimpleNamespace(num_experts_per_tok=1))
    aux = router_aux_loss(model, SimpleNamespace(aux_loss=None, router_logits=(logits,)), None)
    probs = logits.softmax(-1)
    fraction = torch.tensor([2 / 3, 1 / 3])  # tokens sent to each expert
    assert aux.item() == pytest.approx(2 * (fraction * probs.mean(0)).sum().item(), rel=1e-5)
    own = torch.tensor(0.25)
    assert router_aux_loss(model, SimpleNamespace(aux_loss=own, router_logits=(logits,)), None) is own


# -- rewards ----------------------------------------------------------------------------------------

def test_script_reward_scores_the_share_of_letters_in_the_prompt_languages_script():
    prompts = ["p"] * 5
    completions = ["Привет мир", "hello мир", "これは日本語です", "这是中文", "über Straße"]
    langs = ["ru", "ru", "ja", "zh", "de"]
    r = script_reward(prompts, completions, language=langs)
    assert r[0] == 1.0 and r[1] == pytest.approx(3 / 8) and r[2] == 1.0 and r[3] == 1.0 and r[4] == 1.0
    # kana is not Chinese; a Latin reply to Chinese scores 0; no language: the prompt's own script counts
    assert script_reward(["p"], ["これは"], language=["zh"]) == [0.0]
    assert script_reward(["p"], ["hello"], language=["zho"]) == [0.0]
    assert script_reward(["Как дела?"], ["хорошо"]) == [1.0]
    assert script_reward(["p"], ["123 !"], language=["en"]) == [0.0]


def test_keyword_and_multilingual_rewards():
    got = keyword_reward(["p", "p"], ["das Handbuch", "nichts"], keyword=["handbuch", "Handbuch"])
    assert got == [1.0, 0.0]
    with pytest.raises(ExpertmixError, match="keyword"):
        keyword_reward(["p"], ["x"])
    r = multilingual_reward(["p", "p", "p"], ["файл есть", "file", "файл"], language=["ru"] * 3,
                            keyword=["файл", "файл", None])
    assert r == [1.0, 0.0, 1.0]


def test_rewards_compare_text_after_unicode_normalisation():
    """A decomposed 'é' matches a composed keyword; half-width katakana is Japanese and full-width Latin is
    Latin (both scored 0 before)."""
    assert keyword_reward(["p"], [unicodedata.normalize("NFD", "un café")], keyword=["café"]) == [1.0]
    assert multilingual_reward(["p"], [unicodedata.normalize("NFD", "le café")], language=["fr"],
                               keyword=["Café"]) == [1.0]
    assert script_reward(["p", "p"], ["ｺﾝﾆﾁﾊ", "ＨＥＬＬＯ"], language=["ja", "en"]) == [1.0, 1.0]


def test_arithmetic_answers_are_integers_and_chained_expressions_are_evaluated_whole():
    assert [arithmetic_answer(p) for p in ("10 - 3 - 2 =", "2 + 3 * 4 =", "3 - -2 =", "shots\n7 * 6 =")] == \
        [5, 14, 5, 42]
    assert arithmetic_reward(["10 - 3 - 2 ="], ["5"]) == [1.0]
    assert arithmetic_reward(["x", "x"], ["8", "8"], answer=[8.0, " 8"]) == [1.0, 1.0]
    for bad in (8.7, True, "eight"):
        with pytest.raises(ExpertmixError, match=f"field 'answer' must be an integer, got {bad!r}"):
            arithmetic_reward(["x"], ["8"], answer=[bad])


def test_arithmetic_reward_checks_the_first_number_of_the_reply():
    prompts = ["12 + 30 =", "7 * 6 =", "5 - 9 =", "what?"]
    r = arithmetic_reward(prompts[:3], [" 42\n1 + 1 = 2", " 40", " -4"])
    assert r[0] == 1.0 and r[1] == pytest.approx(0.5 * (1 - 2 / 42)) and r[2] == 1.0
    assert arithmetic_reward(["12 + 30 ="], ["no idea"]) == [0.0]
    assert arithmetic_reward(prompts[3:], ["7"], answer=[7]) == [1.0]
    with pytest.raises(ExpertmixError, match="answer"):
        arithmetic_reward(prompts[3:], ["7"])


def test_load_reward_accepts_builtins_module_functions_and_files(tmp_path):
    assert load_reward("script") is script_reward
    assert load_reward("expertmix.alignment.rewards:keyword_reward") is keyword_reward
    f = tmp_path / "my_reward.py"
    f.write_text("def longest(prompts, completions, **kw):\n"
                 "    return [float(len(c)) for c in completions]\n")
    fn = load_reward(f"{f}:longest")
    assert score(fn, ["a", "b"], ["xyz", ""]) == [3.0, 0.0]
    for bad, msg in [("nope", "unknown reward"), (f"{f}:missing", "no function"),
                     ("no_such_module_xyz:f", "cannot import"), (str(tmp_path), "config.json")]:
        with pytest.raises(ExpertmixError, match=msg):
            load_reward(bad)


def test_score_refuses_wrong_length_or_non_finite_rewards():
    with pytest.raises(ExpertmixError, match="returned 1 scores for 2"):
        score(lambda p, c, **kw: [1.0], ["a", "b"], ["x", "y"])
    with pytest.raises(ExpertmixError, match="not finite"):
        score(lambda p, c, **kw: [float("nan")], ["a"], ["x"])


def test_a_per_sample_or_failing_reward_function_is_refused_in_one_line_and_align_writes_nothing(tmp_path,
                                                                                                 llama_seed):
    """A reward written per sample (TRL's convention is lists) or one that raises ends the command with a line
    naming the function and what went wrong, not a traceback from deep inside the sampler."""
    from click.testing import CliRunner

    from expertmix.cli import main

    rewards = tmp_path / "rewards.py"
    rewards.write_text("def per_sample(prompt, completion, **kw):\n    return 1.0\n\n"
                       "def flaky(prompts, completions, **kw):\n    raise ConnectionError('reward server down')\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "1 + 2 =", "language": "en"}\n{"prompt": "3 + 4 =", "language": "en"}\n')
    for name, expected in (("per_sample", "reward per_sample returned float 1.0, not a list"),
                           ("flaky", "reward flaky raised ConnectionError: reward server down")):
        out = tmp_path / f"aligned-{name}"
        result = CliRunner().invoke(main, ["align", str(llama_seed), "--method", "rloo", "--prompts", str(prompts),
                                           "--reward", f"{rewards}:{name}", "--k", "2", "--batch-size", "2",
                                           "--steps", "1", "--max-new-tokens", "4", "--out", str(out)])
        assert result.exit_code == 1 and expected in " ".join(result.output.split()), result.output
        assert "Traceback" not in result.output and not out.exists()
    with pytest.raises(ExpertmixError, match="returned str 'yes', not a list"):
        score(lambda p, c, **kw: "yes", ["a"], ["x"])


# -- preference files -------------------------------------------------------------------------------

def test_prompts_read_plain_and_aya_rows_keeping_extra_fields(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt": "Привет", "language": "ru", "keyword": "мир"}) + "\n\n"
                 + json.dumps({"inputs": "Wie spät?", "targets": "x", "language": "German",
                               "language_code": "deu"}, ensure_ascii=False) + "\n", encoding="utf-8")
    recs = read_prompts(f)
    assert [(r.prompt, r.language) for r in recs] == [("Привет", "ru"), ("Wie spät?\n", "deu")]
    # rewards get the row's columns as TRL passes them, language_code included; `language` is the code when known
    assert recs[0].fields == {"keyword": "мир"} and recs[1].fields == {"language_code": "deu"}
    assert prompt_columns(recs) == {"keyword": ["мир", None], "language_code": [None, "deu"],
                                    "language": ["ru", "deu"]}
    # a row naming only its language groups under the code another row gives that name
    g = tmp_path / "named.jsonl"
    g.write_text(json.dumps({"prompt": "a", "language": "German"}) + "\n"
                 + json.dumps({"prompt": "b", "language": "german", "language_code": "deu"}) + "\n"
                 + json.dumps({"prompt": "c", "language": "French"}) + "\n")
    assert [r.language for r in read_prompts(g)] == ["deu", "deu", "French"]


@pytest.mark.parametrize("content,msg", [
    ('{"prompt": "a"}\n{"text": "b"}\n', "line 2: no field 'prompt' or 'inputs'"),
    ('{"prompt": ""}\n', "line 1: field 'prompt' must be a non-empty string"),
    ('{"prompt": "a"\n', "line 1: not valid JSON"),
    ("", "no prompts"),
])
def test_bad_prompt_files_name_the_line_and_field(tmp_path, content, msg):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=msg):
        read_prompts(f)


def test_preference_pairs_round_trip_with_scores(tmp_path):
    pairs = [PreferencePair("q1", "good", "bad", "ja", 0.9, 0.1, [{"text": "good", "score": 0.9}],
                            {"keyword": "k"}),
             PreferencePair("q2", "yes", "no"),
             PreferencePair("q3", "an answer", "", "de", 0.7, 0.0)]  # a sample that stopped at once is a reply
    f = tmp_path / "prefs.jsonl"
    write_preferences(f, pairs)
    back = read_preferences(f)
    assert back == pairs
    with pytest.raises(DataError, match="line 1: no field 'rejected'"):
        f.write_text('{"prompt": "a", "chosen": "b"}\n')
        read_preferences(f)
    with pytest.raises(DataError, match="line 1: field 'prompt' must be a non-empty string"):
        f.write_text('{"prompt": "", "chosen": "b", "rejected": "c"}\n')
        read_preferences(f)


def test_the_k3_kl_estimate_is_never_negative_and_agrees_with_the_exact_kl():
    """Held-out KL is reported with k3: per sample >= 0 (k1 often is not), both unbiased for KL(pi || ref)."""
    gen = torch.Generator().manual_seed(0)
    tokens, vocab, samples = 6, 5, 20000
    pi = torch.softmax(torch.randn(tokens, vocab, generator=gen), -1)
    ref = torch.softmax(torch.randn(tokens, vocab, generator=gen), -1)
    exact = float((pi * (pi.log() - ref.log())).sum())
    y = torch.multinomial(pi, samples, replacement=True, generator=gen).T  # [samples, tokens], y ~ pi
    pol_lp, ref_lp = pi.log().gather(1, y.T).T, ref.log().gather(1, y.T).T
    mask = torch.ones(samples, tokens)
    k1, k3 = sequence_kl(pol_lp, ref_lp, mask), sequence_kl(pol_lp, ref_lp, mask, estimator="k3")
    assert (k1 < 0).any() and (k3 >= 0).all()
    assert abs(float(k1.mean()) - exact) < 0.05 * exact and abs(float(k3.mean()) - exact) < 0.05 * exact
    with pytest.raises(ValueError, match="k2"):
        sequence_kl(pol_lp, ref_lp, mask, estimator="k2")


def test_the_script_reward_follows_a_rows_own_script_field_before_its_language():
    """Serbian is written in Latin and Cyrillic: an Aya row saying Latn wants a Latin reply."""
    from expertmix.alignment.rewards import script_reward

    latin, cyrillic = "Tri plus cetiri je sedam", "Три плюс четири је седам"
    assert script_reward(["q"] * 2, [latin, cyrillic], language=["srp"] * 2, script=["Latn"] * 2) == [1.0, 0.0]
    assert script_reward(["q"] * 2, [latin, cyrillic], language=["srp"] * 2, script=["Cyrl"] * 2) == [0.0, 1.0]
    assert script_reward(["q"], [cyrillic], language=["srp"], script=[None]) == [1.0]  # no field: the language's
    assert script_reward(["q"], [cyrillic], language=["srp"]) == [1.0]


def test_language_filters_match_a_rows_language_name_as_well_as_its_code(tmp_path):
    from expertmix.alignment.preferences import filter_languages, read_prompts

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"inputs": "Wie geht's?", "language": "German", "language_code": "deu"}) + "\n"
                 + json.dumps({"prompt": "How?", "language": "en"}) + "\n")
    rows = read_prompts(p)
    assert [r.language for r in filter_languages(rows, ["German"], p)] == ["deu"]
    assert [r.language for r in filter_languages(rows, ["deu", "en"], p)] == ["deu", "en"]
    with pytest.raises(DataError, match="found: deu, en"):
        filter_languages(rows, ["fr"], p)
