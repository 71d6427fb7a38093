"""Rollout correction and the engine/learner log-prob mismatch (learner/losses.py, learner/batch.py):
the importance weights are capped as configured, the forced mode token never enters a ratio,
and the mismatch is measured per mode over sampled tokens only."""

from __future__ import annotations

import math

import pytest
import torch

from learner.batch import PolicySample, collate
from learner.losses import logprob_mismatch, policy_loss, rollout_correction_weights


def _sample(response: list[int], engine: list[float], *, forced: bool, mode: int = 0) -> PolicySample:
    return PolicySample([5, 6, 7], response, advantage=1.0, mode=mode, reward=1.0, engine_logprobs=engine,
                        forced=forced)


def test_tis_caps_each_sampled_tokens_weight_and_leaves_the_forced_token_at_one():
    learner = torch.tensor([[-0.1, math.log(0.9), math.log(0.5), math.log(0.2)]])
    engine = torch.tensor([[-9.0, math.log(0.3), math.log(0.5), math.log(0.4)]])  # first: the forced token
    sampled = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    weights = rollout_correction_weights(learner, engine, sampled, kind="tis", cap=2.0)
    assert weights[0, 0] == 1.0  # exp(-0.1 + 9) would be ~7000: the forced token is not a sample
    assert weights[0, 1] == pytest.approx(2.0)  # 0.9 / 0.3 = 3, capped
    assert weights[0, 2] == pytest.approx(1.0)
    assert weights[0, 3] == pytest.approx(0.5)  # below 1: kept as is (truncation caps from above only)
    assert float(weights.max()) <= 2.0 + 1e-6
    with torch.no_grad():
        uncapped = rollout_correction_weights(learner, engine, sampled, kind="tis", cap=10.0)
    assert uncapped[0, 1] == pytest.approx(3.0, rel=1e-5)


def test_mask_drops_tokens_whose_ratio_leaves_the_band_and_none_changes_nothing():
    learner = torch.log(torch.tensor([[0.9, 0.9, 0.5, 0.1]]))
    engine = torch.log(torch.tensor([[0.01, 0.3, 0.5, 0.4]]))
    sampled = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert rollout_correction_weights(learner, engine, sampled, kind="mask", cap=2.0).tolist() == [[1, 0, 1, 0]]
    assert rollout_correction_weights(learner, engine, sampled, kind="none", cap=2.0).tolist() == [[1, 1, 1, 1]]
    with pytest.raises(ValueError, match="rollout correction"):
        rollout_correction_weights(learner, engine, sampled, kind="clip", cap=2.0)


def test_corrected_loss_weighs_each_tokens_policy_gradient_and_not_its_kl():
    logprobs = torch.log(torch.tensor([[0.5, 0.4, 0.3]])).requires_grad_()
    reference = torch.log(torch.tensor([[0.4, 0.4, 0.4]]))
    advantages = torch.tensor([[2.0, 1.0, 1.0]])
    mask = torch.ones(1, 3)
    correction = torch.tensor([[1.0, 2.0, 0.0]])
    kwargs = dict(clip_range=0.2, kl_coef=0.5, denominator=3.0)
    plain = policy_loss(logprobs, logprobs.detach(), reference, advantages, mask, **kwargs)
    corrected = policy_loss(logprobs, logprobs.detach(), reference, advantages, mask, correction=correction,
                            **kwargs)
    # ratio 1: pg = -A per token; KL unchanged by the correction.
    assert float(plain.pg_sum) == pytest.approx(-4.0)
    assert float(corrected.pg_sum) == pytest.approx(-(2.0 * 1 + 1.0 * 2 + 1.0 * 0))
    assert float(corrected.kl_sum) == pytest.approx(float(plain.kl_sum))
    (grad_plain,) = torch.autograd.grad(plain.loss, logprobs)
    (grad_corrected,) = torch.autograd.grad(corrected.loss, logprobs)
    kl_grad = grad_plain + advantages / 3.0  # what is left of the plain gradient without the pg term
    assert torch.allclose(grad_corrected, -advantages * correction / 3.0 + kl_grad, atol=1e-6)


def test_collate_marks_only_sampled_tokens_and_carries_the_engines_logprobs():
    forced = _sample([100, 11, 12], [0.0, -0.5, -0.25], forced=True)
    free = _sample([101, 13], [-0.1, -0.2], forced=False, mode=1)
    unknown = PolicySample([5, 6], [102, 14], advantage=0.0, mode=0, reward=0.0)
    batch = collate([forced, free, unknown], [0, 1, 2])
    # Column j is the token at position start + 1 + j; start = shortest prompt - 1 = 1.
    assert batch.targets[0].tolist()[:4] == [7, 100, 11, 12]
    assert batch.sampled_mask[0].tolist()[:4] == [0, 0, 1, 1]  # prompt, forced mode token, sampled, sampled
    assert batch.engine_logprobs[0].tolist()[2:4] == [-0.5, -0.25]
    assert batch.sampled_mask[1].tolist()[:3] == [0, 1, 1]  # a free mode token was sampled: it counts
    assert batch.sampled_mask[2].sum() == 0 and batch.response_mask[2].sum() == 2  # no engine log-probs
    with pytest.raises(ValueError, match="engine_logprobs"):
        _sample([100, 11], [0.0], forced=True)


def test_mismatch_is_measured_per_mode_over_sampled_tokens_only():
    learner = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    engine = torch.tensor([[-7.0, -1.5, -1.0], [-2.0, -2.05, -4.0], [-1.0, -1.2, -1.0]])
    sampled = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0 forced; row 1 pad
    found = logprob_mismatch(learner, engine, sampled, torch.tensor([0, 1, -1]), threshold=0.1)
    assert found.count.tolist() == [2, 2, 3]
    assert found.abs_sum.tolist() == pytest.approx([0.5, 0.05, 0.2])
    assert found.max.tolist() == pytest.approx([0.5, 0.05, 0.2])
    assert found.over.tolist() == [1, 0, 1]


def test_correction_is_off_for_on_policy_runs_and_tis_with_a_one_update_lag_unless_chosen():
    from actors.config import ConfigError, load_config

    def correction_of(*overrides: str) -> str:
        return load_config(None, list(overrides)).algo.rollout_correction

    def resolved(*overrides: str) -> str:
        from actors.config import section

        return section(load_config(None, list(overrides)), "algo").correction

    assert correction_of() is None  # null: chosen by the staleness the run allows
    assert resolved("cluster.schedule=serial") == "none"
    assert resolved("cluster.schedule=pipelined") == "tis"  # rollouts one update old
    assert resolved("cluster.schedule=pipelined", "algo.rollout_correction=none") == "none"
    chosen = load_config(None, ["algo.rollout_correction=mask", "algo.rollout_correction_cap=3"]).algo
    assert (chosen.rollout_correction, chosen.rollout_correction_cap) == ("mask", 3.0)
    with pytest.raises(ConfigError, match=r"^algo.rollout_correction: expected one of"):
        load_config(None, ["algo.rollout_correction=clip"])
    with pytest.raises(ConfigError, match=r"^algo.rollout_correction_cap: must be > 1"):
        load_config(None, ["algo.rollout_correction_cap=1"])
    with pytest.raises(ConfigError, match=r"rollout.generate_timeout_s: must be > 0"):
        load_config(None, ["rollout.generate_timeout_s=0"])
