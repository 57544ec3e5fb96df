"""The distillation loss: KL to a row's teacher, cross-entropy where a row has none."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmix.assembler.distillation import distillation_loss, routing_distillation_loss


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
