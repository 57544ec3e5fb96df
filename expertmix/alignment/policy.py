"""The policy being aligned and its frozen reference: loading, sampling, log-probabilities, KL, saving.

Works on any causal LM folder that ``AutoModelForCausalLM`` loads, including the Nexus mix: a model whose
output carries ``aux_loss`` (or only ``router_logits``) has that router loss returned beside the log-probs,
so DPO and RLOO add it to the policy loss.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ..checkpoints import require_model_weights
from ..errors import ExpertmixError
from ..experts.training import _saved_dtype
from .rewards import RewardFn, score

# Not carried over: weights (``save_pretrained`` writes new ones) and the model card, which describes the
# input. Everything else in the input folder (``mix.json``, domain embeddings, remote code) is.
_NOT_CARRIED = re.compile(
    r"^(model.*\.safetensors|pytorch_model.*\.bin|.*\.index\.json|adapter_model.*|README\.md)$")
# Router parameters of transformers MoE classes (``mlp.gate``, ``shared_expert_gate``) and of the Nexus mix
# (``router``); ``gate_proj``/``gate_up_proj`` are expert weights and do not match.
ROUTER_PARAM = re.compile(r"(^|\.)(router|gate|shared_expert_gate)(\.|$)")


def load_policy(path: str | Path, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from a model or mix folder, in float32 for training."""
    path = Path(path)
    require_model_weights(path, "sampling or aligning a policy")
    # registers the Nexus mix and the quantized-checkpoint format with transformers' Auto classes
    from ..assembler import quantization  # noqa: F401
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    # Sampled and scored log-probs must come from one distribution: no dropout. (TRL's
    # disable_dropout_in_model is this loop, but importing it loads TRL's whole trainer stack.)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, tokenizer


def load_reference(path: str | Path, device: str | torch.device = "cpu"):
    """A second, frozen copy of the model at ``path``: the KL anchor that never changes during alignment."""
    model, _ = load_policy(path, device)
    model.requires_grad_(False)
    return model


def router_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The router's parameters: the model's own ``router_parameters()`` when it has one, else by name."""
    if hasattr(model, "router_parameters"):
        return list(model.router_parameters())
    return [(n, p) for n, p in model.named_parameters() if ROUTER_PARAM.search(n)]


def freeze_router(model: torch.nn.Module) -> int:
    """Stop the router from training; returns how many parameters were frozen."""
    params = router_parameters(model)
    if not params:
        raise ExpertmixError(f"--freeze-router: {type(model).__name__} has no router parameters "
                             f"(no parameter named router/gate); it is not a mixture of experts")
    for _, p in params:
        p.requires_grad_(False)
    return sum(p.numel() for _, p in params)


def save_aligned(model, tokenizer, source: str | Path, out: str | Path) -> None:
    """Save like the input (class, dtype, tokenizer) and carry over ``mix.json`` and other side files.

    The in-memory model stays float32 but rounded to the saved dtype, so it is exactly what was saved.
    """
    source, out = Path(source), Path(out)
    dtype = _saved_dtype(source)
    model.to(dtype).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    for f in source.iterdir():
        if f.is_file() and not (out / f.name).exists() and not _NOT_CARRIED.match(f.name):
            shutil.copy2(f, out / f.name)


@dataclass
class Samples:
    """Sampled completions: row ``i`` answers prompt ``prompt_index[i]``; ids exclude padding."""

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]

    def repeat(self, values: Sequence) -> list:
        """Per-prompt ``values`` laid out per sample."""
        return [values[i] for i in self.prompt_index]


def score_samples(reward: RewardFn, prompts: Sequence[str], columns: dict[str, list],
                  samples: Samples) -> tuple[list[float], dict[str, list]]:
    """Score every sample against its prompt; returns the rewards and the columns laid out per sample."""
    per_sample = {key: samples.repeat(col) for key, col in columns.items()}
    return score(reward, samples.repeat(prompts), samples.texts, per_sample), per_sample


def encode_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int = 512) -> list[list[int]]:
    """Token ids of each prompt (with the tokenizer's special tokens), its last ``max_prompt_tokens``."""
    out = []
    for i, p in enumerate(prompts):
        ids = tokenizer(p)["input_ids"][-max_prompt_tokens:]
        if not ids:
            raise ExpertmixError(f"prompt {i} is empty after tokenization: {p!r}")
        out.append(ids)
    return out


def _pad(rows: Sequence[Sequence[int]], value: int, side: str) -> torch.Tensor:
    tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value, padding_side=side)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], k: int, max_new_tokens: int = 32,
                       temperature: float = 1.0, batch_size: int = 32,
                       max_prompt_tokens: int = 512) -> Samples:
    """Sample ``k`` completions per prompt with ``generate`` (pure sampling: no top-k/top-p truncation)."""
    if k < 1:
        raise ExpertmixError(f"k must be at least 1, got {k}")
    eos = tokenizer.eos_token_id
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                           max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=eos, use_cache=getattr(model.config, "use_cache", True))
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens)
    rows = [(i, ids) for i, ids in enumerate(encoded) for _ in range(k)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = Samples([], [], [], [])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids = _pad([r for _, r in chunk], tokenizer.pad_token_id, "left").to(device)
        mask = _pad([[1] * len(r) for _, r in chunk], 0, "left").to(device)
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, ids.size(1):]
        for (i, p_ids), g in zip(chunk, generated.tolist(), strict=True):
            if eos is not None and eos in g:
                g = g[:g.index(eos) + 1]  # keep the EOS: stopping is part of the action
            elif tokenizer.pad_token_id in g:
                g = g[:g.index(tokenizer.pad_token_id)]
            out.prompt_index.append(i)
            out.prompt_ids.append(p_ids)
            out.completion_ids.append(g)
            out.texts.append(tokenizer.decode(g, skip_special_tokens=True))
    model.train(was_training)
    return out


