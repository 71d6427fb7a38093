"""Dynamic sampling (``algo.filter_groups``, DAPO's): groups whose rewards are all equal leave
the batch, and more prompts are generated until the batch holds ``prompts_per_step`` groups
with a reward spread, or a bound on generation rounds is hit.

A group whose rewards are all equal has a zero advantage on every response under every
estimator (each is centred on its group or its mode sub-group), so it adds only the KL term and
its share of the token-mean denominator, which dilutes the gradient of the groups that do
carry signal. Pure Python: the driver hands in a function that generates and scores a round.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from personadual.records import Scored


@dataclass
class FilterCounts:
    """What one step's dynamic sampling did (the step's ``filter/*`` metrics)."""

    rounds: int = 0  # generation rounds, the step's first included
    prompts_generated: int = 0
    groups_seen: int = 0  # groups with at least one reward
    filtered_groups: int = 0  # left out: every reward of the group equal
    kept_groups: int = 0  # in the learner batch
    surplus_groups: int = 0  # with a reward spread, beyond the batch (or a prompt already in it): discarded
    fallback: int = 0  # 1: no group had a spread, so the step trains on its first round unfiltered

    def metrics(self) -> dict[str, float]:
        values = {f"filter/{key}": float(value) for key, value in asdict(self).items()
                  if key != "filtered_groups"}
        return {"reward/filtered_groups": float(self.filtered_groups), **values}


def groups_in_order(scored: Sequence[Scored]) -> dict[str, list[Scored]]:
    """Samples by group id, groups in order of first appearance."""
    groups: dict[str, list[Scored]] = {}
    for item in scored:
        groups.setdefault(item.rollout.group_id, []).append(item)
    return groups


def has_uniform_rewards(group: Sequence[Scored]) -> bool:
    """True when every scored (not dropped) sample of the group has the same reward; a group
    with one scored sample counts as uniform (nothing to compare it with)."""
    rewards = [item.reward for item in group if item.status != "dropped"]
    return bool(rewards) and all(reward == rewards[0] for reward in rewards)


def next_round_prompts(missing: int, kept: int, seen: int, limit: int) -> int:
    """Prompts to generate for ``missing`` groups, by the share of groups kept so far (every
    round so far if none kept), at most ``limit``."""
    if seen == 0 or kept == 0:
        return limit
    return max(1, min(limit, math.ceil(missing * seen / kept)))


def fill_batch(first: Sequence[Scored], *, target_groups: int, max_rounds: int,
               generate: Callable[[int, int], list[Scored]]) -> tuple[list[Scored], FilterCounts]:
    """The step's batch: groups of ``first`` with a reward spread, then of further rounds
    ``generate(round, prompts)`` (round 1, 2, ...) until ``target_groups`` are held or
    ``max_rounds`` rounds (the first included) have run. Groups keep their arrival order; the
    batch is cut at ``target_groups``. With no group kept at all, the first round is returned
    whole (``fallback``): the learner then has its usual batch, whose advantages are all zero."""
    if target_groups < 1 or max_rounds < 1:
        raise ValueError(f"fill_batch: target_groups and max_rounds must be >= 1, got {target_groups}, {max_rounds}")
    counts = FilterCounts()
    kept: dict[str, list[Scored]] = {}
    batch = list(first)
    while True:
        counts.rounds += 1
        for group_id, group in groups_in_order(batch).items():
            if all(item.status == "dropped" for item in group):
                continue
            counts.groups_seen += 1
            if has_uniform_rewards(group):
                counts.filtered_groups += 1
            elif len(kept) < target_groups and group_id not in kept:
                kept[group_id] = group
            else:
                counts.surplus_groups += 1
        if counts.rounds == 1:
            counts.prompts_generated = len(groups_in_order(first))
        missing = target_groups - len(kept)
        if missing <= 0 or counts.rounds >= max_rounds:
            break
        prompts = next_round_prompts(missing, len(kept), counts.groups_seen, target_groups)
        batch = generate(counts.rounds, prompts)
        counts.prompts_generated += prompts
    if not kept:
        counts.fallback = 1
        counts.kept_groups = len(groups_in_order(first))
        return list(first), counts
    counts.kept_groups = len(kept)
    return [item for group in kept.values() for item in group], counts
