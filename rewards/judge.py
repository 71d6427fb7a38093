"""An LLM judge over the OpenAI chat-completions protocol (the paper's GPT-4o-mini judge).

The judge reads the question, the gold answer(s) and a response, extracts the response's
final answer and says whether it is correct, as a JSON verdict. ``JudgeClient.judge_many``
judges a batch concurrently (an asyncio semaphore bounds in-flight requests), with a
deadline per attempt, retries with exponential backoff on 429, 5xx, timeouts and connection
errors (never on other 4xx), and a verdict cache keyed by (judge model, prompt, gold,
response), so a repeated response is paid once. A judgement that fails comes back as a
failure with its kind; the caller applies the failure policy (``rewards/scorer.py``).

The API key is read from the environment variable the config names and lives only inside
``ApiKey`` (whose repr hides it) and the HTTP client; errors, logs and details carry the
failure kind and status code, never a server's text unscrubbed.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from personadual.modes import strip_mode
from personadual.prompts import format_question
from personadual.records import Prompt
from rewards.config import SECTION, JudgeConfig, RewardConfigError
from rewards.normalize import clip
from rewards.verdict import Verdict, VerdictError, parse_verdict

if TYPE_CHECKING:  # the client is imported where requests are made: the driver needs only the records here
    import openai
    from openai import AsyncOpenAI

log = logging.getLogger(__name__)

# Every way a judgement can fail; each is counted as ``judge/error/<kind>``.
FAILURE_KINDS = ("timeout", "rate_limit", "server_error", "connection", "client_error",
                 "bad_response", "parse")
RETRYABLE_KINDS = frozenset({"timeout", "rate_limit", "server_error", "connection"})
NO_KEY_PLACEHOLDER = "EMPTY"  # what OpenAI-compatible servers without auth conventionally accept

SYSTEM_PROMPT = (
    "You grade answers. Read the question, the gold answer (alternatives separated by |) "
    "and the response. Extract the response's final answer and decide whether it means the "
    "same as the gold answer. Reply with only a JSON object: "
    '{"extracted_answer": "<final answer>", "correct": true or false}'
)
# Verdicts are only reusable under the same instructions: the cache key includes these.
_PROMPT_VERSION = hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest()[:12]


class JudgeError(RuntimeError):
    """Judgements failed under ``failure_policy: fail``: names the first failed prompt and
    its failure, and carries the counts of the whole batch it failed in (``counts``, the
    batch scorer's keys: failures by kind, requests, retries, cache hits), so a step that
    stops still reports what it cost and how it failed."""

    def __init__(self, prompt_id: str, kind: str, attempts: int, failures: int = 1,
                 counts: dict[str, int] | None = None) -> None:
        self.prompt_id, self.kind, self.attempts, self.failures = prompt_id, kind, attempts, failures
        self.counts = dict(counts or {})
        super().__init__(f"judge failed on prompt {prompt_id!r}: {kind} after {attempts} attempt(s)"
                         f"{_batch_summary(failures, self.counts)} ({SECTION}.judge.failure_policy=fail)")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries (Ray) intact
        return (type(self), (self.prompt_id, self.kind, self.attempts, self.failures, self.counts))


def _batch_summary(failures: int, counts: dict[str, int]) -> str:
    parts = []
    if failures > 1 or counts:
        parts.append(f"{failures} judgement(s) failed in this batch")
    kinds = {key.removeprefix("judge/error/"): n for key, n in sorted(counts.items())
             if key.startswith("judge/error/") and n}
    if kinds:
        parts[-1] += " (" + ", ".join(f"{kind}: {n}" for kind, n in kinds.items()) + ")"
    if counts:
        parts.append(f"{counts.get('judge/requests', 0)} request(s), {counts.get('judge/retries', 0)} "
                     f"retries, {counts.get('judge/cache_hits', 0)} cache hit(s)")
    return "".join(f"; {part}" for part in parts)


class ApiKey:
    """The judge's API key. Its repr and str hide it; only ``reveal`` gives the value.

    It pickles with its value on purpose: that is how a driver hands the key to reward
    workers on other machines without putting it in a config or runtime env.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def scrub(self, text: str) -> str:
        """``text`` with the key blanked: for anything a server sent back."""
        return text.replace(self._value, "***") if self._value and self._value != NO_KEY_PLACEHOLDER else text

    def __repr__(self) -> str:
        return "ApiKey('***')"

    __str__ = __repr__

    def __reduce__(self) -> tuple[Any, ...]:
        return (ApiKey, (self._value,))


def api_key_from_env(config: JudgeConfig) -> ApiKey:
    """The key from the environment variable the config names ("" names none: placeholder)."""
    if not config.api_key_env:
        return ApiKey(NO_KEY_PLACEHOLDER)
    value = os.environ.get(config.api_key_env)
    if not value:
        raise RewardConfigError(f"{SECTION}.judge.api_key_env: environment variable "
                                f"{config.api_key_env!r} is not set (set it, or use \"\" for a server without auth)")
    return ApiKey(value)


@dataclass(frozen=True)
class Judgement:
    """One response's judgement: a verdict, or the kind of failure that prevented one."""

    verdict: Verdict | None
    error: str | None = None  # one of FAILURE_KINDS when verdict is None
    attempts: int = 0  # HTTP requests made for it (0: served from the cache)
    cached: bool = False
    raw: str = ""  # the judge's reply text, scrubbed and clipped, for failures' details


def build_messages(prompt: Prompt, response: str, max_response_chars: int) -> list[dict[str, str]]:
    answer = strip_mode(response)
    if len(answer) > max_response_chars:  # the final answer is at the end: keep the tail
        answer = "[...] " + answer[-max_response_chars:]
    user = (f"<question>\n{format_question(prompt.question, prompt.choices)}\n</question>\n"
            f"<gold_answer>\n{' | '.join(prompt.gold)}\n</gold_answer>\n"
            f"<response>\n{answer}\n</response>")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def cache_key(model: str, prompt: Prompt, response: str) -> str:
    """Stable across processes (unlike ``hash``), so workers and runs can share verdicts."""
    payload = json.dumps([_PROMPT_VERSION, model, format_question(prompt.question, prompt.choices),
                          list(prompt.gold), response])
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()


class VerdictCache:
    """Verdicts by cache key, in memory and optionally appended to a JSON-lines file."""

    def __init__(self, path: str | None = None) -> None:
        self.path = Path(path) if path else None
        self._verdicts: dict[str, Verdict] = {}
        if self.path is not None and self.path.exists():
            skipped = 0
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self._verdicts[entry["key"]] = Verdict(bool(entry["correct"]), str(entry["extracted"]))
                except (ValueError, KeyError, TypeError):
                    skipped += 1  # a line torn by a crash mid-write: that verdict is re-asked
            if skipped:
                log.warning("judge cache %s: skipped %d unreadable line(s)", self.path, skipped)

    def __len__(self) -> int:
        return len(self._verdicts)

    def get(self, key: str) -> Verdict | None:
        return self._verdicts.get(key)

    def put_many(self, entries: dict[str, Verdict]) -> None:
        self._verdicts.update(entries)
        if self.path is not None and entries:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps({"key": k, "correct": v.correct, "extracted": v.extracted}) + "\n"
                            for k, v in entries.items())
            with self.path.open("a", encoding="utf-8") as handle:  # one append per batch
                handle.write(lines)


