"""Each prompt computed once (learner.shared_prefix): the packed forward gives the unshared
forward's log-probs and gradients (fp32, 1e-5), on random groups of unequal prompt and
response lengths, whole, split by the token budget, and with a prompt repeated across
groups; the DeepSpeed learner's policy step is the same with the switch on and off; and the
packed backward, alone and in the learner's step, repeats bit for bit on two threads."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import deepspeed  # noqa: F401  (a broken install fails here rather than skipping)
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.batch import PolicySample, build_policy_batch, micro_batches, shard
from learner.config import LearnerConfig, OptimConfig
from learner.engine import Learner
from learner.forward import forward_logits
from learner.losses import token_logprobs
from learner.shared_prefix import to_unshared_frame
from personadual.algo_config import AlgoConfig
from personadual.modes import Mode
from tests.helpers import make_prompt, make_scored

pytestmark = pytest.mark.usefixtures("own_process_group")

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.eval()  # no dropout in Qwen3 anyway; eval makes that explicit
    return model


def random_groups(seed: int, *, groups: int, per_group: int, vocab: int, repeat_prompt: bool = False,
                  ) -> list[PolicySample]:
    """Groups of ``per_group`` responses; prompts 5-40 tokens, responses 1-20 (unequal within a
    group). With ``repeat_prompt`` the last group reuses the first group's prompt ids."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        count = int(torch.randint(low, high + 1, (1,), generator=gen))
        return torch.randint(3, vocab, (count,), generator=gen).tolist()

    prompts = [tokens(5, 40) for _ in range(groups)]
    if repeat_prompt:
        prompts[-1] = list(prompts[0])
    samples = []
    for group, prompt in enumerate(prompts):
        for member in range(per_group):
            samples.append(PolicySample(prompt, tokens(1, 20), advantage=float(torch.randn(1, generator=gen)),
                                        mode=member % 2, reward=0.0))
    # Interleave the groups: rows of one prompt need not arrive together.
    order = torch.randperm(len(samples), generator=gen).tolist()
    return [samples[i] for i in order]


def response_logprobs_and_grads(model, samples: list[PolicySample], *, shared: bool, budget: int,
                                weights: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], int]:
    """Each sample's response-token log-probs, the gradient of sum(weights x log-probs), and the
    positions the forward processed (real tokens of its rows)."""
    model.zero_grad(set_to_none=True)
    found: list[torch.Tensor] = [torch.empty(0)] * len(samples)
    positions = 0
    for mb in micro_batches(samples, budget, shared_prefix=shared):
        assert (mb.layout is not None) == shared
        logprobs = token_logprobs(forward_logits(model, mb), mb.targets)
        loss = torch.zeros(())
        for row, index in enumerate(mb.indices):
            picked = logprobs[row][mb.response_mask[row] > 0]
            found[index] = picked.detach()
            loss = loss + (picked * weights[index]).sum()
        loss.backward()
        positions += int(mb.attention_mask.sum())
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return found, grads, positions


