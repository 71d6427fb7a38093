"""Two DeepSpeed ranks on gloo, as a LearnerGroup of Ray actors, against the same steps in
plain single-process torch: an SFT step, then two DualGRPO steps (the second with a
non-zero KL to the frozen post-SFT reference). Also a ZeRO-3 checkpoint round trip."""

from __future__ import annotations

import copy
import dataclasses
import math

import deepspeed  # noqa: F401  (a broken install fails here rather than skipping)
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors import cluster
from actors.learner_group import LearnerGroup
from learner.batch import SftSample
from learner.config import LearnerConfig, OptimConfig
from personadual.advantage import dual_grpo_advantages
from personadual.algo_config import AlgoConfig
from personadual.modes import Mode, mode_token_ids
from personadual.records import Scored
from tests.helpers import forced_batches

pytestmark = [pytest.mark.slow]

# The objective differs from AlgoConfig's defaults, so matching plain torch shows that every
# rank trains the algo it was handed.
SFT_LR, RL_LR, MAX_NORM, CLIP, KL_COEF, BETA = 3e-3, 2e-3, 1.0, 0.25, 0.05, 3.0
ALGO = AlgoConfig(clip_range=CLIP, kl_coef=KL_COEF, beta=BETA)
# Adam's first steps are nearly sign(gradient) * lr wherever |gradient| >> eps, so with the
# usual eps (1e-8) float round-off in a near-zero gradient component can move a weight by up
# to lr. An eps above round-off keeps the comparison about the learner's math, not that.
EPS = 1e-3


@pytest.fixture(scope="module")
def ray_cluster():
    cluster.connect(num_cpus=4)
    yield
    cluster.shutdown()


def _config(zero_stage: int) -> LearnerConfig:
    # Cosine over 2 steps without warm-up: the RL rate is lr, then lr / 2. Buckets of 64 KiB:
    # a ZeRO-3 gather of the full weights spans many buckets.
    return LearnerConfig(
        zero_stage=zero_stage, num_ranks=2, micro_batch_tokens=48, max_grad_norm=MAX_NORM, optim=OptimConfig(lr=RL_LR, eps=EPS, schedule="cosine", total_steps=2),
        sft_optim=OptimConfig(lr=SFT_LR, eps=EPS, schedule="constant", total_steps=1), collective_timeout_s=120,
        bucket_bytes=64 << 10)


def _full_weights(learner) -> dict[str, torch.Tensor]:
    """What a weight sync sends (a collective under ZeRO-3: every rank gathers), kept on rank 0."""
    gathered = dict(learner.full_weights(device="cpu"))
    return gathered if learner.rank == 0 else {}


def _rank0_weights(group: LearnerGroup) -> dict[str, torch.Tensor]:
    return group.call(_full_weights)[0]


def _data(tokenizer, seed: int) -> tuple[list[SftSample], list[list[Scored]]]:
    gen = torch.Generator().manual_seed(seed)
    ids = mode_token_ids(tokenizer)
    vocab = len(tokenizer)

    def tokens(low: int, high: int) -> list[int]:
        return torch.randint(10, vocab, (int(torch.randint(low, high, (1,), generator=gen)),), generator=gen).tolist()

    sft = [SftSample(tokens(3, 14), [ids[Mode(i % 2)]] + tokens(2, 9)) for i in range(7)]
    batches = forced_batches(prompt_ids=lambda group: tokens(4, 12),
                             response=lambda mode, sample: [ids[mode]] + tokens(2, 10),
                             reward=lambda group, sample: float(torch.randint(0, 3, (1,), generator=gen)) / 2)
    return sft, batches


def _response_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)


