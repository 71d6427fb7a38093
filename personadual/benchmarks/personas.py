"""Personas for objective questions: none, unaligned (a random PersonaHub persona) or aligned
(written by an OpenAI-compatible chat model given the question and its answer).

PersonaHub ``proj-persona/PersonaHub`` config ``persona``, split ``train``: one column
``persona`` (200k one-sentence personas, e.g. "A pediatric nurse who ...").

Aligned personas cost an API call each, so they are cached in a JSONL file keyed by
(model, question id): a rerun, or a second benchmark load, never pays twice. The API key is
read from the environment variable *named* in the config and never logged or cached.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import openai

from personadual.benchmarks.source import load_rows, map_rows, text
from personadual.data import DataError
from personadual.endpoint import EndpointConfig

log = logging.getLogger(__name__)

PERSONAHUB_ID = "proj-persona/PersonaHub"

DEFAULT_INSTRUCTION = (
    "Write a user persona for a question-answering study. The persona is one or two sentences "
    "in the style \"A <role> who ...\", describing a person whose background (profession, "
    "training, experience or interests) makes the correct answer to the question below natural "
    "for them to know. Do not quote the answer itself. Reply with the persona only."
)


@dataclass
class PersonaHubConfig:
    source: str = PERSONAHUB_ID  # hub id or a local file/folder with a ``persona`` column
    subset: str | None = "persona"
    split: str = "train"
    limit: int | None = None  # read only the first N personas (the pool to draw from)


class PersonaPool:
    """PersonaHub personas; ``pick`` draws one per key, the same one whatever else is loaded."""

    def __init__(self, personas: Sequence[str]):
        if not personas:
            raise DataError("persona pool: no personas")
        self.personas = tuple(personas)

    @classmethod
    def load(cls, config: PersonaHubConfig, cache_dir: str | None = None,
             skipped: Counter[str] | None = None) -> "PersonaPool":
        """With ``skipped``, empty personas are left out and counted instead of ending the load."""
        rows = load_rows(config.source, subset=config.subset,
                         split=config.split, limit=config.limit, required=("persona",),
                         cache_dir=cache_dir, benchmark="personahub")
        return cls(map_rows(rows, lambda row, _: text(row, "persona"), skipped))

    def pick(self, key: str, seed: int) -> str:
        return self.personas[random.Random(f"{seed}|unaligned|{key}").randrange(len(self.personas))]


@dataclass
class AlignedPersonaConfig(EndpointConfig):
    """The persona writer: an endpoint (a hosted model by default, short replies), where its
    personas are cached, and what it is asked."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    max_tokens: int = 200
    timeout_s: float = 60.0
    cache_path: str = "data/aligned_personas.jsonl"
    instruction: str = DEFAULT_INSTRUCTION


@dataclass(frozen=True)
class PersonaRequest:
    question_id: str  # stable across runs: the cache key together with the model
    question: str
    answer: str


def persona_messages(config: AlignedPersonaConfig, request: PersonaRequest) -> list[dict[str, str]]:
    """The chat the persona writer is asked for one aligned persona."""
    return [{"role": "system", "content": config.instruction},
            {"role": "user", "content": f"Question:\n{request.question}\n\nCorrect answer: {request.answer}"}]


class AlignedPersonaError(RuntimeError):
    """The model could not produce an aligned persona; one line naming question and model."""


class AlignedPersonaGenerator:
    def __init__(self, config: AlignedPersonaConfig):
        self.config = config
        self.cache_path = Path(config.cache_path).expanduser()
        self._cache = self._read_cache()
        self.calls = 0  # personas this generator got from the model (cache hits cost none)
        self._client: openai.OpenAI | None = None

    def personas(self, requests: Sequence[PersonaRequest]) -> dict[str, str]:
        """question_id -> persona, from the cache where possible, else from the model."""
        model = self.config.model
        found = {r.question_id: self._cache[(model, r.question_id)] for r in requests
                 if (model, r.question_id) in self._cache}
        missing = list({r.question_id: r for r in requests if r.question_id not in found}.values())
        if missing:
            log.info("aligned personas: %d cached, %d to generate with %s at %s",
                     len(found), len(missing), model, self.config.base_url)
            found.update(self._generate(missing))
        return found

    def _generate(self, requests: list[PersonaRequest]) -> dict[str, str]:
        client = self._get_client()
        made: dict[str, str] = {}
        failures: list[AlignedPersonaError] = []
        with ThreadPoolExecutor(max_workers=max(1, self.config.concurrency)) as pool:
            futures = {pool.submit(self._ask, client, request): request for request in requests}
            for future in as_completed(futures):
                request = futures[future]
                try:
                    persona = future.result()
                except AlignedPersonaError as error:
                    failures.append(error)
                    continue
                self.calls += 1
                # Written as each arrives, so a failed or interrupted run keeps what it paid for.
                self._append_cache(request.question_id, persona)
                made[request.question_id] = persona
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise AlignedPersonaError(f"{failures[0]}{more}")
        return made

    def _ask(self, client: openai.OpenAI, request: PersonaRequest) -> str:
        messages = persona_messages(self.config, request)
        try:
            reply = client.chat.completions.create(
                model=self.config.model, messages=messages, temperature=self.config.temperature,
                max_tokens=self.config.max_tokens)
        except openai.OpenAIError as error:
            raise AlignedPersonaError(
                f"aligned persona for {request.question_id!r} from {self.config.model} at "
                f"{self.config.base_url}: {type(error).__name__}: {_first_line(error)}") from None
        content = reply.choices[0].message.content if reply.choices else None
        persona = clean_persona(content or "")
        if not persona:
            raise AlignedPersonaError(f"aligned persona for {request.question_id!r} from "
                                      f"{self.config.model}: empty reply")
        return persona

    def _get_client(self) -> openai.OpenAI:
        if self._client is None:
            key = os.environ.get(self.config.api_key_env)
            if not key:
                raise DataError(f"aligned_personas.api_key_env: environment variable "
                                f"{self.config.api_key_env} is not set (servers that need no key "
                                f"accept any value)")
            self._client = openai.OpenAI(base_url=self.config.base_url, api_key=key,
                                         timeout=self.config.timeout_s,
                                         max_retries=self.config.max_retries)
        return self._client

    def _read_cache(self) -> dict[tuple[str, str], str]:
        cache: dict[tuple[str, str], str] = {}
        if not self.cache_path.is_file():
            return cache
        with self.cache_path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    cache[(entry["model"], entry["question_id"])] = entry["persona"]
                except (ValueError, KeyError, TypeError) as error:
                    raise DataError(f"{self.cache_path}:{number}: bad aligned-persona cache entry "
                                    f"({type(error).__name__}: {error})") from None
        return cache

    def _append_cache(self, question_id: str, persona: str) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"model": self.config.model, "question_id": question_id, "persona": persona}
        with self.cache_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._cache[(self.config.model, question_id)] = persona


_LEAD_IN = re.compile(r"^\s*(?:persona\s*:\s*|i\s*am\s+|i'm\s+)", re.IGNORECASE)


def clean_persona(reply: str) -> str:
    """The model's reply as a persona: trimmed, unquoted, without a "Persona:"/"I am" lead-in."""
    persona = reply.strip().strip('"').strip()
    persona = _LEAD_IN.sub("", persona).strip()
    return persona[:1].upper() + persona[1:]


def _first_line(error: BaseException) -> str:
    message = str(error).strip()
    return message.splitlines()[0] if message else "no message"
