"""Records that flow through one RL step (docs/ARCHITECTURE.md, "One RL step")."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field
from typing import Any

from personadual.modes import Mode

PERSONA_SETTINGS = ("none", "unaligned", "aligned")
TASK_TYPES = ("objective", "personalized")
SCORERS = ("exact_match", "multiple_choice", "math", "judge")
FINISH_REASONS = ("stop", "length", "abort")
SCORE_STATUSES = ("ok", "fallback", "dropped")


class RecordError(ValueError):
    """A record field is missing or ill-typed; the message names the record and field."""


def _fail(record: str, name: str, problem: str) -> None:
    raise RecordError(f"{record}.{name}: {problem}")


def _require_str(record: str, name: str, value: Any, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        _fail(record, name, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        _fail(record, name, "must not be empty")


def _require_choice(record: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(record, name, f"expected one of {list(allowed)}, got {value!r}")


@dataclass(frozen=True)
class Prompt:
    """One question put to the model, with everything needed to score an answer."""

    id: str
    question: str
    persona: str | None
    persona_setting: str  # none | unaligned | aligned
    task_type: str  # objective | personalized
    gold: tuple[str, ...]  # accepted answers (aliases); for multiple choice, the gold letter
    scorer: str  # exact_match | multiple_choice | math | judge
    choices: tuple[str, ...] | None = None
    benchmark: str = "synthetic"

    def __post_init__(self) -> None:
        # Lists from JSON/YAML become tuples so records stay hashable and immutable.
        if isinstance(self.gold, list):
            object.__setattr__(self, "gold", tuple(self.gold))
        if isinstance(self.gold, str):
            object.__setattr__(self, "gold", (self.gold,))
        if isinstance(self.choices, list):
            object.__setattr__(self, "choices", tuple(self.choices))
        _require_str("Prompt", "id", self.id)
        _require_str("Prompt", "question", self.question)
        _require_choice("Prompt", "persona_setting", self.persona_setting, PERSONA_SETTINGS)
        _require_choice("Prompt", "task_type", self.task_type, TASK_TYPES)
        _require_choice("Prompt", "scorer", self.scorer, SCORERS)
        _require_str("Prompt", "benchmark", self.benchmark)
        if self.persona is not None:
            _require_str("Prompt", "persona", self.persona)
        if (self.persona is None) != (self.persona_setting == "none"):
            _fail("Prompt", "persona", f"persona_setting {self.persona_setting!r} "
                  f"{'needs' if self.persona is None else 'forbids'} a persona")
        if self.task_type == "personalized" and self.persona is None:
            _fail("Prompt", "persona", "a personalized task needs a persona")
        if not isinstance(self.gold, tuple) or not self.gold:
            _fail("Prompt", "gold", "expected a non-empty list of accepted answers")
        for answer in self.gold:
            _require_str("Prompt", "gold", answer)
        if self.choices is not None:
            if not isinstance(self.choices, tuple) or len(self.choices) < 2:
                _fail("Prompt", "choices", "expected a list of at least two options")
            for option in self.choices:
                _require_str("Prompt", "choices", option)
        if self.scorer == "multiple_choice":
            if self.choices is None:
                _fail("Prompt", "choices", "a multiple_choice prompt needs choices")
            letters = option_letters(len(self.choices))
            for answer in self.gold:
                if answer not in letters:
                    _fail("Prompt", "gold", f"{answer!r} is not an option letter {letters}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Prompt":
        """A Prompt from a JSON object; a missing or unknown field is a RecordError naming it."""
        fields = cls.__dataclass_fields__
        unknown = sorted(set(data) - set(fields))
        if unknown:
            _fail("Prompt", unknown[0], "unknown field")
        for name, spec in fields.items():
            if name not in data and spec.default is MISSING:
                _fail("Prompt", name, "missing")
        return cls(**data)


def option_letters(count: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(count)]


@dataclass
class Rollout:
    """One sampled response to a Prompt. The mode token is the first response token."""

    prompt: Prompt
    prompt_token_ids: list[int]
    response_token_ids: list[int]
    response_logprobs: list[float]  # sampling logprob of each response token (forced ones: 0.0)
    text: str  # decoded response, mode token included
    mode: Mode | None  # None: the response does not start with a mode token
    forced: bool  # True when the mode token was forced (forced-prefix sampling)
    finish_reason: str
    weight_version: int
    sample_index: int = 0
    # The frozen KL reference's log-prob of each response token, when a reference worker scored
    # the rollout beside generation; empty: the learner computes them in its step.
    reference_logprobs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, Prompt):
            _fail("Rollout", "prompt", f"expected a Prompt, got {type(self.prompt).__name__}")
        if not self.prompt_token_ids:
            _fail("Rollout", "prompt_token_ids", "must not be empty")
        if len(self.response_logprobs) != len(self.response_token_ids):
            _fail("Rollout", "response_logprobs",
                  f"{len(self.response_logprobs)} logprobs for "
                  f"{len(self.response_token_ids)} response tokens")
        if self.reference_logprobs and len(self.reference_logprobs) != len(self.response_token_ids):
            _fail("Rollout", "reference_logprobs", f"{len(self.reference_logprobs)} logprobs for "
                  f"{len(self.response_token_ids)} response tokens")
        _require_choice("Rollout", "finish_reason", self.finish_reason, FINISH_REASONS)
        if self.mode is not None:
            self.mode = Mode(self.mode)
        if self.forced and self.mode is None:
            _fail("Rollout", "mode", "a forced-prefix rollout must carry its mode")
        if not isinstance(self.weight_version, int) or self.weight_version < 0:
            _fail("Rollout", "weight_version", f"expected an int >= 0, got {self.weight_version!r}")

    @property
    def group_id(self) -> str:
        return self.prompt.id


@dataclass
class Scored:
    """A Rollout with its reward. ``reward`` is None only when the sample was dropped."""

    rollout: Rollout
    reward: float | None
    correct: bool
    status: str = "ok"  # ok | fallback (scored by the fallback scorer) | dropped
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require_choice("Scored", "status", self.status, SCORE_STATUSES)
        if self.status == "dropped":
            if self.reward is not None:
                _fail("Scored", "reward", "a dropped sample carries no reward")
        else:
            if not isinstance(self.reward, (int, float)) or not math.isfinite(self.reward):
                _fail("Scored", "reward", f"expected a finite number, got {self.reward!r}")
            self.reward = float(self.reward)
