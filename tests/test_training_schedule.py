"""The training loop's schedule: cosine with warm-up, optionally down to a floor (Nexus' reference recipe decays
to 30% of the peak rate)."""

from __future__ import annotations

import ast
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from expertmix.experts.data import pack, read_documents, tokenize_documents
from expertmix.experts.training import TrainSettings, fit


class _Rates(TrainerCallback):
    def __init__(self):
        self.rates: list[float] = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_cosine_schedule_decays_to_the_configured_share_of_the_peak(floor, llama_seed, corpus, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_seed)
    blocks = pack(tokenize_documents(read_documents(corpus["prose"]), AutoTokenizer.from_pretrained(llama_seed)), 32)
    seen = _Rates()
    settings = TrainSettings(max_steps=10, batch_size=2, learning_rate=1e-3, warmup_ratio=0.2, min_lr_ratio=floor,
                             save_steps=0, progress=False)
    fit(model, blocks, None, settings, tmp_path / "fit", callbacks=[seen])
    assert len(seen.rates) == 10 and max(seen.rates) == pytest.approx(1e-3)
    after_peak = seen.rates[seen.rates.index(max(seen.rates)):]
    assert after_peak == sorted(after_peak, reverse=True)  # decays monotonically after the warm-up
    assert min(after_peak) >= floor * 1e-3 - 1e-12
    assert after_peak[-1] == pytest.approx(floor * 1e-3 + (1 - floor) * 1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_a_one_step_run_takes_its_step_at_the_peak_rate(llama_seed, corpus, tmp_path):
    """A warm-up rounded up to the whole run would leave its only step at learning rate 0: nothing would train."""
    model = AutoModelForCausalLM.from_pretrained(llama_seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = pack(tokenize_documents(read_documents(corpus["prose"]), AutoTokenizer.from_pretrained(llama_seed)), 32)
    seen = _Rates()
    fit(model, blocks, None, TrainSettings(max_steps=1, batch_size=2, learning_rate=1e-3, save_steps=0,
                                           progress=False), tmp_path / "fit", callbacks=[seen])
    assert seen.rates == [pytest.approx(1e-3)]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


class _Interrupt(TrainerCallback):
    """Stops the process the way Ctrl-C does, at the end of ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_train_loss_after_a_resume_is_the_mean_over_the_whole_run(llama_seed, corpus, tmp_path, caplog, capsys):
    """The Trainer's train_loss covers only the steps since the resume; the recorded one covers them all, and equals
    the loss of the same run left uninterrupted."""
    blocks = pack(tokenize_documents(read_documents(corpus["prose"]), AutoTokenizer.from_pretrained(llama_seed)), 32)
    settings = TrainSettings(max_steps=7, batch_size=2, learning_rate=1e-3, save_steps=3, logging_steps=2,
                             progress=False)
    whole = fit(AutoModelForCausalLM.from_pretrained(llama_seed), blocks, None, settings, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        fit(AutoModelForCausalLM.from_pretrained(llama_seed), blocks, None, settings, tmp_path / "cut",
            callbacks=[_Interrupt(5)])
    capsys.readouterr()
    resumed = fit(AutoModelForCausalLM.from_pretrained(llama_seed), blocks, None, settings, tmp_path / "cut",
                  resume=True)
    assert resumed["resumed_from"] == "checkpoint-3"
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    # the console's closing line (the Trainer's printer) and the trainer's log history say the same
    printed = [ast.literal_eval(line) for line in capsys.readouterr().out.splitlines() if "'train_loss'" in line]
    assert [float(p["train_loss"]) for p in printed] == [pytest.approx(whole["train_loss"], rel=1e-4)]
    # the tied head is not in the checkpoint by design: no "missing keys" alarm on resume
    assert not [r for r in caplog.records if "missing keys" in r.getMessage()]
