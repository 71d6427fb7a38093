"""How to reach an OpenAI-protocol chat endpoint (any ``vllm serve``, or a hosted API): the
one config type of every model the data preparation calls (teacher, persona writer)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EndpointConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""  # the served model name (required when the endpoint is used)
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the environment variable holding the key
    temperature: float = 0.7
    max_tokens: int = 1024
    timeout_s: float = 120.0
    max_retries: int = 3  # the openai client's own retries, with backoff, on 429/5xx/timeouts
    concurrency: int = 8