@pytest.mark.parametrize("seed, groups, per_group, budget, repeat_prompt", [
    (0, 3, 8, 4096, False),  # whole groups in one micro-batch
    (1, 4, 6, 96, False),  # a budget smaller than a group: groups packed in parts, several micro-batches
    (2, 3, 5, 4096, True),  # two groups with the same prompt ids share one row
])
def test_shared_prefix_log_probs_and_gradients_equal_the_unshared_forward(model, seed, groups, per_group, budget,
                                                                          repeat_prompt):
    vocab = model.config.vocab_size
    samples = random_groups(seed, groups=groups, per_group=per_group, vocab=vocab, repeat_prompt=repeat_prompt)
    gen = torch.Generator().manual_seed(100 + seed)
    weights = [torch.randn(len(s.response_token_ids), generator=gen) for s in samples]
    plain, plain_grads, plain_positions = response_logprobs_and_grads(model, samples, shared=False, budget=budget,
                                                                      weights=weights)
    packed, packed_grads, packed_positions = response_logprobs_and_grads(model, samples, shared=True, budget=budget,
                                                                         weights=weights)
    for sample, a, b in zip(samples, plain, packed):
        assert a.shape == b.shape == (len(sample.response_token_ids),)
        torch.testing.assert_close(b, a, atol=TOLERANCE, rtol=0)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name in plain_grads:
        scale = max(1.0, float(plain_grads[name].abs().max()))
        torch.testing.assert_close(packed_grads[name], plain_grads[name], atol=TOLERANCE * scale, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # Positions: the unshared forward computes every prompt once per response; packed, once per
    # row, and a prompt has one row unless its responses pass the budget together.
    assert plain_positions == sum(s.num_tokens for s in samples)
    distinct_prompts = {tuple(s.prompt_token_ids) for s in samples}
    responses = sum(len(s.response_token_ids) for s in samples)
    if budget >= plain_positions:
        assert packed_positions == responses + sum(len(p) for p in distinct_prompts)
    else:
        assert responses + sum(len(p) for p in distinct_prompts) <= packed_positions < plain_positions


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharding_by_prompt_puts_each_prompt_on_one_rank_and_every_sample_on_exactly_one(world_size):
    samples = random_groups(7, groups=5, per_group=4, vocab=500, repeat_prompt=True)
    parts = [shard(samples, rank, world_size, by_prompt=True) for rank in range(world_size)]
    assert sorted(map(id, [s for part in parts for s in part])) == sorted(map(id, samples))
    owners: dict[tuple[int, ...], set[int]] = {}
    for rank, part in enumerate(parts):
        for sample in part:
            owners.setdefault(tuple(sample.prompt_token_ids), set()).add(rank)
    assert all(len(ranks) == 1 for ranks in owners.values())
    assert len(owners) == 4  # five groups, two of them with the same prompt ids
    # Samples keep batch order within a rank.
    for part in parts:
        positions = [next(i for i, s in enumerate(samples) if s is sample) for sample in part]
        assert positions == sorted(positions)


def test_a_response_never_sees_another_response_of_its_group(model):
    """Changing one response's tokens leaves its group mates' log-probs exactly as they were."""
    samples = random_groups(5, groups=1, per_group=4, vocab=model.config.vocab_size)
    before, _, _ = response_logprobs_and_grads(model, samples, shared=True, budget=4096,
                                               weights=[torch.zeros(len(s.response_token_ids)) for s in samples])
    changed = list(samples)
    changed[0] = PolicySample(samples[0].prompt_token_ids, [4] * 20, advantage=0.0, mode=0, reward=0.0)
    after, _, _ = response_logprobs_and_grads(model, changed, shared=True, budget=4096,
                                              weights=[torch.zeros(len(s.response_token_ids)) for s in changed])
    for a, b in zip(before[1:], after[1:]):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


@contextmanager
def two_threads() -> Iterator[None]:
    """torch on two threads, where parallel kernels could sum in thread-arrival order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_the_packed_logits_gradient_is_the_same_bits_every_time_on_two_threads():
    """The prompt's last position feeds the first token of each of the row's responses; their
    gradients must be summed in the same order every time. Advanced indexing summed them with
    unordered atomic adds across threads (index_put_ with accumulate): with one prompt and 32
    responses in the row, the repeats differed in their last bits (this test failed), which is
    how a whole run parted from its repeat at one RL update."""
    samples = random_groups(3, groups=1, per_group=32, vocab=500)
    (mb,) = micro_batches(samples, 4096, shared_prefix=True)
    rows, keep, vocab = mb.input_ids.shape[0], mb.layout.keep, 256
    assert mb.targets.numel() * vocab >= 32768  # the size from which torch's CPU kernels go parallel
    gen = torch.Generator().manual_seed(0)
    packed = torch.randn(rows, keep, vocab, generator=gen, requires_grad=True)
    weights = torch.randn(*mb.targets.shape, vocab, generator=gen)
    grads = []
    with two_threads():
        for _ in range(30):
            packed.grad = None
            frame = to_unshared_frame(packed, mb.layout)
            assert frame.shape == (*mb.targets.shape, vocab)
            (frame * weights).sum().backward()
            grads.append(packed.grad.clone())
    assert all(torch.equal(grad, grads[0]) for grad in grads[1:])


def scored_groups(vocab: int, seed: int, *, groups: int = 3, per_group: int = 6) -> list:
    gen = torch.Generator().manual_seed(seed)

    def tokens(count: int) -> list[int]:
        return torch.randint(3, vocab, (count,), generator=gen).tolist()

    scored = []
    for group in range(groups):
        prompt, ids = make_prompt(f"g{group}"), tokens(10 + 7 * group)
        for sample, mode in enumerate([Mode.GENERAL, Mode.PERSONALIZED] * (per_group // 2)):
            scored.append(make_scored(prompt, mode, float((sample + group) % 3 == 0), prompt_token_ids=ids,
                                      response_token_ids=tokens(2 + (5 * sample + group) % 11), sample_index=sample))
    return scored


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_deepspeed_policy_step_on_two_threads_repeats_bit_for_bit(tiny_model_dir, model):
    """The same DualGRPO step from the same weights, twice, on two threads: the same weights
    after it to the last bit (docs/ARCHITECTURE.md, "Reproducible runs"). One prompt with 32
    responses packs into one row whose last prompt position every response reads, where the
    old gather's atomic adds made this differ."""
    batch = build_policy_batch(scored_groups(model.config.vocab_size, 11, groups=1, per_group=32))
    states = []
    with two_threads():
        for _ in range(2):
            learner = Learner(LearnerConfig(zero_stage=2, micro_batch_tokens=4096, shared_prefix=True,
                                            optim=OptimConfig(lr=1e-3, schedule="constant")),
                              tiny_model_dir, algo=AlgoConfig(kl_coef=0.04))
            try:
                for _ in range(3):
                    learner.policy_step(batch)
                states.append({name: tensor.clone() for name, tensor in learner.full_weights(device="cpu")})
            finally:
                learner.close()
    first, second = states
    assert first.keys() == second.keys() and first
    assert [name for name in first if not torch.equal(first[name], second[name])] == []


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_policy_steps_are_the_same_with_the_prompt_shared_or_repeated(tiny_model_dir, model, zero_stage):
    """Two DualGRPO steps (reference pass and KL included, two mini-batches so old log-probs
    are a separate pass) give the same metrics and weights with learner.shared_prefix on and off."""
    vocab = model.config.vocab_size
    batches = [build_policy_batch(scored_groups(vocab, seed)) for seed in (0, 1)]
    algo = AlgoConfig(kl_coef=0.04, mini_batches=2)
    results = {}
    for shared in (False, True):
        config = LearnerConfig(zero_stage=zero_stage, micro_batch_tokens=160, shared_prefix=shared,
                               optim=OptimConfig(lr=1e-3, schedule="constant"))
        learner = Learner(config, tiny_model_dir, algo=algo)
        try:
            metrics = [learner.policy_step(batch) for batch in batches]
            state = {name: tensor.clone() for name, tensor in learner.full_weights(device="cpu")}
        finally:
            learner.close()
        results[shared] = metrics, state
    (plain_metrics, plain_state), (shared_metrics, shared_state) = results[False], results[True]
    for plain, shared in zip(plain_metrics, shared_metrics):
        for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "mode_token_prob", "tokens"):
            assert shared[key] == pytest.approx(plain[key], abs=TOLERANCE, rel=TOLERANCE), key
        assert shared["padded_tokens"] < plain["padded_tokens"]  # positions computed, packed vs repeated
    # Real positions: every prompt repeated per response when unshared; packed, each prompt at
    # least once and the responses once, but fewer than unshared.
    for batch, plain, shared in zip(batches, plain_metrics, shared_metrics):
        samples = batch.samples
        responses = sum(len(s.response_token_ids) for s in samples)
        assert plain["positions"] == responses + sum(len(s.prompt_token_ids) for s in samples)
        unique_prompts = {tuple(s.prompt_token_ids) for s in samples}
        assert responses + sum(map(len, unique_prompts)) <= shared["positions"] < plain["positions"]
    # Adam divides each gradient element by its own running scale, so an element whose gradient
    # is ~0 moves by up to lr on float noise alone: the weights agree to a fraction of one step.
    lr_fraction = 0.1 * config.optim.lr
    for name, tensor in plain_state.items():
        torch.testing.assert_close(shared_state[name], tensor, atol=lr_fraction, rtol=0)
