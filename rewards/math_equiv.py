"""Math answers: equivalence with math-verify (boxed answers, fractions, LaTeX, decimals)."""

from __future__ import annotations

import threading
from typing import Any

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from personadual.records import Prompt
from rewards.config import RewardConfig
from rewards.exact_match import matches_gold
from rewards.format import compose
from rewards.normalize import clip, extract_answer

PARSE_TIMEOUT_S = 5


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which only the main thread may set; a scorer
    # called from another thread runs without that guard rather than crash.
    return PARSE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str) -> tuple[list[Any], str | None]:
    """math-verify's parse of ``text`` (retried inside ``$...$`` for bare LaTeX such as
    ``\\sqrt{2}``), and the error that stopped it: None, "timeout" or "error"."""
    for candidate in (text, f"${text}$"):
        try:
            parsed = parse(candidate, parsing_timeout=_timeout(), raise_on_error=True)
        except TimeoutException:
            return [], "timeout"
        except Exception:  # math-verify raises whatever sympy raises on malformed input
            return [], "error"
        if parsed:
            return parsed, None
    return [], None


class MathScorer:
    name = "math"

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self._gold_cache: dict[tuple[str, ...], list[list[Any]]] = {}

    def _gold(self, prompt: Prompt) -> list[list[Any]]:
        if prompt.gold not in self._gold_cache:  # a group's 2n responses share one gold
            self._gold_cache[prompt.gold] = [parse_math(alias)[0] for alias in prompt.gold]
        return self._gold_cache[prompt.gold]

    def score(self, prompt: Prompt, response_text: str) -> tuple[float, dict[str, Any]]:
        extraction = extract_answer(response_text)
        answer = extraction.answer[-self.config.math_max_chars:]
        detail: dict[str, Any] = {"scorer": self.name, "extracted": clip(extraction.answer)}
        if matches_gold(answer, prompt.gold):  # identical strings need no sympy
            detail["method"] = "exact"
            return compose(self.config, correct=True, extraction=extraction, answer_ok=True, detail=detail)
        predicted, error = parse_math(answer) if answer else ([], None)
        correct = False
        if error is not None:
            detail["math_error"] = error
        elif predicted:
            golds = [g for g in self._gold(prompt) if g]
            if not golds:
                detail["math_error"] = "gold_unparsed"
            for gold in golds:
                try:
                    if verify(gold, predicted, timeout_seconds=_timeout(), raise_on_error=True):
                        correct = True
                        break
                except TimeoutException:
                    detail["math_error"] = "timeout"
                except Exception:
                    detail["math_error"] = "error"
        detail["method"] = "math_verify"
        return compose(self.config, correct=correct, extraction=extraction,
                       answer_ok=bool(predicted), detail=detail)
