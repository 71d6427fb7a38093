"""Exact match against gold aliases after TriviaQA-style normalisation."""

from __future__ import annotations

from typing import Any, Sequence

from personadual.records import Prompt
from rewards.config import RewardConfig
from rewards.format import compose, single_line_answer
from rewards.normalize import clip, extract_answer, normalize_answer


def matches_gold(answer: str, gold: Sequence[str]) -> bool:
    """Normalised equality with any alias; an answer that normalises to nothing never matches
    (else a gold such as "The" would accept an empty response)."""
    normalized = normalize_answer(answer)
    return bool(normalized) and any(normalized == normalize_answer(alias) for alias in gold)


class ExactMatchScorer:
    name = "exact_match"

    def __init__(self, config: RewardConfig) -> None:
        self.config = config

    def score(self, prompt: Prompt, response_text: str) -> tuple[float, dict[str, Any]]:
        extraction = extract_answer(response_text)
        correct = matches_gold(extraction.answer, prompt.gold)
        detail: dict[str, Any] = {"scorer": self.name, "extracted": clip(extraction.answer)}
        return compose(self.config, correct=correct, extraction=extraction,
                       answer_ok=single_line_answer(extraction.answer), detail=detail)
