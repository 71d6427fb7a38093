"""Multiple choice: which option a free-text answer chose, compared with the gold letter.

An answer may name its option by letter ("Answer: B", "(B)", "B.", "b") or by the option's
text. Option text is compared token by token: words case-insensitively, without articles
and soft punctuation (quotes, commas, brackets, full stops, a hyphen between words), but
numbers whole and with their sign, and symbols (``-`` ``+`` ``%`` ``/`` ``^``...) kept, so
"-2" is not "2", "2" is not found inside "12" or "2.5", and "blue" is not found inside
"light blue" when "light blue" is an option too. Naming two different options ("A and B") chooses none: the
answer is wrong and counted as ambiguous.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Sequence

from personadual.records import Prompt, option_letters
from rewards.config import RewardConfig
from rewards.format import compose
from rewards.normalize import clip, extract_answer

_LETTER = re.compile(r"(?<!\w)([A-Z])(?!\w)")
_LONE_LETTER = re.compile(r"^\W*([A-Za-z])\W*$")
_NEXT_WORD = re.compile(r"\s+([a-z]+)")
# "A" and "I" are also words. Followed by a lower-case word they are read as the article or
# pronoun ("A cat", "I think") unless that word is one that follows an option letter.
_LETTER_FOLLOWERS = frozenset({
    "and", "or", "nor", "vs", "versus", "is", "was", "seems", "looks", "would", "should",
    "fits", "matches", "because", "since", "as", "then",
})
# A number keeps a sign that starts it (not the minus of "x-2") and its decimal or
# thousands parts; a word is a run of letters; any other non-space character is a token of
# its own unless it is soft punctuation.
_TOKEN = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*|\d+(?:[.,]\d+)*|[^\W\d_]+|[^\w\s]")
_SOFT = frozenset(".,;:!?'\"()[]{}`_*") | frozenset("\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026")
_ARTICLES = frozenset({"a", "an", "the"})
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2012": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"})


@dataclass(frozen=True)
class _Tokens:
    values: list[str]
    spans: list[tuple[int, int]]  # each token's start and end in the original text


def _joins_words(text: str, index: int) -> bool:
    """A hyphen between two letters ("light-blue") is spacing; elsewhere it is a sign."""
    return 0 < index < len(text) - 1 and text[index - 1].isalpha() and text[index + 1].isalpha()


def _tokens(text: str) -> _Tokens:
    """Comparable tokens of ``text`` with their spans in it (NFKC, lower case)."""
    normalized: list[str] = []
    origin: list[int] = []  # original index of each normalized character
    for index, char in enumerate(text):
        for out in unicodedata.normalize("NFKC", char.translate(_MINUS_SIGNS)).lower():
            normalized.append(out)
            origin.append(index)
    flat = "".join(normalized)
    values, spans = [], []
    for match in _TOKEN.finditer(flat):
        token = match.group()
        if token in _SOFT or token in _ARTICLES or (token == "-" and _joins_words(flat, match.start())):
            continue
        values.append(token)
        spans.append((origin[match.start()], origin[match.end() - 1] + 1))
    return _Tokens(values, spans)


def _occurrences(answer: _Tokens, option: list[str], positions: dict[str, list[int]]) -> list[int]:
    """Token indices in ``answer`` where the whole ``option`` token sequence starts."""
    size = len(option)
    return [start for start in positions.get(option[0], ())
            if answer.values[start:start + size] == option]


def chosen_options(answer: str, choices: Sequence[str]) -> set[str]:
    """Letters of every option the answer names, by text or by letter."""
    letters = option_letters(len(choices))
    tokens = _tokens(answer)
    positions: dict[str, list[int]] = {}
    for index, value in enumerate(tokens.values):
        positions.setdefault(value, []).append(index)
    chosen: set[str] = set()
    covered_tokens = bytearray(len(tokens.values))
    covered = bytearray(len(answer))  # 1 where a matched option's text lies
    # Longest options first, so "light blue" is not also read as "blue".
    options = [(letter, _tokens(option).values) for letter, option in zip(letters, choices)]
    for letter, option in sorted(options, key=lambda pair: -len(pair[1])):
        if not option:
            continue
        for start in _occurrences(tokens, option, positions):
            end = start + len(option)
            if covered_tokens.find(1, start, end) != -1:
                continue
            covered_tokens[start:end] = b"\x01" * (end - start)
            first, last = tokens.spans[start][0], tokens.spans[end - 1][1]
            covered[first:last] = b"\x01" * (last - first)
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
                                  "chosen": sorted(chosen), "ambiguous": len(chosen) > 1}
        return compose(self.config, correct=correct, extraction=extraction,
                       answer_ok=len(chosen) == 1, detail=detail)
