"""The distillation loss (KL to a row's teacher, cross-entropy where a row has none) and the teachers' precision."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from expertmix.assembler.distillation import (
    TEACHER_KEY,
    DistillationTrainer,
    distillation_loss,
    load_teachers,
    routing_distillation_loss,
)
from expertmix.experts.training import TrainSettings, fit


def _logits(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_untaught_rows_give_the_plain_next_token_cross_entropy():
    logits, labels = _logits(3, 6, 11, seed=0), torch.randint(0, 11, (3, 6))
    labels[1, 4] = -100
    got = distillation_loss(logits, labels, torch.full((3,), -1), {})
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, want)


def test_a_row_that_matches_its_teacher_costs_nothing_and_others_pay_their_kl():
    logits, labels = _logits(2, 5, 7, seed=1), torch.randint(0, 7, (2, 5))
    which = torch.tensor([0, 1])
    teachers = {0: logits[:1].clone(), 1: _logits(1, 5, 7, seed=2)}
    got = distillation_loss(logits, labels, which, teachers)
    p = F.log_softmax(teachers[1][0, :-1], -1)
    q = F.log_softmax(logits[1, :-1], -1)
    kl = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(got, kl.sum() / 8)  # row 0 adds 0 over its 4 scored tokens
    assert (kl > 0).all()


def test_the_loss_pulls_the_student_toward_the_teacher():
    student = _logits(1, 4, 5, seed=3).requires_grad_()
    teacher = _logits(1, 4, 5, seed=4)
    labels = torch.zeros(1, 4, dtype=torch.long)
    opt = torch.optim.SGD([student], lr=1.0)
    first = None
    for _ in range(50):
        loss = distillation_loss(student, labels, torch.tensor([0]), {0: teacher})
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_routing_distillation_is_zero_when_routing_is_kept_and_charges_mass_moved_to_the_new_expert():
    rows, length, old = torch.tensor([True, False, True]), 4, 3
    teacher = [_logits(2 * length, old, seed=5 + i) for i in range(2)]  # two layers, the two taught rows
    other_row = _logits(length, old + 1, seed=9)

    def student(new_expert_logit: float) -> list[torch.Tensor]:
        out = []
        for t in teacher:
            taught = torch.cat([t, torch.full((t.shape[0], 1), new_expert_logit)], dim=-1).view(2, length, -1)
            out.append(torch.stack([taught[0], other_row, taught[1]]).reshape(-1, old + 1))
        return out

    kept = routing_distillation_loss(student(-1e4), teacher, rows)  # nothing to the new expert: same routing
    torch.testing.assert_close(kept, torch.tensor(0.0), atol=1e-6, rtol=0)
    moved = routing_distillation_loss(student(0.0), teacher, rows)
    p_new = [torch.sigmoid(-torch.logsumexp(t, -1)) for t in teacher]  # the new expert's share per token
    want = torch.stack([(-torch.log1p(-p)).mean() for p in p_new]).mean()  # old experts keep their ratios
    torch.testing.assert_close(moved, want)
    assert moved > 0.05


def test_bf16_training_holds_teachers_in_bf16_and_runs_them_in_the_students_autocast(llama_seed, tmp_path):
    teachers = load_teachers([llama_seed], bf16=True)
    before = {k: v.clone() for k, v in teachers[0].state_dict().items()}
    seen = []
    teachers[0].model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda _m, _i, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    student = AutoModelForCausalLM.from_pretrained(llama_seed, dtype=torch.float32)
    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    blocks = {"input_ids": ids, "labels": ids.clone(), TEACHER_KEY: torch.tensor([0, -1, 0, -1])}
    metrics = fit(student, blocks, None, TrainSettings(max_steps=2, batch_size=2, save_steps=0, bf16=True,
                                                       progress=False), tmp_path / "work",
                  trainer_class=partial(DistillationTrainer, teachers=teachers))
    assert math.isfinite(metrics["train_loss"]) and metrics["steps"] == 2
    assert seen == [(True, torch.bfloat16)] * 2  # one taught row per batch of two, each step
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teachers[0].parameters())
    assert all(torch.equal(v, before[k]) for k, v in teachers[0].state_dict().items())
    assert load_teachers([llama_seed], bf16=False)[0].dtype == torch.float32
