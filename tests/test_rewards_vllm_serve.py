"""The judge against vLLM's own OpenAI-compatible server (``vllm serve``'s server, on the tiny model).

The tiny model is randomly initialised, so its verdicts are garbage: the test proves the
protocol round trip (auth, chat template, chat completions, a reply parsed by our verdict
parser) and that the garbage goes through the failure policy with exact counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vllm  # noqa: F401  a broken vLLM install must fail here, not skip
from transformers import AutoTokenizer

from personadual.modes import Mode
from rewards.config import JudgeConfig, RewardConfig
from rewards.judge import build_messages
from rewards.scorer import BatchScorer
from tests.judge_server import make_prompt, make_rollout
from tests.vllm_server import vllm_api_server

G = Mode.GENERAL.token
KEY_ENV = "PERSONADUAL_TEST_VLLM_JUDGE_KEY"
CANARY = "sk-canary-vllm-93d1f0"  # vLLM checks it (VLLM_API_KEY): proves the client sends it
SERVED_NAME = "tiny-judge"
MAX_MODEL_LEN = 512
MAX_TOKENS = 24
START_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log_path = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    with vllm_api_server(tiny_model_dir, log_path, served_name=SERVED_NAME, api_key=CANARY,
                         max_model_len=MAX_MODEL_LEN, start_timeout_s=START_TIMEOUT_S) as base_url:
        yield base_url


def _config(base_url: str, **judge: object) -> RewardConfig:
    settings = dict(base_url=base_url, model=SERVED_NAME, api_key_env=KEY_ENV, max_tokens=MAX_TOKENS,
                    timeout_s=120.0, max_retries=1, backoff_initial_s=0.1, max_concurrency=4)
    settings.update(judge)
    return RewardConfig(judge=JudgeConfig(**settings))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_judge_round_trip_against_vllm_serve(vllm_server, tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, CANARY)
    batch = [make_rollout(make_prompt(i, scorer="judge", gold=("teal",)), f"{G} It is teal. Answer: {answer}")
             for i, answer in enumerate(("teal", "red", "Teal"))]
    # The judge's chat prompt, through the model's chat template, fits the context window.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoded = tokenizer.apply_chat_template(build_messages(batch[0].prompt, batch[0].text, 8000),
                                            add_generation_prompt=True, tokenize=True)
    prompt_tokens = len(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    assert prompt_tokens + MAX_TOKENS <= MAX_MODEL_LEN

    scored, counts = BatchScorer(_config(vllm_server)).score_many(batch)
    # Every request got a 200 with a chat completion (no retries, no HTTP or protocol errors)...
    assert counts["judge/requests"] == 3 and counts["judge/retries"] == 0
    assert counts["judge/failures"] == counts["judge/error/parse"] == 3
    # ...and the random model's text is no verdict: each went to the fallback, and was counted.
    assert counts["fallback"] == 3 and counts["ok"] == counts["dropped"] == 0
    assert [s.status for s in scored] == ["fallback"] * 3
    assert [s.detail["judge_error"] for s in scored] == ["parse"] * 3
    assert [s.reward for s in scored] == [1.0, 0.0, 1.0]  # exact match decided instead
    assert all(isinstance(s.detail.get("judge_raw", ""), str) for s in scored)

    # A wrong key is refused by the server (401): not retried, counted, and the policy applies.
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    scored, counts = BatchScorer(_config(vllm_server, failure_policy="drop")).score_many(batch[:1])
    assert counts["judge/requests"] == 1 and counts["judge/error/client_error"] == 1
    assert scored[0].status == "dropped"
    assert CANARY not in caplog.text
