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
from personadual.benchmarks.source import RowError, field, text

PUBMEDQA_DECISIONS = ("yes", "no", "maybe")
PUBMEDQA_COLUMNS = ("pubid", "question", "context", "final_decision")
ULTRAMEDICAL_COLUMNS = ("id", "type", "conversations", "answer")


def pubmedqa_item(row: dict[str, Any], index: int, scorer: str) -> ObjectiveItem:
    decision = text(row, "final_decision").lower()
    if decision not in PUBMEDQA_DECISIONS:
        raise RowError("final_decision", f"{decision!r} is not one of {list(PUBMEDQA_DECISIONS)}")
    contexts = field(row, "context.contexts")
    abstract = "\n".join(part.strip() for part in contexts if isinstance(part, str) and part.strip())
    question = text(row, "question")
    stem = f"Context:\n{abstract}\n\nQuestion: {question}" if abstract else question
    long_answer = row.get("long_answer") or ""
    answer_text = f"{decision} ({long_answer.strip()})" if long_answer.strip() else decision
    row_id = str(field(row, "pubid"))
    if scorer == "multiple_choice":
        gold = letter_of(PUBMEDQA_DECISIONS.index(decision), 3, "final_decision")
        return ObjectiveItem(row_id, stem, (gold,), scorer, PUBMEDQA_DECISIONS, answer_text)
    return ObjectiveItem(row_id, f"{stem}\nAnswer yes, no or maybe.", (decision,), scorer,
                         None, answer_text)


_LEADING_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)]|\s|$)")


def ultramedical_item(row: dict[str, Any], index: int, scorer: str) -> ObjectiveItem:
    turns = field(row, "conversations")
    if not isinstance(turns, list):
        raise RowError("conversations", "must be a list of {from, value} turns")
    human = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"]
    if not human or not isinstance(human[0], str) or not human[0].strip():
        raise RowError("conversations", "has no 'human' turn")
    question = human[0].strip()
    row_id = text(row, "id")
    answer = (row.get("answer") or "").strip()
    if not answer:
        # Open-ended sources carry the reference only as the assistant turn.
        gpt = [t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
        answer = gpt[0].strip() if gpt and isinstance(gpt[0], str) else ""
    if not answer:
        raise RowError("answer", "empty, and no 'gpt' turn gives an answer")
    split = split_lettered_options(question) if row.get("type") == "mc" and scorer != "judge" else None
    if split is None:
        return ObjectiveItem(row_id, question, (answer,), "judge", None, answer)
    stem, options = split
    letter = _resolve_letter(answer, options)
    if letter is None:
        raise RowError("answer", f"{answer[:40]!r} names none of the {len(options)} options")
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
