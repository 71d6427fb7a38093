"""The reference worker (cluster.reference=worker): the frozen KL reference's log-probs computed
beside the engines must be the learner's own, and a dead worker is named.

The pipelined run that uses it (staleness 1, the learner's KL at step 1 exactly 0 on the
worker's numbers, the worker's time recorded) is tests/test_e2e.py's pipelined test.
"""

from __future__ import annotations

from dataclasses import replace

import deepspeed  # noqa: F401  (a broken install fails here rather than skipping)
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.config import ConfigError, load_config
from actors.reference_worker import ReferenceService, ReferenceWorkerDied
from learner.batch import SftSample, build_policy_batch
from learner.config import LearnerConfig, OptimConfig
from learner.engine import Learner
from learner.policy_step import plan_step, reference_logprobs
from learner.reference_scorer import ReferencePlan, ReferenceScorer
from personadual.algo_config import AlgoConfig
from personadual.modes import Mode
from tests.helpers import SMOKE, make_prompt, make_scored

pytestmark = pytest.mark.usefixtures("own_process_group")
TOLERANCE = 1e-6
QUESTIONS = ("What is the capital of the country the river crosses?", "Name the mountain.",
             "Which instrument does the composer of the opera play, and in which year was it written?")


# ---- the config ---------------------------------------------------------------------------
def test_the_worker_is_the_default_only_where_it_comes_off_the_critical_path():
    assert load_config(SMOKE).cluster.reference == "learner"
    assert load_config(SMOKE, ["cluster.schedule=colocated"]).cluster.reference == "learner"
    assert load_config(SMOKE, ["cluster.schedule=pipelined"]).cluster.reference == "worker"
    assert load_config(SMOKE, ["cluster.schedule=pipelined", "algo.kl_coef=0"]).cluster.reference == "learner"
    assert load_config(SMOKE, ["cluster.schedule=pipelined", "cluster.reference=learner"]).cluster.reference == \
        "learner"
    assert load_config(SMOKE, ["cluster.reference=worker"]).cluster.reference == "worker"  # serial may ask for it


@pytest.mark.parametrize("overrides", [["cluster.reference=engine"],
                                       ["cluster.reference=worker", "algo.kl_coef=0"],
                                       ["cluster.reference=worker", "rollout.num_gpus_per_engine=1"]])
def test_a_worker_that_could_not_do_its_job_is_one_line_naming_the_key(overrides):
    with pytest.raises(ConfigError) as error:
        load_config(SMOKE, overrides)
    assert "cluster.reference" in str(error.value) and "\n" not in str(error.value)


# ---- the numbers: the worker's equal the learner's ------------------------------------------
def sampled_batch(model_dir, seed: int) -> list:
    """Questions through the tokenizer, each answered six times by the model itself (sampled),
    cut to unequal lengths: a batch of real groups, modes alternating as forced-prefix ones do."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    scored = []
    for group, question in enumerate(QUESTIONS):
        prompt_ids = tokenizer(question)["input_ids"]
        out = model.generate(torch.tensor([prompt_ids]), do_sample=True, max_new_tokens=14, min_new_tokens=14,
                             num_return_sequences=6, pad_token_id=tokenizer.pad_token_id or 0)
        for sample, row in enumerate(out[:, len(prompt_ids):].tolist()):
            mode = (Mode.GENERAL, Mode.PERSONALIZED)[sample % 2]
            scored.append(make_scored(make_prompt(f"q{group}"), mode, float((sample + group) % 3 == 0),
                                      prompt_token_ids=prompt_ids,
                                      response_token_ids=row[:3 + (5 * sample + group) % 12],
                                      sample_index=sample))
    return scored


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_the_reference_workers_log_probs_equal_the_learners_own_on_a_sampled_batch(tiny_model_dir, shared_prefix):
    """After an SFT step the reference (the policy frozen as RL starts) is no longer the model
    file: the worker must hold the learner's weights and cut the batch as the learner does."""
    scored = sampled_batch(tiny_model_dir, seed=0)
    config = LearnerConfig(micro_batch_tokens=160, shared_prefix=shared_prefix,
                           sft_optim=OptimConfig(lr=1e-2, schedule="constant"))
    algo = AlgoConfig(kl_coef=0.04, mini_batches=2)
    learner = Learner(config, tiny_model_dir, algo=algo)
    try:
        learner.sft_step([SftSample(s.rollout.prompt_token_ids, s.rollout.response_token_ids) for s in scored])
        plan = ReferencePlan(num_ranks=1, mini_batches=2, micro_batch_tokens=160, shared_prefix=shared_prefix)
        worker = ReferenceScorer(tiny_model_dir, plan)
        model_file = worker.response_logprobs([(s.rollout.prompt_token_ids, s.rollout.response_token_ids)
                                               for s in scored])
        worker.load(learner.reference_weights())
        found = worker.response_logprobs([(s.rollout.prompt_token_ids, s.rollout.response_token_ids)
                                          for s in scored])
        own, given = learner_and_given(learner, scored, found)
    finally:
        learner.close()
    compared = 0
    for (own_lp, mb), given_lp in zip(own, given):
        mask = mb.response_mask > 0
        assert torch.equal(given_lp[mask].isfinite(), torch.ones_like(given_lp[mask], dtype=torch.bool))
        assert (given_lp[mask] - own_lp[mask]).abs().max() <= TOLERANCE
        compared += int(mask.sum())
    assert compared == sum(len(s.rollout.response_token_ids) for s in scored)
    # The model file's numbers are not the reference's: the comparison above can fail.
    drift = max(abs(a - b) for before, after in zip(model_file, found) for a, b in zip(before, after))
    assert drift > 1e-3


