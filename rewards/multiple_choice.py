"""Multiple choice: which option a free-text answer chose, compared with the gold letter.

An answer may name its option by letter ("Answer: B", "(B)", "B.", "b") or by the option's
text. Naming two different options ("A and B") chooses none: the answer is wrong.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from personadual.records import Prompt, option_letters
from rewards.config import RewardConfig
from rewards.format import compose
from rewards.normalize import clip, extract_answer, normalize_answer

_LETTER = re.compile(r"(?<!\w)([A-Z])(?!\w)")
_LONE_LETTER = re.compile(r"^\W*([A-Za-z])\W*$")
_NEXT_WORD = re.compile(r"\s+([a-z]+)")
# "A" and "I" are also words. Followed by a lower-case word they are read as the article or
# pronoun ("A cat", "I think") unless that word is one that follows an option letter.
_LETTER_FOLLOWERS = frozenset({
    "and", "or", "nor", "vs", "versus", "is", "was", "seems", "looks", "would", "should",
    "fits", "matches", "because", "since", "as", "then",
})


def _option_pattern(option: str) -> re.Pattern[str] | None:
    """The option's words in order, any punctuation or spacing between them, case-insensitive."""
    words = normalize_answer(option).split()
    if not words:
        return None
    return re.compile(r"(?<!\w)" + r"\W+".join(re.escape(w) for w in words) + r"(?!\w)", re.IGNORECASE)


def chosen_options(answer: str, choices: Sequence[str]) -> set[str]:
    """Letters of every option the answer names, by text or by letter."""
    letters = option_letters(len(choices))
    chosen: set[str] = set()
    covered = bytearray(len(answer))  # 1 where a matched option's text lies (linear on long text)
    # Longest options first, so "light blue" is not also read as "blue".
    by_length = sorted(zip(letters, choices), key=lambda pair: -len(normalize_answer(pair[1])))
    for letter, option in by_length:
        pattern = _option_pattern(option)
        if pattern is None:
            continue
        for match in pattern.finditer(answer):
            if covered.find(1, match.start(), match.end()) != -1:
                continue
            covered[match.start():match.end()] = b"\x01" * (match.end() - match.start())
            chosen.add(letter)
    for match in _LETTER.finditer(answer):
        letter = match.group(1)
        # A letter inside a matched option's text ("Vitamin C") is not a second choice.
        if letter not in letters or covered[match.start()]:
            continue
        if letter in ("A", "I"):
            follower = _NEXT_WORD.match(answer, match.end())
            if follower and follower.group(1) not in _LETTER_FOLLOWERS:
                continue
        chosen.add(letter)
    if not chosen:
        lone = _LONE_LETTER.match(answer)  # "b", "(b)": lower case only when it stands alone
        if lone and lone.group(1).upper() in letters:
            chosen.add(lone.group(1).upper())
    return chosen


class MultipleChoiceScorer:
    name = "multiple_choice"

    def __init__(self, config: RewardConfig) -> None:
        self.config = config

    def score(self, prompt: Prompt, response_text: str) -> tuple[float, dict[str, Any]]:
        if not prompt.choices:
            raise ValueError(f"prompt {prompt.id!r}: choices: a multiple_choice prompt needs choices")
        extraction = extract_answer(response_text)
        chosen = chosen_options(extraction.answer, prompt.choices)
        correct = len(chosen) == 1 and next(iter(chosen)) in prompt.gold
        detail: dict[str, Any] = {"scorer": self.name, "extracted": clip(extraction.answer),
                                  "chosen": sorted(chosen)}
        return compose(self.config, correct=correct, extraction=extraction,
                       answer_ok=len(chosen) == 1, detail=detail)