def _plain_torch_run(model_path, sft: list[SftSample], batches: list[list[Scored]]):
    """The same steps, written out directly: one sequence at a time, no padding, no DeepSpeed."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.train()
    losses = []

    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR, eps=EPS, weight_decay=0.0)
    total = sum(len(s.response_token_ids) for s in sft)
    loss = sum(-_response_logprobs(model, s.prompt_token_ids, s.response_token_ids).sum() for s in sft) / total
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()
    optimizer.zero_grad()
    losses.append(float(loss.detach()))

    reference = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=RL_LR, eps=EPS, weight_decay=0.0)
    for step, scored in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = RL_LR * 0.5 * (1 + math.cos(math.pi * step / 2))
        groups = {}
        rewards = torch.tensor([s.reward for s in scored])
        modes = torch.tensor([int(s.rollout.mode) for s in scored])
        group_ids = torch.tensor([groups.setdefault(s.rollout.group_id, len(groups)) for s in scored])
        advantages = dual_grpo_advantages(rewards, modes, group_ids)
        total = sum(len(s.rollout.response_token_ids) for s in scored)
        loss = 0.0
        for item, advantage in zip(scored, advantages):
            prompt, response = item.rollout.prompt_token_ids, item.rollout.response_token_ids
            logprobs = _response_logprobs(model, prompt, response)
            with torch.no_grad():
                ref = _response_logprobs(reference, prompt, response)
            weight = torch.ones(len(response))
            weight[0] = BETA
            token_adv = advantage * weight
            ratio = torch.exp(logprobs - logprobs.detach())
            pg = torch.maximum(-token_adv * ratio, -token_adv * ratio.clamp(1 - CLIP, 1 + CLIP))
            kl = torch.exp(ref - logprobs) - (ref - logprobs) - 1
            loss = loss + (pg + KL_COEF * kl).sum() / total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return model, losses


@pytest.fixture(scope="module")
def scenario(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sft, batches = _data(tokenizer, seed=4)
    model, losses = _plain_torch_run(tiny_model_dir, sft, batches)
    return sft, batches, model.state_dict(), losses


@pytest.mark.timeout(600)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_match_plain_torch(ray_cluster, tiny_model_dir, scenario, zero_stage, tmp_path):
    sft, batches, expected, expected_losses = scenario
    group = LearnerGroup(_config(zero_stage), tiny_model_dir, algo=ALGO)
    try:
        losses = [group.sft_step(sft)["loss"]]
        first = group.policy_step(batches[0])
        assert first["kl"] == pytest.approx(0.0, abs=1e-9)  # the reference is the post-SFT policy
        if zero_stage == 3:
            group.save_checkpoint(tmp_path / "ckpt", {"data_position": 7})
        second = group.policy_step(batches[1])
        assert second["kl"] > 0 and first["pg_loss"] != 0 and second["pg_loss"] != 0
        losses += [first["loss"], second["loss"]]
        assert group.weight_version == 3
        assert group.call(lambda learner: (learner.rank, learner.weight_version)) == [(0, 3), (1, 3)]
        assert group.call(lambda learner: learner.algo) == [ALGO, ALGO]
        assert losses == pytest.approx(expected_losses, rel=1e-5, abs=1e-8)

        exported = _rank0_weights(group)
        assert list(exported) == list(expected)  # every tensor, HF names, lm_head included
        for name, tensor in expected.items():
            torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)

        if zero_stage == 3:
            assert group.load_checkpoint(tmp_path / "ckpt") == {"data_position": 7}
            assert group.weight_version == 2
            again = group.policy_step(batches[1])
            assert again["loss"] == second["loss"] and again["kl"] == second["kl"]
            resumed = _rank0_weights(group)
            for name, tensor in exported.items():
                torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    finally:
        group.shutdown()
    assert ray.is_initialized()


@pytest.mark.timeout(600)
def test_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank(ray_cluster, tiny_model_dir, scenario):
    """Only rank 0's loss is NaN (the fault-injection knob, RL step 1): the ranks all-reduce
    the verdict, so both skip the update and keep identical, untouched weights; step 2 then
    trains on both. ZeRO-0, where no DeepSpeed check stands behind the learner's own (ZeRO-1-3
    all-reduce the gradient norm themselves: tests/test_learner_engine.py)."""
    _, batches, _, _ = scenario
    config = dataclasses.replace(_config(0), fault_nan_loss_at_rl_steps=[1])
    group = LearnerGroup(config, tiny_model_dir, algo=ALGO)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    try:
        skipped = group.policy_step(batches[0])
        assert skipped["skipped_updates"] == 1 and group.weight_version == 0
        assert group.call(lambda learner: (learner.weight_version, learner.consecutive_skipped)) == [(0, 1), (0, 1)]
        ranks = group.call(lambda learner: {n: t.clone() for n, t in learner.engine.module.state_dict().items()})
        for state in ranks:
            for name, tensor in state.items():
                assert torch.equal(tensor, original[name]), name

        trained = group.policy_step(batches[1])
        assert trained["skipped_updates"] == 0 and group.weight_version == 1
        assert group.call(lambda learner: (learner.weight_version, learner.consecutive_skipped)) == [(1, 0), (1, 0)]
        exported = _rank0_weights(group)
        assert all(torch.isfinite(t).all() for t in exported.values())
        assert not torch.equal(exported["lm_head.weight"], original["lm_head.weight"])
    finally:
        group.shutdown()
