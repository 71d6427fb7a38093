"""Per-run targets for a persona-world run: does RL teach the mode choice without breaking
either mode? Each a check on the final eval against the run's SFT eval, so the README's
"each seed meets the targets" is a printed fact, not arithmetic done by hand.

The README lists them under "Comparing runs"; at 200 eval items per setting one item moves
a setting by 0.5%, so a margin of 0.02 is four items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Slack for comparing sums of 1/200 steps against decimal limits written by hand.
_EPS = 1e-9
MIN_OBJECTIVE_ITEMS = 200
MIN_PERSONALIZED_ITEMS = 150


@dataclass(frozen=True)
class Target:
    name: str
    met: bool
    value: str  # what was measured, formatted for a table


def _accuracy(result: dict[str, Any], setting: str) -> float:
    return float(result[setting]["accuracy"])


def _upper_bound(result: dict[str, Any], setting: str) -> float:
    return float(result["baselines"]["upper_bound"][setting])


def check_targets(final: dict[str, Any], sft: dict[str, Any] | None) -> list[Target]:
    """The targets ``final`` (summary.json's ``eval``) meets or misses; the ones comparing
    with SFT need ``sft`` (the SFT checkpoint's eval). Empty for evals without the persona
    world's four settings and forced-mode baselines (file datasets)."""
    settings = ("no_persona", "unaligned", "aligned", "personalized")
    if not all(s in final for s in settings) or "baselines" not in final:
        return []
    none, unaligned, aligned, personalized = (_accuracy(final, s) for s in settings)
    rate_unaligned = float(final["unaligned"]["personalized_mode_rate"])
    none_bound = _upper_bound(final, "no_persona")
    targets = [
        Target("unaligned within 0.02 of no persona", abs(unaligned - none) <= 0.02 + _EPS,
               f"{unaligned - none:+.3f}"),
        Target("no persona within 0.05 of its either-mode upper bound", none_bound - none <= 0.05 + _EPS,
               f"{none:.3f} vs {none_bound:.3f}"),
        Target("aligned >= no persona + 0.10", aligned >= none + 0.10 - _EPS, f"{aligned - none:+.3f}"),
        Target("personalized >= 0.95", personalized >= 0.95 - _EPS, f"{personalized:.3f}"),
        Target("personalized-mode rate on unaligned <= 0.05", rate_unaligned <= 0.05 + _EPS, f"{rate_unaligned:.3f}"),
        Target(f"eval items >= {MIN_OBJECTIVE_ITEMS} per objective setting, {MIN_PERSONALIZED_ITEMS} personalized",
               all(int(final[s]["count"]) >= MIN_OBJECTIVE_ITEMS for s in settings[:3])
               and int(final["personalized"]["count"]) >= MIN_PERSONALIZED_ITEMS,
               "/".join(str(final[s]["count"]) for s in settings)),
    ]
    if sft is not None and all(s in sft for s in settings) and "baselines" in sft:
        start, bound = _accuracy(sft, "aligned"), _upper_bound(sft, "aligned")
        closed = (aligned - start) / (bound - start) if bound > start else float("nan")
        targets += [
            Target("RL closes half of SFT's aligned gap to its upper bound", closed >= 0.5 - _EPS,
                   f"{closed:.2f} ({start:.3f} -> {aligned:.3f}, bound {bound:.3f})"),
            Target("mean above SFT's", float(final["mean_accuracy"]) > float(sft["mean_accuracy"]) + _EPS,
                   f"{float(sft['mean_accuracy']):.3f} -> {float(final['mean_accuracy']):.3f}"),
        ]
    return targets


def format_missed(targets: list[Target]) -> str:
    """The missed targets, each with its figure ("NAME (VALUE); ..."); empty when none was."""
    return "; ".join(f"{t.name} ({t.value})" for t in targets if not t.met)


def format_targets(label: str, targets: list[Target]) -> str:
    met = sum(t.met for t in targets)
    missed = format_missed(targets)
    return f"targets, {label}: {met} of {len(targets)} met" + (f"; missed: {missed}" if missed else "")
