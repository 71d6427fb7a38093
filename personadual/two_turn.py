"""Two-turn mode-alignment cases over the synthetic world: one persona, two questions whose
best modes differ, so a model that keeps the first turn's mode for the second is caught."""
from __future__ import annotations

import random
from dataclasses import dataclass

from personadual.records import Prompt
from personadual.world import PersonaWorld


@dataclass(frozen=True)
class TwoTurnCase:
    """A two-turn chat under one persona: the second turn's best mode differs from the first's."""

    first: Prompt
    second: Prompt
    order: str  # general_then_personalized | personalized_then_general


def two_turn_cases(world: PersonaWorld, count: int = 48, seed: int = 0) -> list[TwoTurnCase]:
    """Pairs of eval prompts under one persona (the preference question's persona, which
    carries no cue for the objective question): objective -> personalized and back. The
    objective question is about a known entity, so general mode is its best mode."""
    rng = random.Random(seed)
    preferences = [p for p in world.eval_prompts() if p.task_type == "personalized"]
    objective = [p for p in world.eval_prompts()
                 if p.task_type == "objective" and p.persona_setting == "none" and world.is_knowable(p)]
    cases = []
    for index in range(min(count, len(preferences))):
        preference = preferences[index]
        question = rng.choice(objective)
        under_persona = Prompt(
            id=f"{question.id}-under-{preference.id}", question=question.question,
            persona=preference.persona, persona_setting="unaligned", task_type="objective",
            gold=question.gold, scorer=question.scorer, benchmark=question.benchmark)
        order = ("general_then_personalized", "personalized_then_general")[index % 2]
        first, second = (under_persona, preference) if index % 2 == 0 else (preference, under_persona)
        cases.append(TwoTurnCase(first, second, order))
    return cases
