from __future__ import annotations

import pytest
import torch
import vllm
from transformers import AutoModelForCausalLM, AutoTokenizer

from personadual.modes import Mode, mode_of_token_ids, mode_token_ids
from personadual.prompts import forced_prompt, render_prompt
from personadual.tiny import build_tiny_model
from personadual.world import PersonaWorld


def test_cached_build_is_reused_and_keyed_by_config(tmp_path):
    first = build_tiny_model("tiny", cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model("tiny", cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(list(tmp_path.iterdir())) == 1


def test_reload_mode_tokens_and_chat_template(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen3" and not model.config.tie_word_embeddings
    ids = mode_token_ids(tokenizer)
    assert len(set(ids.values())) == 2
    for mode, token_id in ids.items():
        assert tokenizer.encode(mode.token, add_special_tokens=False) == [token_id]
        assert mode_of_token_ids([token_id, 5], ids) is mode
    prompt = PersonaWorld().train_prompts()[1]
    text = forced_prompt(render_prompt(tokenizer, prompt), Mode.PERSONALIZED)
    encoded = tokenizer.encode(text, add_special_tokens=False)
    assert encoded[-1] == ids[Mode.PERSONALIZED]
    assert tokenizer.decode(encoded) == text
    # A world response tokenises without unknown pieces and round-trips exactly.
    response = PersonaWorld().sft_examples()[1].response
    assert tokenizer.decode(tokenizer.encode(response, add_special_tokens=False)) == response
    with torch.no_grad():
        logits = model(torch.tensor([encoded])).logits
    assert logits.shape == (1, len(encoded), len(tokenizer))


@pytest.mark.slow
def test_vllm_loads_the_tiny_model_and_generates(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    llm = vllm.LLM(model=str(tiny_model_dir), dtype="float32", max_model_len=256, enforce_eager=True,
                   distributed_executor_backend="uni", seed=0)
    try:
        prompt = PersonaWorld().eval_prompts()[0]
        text = forced_prompt(render_prompt(tokenizer, prompt), Mode.GENERAL)
        out = llm.generate([text], vllm.SamplingParams(max_tokens=8, temperature=0.0))[0].outputs[0]
        assert len(out.token_ids) == 8
        # Same greedy tokens as transformers: vLLM runs the weights we built.
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        hf = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        assert list(out.token_ids) == hf
    finally:
        del llm
