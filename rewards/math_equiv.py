"""Math answers: equivalence by math-verify, gold and answer both parsed as LaTeX.

math-verify reads LaTeX inside its delimiters (``$...$``, ``\\[...\\]``, ``\\boxed{}``) as one
expression; outside them its plain-expression extractor takes the first number it finds, so
a bare ``6\\sqrt{2}`` would read as ``6``. Gold answers (MATH-500 stores bare LaTeX) and
undelimited answers are therefore parsed inside ``$...$``; text that already carries a
delimiter is parsed as written, which lets math-verify prefer the ``\\boxed{}`` answer.

The only string shortcut is equality up to runs of whitespace, which never merges two
different answers; signs, brackets, radicals and exponents are always compared by math-verify.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException

from personadual.records import Prompt
from rewards.config import RewardConfig
from rewards.format import compose
from rewards.normalize import clip, extract_answer

PARSE_TIMEOUT_S = 5
EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())
# An unescaped $, \(, \[ or \boxed: math-verify finds the answer's LaTeX itself.
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")
# A word of two or more letters that is not a LaTeX command: prose around the answer.
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_TEXT_ARGUMENT = re.compile(r"\\(?:text|textbf|mathrm|mbox|operatorname)\s*\{[^{}]*\}")


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which only the main thread may set; a scorer
    # called from another thread runs without that guard rather than crash.
    return PARSE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(text: str) -> tuple[list[Any], str | None]:
    try:
        return parse(text, extraction_config=EXTRACTION, parsing_timeout=_timeout(), raise_on_error=True), None
    except TimeoutException:
        return [], "timeout"
    except Exception:  # math-verify raises whatever sympy raises on malformed input
        return [], "error"


def _has_free_symbols(parsed: list[Any]) -> bool:
    first = parsed[0] if parsed else None
    return isinstance(first, (sympy.Basic, sympy.MatrixBase)) and bool(first.free_symbols)


def parse_math(text: str, *, gold: bool = False) -> tuple[list[Any], str | None]:
    """math-verify's parse of ``text`` and the error that stopped it (None, "timeout", "error").

    Delimited text is parsed as written; anything else inside ``$...$``, so that a bare
    ``6\\sqrt{2}`` is six root two, not six. An answer written as prose ("it is 7") reads as
    a product of letters inside ``$...$``; then, and only for answers, math-verify's own
    extraction from the bare text is used instead (``gold=True`` never falls back: a gold
    answer is LaTeX, never prose).
    """
    text = text.strip()
    if not text:
        return [], None
    if _DELIMITED.search(text):
        return _parse(text)
    as_latex, error = _parse(f"${text}$")
    if gold or error is not None:
        return as_latex, error
    reads_as_prose = _PROSE_WORD.search(_TEXT_ARGUMENT.sub(" ", text)) is not None
    if as_latex and not (reads_as_prose and _has_free_symbols(as_latex)):
        return as_latex, None
    from_prose, error = _parse(text)
    if from_prose and not _has_free_symbols(from_prose):
        return from_prose, error
    return as_latex, None


def same_text(answer: str, gold: str) -> bool:
    """Equal up to runs of whitespace (never two different answers)."""
    return bool(answer.split()) and answer.split() == gold.split()


class MathScorer:
    name = "math"

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self._gold_cache: dict[tuple[str, ...], list[list[Any]]] = {}

    def _gold(self, prompt: Prompt) -> list[list[Any]]:
        if prompt.gold not in self._gold_cache:  # a group's 2n responses share one gold
            self._gold_cache[prompt.gold] = [parse_math(alias, gold=True)[0] for alias in prompt.gold]
        return self._gold_cache[prompt.gold]

    def score(self, prompt: Prompt, response_text: str) -> tuple[float, dict[str, Any]]:
        extraction = extract_answer(response_text)
        answer = extraction.answer[-self.config.math_max_chars:]
        detail: dict[str, Any] = {"scorer": self.name, "extracted": clip(extraction.answer)}
        if any(same_text(answer, alias) for alias in prompt.gold):  # identical text needs no sympy
            detail["method"] = "exact"
            return compose(self.config, correct=True, extraction=extraction, answer_ok=True, detail=detail)
        predicted, error = parse_math(answer)
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
