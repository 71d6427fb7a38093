"""Lettered multiple choice: MMLU-Pro and SuperGPQA (benchmarks).

MMLU-Pro ``TIGER-Lab/MMLU-Pro``, split ``test`` (``validation`` holds the few-shot examples):
``question_id`` int, ``question`` str, ``options`` [str] (up to 10), ``answer`` letter,
``answer_index`` int, ``cot_content`` str, ``category`` str, ``src`` str. Questions with fewer
than ten options are padded with "N/A" options, which are not shown to the model.

SuperGPQA ``m-a-p/SuperGPQA``, split ``train`` (the only one; JSONL ``SuperGPQA-all.jsonl``):
``uuid`` str, ``question`` str, ``options`` [str], ``answer`` str (the option text),
``answer_letter`` letter, ``discipline``, ``field``, ``subfield``, ``difficulty`` str,
``is_calculation`` bool.
"""

from __future__ import annotations

from typing import Any

from personadual.benchmarks.items import ObjectiveItem, letter_of
from personadual.benchmarks.source import RowError, field, text
from personadual.records import option_letters

MMLU_PRO_COLUMNS = ("question_id", "question", "options", "answer", "answer_index")
SUPERGPQA_COLUMNS = ("uuid", "question", "options", "answer_letter")
# MMLU-Pro pads questions with fewer than ten options with this text; it is no option.
MMLU_PRO_PADDING = "N/A"


def _options(row: dict[str, Any]) -> tuple[str, ...]:
    options = field(row, "options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise RowError("options", "must be a list of at least two strings")
    return tuple(option.strip() for option in options)


def mmlu_pro_item(row: dict[str, Any], index: int, scorer: str) -> ObjectiveItem:
    """Options as published minus the "N/A" padding, lettered A, B, ... in their order; the gold
    letter is the answer's position among the options kept."""
    published = _options(row)
    raw_index = field(row, "answer_index")
    try:
        answer_index = int(raw_index)
    except (TypeError, ValueError):
        raise RowError("answer_index", f"must be an integer, got {raw_index!r}") from None
    letter = letter_of(answer_index, len(published), "answer_index")
    if text(row, "answer") != letter:
        raise RowError("answer", f"{row['answer']!r} disagrees with answer_index {answer_index} ({letter})")
    if published[answer_index] == MMLU_PRO_PADDING:
        raise RowError("answer_index", f"{answer_index} points at an {MMLU_PRO_PADDING!r} padding option")
    kept = [position for position, option in enumerate(published) if option != MMLU_PRO_PADDING]
    if len(kept) < 2:
        raise RowError("options", f"fewer than two options besides {MMLU_PRO_PADDING!r}")
    options = tuple(published[position] for position in kept)
    gold = option_letters(len(options))[kept.index(answer_index)]
    return ObjectiveItem(str(field(row, "question_id")), text(row, "question"),
                         (gold,), scorer, options, published[answer_index])


def supergpqa_item(row: dict[str, Any], index: int, scorer: str) -> ObjectiveItem:
    options = _options(row)
    letter = text(row, "answer_letter")
    if letter not in option_letters(len(options)):
        raise RowError("answer_letter", f"{letter!r} is outside the {len(options)} options")
    answer_text = options[option_letters(len(options)).index(letter)]
    return ObjectiveItem(text(row, "uuid"), text(row, "question"),
                         (letter,), scorer, options, answer_text)