class _AttemptFailed(Exception):
    """One HTTP attempt failed; ``kind`` decides whether it is retried."""

    def __init__(self, kind: str, retry_after: float | None = None) -> None:
        super().__init__(kind)
        self.kind, self.retry_after = kind, retry_after


class _Retryable(_AttemptFailed):
    pass


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds ("3", "1.5") or an
    HTTP-date ("Wed, 21 Oct 2026 07:28:00 GMT", RFC 9110 section 10.2.3). A date in the past
    is 0; anything else unreadable is None (the backoff applies)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 850 / asctime forms carry no zone: they are GMT
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _retry_after(error: openai.APIStatusError) -> float | None:
    return parse_retry_after(error.response.headers.get("retry-after"))


def _classify(error: BaseException) -> _AttemptFailed:
    """Map a client exception to a failure kind. Order matters: a timeout is also a
    connection error to the openai client, and 429 is also a status error."""
    import openai

    if isinstance(error, (TimeoutError, openai.APITimeoutError)):
        return _Retryable("timeout")
    if isinstance(error, openai.APIStatusError):
        if error.status_code == 429:
            return _Retryable("rate_limit", _retry_after(error))
        if error.status_code >= 500:
            return _Retryable("server_error", _retry_after(error))
        return _AttemptFailed("client_error")
    if isinstance(error, openai.APIConnectionError):
        return _Retryable("connection")
    if isinstance(error, (openai.APIResponseValidationError, ValueError, TypeError, AttributeError, IndexError)):
        return _AttemptFailed("bad_response")  # a 200 whose body is not a chat completion
    raise error