def pack_sequences(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int):
    """Right-padded ``prompt + completion`` rows: ``input_ids``, ``attention_mask`` and ``completion_mask``.

    ``completion_mask[b, t]`` is 1 where token ``t + 1`` is a completion token, i.e. it masks the next-token
    log-probabilities ``[B, L-1]``.
    """
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    input_ids = _pad(seqs, pad_id, "right")
    attention_mask = _pad([[1] * len(s) for s in seqs], 0, "right")
    completion_mask = torch.zeros(input_ids.size(0), input_ids.size(1) - 1)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        completion_mask[b, len(p) - 1:len(p) - 1 + len(c)] = 1.0
    return input_ids, attention_mask, completion_mask


def router_aux_loss(model, outputs, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The model's load-balancing loss: its own ``aux_loss``, else Switch-style from ``router_logits``."""
    aux = getattr(outputs, "aux_loss", None)
    if aux is not None:
        return aux
    router_logits = getattr(outputs, "router_logits", None)
    if not router_logits:
        return None
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(router_logits, router_logits[0].size(-1),
                                    getattr(model.config, "num_experts_per_tok", 1), attention_mask)


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probabilities of the completion tokens ``[B, L-1]`` (0 elsewhere) and the router loss.

    The model's own forward runs (not a replacement head), so whatever router loss it computes is returned.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    completion_mask = completion_mask.to(device)
    kwargs = {"output_router_logits": True} if hasattr(model.config, "output_router_logits") else {}
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    logits = outputs.logits[:, :-1].float() / temperature
    targets = input_ids[:, 1:].unsqueeze(-1)
    # gather - logsumexp: the log-softmax of the chosen tokens without a second [B, L, V] tensor
    logps = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logps * completion_mask, router_aux_loss(model, outputs, attention_mask)


def sequence_kl(policy_token_logps: torch.Tensor, ref_token_logps: torch.Tensor,
                completion_mask: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-sequence estimate of KL(pi || pi_ref) over the completion (y ~ pi), summed over its tokens.

    ``k1``: ``log pi(y_t) - log pi_ref(y_t)``, the log ratio RLOO puts in the reward (unbiased, but one sample can
    be negative). ``k3``: ``exp(-d) - 1 + d`` with ``d`` that log ratio: unbiased too and never negative, so a
    measured KL reads as one (what the held-out evaluation reports).
    """
    d = policy_token_logps - ref_token_logps
    if estimator == "k3":
        d = torch.expm1(-d) + d
    elif estimator != "k1":
        raise ValueError(f"sequence_kl: estimator {estimator!r} is not k1 or k3")
    return (d * completion_mask).sum(-1)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def by_language(values: Sequence[float], languages: Sequence[str | None]) -> dict[str, float]:
    """Mean of ``values`` per language (rows without a language count as ``unknown``)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for v, lang in zip(values, languages, strict=True):
        groups[lang or "unknown"].append(v)
    return {lang: _mean(vs) for lang, vs in sorted(groups.items())}


@torch.no_grad()
def evaluate_policy(policy, reference, tokenizer, prompts: Sequence[str], columns: dict[str, list],
                    reward: RewardFn | None, samples_per_prompt: int = 4, max_new_tokens: int = 32,
                    temperature: float = 1.0, batch_size: int = 32, seed: int = 0) -> dict:
    """Mean reward and KL to the reference (the non-negative k3 estimate) of the policy's own samples, overall and
    per language.

    Without a reward only the KL is measured (``reward`` is then None).
    """
    torch.manual_seed(seed)
    s = sample_completions(policy, tokenizer, prompts, samples_per_prompt, max_new_tokens, temperature,
                           batch_size)
    rewards = score_samples(reward, prompts, columns, s)[0] if reward is not None else None
    kls: list[float] = []
    for start in range(0, len(s.texts), batch_size):
        sl = slice(start, start + batch_size)
        ids, mask, cmask = pack_sequences(s.prompt_ids[sl], s.completion_ids[sl], tokenizer.pad_token_id)
        pol, _ = token_logps(policy, ids, mask, cmask, temperature)
        ref, _ = token_logps(reference, ids, mask, cmask, temperature)
        kls.extend(sequence_kl(pol, ref, cmask.to(pol.device), estimator="k3").tolist())
    languages = s.repeat(columns["language"]) if "language" in columns else [None] * len(kls)
    per_kl = by_language(kls, languages)
    per_reward = by_language(rewards, languages) if rewards is not None else dict.fromkeys(per_kl)
    return {"reward": _mean(rewards) if rewards is not None else None, "kl": _mean(kls), "samples": len(kls),
            "per_language": {lang: {"reward": per_reward[lang], "kl": per_kl[lang]} for lang in per_kl}}
