"""Lettered multiple choice: MMLU-Pro and SuperGPQA (benchmarks).

MMLU-Pro ``TIGER-Lab/MMLU-Pro``, split ``test`` (``validation`` holds the few-shot examples):
``question_id`` int, ``question`` str, ``options`` [str] (up to 10), ``answer`` letter,
``answer_index`` int, ``cot_content`` str, ``category`` str, ``src`` str.

SuperGPQA ``m-a-p/SuperGPQA``, split ``train`` (the only one; JSONL ``SuperGPQA-all.jsonl``):
``uuid`` str, ``question`` str, ``options`` [str], ``answer`` str (the option text),
``answer_letter`` letter, ``discipline``, ``field``, ``subfield``, ``difficulty`` str,
``is_calculation`` bool.
"""

from __future__ import annotations

from typing import Any

from personadual.benchmarks.items import ObjectiveItem, letter_of
from personadual.benchmarks.source import field, text
from personadual.data import DataError
from personadual.records import option_letters

MMLU_PRO_COLUMNS = ("question_id", "question", "options", "answer", "answer_index")
SUPERGPQA_COLUMNS = ("uuid", "question", "options", "answer_letter")


def _options(row: dict[str, Any], origin: str, index: int) -> tuple[str, ...]:
    options = field(row, "options", origin, index)
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise DataError(f"{origin}: row {index}: 'options' must be a list of at least two strings")
    return tuple(option.strip() for option in options)


def mmlu_pro_item(row: dict[str, Any], index: int, origin: str, scorer: str) -> ObjectiveItem:
    options = _options(row, origin, index)
    answer_index = field(row, "answer_index", origin, index)
    letter = letter_of(int(answer_index), len(options), origin, index, "answer_index")
    if text(row, "answer", origin, index) != letter:
        raise DataError(f"{origin}: row {index}: answer {row['answer']!r} disagrees with "
                        f"answer_index {answer_index} ({letter})")
    return ObjectiveItem(str(field(row, "question_id", origin, index)), text(row, "question", origin, index),
                         (letter,), scorer, options, options[int(answer_index)])


def supergpqa_item(row: dict[str, Any], index: int, origin: str, scorer: str) -> ObjectiveItem:
    options = _options(row, origin, index)
    letter = text(row, "answer_letter", origin, index)
    if letter not in option_letters(len(options)):
        raise DataError(f"{origin}: row {index}: answer_letter {letter!r} is outside the "
                        f"{len(options)} options")
    answer_text = options[option_letters(len(options)).index(letter)]
    return ObjectiveItem(text(row, "uuid", origin, index), text(row, "question", origin, index),
                         (letter,), scorer, options, answer_text)
