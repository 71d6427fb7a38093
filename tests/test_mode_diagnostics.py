"""The mode token's share of the logit gradient, checked against autograd on the learner's own
loss (learner/losses.py policy_loss), and its KL against k3_kl."""

from __future__ import annotations

import pytest
import torch

from learner.losses import k3_kl, policy_loss, token_logprobs
from learner.mode_diagnostics import TERMS, mode_token_metrics, mode_token_terms


def _batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    rows, length, vocab = 5, 7, 11
    logits = (torch.randn(rows, length, vocab, generator=generator) * 2).requires_grad_(True)
    targets = torch.randint(vocab, (rows, length), generator=generator)
    mask = torch.zeros(rows, length)
    for row, (start, end) in enumerate([(2, 7), (1, 4), (3, 7), (0, 0), (4, 6)]):  # row 3: no response (padding)
        mask[row, start:end] = 1.0
    advantages = torch.randn(rows, 1, generator=generator).expand(rows, length).clone()
    advantages[torch.arange(rows), mask.argmax(1)] *= 2.0  # the mode token's advantage times beta
    reference = token_logprobs(logits.detach() + 0.3 * torch.randn(rows, length, vocab, generator=generator), targets)
    return logits, targets, mask, advantages, reference


@pytest.mark.parametrize("kl_coef", [0.0, 0.04, 1.0])
def test_gradient_norms_and_kl_match_autograd_on_the_policy_loss(kl_coef: float) -> None:
    for seed in range(3):
        logits, targets, mask, advantages, reference = _batch(seed)
        logprobs = token_logprobs(logits, targets)
        parts = policy_loss(logprobs, logprobs.detach(), reference, advantages, mask, clip_range=0.2,
                            kl_coef=kl_coef, denominator=1.0)
        parts.loss.backward()
        norms = logits.grad.norm(dim=-1)  # (B, K): each position's gradient at the logits
        first = mask.argmax(1)
        real = mask.sum(1) > 0
        terms = dict(zip(TERMS, mode_token_terms(logits.detach(), logprobs.detach(), reference, advantages, mask,
                                                  kl_coef=kl_coef).tolist()))
        expected_mode = norms[torch.arange(5), first][real].sum()
        assert terms["grad_mode"] == pytest.approx(float(expected_mode), rel=1e-4)
        assert terms["grad_all"] == pytest.approx(float((norms * mask).sum()), rel=1e-4)
        kl = k3_kl(logprobs.detach(), reference)
        assert terms["kl_all"] == pytest.approx(float((kl * mask).sum()) if kl_coef else 0.0, rel=1e-4, abs=1e-9)
        assert (terms["rows"], terms["tokens"]) == (4.0, float(mask.sum()))


def test_metrics_are_ratios_of_the_summed_terms_and_absent_without_rows() -> None:
    sums = dict(grad_mode=3.0, grad_all=12.0, kl_mode=0.2, kl_all=1.2, kl_pull_mode=0.5, advantage_mode=5.0,
                rows=4.0, tokens=24.0)
    metrics = mode_token_metrics([sums[name] for name in TERMS])
    assert metrics == pytest.approx({"mode_token/grad_share": 0.25, "mode_token/token_share": 4 / 24,
                                     "mode_token/kl": 0.05, "mode_token/kl_other_tokens": 0.05,
                                     "mode_token/kl_pull_over_advantage": 0.1})
    assert mode_token_metrics([0.0] * len(TERMS)) == {}
