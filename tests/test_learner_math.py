"""The learner's math without DeepSpeed: losses against hand computation, the beta weight,
token-mean normalisation across simulated ranks and micro-batches, batching and sharding,
schedules and config errors."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.batch import (PolicyBatch, PolicySample, SftSample, build_policy_batch, collate, micro_batch_advantages,
                           micro_batches, plan_micro_batches, shard, shard_indices)
from learner.config import LearnerConfig, LearnerConfigError, OptimConfig
from learner.forward import forward_logits
from learner.optim import lr_lambda
from learner.losses import k3_kl, policy_loss, sft_loss, token_logprobs
from personadual.advantage import batch_advantages
from personadual.evaluation import EVAL_SETTINGS
from personadual.modes import Mode
from personadual.records import Scored
from tests.helpers import make_prompt, make_scored


# ---- token log-probs against torch's cross-entropy -------------------------------------------
def test_token_logprobs_and_their_gradient_equal_torchs_cross_entropy():
    """The CPU path (log_softmax) against torch's own cross-entropy, values and gradients, with
    logits large enough that an unstabilised softmax would overflow."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 97, generator=generator) * 30).requires_grad_()
    targets = torch.randint(0, 97, (3, 5), generator=generator)
    weights = torch.rand(3, 5, generator=generator)
    ours = token_logprobs(logits, targets)
    (ours * weights).sum().backward()
    ours_grad, logits.grad = logits.grad, None
    theirs = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    (theirs * weights).sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours_grad, logits.grad, rtol=1e-6, atol=1e-6)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()


# ---- the DualGRPO loss by hand --------------------------------------------------------------
def test_policy_loss_equals_hand_computation():
    logp = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]]
    old = [[-1.1, -1.5, -0.5], [-0.3, -1.0, -9.0]]
    ref = [[-0.9, -2.5, -0.7], [-0.2, -1.1, -1.0]]
    adv = [[2.0, 1.0, 1.0], [-1.0, -0.5, 0.0]]
    mask = [[1, 1, 1], [1, 1, 0]]  # the last token of row 2 is padding
    clip, kl_coef, denominator = 0.2, 0.04, 7.0  # the step holds 7 tokens; this piece holds 5

    expected = 0.0
    for r in range(2):
        for t in range(3):
            if not mask[r][t]:
                continue
            ratio = math.exp(logp[r][t] - old[r][t])
            clipped_ratio = min(max(ratio, 1 - clip), 1 + clip)
            surrogate = min(ratio * adv[r][t], clipped_ratio * adv[r][t])
            kl = math.exp(ref[r][t] - logp[r][t]) - (ref[r][t] - logp[r][t]) - 1
            expected += -surrogate + kl_coef * kl
    expected /= denominator

    parts = policy_loss(torch.tensor(logp), torch.tensor(old), torch.tensor(ref), torch.tensor(adv),
                        torch.tensor(mask, dtype=torch.float32), clip_range=clip, kl_coef=kl_coef,
                        denominator=denominator)
    assert float(parts.loss) == pytest.approx(expected, rel=1e-6)
    # ratios: e^0.1 (in range), e^-0.5 (below 1-0.2 with A>0: unclipped wins, not counted),
    # e^0 (1), e^0 (1), e^-0.2 (A<0: 0.8187 inside range) -> no token takes the clipped branch.
    assert float(parts.clipped_sum) == 0.0
    assert float(parts.kl_sum) == pytest.approx(sum(
        math.exp(ref[r][t] - logp[r][t]) - (ref[r][t] - logp[r][t]) - 1
        for r in range(2) for t in range(3) if mask[r][t]), rel=1e-6)


def test_clipped_branch_is_counted_and_stops_the_gradient():
    logp = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratio e^0.5 and e^-0.5 vs old 0
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])  # A>0 with ratio above 1+eps; A<0 with ratio below 1-eps
    parts = policy_loss(logp, old, None, adv, torch.ones(1, 2), clip_range=0.2, kl_coef=0.0, denominator=2)
    parts.loss.backward()
    assert float(parts.clipped_sum) == 2.0
    assert torch.equal(logp.grad, torch.zeros(1, 2))


def test_k3_kl_is_zero_at_equality_and_positive_elsewhere():
    a = torch.tensor([-1.0, -2.0, -0.1])
    assert torch.equal(k3_kl(a, a), torch.zeros(3))
    assert bool((k3_kl(a, a + torch.tensor([0.3, -0.7, 0.01])) > 0).all())


# ---- beta -----------------------------------------------------------------------------------
def _policy_samples() -> list[PolicySample]:
    return [PolicySample([5, 6, 7], [100, 11, 12, 13], 0.7, int(Mode.GENERAL), 1.0),
            PolicySample([5, 6], [101, 14, 15], -0.4, int(Mode.PERSONALIZED), 0.0),
            PolicySample([5, 6, 7, 8], [16, 17], 0.3, -1, 0.5)]  # free mode: no mode token


