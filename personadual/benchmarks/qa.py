"""Open questions: TriviaQA (benchmark) and FLAN (training set).

TriviaQA ``mandarjoshi/trivia_qa`` config ``rc.nocontext``, split ``validation`` (the test split
has no answers): ``question`` str, ``question_id`` str, ``question_source`` str, ``entity_pages``
and ``search_results`` (empty in nocontext), ``answer`` {``aliases``: [str],
``normalized_aliases``: [str], ``matched_wiki_entity_name``, ``normalized_matched_wiki_entity_name``,
``normalized_value``, ``type``, ``value``: str}.

FLAN ``Muennighoff/flan`` (the FLAN 2021 collection as JSONL, one file per task and split,
e.g. ``train/natural_questions_10templates_train.jsonl``): ``inputs`` str, ``targets`` str,
``task`` str. Templates with an ``OPTIONS:`` block of ``- option`` lines become multiple choice
(as the paper's released data did, answering with a letter); the others exact match.
"""

from __future__ import annotations

import re
from typing import Any

from personadual.benchmarks.items import ObjectiveItem, unique
from personadual.benchmarks.source import RowError, field, text
from personadual.records import option_letters

TRIVIAQA_COLUMNS = ("question_id", "question", "answer")
FLAN_COLUMNS = ("inputs", "targets")


def triviaqa_item(row: dict[str, Any], index: int, scorer: str) -> ObjectiveItem:
    value = text(row, "answer.value")
    aliases = field(row, "answer.aliases")
    if not isinstance(aliases, list):
        raise RowError("answer.aliases", "must be a list")
    gold = unique([value, *(alias for alias in aliases if isinstance(alias, str))])
    return ObjectiveItem(text(row, "question_id"), text(row, "question"),
                         gold, scorer, None, value)


_OPTIONS_HEADER = re.compile(r"^\s*options\s*:\s*$", re.IGNORECASE)


def flan_item(row: dict[str, Any], index: int, scorer: str) -> ObjectiveItem:
    inputs = text(row, "inputs")
    target = text(row, "targets")
    task = row.get("task")
    row_id = f"{task}.{index}" if isinstance(task, str) and task.strip() else str(index)
    split = _split_options(inputs) if scorer in ("auto", "multiple_choice") else None
    if split is not None:
        stem, options = split
        matches = [i for i, option in enumerate(options) if option == target]
        if matches:
            letter = option_letters(len(options))[matches[0]]
            return ObjectiveItem(row_id, stem, (letter,), "multiple_choice", options, target)
    if scorer == "multiple_choice":
        raise RowError("inputs", f"no OPTIONS block containing the target {target[:40]!r}, "
                                 f"so it cannot be scored as multiple choice")
    return ObjectiveItem(row_id, inputs, (target,), "judge" if scorer == "judge" else "exact_match",
                         None, target)


def _split_options(inputs: str) -> tuple[str, tuple[str, ...]] | None:
    lines = inputs.splitlines()
    for start, line in enumerate(lines):
        if not _OPTIONS_HEADER.match(line):
            continue
        end = start + 1
        while end < len(lines) and lines[end].startswith("- "):
            end += 1
        options = unique([option[2:] for option in lines[start + 1:end]])
        if len(options) < 2 or len(options) != end - start - 1:
            return None
        # Text after the block (e.g. "I think the answer is") stays with the question.
        stem = "\n".join([*lines[:start], *lines[end:]]).strip()
        return (stem, options) if stem else None
    return None
