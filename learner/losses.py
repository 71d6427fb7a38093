"""The learner's losses as pure functions of per-token tensors.

Every loss is a SUM over masked tokens divided by ``denominator``: the response-token count
of the whole optimizer step, across ranks and accumulation steps (docs/ARCHITECTURE.md, "Loss and weight-sync rules").
Summing the losses of any split of a batch then gives the loss of the whole batch, so the
gradient does not depend on how the batch is sharded or micro-batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# exp() of a log-ratio beyond this overflows float32 long before it means anything.
MAX_LOG_RATIO = 20.0


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) per position, in float32, without materialising a log-softmax."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution per position (a metric: no gradient)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: r - log r - 1 with
    r = p_ref / p_policy; unbiased, always >= 0."""
    log_ratio = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return log_ratio.exp() - log_ratio - 1


@dataclass
class PolicyLossParts:
    loss: Tensor  # scalar: sum of per-token losses / denominator (differentiable)
    # Masked token SUMS (detached), for metrics reduced across micro-batches and ranks.
    pg_sum: Tensor
    kl_sum: Tensor
    clipped_sum: Tensor
    ratio_sum: Tensor


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None, advantages: Tensor,
                mask: Tensor, *, clip_range: float, kl_coef: float, denominator: float) -> PolicyLossParts:
    """The clipped importance-ratio objective plus the k3 KL penalty, token-mean aggregated.

    All tensors are (B, K); ``advantages`` are per token (the mode token's already times beta).
    """
    log_ratio = (logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    pg = torch.maximum(unclipped, clipped)
    per_token = pg
    kl = torch.zeros_like(pg)
    if ref_logprobs is not None and kl_coef > 0:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = pg + kl_coef * kl
    loss = (per_token * mask).sum() / denominator
    return PolicyLossParts(
        loss=loss,
        pg_sum=(pg * mask).sum().detach(),
        kl_sum=(kl * mask).sum().detach(),
        clipped_sum=((clipped > unclipped).float() * mask).sum().detach(),
        ratio_sum=(ratio * mask).sum().detach(),
    )


def sft_loss(logprobs: Tensor, mask: Tensor, *, denominator: float) -> Tensor:
    """Next-token negative log-likelihood over response tokens (prompt masked)."""
    return -(logprobs * mask).sum() / denominator
