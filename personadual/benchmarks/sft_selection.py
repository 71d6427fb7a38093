"""SFT data as in the paper (appendix B.1), from a teacher's trajectories on real data.

- Personalized tasks train on a personalized-mode trajectory (a correct one).
- Objective tasks train on a personalized-mode trajectory only where using the persona yields
  the right answer (the teacher's personalized-mode answer is correct); otherwise on a correct
  general-mode one. A prompt without a persona can only get a general-mode trajectory.
- A prompt the teacher never got right is dropped (and counted): training on a wrong
  trajectory would teach the wrong answer.

The teacher file is JSONL, one trajectory a row: ``question`` str, ``persona`` str | null,
``mode`` "general" | "personalized" (or the mode token), ``response`` str (with or without the
leading mode token), ``correct`` bool, and optionally ``id`` (a Prompt id, matched exactly;
otherwise rows match prompts by (question, persona)). Tokenise each selected pair with
``personadual.sft_data.tokenize_trajectory(tokenizer, prompt, response)``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from personadual.benchmarks.source import RowError, load_rows, map_rows
from personadual.modes import Mode, mode_of_text
from personadual.records import Prompt

TEACHER_COLUMNS = ("question", "persona", "mode", "response", "correct")
_MODE_NAMES = {"general": Mode.GENERAL, "personalized": Mode.PERSONALIZED,
               Mode.GENERAL.token: Mode.GENERAL, Mode.PERSONALIZED.token: Mode.PERSONALIZED}


@dataclass(frozen=True)
class TeacherRow:
    question: str
    persona: str | None
    mode: Mode
    response: str  # starts with its mode token
    correct: bool
    prompt_id: str | None = None


def read_teacher_rows(path: str | Path, cache_dir: str | None = None) -> list[TeacherRow]:
    rows = load_rows(str(path), split="train", required=TEACHER_COLUMNS, cache_dir=cache_dir,
                     benchmark="teacher trajectories")
    return map_rows(rows, _teacher_row, None)


def _teacher_row(row: dict[str, Any], index: int) -> TeacherRow:
    question, persona, response = row.get("question"), row.get("persona"), row.get("response")
    if not isinstance(question, str) or not question.strip():
        raise RowError("question", "must be a non-empty string")
    if persona is not None and (not isinstance(persona, str) or not persona.strip()):
        raise RowError("persona", "must be a non-empty string or null")
    mode = _MODE_NAMES.get(str(row.get("mode")).strip())
    if mode is None:
        raise RowError("mode", f"{row.get('mode')!r} is not one of general, personalized")
    if not isinstance(response, str) or not response.strip():
        raise RowError("response", "must be a non-empty string")
    declared = mode_of_text(response)
    if declared is not None and declared != mode:
        raise RowError("response", f"starts with {declared.token} but mode is {mode.token}")
    correct = row.get("correct")
    if not isinstance(correct, bool):
        raise RowError("correct", f"must be true or false, got {correct!r}")
    prompt_id = row.get("id")
    return TeacherRow(question.strip(), persona.strip() if persona else None, mode,
                      response.lstrip() if declared else f"{mode.token} {response.strip()}", correct,
                      str(prompt_id) if prompt_id not in (None, "") else None)


def choose_trajectory(prompt: Prompt, rows: Sequence[TeacherRow]) -> TeacherRow | None:
    """The selection rule for one prompt, given its teacher trajectories (file order)."""
    def first_correct(mode: Mode) -> TeacherRow | None:
        return next((r for r in rows if r.mode == mode and r.correct), None)

    if prompt.task_type == "personalized":
        return first_correct(Mode.PERSONALIZED)
    if prompt.persona is not None:
        personalized = first_correct(Mode.PERSONALIZED)
        if personalized is not None:
            return personalized
    return first_correct(Mode.GENERAL)


def select_sft_trajectories(prompts: Sequence[Prompt], teacher: str | Path | Sequence[TeacherRow], *,
                            stats: dict[str, int] | None = None,
                            cache_dir: str | None = None) -> list[tuple[Prompt, str]]:
    """(Prompt, response) pairs for SFT; ``stats`` receives the counts per outcome."""
    rows = read_teacher_rows(teacher, cache_dir) if isinstance(teacher, (str, Path)) else list(teacher)
    by_id = {p.id: p for p in prompts}
    by_text: dict[tuple[str, str | None], list[Prompt]] = defaultdict(list)
    for prompt in prompts:
        by_text[(prompt.question.strip(), prompt.persona)].append(prompt)
    per_prompt: dict[str, list[TeacherRow]] = defaultdict(list)
    counts = {"personalized": 0, "general": 0, "dropped": 0, "unmatched_rows": 0}
    for row in rows:
        if row.prompt_id is not None:
            matched = [by_id[row.prompt_id]] if row.prompt_id in by_id else []
        else:
            matched = by_text.get((row.question, row.persona), [])
        if not matched:
            counts["unmatched_rows"] += 1
        for prompt in matched:
            per_prompt[prompt.id].append(row)
    selected = []
    for prompt in prompts:
        choice = choose_trajectory(prompt, per_prompt.get(prompt.id, []))
        if choice is None:
            counts["dropped"] += 1
            continue
        counts["personalized" if choice.mode == Mode.PERSONALIZED else "general"] += 1
        selected.append((prompt, choice.response))
    if stats is not None:
        stats.update(counts)
    return selected
