"""RLOO (Ahmadian et al. 2024): k samples per prompt, leave-one-out baseline, KL inside the reward.

The whole completion is one action: ``R_i = r_i - beta * KL_i`` with
``KL_i = sum_t log pi(y_t) - log pi_ref(y_t)`` against a frozen reference, advantage
``A_i = R_i - mean_{j != i} R_j``, loss ``-(1/k) sum_i A_i log pi(y_i|x)``.

Why not TRL's ``RLOOTrainer``: in TRL 1.16 it takes no reference model but reloads one from
``config._name_or_path``, which fails for a class registered in-process with the Auto classes (checked:
``AttributeError: ... no attribute 'auto_map'``), and, like ``DPOTrainer``, it replaces the model's forward
with a fused head that drops a router loss the model computes itself unless the config mimics Mixtral's.
Its per-step metrics are aggregated, so per-language rewards are not available either. The math below is
the same (sequence-level KL with the first-order log ratio, leave-one-out baseline, one update per batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ExpertmixError
from .policy import by_language, pack_sequences, sample_completions, score_samples, sequence_kl, token_logps
from .rewards import RewardFn


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages of ``rewards [prompts, k]``: each reward minus the mean of the other k-1."""
    k = rewards.size(-1)
    if k < 2:
        raise ExpertmixError(f"RLOO needs at least 2 samples per prompt (k), got {k}")
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def kl_penalized_rewards(rewards: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """The KL penalty inside the reward: ``r - beta * KL`` per completion."""
    return rewards - beta * kl


def rloo_loss(sequence_logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the leave-one-out baseline: ``-mean(A_i * log pi(y_i|x))``, advantages constant."""
    return -(advantages.detach() * sequence_logps).mean()


def rloo_step(policy, reference, tokenizer, prompts: Sequence[str], columns: dict[str, list],
              reward: RewardFn, k: int, beta: float, max_new_tokens: int = 32, temperature: float = 1.0,
              aux_loss_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Sample ``k`` completions per prompt, score them and return the RLOO loss and the step's metrics."""
    s = sample_completions(policy, tokenizer, prompts, k, max_new_tokens, temperature,
                           batch_size=len(prompts) * k)
    scores, per_sample = score_samples(reward, prompts, columns, s)
    rewards = torch.tensor(scores)
    ids, mask, cmask = pack_sequences(s.prompt_ids, s.completion_ids, tokenizer.pad_token_id)
    pol_tok, aux = token_logps(policy, ids, mask, cmask, temperature)
    with torch.no_grad():
        ref_tok, _ = token_logps(reference, ids, mask, cmask, temperature)
    cmask = cmask.to(pol_tok.device)
    kl = sequence_kl(pol_tok.detach(), ref_tok, cmask).cpu()
    advantages = rloo_advantages(kl_penalized_rewards(rewards, kl, beta).view(-1, k)).view(-1)
    loss = rloo_loss(pol_tok.sum(-1), advantages.to(pol_tok.device))
    metrics = {"rloo_loss": loss.item()}
    if aux is not None:
        loss = loss + aux_loss_coef * aux
        metrics["aux_loss"] = aux.item()
    languages = per_sample.get("language", [None] * len(scores))
    metrics.update({
        "loss": loss.item(), "reward": rewards.mean().item(), "kl": kl.mean().item(),
        "completion_tokens": cmask.sum(-1).mean().item(),
        "reward_per_language": by_language(rewards.tolist(), languages),
        "kl_per_language": by_language(kl.tolist(), languages),
    })
    return loss, metrics
