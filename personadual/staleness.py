"""How many learner updates old a step's rollouts are, and the refusal of a batch staler than
``algo.max_staleness`` (pipelined generation makes rollouts one update old by design)."""

from __future__ import annotations

from typing import Sequence


class StaleRolloutsError(RuntimeError):
    """Rollouts generated with weights more learner updates old than algo.max_staleness."""


def rollout_staleness(versions: Sequence[int], update_versions: Sequence[int]) -> list[int]:
    """Staleness, in learner updates, of rollouts generated with weight ``versions``: how many
    of the learner's RL updates (``update_versions``: the weight version after each) came
    after them. Counted in updates, not versions: one update may hold several optimizer steps."""
    return [sum(update > version for update in update_versions) for version in versions]


def check_staleness(step: int, versions: Sequence[int], update_versions: Sequence[int],
                    max_staleness: int) -> list[int]:
    """Each rollout's staleness; refuses the batch when any is staler than ``max_staleness``."""
    staleness = rollout_staleness(versions, update_versions)
    if max(staleness, default=0) > max_staleness:
        stale = sum(value > max_staleness for value in staleness)
        raise StaleRolloutsError(f"{stale} rollouts offered to RL step {step} are {max(staleness)} learner "
                                 f"updates old (weight version {min(versions)}, learner at "
                                 f"{update_versions[-1]}); algo.max_staleness={max_staleness}")
    return staleness
