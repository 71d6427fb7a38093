"""Plain-loop references of the advantage estimators, written straight from the formulas in
docs/ARCHITECTURE.md ("The objective"), to check the vectorised code against."""

from __future__ import annotations

import statistics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def dual_loop(rewards: list[float], modes: list[int], groups: list[int], inter: bool = True) -> list[float]:
    out = []
    for r, m, g in zip(rewards, modes, groups):
        own = [rj for rj, mj, gj in zip(rewards, modes, groups) if gj == g and mj == m]
        other = [rj for rj, mj, gj in zip(rewards, modes, groups) if gj == g and mj != m]
        a = r - _mean(own)
        if inter and other:
            a += _mean(own) - _mean(other)
        out.append(a)
    return out


def grpo_loop(rewards: list[float], groups: list[int]) -> list[float]:
    return [r - _mean([rj for rj, gj in zip(rewards, groups) if gj == g]) for r, g in zip(rewards, groups)]


def released_loop(rewards: list[float], modes: list[int], groups: list[int], eps: float = 1e-6) -> list[float]:
    normalised = []
    for r, g in zip(rewards, groups):
        members = [rj for rj, gj in zip(rewards, groups) if gj == g]
        std = statistics.stdev(members) if len(members) > 1 else 0.0
        normalised.append((r - _mean(members)) / (std + eps))
    out = []
    for a, m, g in zip(normalised, modes, groups):
        own = [aj for aj, mj, gj in zip(normalised, modes, groups) if gj == g and mj == m]
        other = [aj for aj, mj, gj in zip(normalised, modes, groups) if gj == g and mj != m]
        out.append((a - _mean(own)) + ((a - _mean(other)) if other else 0.0))
    return out
