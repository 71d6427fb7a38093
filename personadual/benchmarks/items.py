"""What a dataset row becomes before personas are attached, and helpers shared by the mappers."""

from __future__ import annotations

import re
from dataclasses import dataclass

from personadual.benchmarks.source import RowError
from personadual.records import option_letters


@dataclass(frozen=True)
class ObjectiveItem:
    """One objective question, persona-free; the registry expands it into Prompts per setting."""

    row_id: str
    question: str
    gold: tuple[str, ...]
    scorer: str
    choices: tuple[str, ...] | None = None
    answer_text: str = ""  # the right answer in words: what an aligned persona is built around


def letter_of(index: int, count: int, name: str) -> str:
    if not 0 <= index < count:
        raise RowError(name, f"{index} is outside the {count} options")
    return option_letters(count)[index]


def unique(values: list[str]) -> tuple[str, ...]:
    """Order-preserving de-duplication of non-empty strings."""
    seen: dict[str, None] = {}
    for value in values:
        value = value.strip()
        if value and value not in seen:
            seen[value] = None
    return tuple(seen)


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s+(.+?)\s*$")


def split_lettered_options(question: str) -> tuple[str, tuple[str, ...]] | None:
    """``"stem\\nA. x\\nB. y"`` -> ``("stem", ("x", "y"))`` when the trailing lines are A, B, C...

    Returns None unless the question ends with at least two options lettered in order from A.
    """
    lines = question.rstrip().splitlines()
    found: list[tuple[str, str]] = []  # (letter, option text)
    for line in reversed(lines):
        match = _OPTION_LINE.match(line)
        if not match:
            break
        found.append((match.group(1), match.group(2)))
    found.reverse()
    if len(found) < 2 or [letter for letter, _ in found] != option_letters(len(found)):
        return None
    stem = "\n".join(lines[: len(lines) - len(found)]).strip()
    return (stem, tuple(option for _, option in found)) if stem else None
