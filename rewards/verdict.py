"""The judge's reply read as a verdict: the first JSON object with a boolean ``correct``,
tolerating code fences and prose around it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_MAX_VERDICT_CHARS = 20_000  # a verdict is short; never scan megabytes of garbage for one
_MAX_JSON_STARTS = 64


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str


class VerdictError(ValueError):
    """The judge's reply holds no verdict."""


_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.DOTALL)
_TRUE = frozenset({"true", "yes", "correct", "1"})
_FALSE = frozenset({"false", "no", "incorrect", "0"})


def _verdict_from(obj: Any) -> Verdict | None:
    if not isinstance(obj, dict) or "correct" not in obj:
        return None
    correct = obj["correct"]
    if isinstance(correct, str) and correct.strip().lower() in _TRUE | _FALSE:
        correct = correct.strip().lower() in _TRUE
    if not isinstance(correct, bool):
        return None
    extracted = obj.get("extracted_answer", "")
    return Verdict(correct, "" if extracted is None else str(extracted))


def parse_verdict(content: str | None) -> Verdict:
    """The first JSON object with a boolean ``correct`` in the reply; code fences and prose
    around it are tolerated. Anything else raises ``VerdictError``."""
    if not content or not content.strip():
        raise VerdictError("empty reply")
    content = content[:_MAX_VERDICT_CHARS]
    decoder = json.JSONDecoder()
    for text in [*_FENCE.findall(content), content]:
        start = text.find("{")
        tries = 0
        while start != -1 and tries < _MAX_JSON_STARTS:
            tries += 1
            try:
                obj, _ = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                obj = None
            verdict = _verdict_from(obj)
            if verdict is not None:
                return verdict
            start = text.find("{", start + 1)
    raise VerdictError("no JSON object with a boolean 'correct'")
