"""Medical datasets: PubMedQA (benchmark) and UltraMedical (training set).

PubMedQA ``qiaojin/PubMedQA`` config ``pqa_labeled``, split ``train`` (1,000 expert-labelled rows):
``pubid`` int, ``question`` str, ``context`` {``contexts``: [str], ``labels``: [str], ``meshes``:
[str], ...}, ``long_answer`` str, ``final_decision`` "yes" | "no" | "maybe".

UltraMedical ``TsinghuaC3I/UltraMedical``, split ``train``: ``id`` str (source,name), ``type`` str
("mc" for exam questions), ``conversations`` [{``from``, ``value``}], ``answer`` str, ``score`` str.
"""

from __future__ import annotations

import re
from typing import Any

from personadual.benchmarks.items import ObjectiveItem, letter_of, split_lettered_options
from personadual.benchmarks.source import field, text
from personadual.data import DataError

PUBMEDQA_DECISIONS = ("yes", "no", "maybe")
PUBMEDQA_COLUMNS = ("pubid", "question", "context", "final_decision")
ULTRAMEDICAL_COLUMNS = ("id", "type", "conversations", "answer")


def pubmedqa_item(row: dict[str, Any], index: int, origin: str, scorer: str) -> ObjectiveItem:
    decision = text(row, "final_decision", origin, index).lower()
    if decision not in PUBMEDQA_DECISIONS:
        raise DataError(f"{origin}: row {index}: final_decision {decision!r} is not one of "
                        f"{list(PUBMEDQA_DECISIONS)}")
    contexts = field(row, "context.contexts", origin, index)
    abstract = "\n".join(part.strip() for part in contexts if isinstance(part, str) and part.strip())
    question = text(row, "question", origin, index)
    stem = f"Context:\n{abstract}\n\nQuestion: {question}" if abstract else question
    long_answer = row.get("long_answer") or ""
    answer_text = f"{decision} ({long_answer.strip()})" if long_answer.strip() else decision
    row_id = str(field(row, "pubid", origin, index))
    if scorer == "multiple_choice":
        gold = letter_of(PUBMEDQA_DECISIONS.index(decision), 3, origin, index, "final_decision")
        return ObjectiveItem(row_id, stem, (gold,), scorer, PUBMEDQA_DECISIONS, answer_text)
    return ObjectiveItem(row_id, f"{stem}\nAnswer yes, no or maybe.", (decision,), scorer,
                         None, answer_text)


_LEADING_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)]|\s|$)")


def ultramedical_item(row: dict[str, Any], index: int, origin: str, scorer: str) -> ObjectiveItem:
    turns = field(row, "conversations", origin, index)
    human = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"]
    if not human or not isinstance(human[0], str) or not human[0].strip():
        raise DataError(f"{origin}: row {index}: conversations has no 'human' turn")
    question = human[0].strip()
    row_id = text(row, "id", origin, index)
    answer = (row.get("answer") or "").strip()
    if not answer:
        # Open-ended sources carry the reference only as the assistant turn.
        gpt = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
        answer = gpt[0].strip() if gpt and isinstance(gpt[0], str) else ""
    if not answer:
        raise DataError(f"{origin}: row {index}: neither 'answer' nor a 'gpt' turn gives an answer")
    split = split_lettered_options(question) if row.get("type") == "mc" and scorer != "judge" else None
    if split is None:
        return ObjectiveItem(row_id, question, (answer,), "judge", None, answer)
    stem, options = split
    letter = _resolve_letter(answer, options)
    if letter is None:
        raise DataError(f"{origin}: row {index}: answer {answer[:40]!r} names none of the "
                        f"{len(options)} options")
    answer_text = options[ord(letter) - ord("A")]
    return ObjectiveItem(row_id, stem, (letter,), "multiple_choice", options, answer_text)


def _resolve_letter(answer: str, options: tuple[str, ...]) -> str | None:
    match = _LEADING_LETTER.match(answer)
    if match and ord(match.group(1)) - ord("A") < len(options):
        return match.group(1)
    for position, option in enumerate(options):
        if answer.casefold() == option.casefold():
            return chr(ord("A") + position)
    return None
