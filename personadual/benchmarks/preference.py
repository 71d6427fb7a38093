"""Personalized datasets: a user persona, a query and a preferred / dispreferred response.

AlignX ``JinaLeejnl/AlignX`` (training set), split ``train``: ``prompt`` str (the post),
``chosen`` str, ``rejected`` str, ``Preference Direction`` [0 | 0.5 | 1] x 90,
``Demographic Information`` str (a natural-language description of the user),
``User-Generated Content`` [{prompt, comment, Preference Direction}],
``Pair-wise Comparative Feedback`` [{prompt, chosen, rejected, Preference Direction}].
The persona here is the demographic description.

PersonaFeedback ``PersonalAILab/PersonaFeedback`` (benchmark): JSONL files
``data/{general,spedific}/{easy,medium,hard}.jsonl`` (the repo spells "spedific") with rows
``user_id``, ``question``, ``chosen``, ``reject``; personas in ``persona/all_personas.jsonl``,
one JSON object per line (``Name``, ``Demographics``, ``Personality``, ``Preference``, ``Bias``),
``user_id`` being the persona's 1-based line number unless the persona rows carry ``user_id``.

FSPO roleplay ``sher222/persona-iterative-responses`` (benchmark), split ``test``: ``x`` str
(the question), ``yw`` / ``yl`` str (preferred / dispreferred response), ``level`` str,
``score_persona`` {``persona_description``, ``persona_uuid``, ``traits``} (the user who judged),
plus ``question``, ``persona_w``, ``persona_l`` structs.

Pairwise format "choice" asks which of the two responses suits the user (scorer
multiple_choice, the two shown in a seeded order); "open" asks the query itself and hands the
preferred response to the judge as the reference (scorer judge).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from collections import Counter
from typing import Any

from personadual.benchmarks.source import RowError, field, load_rows, map_rows, text
from personadual.data import DataError
from personadual.records import Prompt

PAIRWISE_FORMATS = ("choice", "open")
CHOICE_QUESTION = "Which of these two responses would I prefer?"
ALIGNX_COLUMNS = ("prompt", "chosen", "rejected", "Demographic Information")
FSPO_COLUMNS = ("x", "yw", "yl", "score_persona")
PERSONAFEEDBACK_COLUMNS = ("user_id", "question", "chosen", "reject")
PERSONAFEEDBACK_FILES = tuple(f"data/{track}/{level}.jsonl" for track in ("general", "spedific")
                              for level in ("easy", "medium", "hard"))
PERSONAFEEDBACK_PERSONAS = "persona/all_personas.jsonl"


@dataclass(frozen=True)
class PairwiseItem:
    row_id: str
    query: str
    persona: str
    chosen: str
    rejected: str


def pairwise_prompt(benchmark: str, item: PairwiseItem, fmt: str, seed: int) -> Prompt:
    prompt_id = f"{benchmark}-{item.row_id}-aligned"
    if fmt == "open":
        return Prompt(prompt_id, item.query, item.persona, "aligned", "personalized", (item.chosen,),
                      "judge", None, benchmark)
    # Seeded per row, not per position, so the order survives a different limit or shuffle.
    chosen_first = random.Random(f"{seed}|{benchmark}|{item.row_id}").random() < 0.5
    choices = (item.chosen, item.rejected) if chosen_first else (item.rejected, item.chosen)
    return Prompt(prompt_id, f"{item.query}\n\n{CHOICE_QUESTION}", item.persona, "aligned",
                  "personalized", ("A" if chosen_first else "B",), "multiple_choice", choices,
                  benchmark)


def alignx_item(row: dict[str, Any], index: int) -> PairwiseItem:
    return PairwiseItem(str(index), text(row, "prompt"), text(row, "Demographic Information"),
                        text(row, "chosen"), text(row, "rejected"))


def fspo_item(row: dict[str, Any], index: int) -> PairwiseItem:
    return PairwiseItem(str(index), text(row, "x"), text(row, "score_persona.persona_description"),
                        text(row, "yw"), text(row, "yl"))


def personafeedback_items(source: str, *, subset: str | None, limit: int | None,
                          cache_dir: str | None, skipped: Counter[str] | None = None) -> list[PairwiseItem]:
    """``subset`` picks files by prefix: "general", "spedific/hard", ...; None reads all six.
    With ``skipped``, invalid rows (and personas) are left out and counted by reason."""
    wanted = [name for name in PERSONAFEEDBACK_FILES
              if subset is None or name.removeprefix("data/").startswith(subset.strip("/"))]
    if not wanted:
        raise DataError(f"personafeedback.subset: {subset!r} matches none of "
                        f"{[name.removeprefix('data/').removesuffix('.jsonl') for name in PERSONAFEEDBACK_FILES]}")
    personas = _personafeedback_personas(source, cache_dir, skipped)
    items: list[PairwiseItem] = []
    for name in wanted:
        remaining = None if limit is None else limit - len(items)
        if remaining is not None and remaining <= 0:
            break
        rows = load_rows(source, split="train", data_files=name, limit=remaining,
                         required=PERSONAFEEDBACK_COLUMNS, cache_dir=cache_dir, benchmark="personafeedback")
        tag = name.removeprefix("data/").removesuffix(".jsonl").replace("/", ".")

        def make(row: dict[str, Any], index: int) -> PairwiseItem:
            user = str(field(row, "user_id"))
            if user not in personas:
                raise RowError("user_id", f"{user!r} has no persona in {PERSONAFEEDBACK_PERSONAS}")
            return PairwiseItem(f"{tag}.{index}", text(row, "question"), personas[user], text(row, "chosen"),
                                text(row, "reject"))

        items.extend(map_rows(rows, make, skipped))
    return items


def _personafeedback_personas(source: str, cache_dir: str | None, skipped: Counter[str] | None) -> dict[str, str]:
    rows = load_rows(source, split="train", data_files=PERSONAFEEDBACK_PERSONAS, cache_dir=cache_dir,
                     benchmark="personafeedback personas")
    keyed_by = next((name for name in ("user_id", "id") if name in rows.data.column_names), None)

    def make(row: dict[str, Any], index: int) -> tuple[str, str]:
        key = str(row[keyed_by]) if keyed_by else str(index + 1)
        description = describe_profile({k: v for k, v in row.items() if k != keyed_by})
        if not description:
            raise RowError("persona", "every field is empty")
        return key, description

    return dict(map_rows(rows, make, skipped, label="persona "))


def describe_profile(profile: dict[str, Any]) -> str:
    """A structured profile as one line: ``Name: Ana. Demographics: age: 34; job: nurse. ...``."""
    parts = []
    for key, value in profile.items():
        rendered = _render(value)
        if rendered:
            parts.append(f"{key}: {rendered}")
    return ". ".join(parts)


def _render(value: Any) -> str:
    if isinstance(value, dict):
        inner = [f"{k}: {_render(v)}" for k, v in value.items() if _render(v)]
        return "; ".join(inner)
    if isinstance(value, list):
        return ", ".join(r for r in (_render(v) for v in value) if r)
    return "" if value is None else str(value).strip()
