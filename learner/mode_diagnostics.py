"""How much of an RL step's push lands on the mode token: a diagnostic of the mode choice.

Under token-mean aggregation every response token's loss is divided by the same token count,
so the mode token is one term among a response's tokens. What it receives is read at the
logits, where each token's gradient has a closed form (at the first pass, where the
importance ratio is 1 and nothing is clipped):

    dL_t/dz_t = c_t (e_y - p_t) / N,   c_t = -A_t + kl_coef (1 - p_ref(y) / p(y)),

A_t the token's advantage (beta times the sequence's on the mode token), the second term
the k3 KL penalty's, N the step's token count. So ||dL_t/dz_t|| = |c_t| ||e_y - p_t|| / N:
a confident token (p(y) near 1) receives almost nothing whatever its advantage.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The sums one micro-batch contributes (float64), in this order; summed over micro-batches
# and ranks, then turned into metrics by ``mode_token_metrics``.
TERMS = ("grad_mode", "grad_all", "kl_mode", "kl_all", "kl_pull_mode", "advantage_mode", "rows", "tokens")


@torch.no_grad()
def mode_token_terms(logits: Tensor, logprobs: Tensor, ref_logprobs: Tensor | None, advantages: Tensor,
                     mask: Tensor, *, kl_coef: float) -> Tensor:
    """(len(TERMS),) sums over a micro-batch's response tokens of (B, K) tensors: the logit
    gradient norm |c_t| ||e_y - p_t|| at the mode token (each row's first response token) and
    at every token; the k3 KL at the mode token and at every token; |kl_coef (1 - r)| and |A|
    at the mode token (the KL's pull against the advantage's push); rows and tokens counted."""
    mask = mask.float()
    probs = torch.softmax(logits.float(), dim=-1)
    p_target = logprobs.float().exp()
    # ||e_y - p||^2 = 1 - 2 p(y) + sum p^2
    distance = (1.0 - 2.0 * p_target + (probs * probs).sum(-1)).clamp(min=0.0).sqrt()
    if ref_logprobs is not None and kl_coef > 0:
        log_ratio = (ref_logprobs.float() - logprobs.float()).clamp(-20.0, 20.0)
        kl = log_ratio.exp() - log_ratio - 1.0
        kl_pull = kl_coef * (1.0 - log_ratio.exp())
    else:
        kl = kl_pull = torch.zeros_like(p_target)
    grad = (kl_pull - advantages.float()).abs() * distance
    has_response = mask.sum(1) > 0
    first = torch.zeros_like(mask)
    first[torch.arange(mask.shape[0], device=mask.device), mask.argmax(dim=1)] = 1.0
    first = first * has_response.unsqueeze(1).float()
    values = [(grad * first).sum(), (grad * mask).sum(), (kl * first).sum(), (kl * mask).sum(),
              (kl_pull.abs() * first).sum(), (advantages.float().abs() * first).sum(), first.sum(), mask.sum()]
    return torch.stack([v.double() for v in values])


def mode_token_metrics(sums: list[float]) -> dict[str, float]:
    """``learner/mode_token/*`` from the summed terms: the mode token's share of the logit
    gradient, its KL beside the other tokens', and the KL's pull relative to the advantage."""
    terms = dict(zip(TERMS, sums))
    rows, tokens = terms["rows"], terms["tokens"]
    if not rows:
        return {}
    others = tokens - rows
    return {
        "mode_token/grad_share": terms["grad_mode"] / terms["grad_all"] if terms["grad_all"] else 0.0,
        "mode_token/token_share": rows / tokens,
        "mode_token/kl": terms["kl_mode"] / rows,
        "mode_token/kl_other_tokens": (terms["kl_all"] - terms["kl_mode"]) / others if others else 0.0,
        "mode_token/kl_pull_over_advantage": (terms["kl_pull_mode"] / terms["advantage_mode"]
                                              if terms["advantage_mode"] else 0.0),
    }
