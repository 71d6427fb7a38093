"""The learner on real DeepSpeed (ZeRO-2, one gloo rank, in this process): the direction of a
DualGRPO step, exact resume from a checkpoint, and the HF export in transformers and vLLM."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import deepspeed  # noqa: F401  (a broken install fails here rather than skipping)
import pytest
import torch
import vllm
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.batch import SftSample, build_policy_batch
from learner.checkpoint import load_torch_file
from learner.config import LearnerConfig, OptimConfig
from learner.engine import Learner
from personadual.algo_config import AlgoConfig
from personadual.modes import Mode, mode_token_ids
from personadual.records import Prompt, Scored
from tests.helpers import forced_batches, make_scored

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_process_group")]


def _config(**overrides) -> LearnerConfig:
    values = dict(zero_stage=2, micro_batch_tokens=64, optim=OptimConfig(lr=1e-3, total_steps=4),
                  sft_optim=OptimConfig(lr=1e-3, total_steps=4))
    values.update(overrides)
    return LearnerConfig(**values)


def _rollout(prompt: Prompt, prompt_ids: list[int], response: list[int], mode: Mode, reward: float) -> Scored:
    return make_scored(prompt, mode, reward, prompt_token_ids=prompt_ids, response_token_ids=response,
                       correct=reward > 0.5)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def batches(tokenizer):
    ids = mode_token_ids(tokenizer)
    gen = torch.Generator().manual_seed(11)

    def tokens(count: int) -> list[int]:
        return torch.randint(10, len(tokenizer), (count,), generator=gen).tolist()

    return forced_batches(prompt_ids=lambda group: tokens(6 + group),
                          response=lambda mode, sample: [ids[mode]] + tokens(4 + sample),
                          reward=lambda group, sample: float(sample == group), prompt_id="s{}g{}".format)


def _sequence_logprob(learner: Learner, prompt: list[int], response: list[int]) -> float:
    model = learner.engine.module
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
    return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(response).unsqueeze(1)).sum())


@pytest.mark.timeout(300)
def test_positive_advantage_gains_probability_and_negative_loses(tiny_model_dir, tokenizer):
    ids = mode_token_ids(tokenizer)
    prompt = Prompt(id="p", question="q", persona=None, persona_setting="none", task_type="objective",
                    gold=("a",), scorer="exact_match")
    prompt_ids = tokenizer.encode("What color is the flower Zor?", add_special_tokens=False)
    good = [ids[Mode.GENERAL]] + tokenizer.encode("It is red.", add_special_tokens=False)
    bad = [ids[Mode.GENERAL]] + tokenizer.encode("No idea at all.", add_special_tokens=False)
    scored = [_rollout(prompt, prompt_ids, good, Mode.GENERAL, 1.0),
              _rollout(prompt, prompt_ids, bad, Mode.GENERAL, 0.0)]
    learner = Learner(_config(optim=OptimConfig(lr=1e-3, schedule="constant")), tiny_model_dir)
    try:
        batch = build_policy_batch(scored)
        assert [s.advantage for s in batch.samples] == [0.5, -0.5]
        before = [_sequence_logprob(learner, prompt_ids, r) for r in (good, bad)]
        metrics = learner.policy_step(batch)
        after = [_sequence_logprob(learner, prompt_ids, r) for r in (good, bad)]
        assert after[0] > before[0] and after[1] < before[1]
        assert learner.weight_version == 1 and metrics["weight_version"] == 1
        assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["kl"] == pytest.approx(0.0, abs=1e-9)
        assert metrics["reward/general"] == 0.5 and metrics["tokens"] == len(good) + len(bad)
        assert 0 < metrics["mode_token_prob/general"] < 1 and metrics["grad_norm"] > 0
        # Both samples are no-persona prompts: that setting's probability is the whole batch's,
        # and no other setting reports one.
        assert metrics["mode_token_prob/no_persona/general"] == metrics["mode_token_prob/general"]
        assert not [k for k in metrics if k.startswith(("mode_token_prob/aligned", "mode_token_prob/unaligned"))]
        assert metrics["time/reference"] > 0 and metrics["time/train"] > 0
    finally:
        learner.close()


@pytest.mark.timeout(300)
def test_resume_from_checkpoint_repeats_the_next_step_exactly(tiny_model_dir, batches, tmp_path, monkeypatch):
    sft = [SftSample(s.rollout.prompt_token_ids, s.rollout.response_token_ids) for s in batches[0][:5]]
    first = Learner(_config(), tiny_model_dir)
    first.sft_step(sft)
    first.policy_step(build_policy_batch(batches[0]))
    (tmp_path / "ckpt" / ".learner.tmp").mkdir(parents=True)  # debris of a crashed save
    first.save_checkpoint(tmp_path / "ckpt", {"data_position": 5, "epoch": 1})
    saved_rng = torch.get_rng_state()
    expected = first.policy_step(build_policy_batch(batches[1]))
    expected_weights = dict(first.full_weights())
    first.close()

    folder = tmp_path / "ckpt" / "learner"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["learner"]  # published whole
    for path in folder.rglob("*"):
        if path.suffix == ".pt":
            assert isinstance(load_torch_file(path), dict)  # weights_only=True, DeepSpeed classes allowlisted
        elif path.suffix == ".json":
            json.loads(path.read_text())
    assert (folder / "reference" / "model.safetensors").is_file()

    torch.manual_seed(123)
    second = Learner(_config(), tiny_model_dir)
    try:
        # Every file the resume path unpickles, DeepSpeed's own loads included, is weights_only.
        loads: list[tuple[str, object]] = []
        real_load = torch.load

        def recording_load(path, *args, **kwargs):
            loads.append((str(path), kwargs.get("weights_only")))
            return real_load(path, *args, **kwargs)

        monkeypatch.setattr(torch, "load", recording_load)
        assert second.load_checkpoint(tmp_path / "ckpt") == {"data_position": 5, "epoch": 1}
        monkeypatch.setattr(torch, "load", real_load)
        assert {Path(path).name for path, _ in loads} >= {"mp_rank_00_model_states.pt",
                                                          "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
        assert all(weights_only is True for _, weights_only in loads), loads
        assert second.weight_version == 2 and second.stage == "rl"
        assert torch.equal(torch.get_rng_state(), saved_rng)
        resumed = second.policy_step(build_policy_batch(batches[1]))
        for key in ("loss", "kl", "pg_loss", "grad_norm", "lr", "entropy", "clip_fraction"):
            assert resumed[key] == expected[key], key
        assert resumed["kl"] > 0
        for name, tensor in second.full_weights():
            assert torch.equal(tensor, expected_weights[name]), name
        with pytest.raises(FileNotFoundError, match="no learner state"):
            second.load_checkpoint(tmp_path)
    finally:
        second.close()


def _flat_weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {name: tensor.float() for name, tensor in learner.full_weights()}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_gradient_checkpointing_and_token_budget_do_not_change_the_step(tiny_model_dir, batches, shared_prefix):
    batch = build_policy_batch(batches[0])
    results = []
    # eps well above float round-off: Adam's first step is ~sign(gradient) * lr where
    # |gradient| >> eps, which would amplify round-off in near-zero gradient components.
    optim = OptimConfig(lr=1e-3, eps=1e-3)
    for overrides in ({}, {"gradient_checkpointing": True, "micro_batch_tokens": 16}):
        learner = Learner(_config(optim=optim, shared_prefix=shared_prefix, **overrides), tiny_model_dir)
        try:
            metrics = learner.policy_step(batch)
            results.append((metrics, _flat_weights(learner)))
        finally:
            learner.close()
    (plain, plain_weights), (checkpointed, checkpointed_weights) = results
    assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-8)
    if shared_prefix:  # a group split by the tight budget repeats its prompt in every part
        assert checkpointed["padded_tokens"] > plain["padded_tokens"]
    else:  # more, tighter micro-batches
        assert checkpointed["padded_tokens"] < plain["padded_tokens"]
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(checkpointed_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.timeout(300)
def test_several_updates_per_batch_use_old_logprobs_from_before_the_first(tiny_model_dir, batches):
    learner = Learner(_config(optim=OptimConfig(lr=1e-2, schedule="constant")), tiny_model_dir,
                      algo=AlgoConfig(ppo_epochs=2, mini_batches=2))
    try:
        metrics = learner.policy_step(build_policy_batch(batches[0]))
        assert learner.weight_version == 4 and metrics["updates"] == 4
        # Updates after the first see a moved policy: ratios leave 1 and the KL to the
        # frozen reference becomes positive.
        assert metrics["ratio_mean"] != pytest.approx(1.0, abs=1e-6)
        assert metrics["kl"] > 0
    finally:
        learner.close()


@pytest.mark.timeout(300)
def test_bf16_learner_steps_and_sends_bf16_weights(tiny_model_dir, batches):
    learner = Learner(_config(precision="bf16"), tiny_model_dir)
    try:
        metrics = learner.policy_step(build_policy_batch(batches[0]))
        assert all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "entropy", "mode_token_prob"))
        assert {dtype for _, dtype, _ in learner.weight_metadata()} == {torch.bfloat16}
        exported = [tensor for _, tensor in learner.full_weights(device="cpu")]  # what a weight sync sends
        assert exported and all(t.dtype == torch.bfloat16 for t in exported)
    finally:
        learner.close()


def _greedy_hf(model, prompt_ids: list[int], tokens: int, pad_id: int) -> list[int]:
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=pad_id)
    return out[0, len(prompt_ids):].tolist()


def _optimizer_state(learner: Learner) -> list[tuple[int, str, torch.Tensor]]:
    state = learner.engine.basic_optimizer.state
    return [(i, key, value.clone() if torch.is_tensor(value) else torch.tensor(float(value)))
            for i, param_state in enumerate(state.values()) for key, value in sorted(param_state.items())]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_nonfinite_loss_skips_the_update_and_leaves_no_trace(tiny_model_dir, batches, zero_stage, caplog):
    """RL steps 2 and 3 get a NaN loss (the fault-injection knob): both updates are skipped,
    logged and counted, and the run after them is the run without them: after step 4 the
    weights equal those of a learner that only ever took steps 1 and 4 (no optimizer step,
    no LR-schedule step, no weight-version bump happened in between). ZeRO-0 takes the
    learner's own check; ZeRO-2/3 DeepSpeed's, which the learner reads back."""
    clean_batches = [build_policy_batch(batches[0]), build_policy_batch(batches[1])]
    reference = Learner(_config(zero_stage=zero_stage), tiny_model_dir)
    try:
        for batch in clean_batches:
            reference.policy_step(batch)
        expected = {name: tensor.clone() for name, tensor in reference.full_weights()}
    finally:
        reference.close()

    learner = Learner(_config(zero_stage=zero_stage, fault_nan_loss_at_rl_steps=[2, 3]), tiny_model_dir)
    try:
        first = learner.policy_step(clean_batches[0])
        assert first["skipped_updates"] == 0 and learner.weight_version == 1
        good = {name: tensor.clone() for name, tensor in learner.full_weights()}
        optimizer_state, lr = _optimizer_state(learner), learner._lr()
        assert optimizer_state  # Adam has moments to compare
        for step in (2, 3):
            with caplog.at_level(logging.WARNING, logger="learner.engine"):
                metrics = learner.policy_step(clean_batches[1])
            assert metrics["skipped_updates"] == 1 and metrics["consecutive_skipped_updates"] == step - 1
            assert math.isnan(metrics["loss"]) and math.isnan(metrics["grad_norm"])
            assert learner.weight_version == 1 and metrics["weight_version"] == 1
        assert caplog.text.count("update skipped") == 2 and "non-finite loss" in caplog.text
        for name, tensor in learner.full_weights():
            assert torch.equal(tensor, good[name]), name
        after = _optimizer_state(learner)
        assert len(after) == len(optimizer_state)
        assert all(torch.equal(a[2], b[2]) for a, b in zip(after, optimizer_state))
        assert learner._lr() == lr

        fourth = learner.policy_step(clean_batches[1])
        assert fourth["skipped_updates"] == 0 and fourth["consecutive_skipped_updates"] == 0
        assert learner.weight_version == 2 and math.isfinite(fourth["loss"])
        for name, tensor in learner.full_weights():
            assert torch.equal(tensor, expected[name]), name
    finally:
        learner.close()


# Last in this module: an in-process vLLM engine replaces the process group that DeepSpeed's
# cached groups refer to, so no learner can be built in this process after it.
@pytest.mark.timeout(400)
def test_hf_export_loads_in_transformers_and_vllm_with_the_same_greedy_tokens(tiny_model_dir, batches, tmp_path):
    learner = Learner(_config(sft_optim=OptimConfig(lr=1e-2, schedule="constant")), tiny_model_dir)
    try:
        learner.sft_step([SftSample(s.rollout.prompt_token_ids, s.rollout.response_token_ids) for s in batches[0]])
        trained = dict(learner.full_weights())
        learner.save_hf(tmp_path / "policy")
    finally:
        learner.close()
    assert not (tmp_path / ".policy.tmp").exists()

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    state = model.state_dict()
    assert set(state) == set(trained)
    for name, tensor in trained.items():
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(state["lm_head.weight"], original.state_dict()["lm_head.weight"])  # the update is in

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "policy")
    mode_token_ids(tokenizer)  # the mode tokens survive the export as single ids
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What color is the flower Zor?"}],
                                           tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = _greedy_hf(model, prompt_ids, 12, tokenizer.pad_token_id)

    llm = vllm.LLM(model=str(tmp_path / "policy"), dtype="float32", max_model_len=256, enforce_eager=True,
                   distributed_executor_backend="uni", seed=0)
    try:
        params = vllm.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        output = llm.generate([vllm.TokensPrompt(prompt_token_ids=prompt_ids)], params)[0]
        assert list(output.outputs[0].token_ids) == expected
    finally:
        del llm