def learner_and_given(learner, scored, found):
    """The learner's own reference pass over the batch, and the one it takes from the batch
    once the worker's log-probs ride on it, micro-batch by micro-batch."""
    own_plan = plan_step(learner, build_policy_batch(scored))
    own, from_batch = reference_logprobs(learner.reference, own_plan.plans, learner.device)
    assert not from_batch
    with_reference = [replace(s, rollout=replace(s.rollout, reference_logprobs=values))
                      for s, values in zip(scored, found)]
    given_plan = plan_step(learner, build_policy_batch(with_reference))
    given, from_batch = reference_logprobs(learner.reference, given_plan.plans, learner.device)
    assert from_batch
    pairs = [(lp, mb) for plan, lps in zip(own_plan.plans, own) for mb, lp in zip(plan, lps)]
    return pairs, [lp for lps in given for lp in lps]


# ---- on Ray: the actor, and its death named ------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dead_or_silent_reference_worker_stops_the_step_with_an_error_naming_it(ray_cluster, tiny_model_dir):
    service = ReferenceService(str(tiny_model_dir), ReferencePlan(1, 1, 4096, True), dtype="float32", threads=1,
                               slot=(None, 0), timeout_s=120.0)
    assert service.threads()["torch"] == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ray.get(service.actor.load.remote(model.state_dict()))
    scored = [make_scored("p0", Mode.GENERAL, 1.0, prompt_token_ids=[5, 6, 7], response_token_ids=[8, 9]),
              make_scored("p0", Mode.PERSONALIZED, 0.0, prompt_token_ids=[5, 6, 7], response_token_ids=[10])]
    filled = service.fill(scored, "a test round")
    assert [len(s.rollout.reference_logprobs) for s in filled] == [2, 1]
    assert all(v < 0 for s in filled for v in s.rollout.reference_logprobs)
    # A round far longer than the limit: the wait ends at the limit with the worker named.
    service.timeout_s = 1e-3
    long_round = [make_scored(f"q{i}", Mode.GENERAL, 1.0, prompt_token_ids=list(range(5, 60)),
                              response_token_ids=list(range(5, 90))) for i in range(32)]
    with pytest.raises(ReferenceWorkerDied, match=r"reference worker \(cluster.reference=worker\) gave no answer "
                                                  r"within rollout.generate_timeout_s=0.001 s during a long round"):
        service.fill(long_round, "a long round")
    service.timeout_s = 120.0
    ray.kill(service.actor)
    with pytest.raises(ReferenceWorkerDied, match=r"reference worker \(cluster.reference=worker\) died during "
                                                  r"RL step 3's reference log-probs"):
        service.fill(scored, "RL step 3's reference log-probs")
