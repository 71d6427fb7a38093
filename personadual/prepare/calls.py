"""Chat calls to an OpenAI-protocol endpoint (any ``vllm serve``, or a hosted API), each cached
on disk as it completes, so a preparation killed mid-way and run again pays only for the calls
it had not finished.

The cache is a JSONL file of ``{"key": sha256, "reply": text}``; the key hashes everything
that decides the reply (base URL excluded: the same model served elsewhere answers the same):
model, messages, temperature, max_tokens, seed. A line cut short by a kill is ignored. The API
key is read from the environment variable *named* in the config and never cached or logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import openai

from personadual.data import DataError
from personadual.endpoint import EndpointConfig

__all__ = ["CachedChat", "CallStats", "ChatRequest", "EndpointConfig", "EndpointError"]


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    seed: int = 0

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


class EndpointError(RuntimeError):
    """An endpoint call that failed after the client's retries; one line naming the endpoint."""


@dataclass
class CallStats:
    requests: int = 0  # calls sent to the endpoint
    cache_hits: int = 0
    wait_s: float = 0.0  # summed over calls: time spent waiting on the endpoint
    wall_s: float = 0.0  # wall time of the batches that sent calls

    def as_dict(self) -> dict[str, float]:
        return {"requests": self.requests, "cache_hits": self.cache_hits,
                "wait_s": round(self.wait_s, 3), "wall_s": round(self.wall_s, 3)}


class CachedChat:
    def __init__(self, config: EndpointConfig, cache_path: str | Path, *, name: str) -> None:
        self.config, self.name = config, name
        self.cache_path = Path(cache_path)
        self._cache = self._read_cache()
        self._lock = threading.Lock()
        self._client: openai.OpenAI | None = None
        self.stats = CallStats()

    def key(self, request: ChatRequest) -> str:
        payload = json.dumps({"model": self.config.model, "messages": request.messages, "seed": request.seed,
                              "temperature": self.config.temperature, "max_tokens": self.config.max_tokens},
                             sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def replies(self, requests: Sequence[ChatRequest], *, progress: bool = True) -> list[str]:
        """One reply per request (in order): cached ones from disk, the rest from the endpoint,
        each written to the cache as it arrives."""
        from tqdm import tqdm

        keys = [self.key(r) for r in requests]
        todo = {k: r for k, r in zip(keys, requests) if k not in self._cache}
        self.stats.cache_hits += sum(1 for k in keys if k in self._cache)
        if todo:
            start = time.perf_counter()
            client = self._get_client()
            with ThreadPoolExecutor(max_workers=max(1, self.config.concurrency)) as pool, \
                    tqdm(total=len(todo), desc=f"{self.name} ({self.config.model})", disable=not progress) as bar:
                futures = {pool.submit(self._ask, client, request): key for key, request in todo.items()}
                for future in as_completed(futures):
                    self._store(futures[future], future.result())
                    bar.update(1)
            self.stats.wall_s += time.perf_counter() - start
        return [self._cache[k] for k in keys]

    def _ask(self, client: openai.OpenAI, request: ChatRequest) -> str:
        start = time.perf_counter()
        try:
            reply = client.chat.completions.create(
                model=self.config.model, messages=request.as_messages(), temperature=self.config.temperature,
                max_tokens=self.config.max_tokens, seed=request.seed)
        except openai.OpenAIError as error:
            first = (str(error).strip().splitlines() or ["no message"])[0]
            raise EndpointError(f"{self.name}: {self.config.model} at {self.config.base_url}: "
                            f"{type(error).__name__}: {first}") from None
        finally:
            with self._lock:
                self.stats.requests += 1
                self.stats.wait_s += time.perf_counter() - start
        content = reply.choices[0].message.content if reply.choices else None
        return (content or "").strip()

    def _store(self, key: str, reply: str) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with self.cache_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
        self._cache[key] = reply

    def _get_client(self) -> openai.OpenAI:
        if self._client is None:
            key = os.environ.get(self.config.api_key_env)
            if not key:
                raise DataError(f"{self.name}.api_key_env: environment variable {self.config.api_key_env} "
                                f"is not set (servers that need no key accept any value)")
            self._client = openai.OpenAI(base_url=self.config.base_url, api_key=key,
                                         timeout=self.config.timeout_s, max_retries=self.config.max_retries)
        return self._client

    def _read_cache(self) -> dict[str, str]:
        cache: dict[str, str] = {}
        if not self.cache_path.is_file():
            return cache
        for line in self.cache_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                cache[entry["key"]] = entry["reply"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill: that call is made again
        return cache