def _grad_wrt_logprobs(beta: float, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    samples = _policy_samples()
    batch = collate(samples, [0, 1, 2])
    adv = micro_batch_advantages(samples, batch, prefix_tokens=1, beta=beta)
    torch.manual_seed(0)
    base = -torch.rand(batch.targets.shape) * 3
    logp = base.clone().requires_grad_(True)
    ref = base - 0.3 * torch.rand(batch.targets.shape)
    parts = policy_loss(logp, logp.detach(), ref, adv, batch.response_mask, clip_range=0.2, kl_coef=kl_coef,
                        denominator=9)
    parts.loss.backward()
    first = batch.response_mask.argmax(dim=1)
    mode_positions = torch.zeros_like(batch.response_mask, dtype=torch.bool)
    mode_positions[0, first[0]] = mode_positions[1, first[1]] = True  # rows 0 and 1 have a mode token
    return logp.grad, mode_positions


def test_beta_scales_the_mode_tokens_gradient_and_nothing_else():
    g1, mode_positions = _grad_wrt_logprobs(beta=1.0, kl_coef=0.0)
    g3, _ = _grad_wrt_logprobs(beta=3.0, kl_coef=0.0)
    torch.testing.assert_close(g3[mode_positions], 3 * g1[mode_positions])
    assert bool((g1[mode_positions] != 0).all())
    assert torch.equal(g3[~mode_positions], g1[~mode_positions])
    # With the KL penalty on, beta still changes the mode tokens' gradient only.
    k1, _ = _grad_wrt_logprobs(beta=1.0, kl_coef=0.04)
    k3, _ = _grad_wrt_logprobs(beta=3.0, kl_coef=0.04)
    assert torch.equal(k3[~mode_positions], k1[~mode_positions])
    torch.testing.assert_close(k3[mode_positions] - k1[mode_positions], 2 * g1[mode_positions])


# ---- losses through the tiny model: hand reference and simulated ranks -----------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def _random_samples(seed: int, count: int, vocab: int) -> list[PolicySample]:
    rng = random.Random(seed)
    return [PolicySample([rng.randrange(vocab) for _ in range(rng.randint(2, 12))],
                         [rng.randrange(vocab) for _ in range(rng.randint(1, 9))],
                         rng.uniform(-1, 1), rng.choice([-1, 0, 1]), rng.random()) for _ in range(count)]


def test_sft_loss_is_response_token_mean_nll(tiny_model):
    samples = [SftSample(s.prompt_token_ids, s.response_token_ids) for s in _random_samples(1, 5, 700)]
    total = sum(len(s.response_token_ids) for s in samples)
    loss = sum(sft_loss(token_logprobs(forward_logits(tiny_model, mb), mb.targets), mb.response_mask,
                        denominator=total) for mb in micro_batches(samples, 30))
    expected = 0.0
    for s in samples:  # one unpadded sequence at a time; prompt tokens never scored
        ids = torch.tensor([s.prompt_token_ids + s.response_token_ids])
        with torch.no_grad():
            logits = tiny_model(input_ids=ids).logits[0]
        logp = torch.log_softmax(logits, -1)
        for offset, token in enumerate(s.response_token_ids):
            expected -= float(logp[len(s.prompt_token_ids) - 1 + offset, token])
    assert float(loss.detach()) == pytest.approx(expected / total, rel=1e-5)


def _loss_over(model, reference, samples, micro_batch_tokens: int, denominator: int) -> torch.Tensor:
    total = torch.zeros(())
    for mb in micro_batches(samples, micro_batch_tokens):
        logp = token_logprobs(forward_logits(model, mb), mb.targets)
        with torch.no_grad():
            ref = token_logprobs(forward_logits(reference, mb), mb.targets)
        adv = micro_batch_advantages(samples, mb, prefix_tokens=1, beta=2.0)
        total = total + policy_loss(logp, logp.detach(), ref, adv, mb.response_mask, clip_range=0.2,
                                    kl_coef=0.04, denominator=denominator).loss
    return total


@pytest.mark.parametrize("world_size,micro_batch_tokens", [(2, 24), (3, 40), (4, 10_000)])
def test_token_mean_loss_does_not_change_with_sharding(tiny_model, world_size, micro_batch_tokens):
    """Each simulated rank sums its micro-batches' losses over the step's global token count;
    the ranks' gradients then add up to the whole batch's (the engine scales each rank's
    loss by the world size because DeepSpeed averages gradients over ranks)."""
    model = tiny_model
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = PolicyBatch(_random_samples(7, 9, 700))
    denominator = batch.response_tokens

    model.zero_grad()
    whole = _loss_over(model, reference, batch.samples, 10_000, denominator)
    whole.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    pieces = 0.0
    for rank in range(world_size):
        part = shard(batch, rank, world_size)
        if part.samples:
            loss = _loss_over(model, reference, part.samples, micro_batch_tokens, denominator)
            loss.backward()  # gradients accumulate over ranks, as their all-reduced sum
            pieces += float(loss.detach())
    assert pieces == pytest.approx(float(whole.detach()), rel=1e-5, abs=1e-7)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-7, msg=name)


