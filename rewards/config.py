"""Reward and judge settings: the ``reward`` section of the experiment config.

Plain dataclasses with OmegaConf-compatible field types (the experiment schema in
``actors/config.py`` embeds them). Values are checked on construction, so a bad value fails
with one line naming its key, e.g. ``reward.judge.max_concurrency: must be > 0, got 0``.
The judge's API key is never a field: only the NAME of the environment variable holding it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Where this config lives in the experiment config; error messages name keys under it.
SECTION = "reward"
FAILURE_POLICIES = ("fallback_exact_match", "drop", "fail")
FORMAT_CHECKS = ("mode_and_answer", "mode")


class RewardConfigError(ValueError):
    """A reward config value is invalid; the message is one line naming the key."""


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise RewardConfigError(f"{key}: must be > 0, got {value!r}")


def _non_negative(key: str, value: float) -> None:
    if not value >= 0:
        raise RewardConfigError(f"{key}: must be >= 0, got {value!r}")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RewardConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")


@dataclass
class JudgeConfig:
    """An LLM judge reached over the OpenAI chat-completions protocol."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"  # the paper's judge for PubMedQA and MATH500
    # Name of the environment variable holding the key; "" sends a placeholder key, for
    # local servers (vLLM, test servers) that check none.
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 8  # in-flight requests per batch; a reward worker scores one batch at a time
    timeout_s: float = 30.0  # whole-request deadline, per attempt
    max_retries: int = 4  # retries after the first attempt, on 429/5xx/timeouts/connection errors
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    # A 429/5xx's Retry-After (seconds or HTTP-date) is waited for even beyond backoff_max_s,
    # up to this many seconds; a longer one is cut to it, with a warning and a count
    # (judge/retry_after_capped).
    retry_after_max_s: float = 60.0
    failure_policy: str = "fallback_exact_match"  # fallback_exact_match | drop | fail
    cache: bool = True  # in-memory verdict cache keyed by (model, prompt, gold, response)
    cache_path: Optional[str] = None  # also persist verdicts as JSON lines here (shared across runs)
    max_tokens: int = 256
    temperature: float = 0.0
    # Ask the server for a JSON object (OpenAI's response_format); off because not every
    # compatible server supports it. The verdict parser tolerates prose and code fences anyway.
    json_response_format: bool = False
    # Longer responses are cut to their last characters (where the final answer is) before
    # they are sent; the cache still keys on the full response.
    max_response_chars: int = 8000

    def __post_init__(self) -> None:
        key = f"{SECTION}.judge"
        for name in ("base_url", "model"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise RewardConfigError(f"{key}.{name}: must be a non-empty string")
        if not isinstance(self.api_key_env, str):
            raise RewardConfigError(f"{key}.api_key_env: must be the NAME of an environment variable")
        _positive(f"{key}.max_concurrency", self.max_concurrency)
        _positive(f"{key}.timeout_s", self.timeout_s)
        _non_negative(f"{key}.max_retries", self.max_retries)
        _non_negative(f"{key}.backoff_initial_s", self.backoff_initial_s)
        _non_negative(f"{key}.backoff_max_s", self.backoff_max_s)
        _non_negative(f"{key}.retry_after_max_s", self.retry_after_max_s)
        _positive(f"{key}.max_tokens", self.max_tokens)
        _non_negative(f"{key}.temperature", self.temperature)
        _positive(f"{key}.max_response_chars", self.max_response_chars)
        _one_of(f"{key}.failure_policy", self.failure_policy, FAILURE_POLICIES)


@dataclass
class RewardConfig:
    """reward = accuracy_weight x correct + format_weight x format term.

    The default (1.0, 0.0) is the paper's correctness reward; the authors' released code
    uses ``accuracy_weight=0.9, format_weight=0.1, format_check=mode``.
    """

    accuracy_weight: float = 1.0
    format_weight: float = 0.0
    # What the format term rewards: "mode_and_answer" = starts with a mode token AND ends
    # with an answer in the task's expected form; "mode" = the leading mode token only.
    format_check: str = "mode_and_answer"
    # Math answers are parsed from at most this many trailing characters: math-verify's
    # regexes and sympy get slow on very long text, and the final answer is at the end.
    math_max_chars: int = 2000
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # The reward workers (Ray actors), one placement bundle each; extra Ray resources pin them
    # to nodes (checked with the placement keys in actors/config.py).
    num_workers: int = 1
    num_cpus_per_worker: float = 0.1
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _non_negative(f"{SECTION}.accuracy_weight", self.accuracy_weight)
        _non_negative(f"{SECTION}.format_weight", self.format_weight)
        _one_of(f"{SECTION}.format_check", self.format_check, FORMAT_CHECKS)
        _positive(f"{SECTION}.math_max_chars", self.math_max_chars)
        _positive(f"{SECTION}.num_workers", self.num_workers)
        _positive(f"{SECTION}.num_cpus_per_worker", self.num_cpus_per_worker)
        if isinstance(self.judge, dict):  # built from plain YAML/JSON rather than OmegaConf
            unknown = sorted(set(self.judge) - set(JudgeConfig.__dataclass_fields__))
            if unknown:
                raise RewardConfigError(f"{SECTION}.judge.{unknown[0]}: unknown key")
            self.judge = JudgeConfig(**self.judge)
        if not isinstance(self.judge, JudgeConfig):
            raise RewardConfigError(f"{SECTION}.judge: expected a judge section, got {type(self.judge).__name__}")
