"""Distillation for a mix's training stages: rows learn a frozen teacher's next-token distributions.

Labels give one token of signal per position; a teacher's distribution gives the whole vocabulary's, so the same
tokens move the student further toward the teacher. ``expertmix assemble`` teaches each domain's rows with that
domain's dense expert, so the mix learns what each expert does on its own domain. ``expertmix extend`` teaches the
replayed rows with the mix before the extension (what the old domains should keep) and the new-domain rows with
the new dense expert (what the new domain should become).

Each training block carries a ``teacher`` index (-1: plain labels). The loss is the mean over scored tokens of
KL(teacher || student) on taught rows and cross-entropy on the others, plus the student's load-balancing loss.
With ``routing_weight``, rows taught by an MoE teacher (the mix before the extension) also learn its routing:
per layer, KL(teacher router || student router) over the teacher's experts, so replayed tokens keep their experts
and gates instead of drifting to the new expert. The Trainer has no per-row teacher, hence this subclass of its
``compute_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Trainer

TEACHER_KEY = "teacher"


def load_teachers(folders: Sequence[str | Path], bf16: bool) -> list[torch.nn.Module]:
    """Frozen teachers in the precision the student computes in: under bf16 they hold half the memory (they all
    stay resident beside the student) and their matrix products run as fast as the student's."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    return [AutoModelForCausalLM.from_pretrained(f, dtype=dtype) for f in folders]


class DistillationTrainer(Trainer):
    """A Trainer whose blocks may name a frozen teacher (``inputs['teacher']``, -1 for plain labels)."""

    def __init__(self, *args, teachers: Sequence[torch.nn.Module], routing_weight: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer divides by accumulation steps
        self.teachers = list(teachers)
        self.routing_weight = routing_weight
        for teacher in self.teachers:
            teacher.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        which = inputs.pop(TEACHER_KEY)
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        routed = hasattr(getattr(model, "module", model), "moe_blocks")  # a dense student (a merge) takes no flag
        outputs = model(input_ids=input_ids, **({"output_router_logits": True} if routed else {}))
        taught = self._teachers_on(input_ids, which)
        loss = distillation_loss(outputs.logits, labels, which, {t: out.logits for t, out in taught.items()})
        if self.routing_weight and getattr(outputs, "router_logits", None):
            for t, out in taught.items():
                if getattr(out, "router_logits", None):
                    loss = loss + self.routing_weight * routing_distillation_loss(
                        outputs.router_logits, out.router_logits, which == t)
        aux = getattr(outputs, "aux_loss", None)
        coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0)
        if aux is not None and coef:
            loss = loss + coef * aux.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _teachers_on(self, input_ids: torch.Tensor, which: torch.Tensor) -> dict[int, object]:
        """Each teacher's outputs on the rows it teaches (with its router logits when it routes)."""
        out = {}
        for t in which.unique().tolist():
            if t < 0:
                continue
            teacher = self.teachers[t]
            device = input_ids.device
            if next(teacher.parameters()).device != device:
                teacher.to(device)
            routes = self.routing_weight > 0 and hasattr(teacher, "moe_blocks")
            with self.accelerator.autocast():  # the student's mixed precision (accelerate wraps only its forward)
                out[t] = teacher(input_ids=input_ids[which == t],
                                 **({"output_router_logits": True} if routes else {}))
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


def routing_distillation_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                              rows: torch.Tensor) -> torch.Tensor:
    """Mean over layers and the taught rows' tokens of KL(teacher router || student router).

    ``student[layer]`` is ``[B * L, E_s]`` for the whole batch, ``teacher[layer]`` ``[R * L, E_t]`` for the ``R``
    rows ``rows [B]`` selects, with ``E_t <= E_s`` (the student's extra experts are new): the student's
    probability on them counts as mass moved away from the teacher's experts.
    """
    losses = []
    for s_logits, t_logits in zip(student, teacher, strict=True):
        s_logp = F.log_softmax(s_logits.float(), dim=-1).view(rows.shape[0], -1, s_logits.shape[-1])[rows]
        t_logp = F.log_softmax(t_logits.float(), dim=-1).view(s_logp.shape[0], s_logp.shape[1], -1)
        kl = (t_logp.exp() * (t_logp - s_logp[..., : t_logp.shape[-1]])).sum(-1)
        losses.append(kl.mean())
    return torch.stack(losses).mean()