# ---- batching and sharding ------------------------------------------------------------------
def _scored(prompt_id: str, mode: Mode | None, reward: float | None, length: int = 3) -> Scored:
    return make_scored(prompt_id, mode, reward, response_token_ids=[7] * length)


def test_policy_batch_groups_by_prompt_id_and_leaves_dropped_samples_out():
    items = [_scored("a", Mode.GENERAL, 1.0), _scored("a", Mode.GENERAL, 0.0), _scored("a", Mode.PERSONALIZED, 1.0),
             _scored("b", Mode.GENERAL, 0.0), _scored("b", Mode.PERSONALIZED, 0.5), _scored("b", None, 1.0),
             _scored("a", Mode.PERSONALIZED, None)]
    batch = build_policy_batch(items)
    assert len(batch) == 6 and batch.stats["dropped"] == 1
    expected = batch_advantages("dual", torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 1.0]), torch.tensor([0, 0, 1, 0, 1, -1]),
                                torch.tensor([0, 0, 0, 1, 1, 1]))
    assert [s.advantage for s in batch.samples] == pytest.approx(expected.tolist())
    assert [s.mode for s in batch.samples] == [0, 0, 1, 0, 1, -1]
    assert batch.stats["reward/general"] == pytest.approx(1 / 3)
    assert batch.stats["reward/personalized"] == pytest.approx(0.75)
    # Reordering the scored list (e.g. for load balance) does not change any advantage.
    order = [4, 0, 5, 2, 1, 3]
    shuffled = build_policy_batch([items[i] for i in order])
    assert [s.advantage for s in shuffled.samples] == pytest.approx([expected[i].item() for i in order])
    with pytest.raises(ValueError, match="dropped"):
        build_policy_batch([items[-1]])


def test_policy_samples_carry_their_prompts_persona_setting_for_the_per_setting_mode_metrics():
    prompts = [make_prompt("n"), make_prompt("u", setting="unaligned", persona="p"),
               make_prompt("a", setting="aligned", persona="p"),
               make_prompt("q", setting="aligned", task_type="personalized", persona="p")]
    batch = build_policy_batch([make_scored(p, Mode.GENERAL, 1.0) for p in prompts])
    assert [EVAL_SETTINGS[s.setting] for s in batch.samples] == ["no_persona", "unaligned", "aligned", "personalized"]


def test_shards_partition_the_batch_balanced_by_tokens():
    lengths = [random.Random(3).randint(1, 50) for _ in range(23)]
    plan = shard_indices(lengths, 4)
    assert sorted(i for part in plan for i in part) == list(range(23))
    loads = [sum(lengths[i] for i in part) for part in plan]
    assert max(loads) - min(loads) <= max(lengths)
    assert shard_indices(lengths, 4) == plan
    samples = [SftSample([1] * n, [2]) for n in lengths]
    assert sum(len(shard(samples, r, 4)) for r in range(4)) == 23


def test_micro_batches_fit_the_token_budget():
    lengths = [3, 17, 8, 8, 40, 2, 11, 5]
    groups = plan_micro_batches(lengths, 24)
    assert sorted(i for g in groups for i in g) == list(range(8))
    for group in groups:
        assert len(group) * max(lengths[i] for i in group) <= 24 or len(group) == 1


def test_collate_marks_response_tokens_in_the_kept_logits_frame():
    samples = [SftSample([1, 2, 3], [4, 5]), SftSample([6, 7], [8, 9, 10])]
    mb = collate(samples, [0, 1], pad_token_id=0)
    # Position 1 (the shorter prompt's last token) is the first whose logits are needed;
    # the last position predicts nothing.
    assert mb.start == 1 and mb.logits_to_keep == 4
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert mb.targets.tolist() == [[3, 4, 5], [8, 9, 10]]
    assert mb.response_mask.tolist() == [[0, 1, 1], [1, 1, 1]]


# ---- schedule and config --------------------------------------------------------------------
def test_schedules_warm_up_then_decay():
    cosine = lr_lambda(OptimConfig(schedule="cosine", warmup_ratio=0.2, total_steps=10))
    assert [cosine(s) for s in range(2)] == pytest.approx([1 / 3, 2 / 3])
    assert cosine(2) == pytest.approx(1.0)
    assert cosine(6) == pytest.approx(0.5)
    assert cosine(10) == pytest.approx(0.0, abs=1e-12)
    linear = lr_lambda(OptimConfig(schedule="linear", total_steps=4))
    assert [linear(s) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_lambda(OptimConfig(schedule="constant", total_steps=4))(3) == 1.0


@pytest.mark.parametrize("overrides,key", [
    ({"zero_stage": 4}, "learner.zero_stage"),
    ({"precision": "fp16"}, "learner.precision"),
    ({"num_cpus_per_rank": 0.0}, "learner.num_cpus_per_rank"),
    ({"optim": OptimConfig(schedule="step")}, "learner.optim.schedule"),
    ({"sft_optim": OptimConfig(warmup_ratio=1.0)}, "learner.sft_optim.warmup_ratio"),
])
def test_bad_config_names_its_key(overrides, key):
    with pytest.raises(LearnerConfigError, match=f"^{key}: "):
        LearnerConfig(**overrides)