class JudgeClient:
    """Judges batches of (prompt, response) pairs; see the module docstring."""

    def __init__(self, config: JudgeConfig, *, api_key: ApiKey | None = None) -> None:
        self.config = config
        self._api_key = api_key  # resolved from the environment on first use when None
        self.cache = VerdictCache(config.cache_path) if config.cache else None
        self._backoff = wait_exponential_jitter(multiplier=config.backoff_initial_s, max=config.backoff_max_s,
                                                jitter=config.backoff_initial_s)

    def __repr__(self) -> str:
        return f"JudgeClient(model={self.config.model!r}, base_url={self.config.base_url!r})"

    def _key(self) -> ApiKey:
        if self._api_key is None:
            self._api_key = api_key_from_env(self.config)
        return self._api_key

    def _wait(self, state: RetryCallState) -> float:
        """The backoff (at most ``backoff_max_s``), or longer when the server's Retry-After
        asks for it, up to ``retry_after_max_s``."""
        delay = min(self._backoff(state), self.config.backoff_max_s)
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, _AttemptFailed) and error.retry_after is not None:
            delay = max(delay, min(error.retry_after, self.config.retry_after_max_s))
        return delay

    async def _ask(self, client: AsyncOpenAI, semaphore: asyncio.Semaphore,
                   messages: list[dict[str, str]], counts: Counter[str]) -> str:
        cfg = self.config
        request: dict[str, Any] = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                                   "max_completion_tokens": cfg.max_tokens, "timeout": cfg.timeout_s}
        if cfg.json_response_format:
            request["response_format"] = {"type": "json_object"}
        async with semaphore:  # held per attempt, not across backoff sleeps
            counts["judge/requests"] += 1
            try:
                # The client's own timeout bounds each read; wait_for bounds the whole request.
                completion = await asyncio.wait_for(client.chat.completions.create(**request), cfg.timeout_s)
                return completion.choices[0].message.content or ""
            except Exception as error:  # classified below; unknown errors re-raise
                raise _classify(error) from None

    async def _judge_one(self, client: AsyncOpenAI, semaphore: asyncio.Semaphore, prompt: Prompt,
                         response: str, counts: Counter[str]) -> Judgement:
        messages = build_messages(prompt, response, self.config.max_response_chars)
        attempts = 0

        def count_retry(state: RetryCallState) -> None:
            counts["judge/retries"] += 1
            error = state.outcome.exception() if state.outcome else None
            asked = getattr(error, "retry_after", None)
            if asked is not None and asked > self.config.retry_after_max_s:
                counts["judge/retry_after_capped"] += 1
                log.warning("judge: the server asked to wait %.1fs (Retry-After) before retrying prompt %r; "
                            "waiting %.1fs (%s.judge.retry_after_max_s)", asked, prompt.id,
                            self.config.retry_after_max_s, SECTION)
            log.debug("judge: retrying prompt %r after %s (attempt %d)", prompt.id,
                      getattr(error, "kind", "?"), state.attempt_number)

        retrying = AsyncRetrying(stop=stop_after_attempt(self.config.max_retries + 1), wait=self._wait,
                                 retry=retry_if_exception_type(_Retryable), before_sleep=count_retry,
                                 reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    content = await self._ask(client, semaphore, messages, counts)
        except _AttemptFailed as failure:
            return Judgement(None, failure.kind, attempts)
        try:
            return Judgement(parse_verdict(content), None, attempts)
        except VerdictError:
            return Judgement(None, "parse", attempts, raw=clip(self._key().scrub(content)))

    async def judge_many(self, items: Sequence[tuple[Prompt, str]]) -> tuple[list[Judgement], Counter[str]]:
        """A judgement per (prompt, response), in order, and counts: requests, retries, cache
        hits (incl. repeats within the batch, judged once), failures by kind."""
        counts: Counter[str] = Counter()
        if not items:
            return [], counts
        keys = [cache_key(self.config.model, prompt, response) for prompt, response in items]
        results: dict[str, Judgement] = {}
        todo: dict[str, tuple[Prompt, str]] = {}
        for key, item in zip(keys, items):
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                results[key] = Judgement(cached, cached=True)
            elif key not in todo:
                todo[key] = item
        if todo:
            from openai import AsyncOpenAI

            semaphore = asyncio.Semaphore(self.config.max_concurrency)
            async with AsyncOpenAI(api_key=self._key().reveal(), base_url=self.config.base_url,
                                   max_retries=0, timeout=self.config.timeout_s) as client:
                judged = await asyncio.gather(*(self._judge_one(client, semaphore, prompt, response, counts)
                                                for prompt, response in todo.values()))
            results.update(zip(todo, judged))
            if self.cache is not None:
                self.cache.put_many({k: j.verdict for k, j in zip(todo, judged) if j.verdict is not None})
        out: list[Judgement] = []
        first_use: set[str] = set()
        for key in keys:
            judgement = results[key]
            if key in todo and key not in first_use:
                first_use.add(key)
            else:  # served from the cache or by the batch's first copy of this response
                counts["judge/cache_hits"] += judgement.verdict is not None
                judgement = Judgement(judgement.verdict, judgement.error, 0, judgement.verdict is not None,
                                      judgement.raw)
            if judgement.error is not None:
                counts["judge/failures"] += 1
                counts[f"judge/error/{judgement.error}"] += 1
            out.append(judgement)
        return out, counts
