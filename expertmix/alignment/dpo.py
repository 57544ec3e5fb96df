"""DPO (Rafailov et al. 2023): the loss as a small pure function and one optimisation step on pairs.

Why not TRL's ``DPOTrainer``: in TRL 1.16 it swaps the model's forward for a fused LM head that runs only
``model.base_model`` and recomputes the MoE loss with Mixtral's formula from ``config.num_experts``; a model
whose own forward computes its router loss (the Nexus mix) gets it dropped unless its config mimics Mixtral's
fields (checked: a custom MoE class trained with ``aux_loss_enabled=False``). It also aggregates its metrics,
so the per-language rewards this product logs are not available. The step below runs the model's own
forward and adds its ``aux_loss``; the loss is TRL's ``sigmoid`` loss (the paper's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .policy import by_language, pack_sequences, token_logps
from .preferences import PreferencePair


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` and the implicit rewards.

    Inputs are sequence log-probabilities of the chosen and rejected completions. Returns
    ``(losses, chosen_rewards, rejected_rewards)`` with ``reward = beta * (log pi - log pi_ref)`` (no grad).
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def encode_pairs(tokenizer, pairs: Sequence[PreferencePair], max_prompt_tokens: int = 512,
                 max_completion_tokens: int = 256):
    """Pack the chosen rows then the rejected rows of ``pairs``: ``input_ids``, ``attention_mask``, mask.

    Prompt and completion are tokenized apart and joined (as they are when sampled); completions end with EOS.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts, completions = [], []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            prompts.append(tokenizer(pair.prompt)["input_ids"][-max_prompt_tokens:])
            ids = tokenizer(getattr(pair, side), add_special_tokens=False)["input_ids"]
            completions.append(ids[:max_completion_tokens] + eos)
    return pack_sequences(prompts, completions, tokenizer.pad_token_id)


def dpo_step(policy, reference, tokenizer, pairs: Sequence[PreferencePair], beta: float,
             aux_loss_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The DPO loss of one batch of pairs (plus the router loss), and its metrics; call ``backward`` on it."""
    ids, mask, cmask = encode_pairs(tokenizer, pairs)
    n = len(pairs)
    pol_tok, aux = token_logps(policy, ids, mask, cmask)
    with torch.no_grad():
        ref_tok, _ = token_logps(reference, ids, mask, cmask)
    pol, ref = pol_tok.sum(-1), ref_tok.sum(-1)
    losses, chosen_r, rejected_r = dpo_loss(pol[:n], pol[n:], ref[:n], ref[n:], beta)
    loss = losses.mean()
    metrics = {"dpo_loss": loss.item()}
    if aux is not None:
        loss = loss + aux_loss_coef * aux
        metrics["aux_loss"] = aux.item()
    margins = (chosen_r - rejected_r).tolist()
    metrics.update({
        "loss": loss.item(),
        "reward": sum(margins) / n,  # the implicit reward margin of chosen over rejected
        "accuracy": sum(m > 0 for m in margins) / n,
        "chosen_reward": chosen_r.mean().item(), "rejected_reward": rejected_r.mean().item(),
        "reward_per_language": by_language(margins, [p.language for p in pairs]),
    })
    return loss, metrics
