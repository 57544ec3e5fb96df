"""Distillation for short finetuning stages: rows learn a frozen teacher's next-token distributions.

``expertmix extend`` finetunes a mix on a few steps of new-domain and replayed data. Labels give one token of
signal per position; a teacher's distribution gives the whole vocabulary's, so the same few steps move the
student further toward the teacher. The replayed rows can learn from the mix before the extension (what the old
domains should keep) and the new-domain rows from the new dense expert (what the new domain should become).

Each training block carries a ``teacher`` index (-1: plain labels). The loss is the mean over scored tokens of
KL(teacher || student) on taught rows and cross-entropy on the others, plus the student's load-balancing loss.
The Trainer has no per-row teacher, hence this subclass of its ``compute_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import Trainer

TEACHER_KEY = "teacher"


class DistillationTrainer(Trainer):
    """A Trainer whose blocks may name a frozen teacher (``inputs['teacher']``, -1 for plain labels)."""

    def __init__(self, *args, teachers: Sequence[torch.nn.Module], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer divides by accumulation steps
        self.teachers = list(teachers)
        for teacher in self.teachers:
            teacher.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        which = inputs.pop(TEACHER_KEY)
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        outputs = model(input_ids=input_ids, output_router_logits=True)
        loss = distillation_loss(outputs.logits, labels, which, self._teacher_logits(input_ids, which))
        aux = getattr(outputs, "aux_loss", None)
        coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0)
        if aux is not None and coef:
            loss = loss + coef * aux.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _teacher_logits(self, input_ids: torch.Tensor, which: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each teacher's logits on the rows it teaches."""
        out = {}
        for t in which.unique().tolist():
            if t < 0:
                continue
            teacher = self.teachers[t]
            device = input_ids.device
            if next(teacher.parameters()).device != device:
                teacher.to(device)
            out[t] = teacher(input_ids=input_ids[which == t]).logits
        return out


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, which: torch.Tensor,
                      teacher_logits: dict[int, torch.Tensor]) -> torch.Tensor:
    """Mean per scored token of KL(teacher || student) on taught rows and cross-entropy on the rest.

    ``logits [B, L, V]`` predict position ``l + 1``; ``labels`` -100 marks tokens not scored (their KL is skipped
    too); ``which [B]`` names each row's teacher (-1: none); ``teacher_logits[t]`` holds teacher ``t``'s logits
    for its rows in order.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = labels[:, 1:]
    scored = target != -100
    per_token = torch.zeros_like(target, dtype=logp.dtype)
    plain = which < 0
    if plain.any():
        tgt = target[plain].clamp_min(0)
        per_token[plain] = -logp[plain].gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    for t, tl in teacher_logits.items():
        rows = which == t
        teacher_logp = F.log_softmax(tl[:, :-1].float(), dim=-1)
        per_token[rows] = F.kl_div(logp[rows], teacher_logp, log_target=True, reduction="none").sum(-1)
    return (per_token * scored).sum() / scored.sum().clamp_min(1)
