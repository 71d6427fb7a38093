"""Evaluation metrics: accuracy and mode choice per persona setting (docs/ARCHITECTURE.md, "The run folder")."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from personadual.modes import Mode
from personadual.records import Prompt, Scored

EVAL_SETTINGS = ("no_persona", "unaligned", "aligned", "personalized")
_OBJECTIVE_SETTING = {"none": "no_persona", "unaligned": "unaligned", "aligned": "aligned"}


def setting_of(prompt: Prompt) -> str:
    """The eval setting a prompt belongs to: personalized tasks, else its persona setting."""
    if prompt.task_type == "personalized":
        return "personalized"
    return _OBJECTIVE_SETTING[prompt.persona_setting]


@dataclass
class SettingResult:
    count: int = 0
    correct: int = 0
    personalized: int = 0
    no_mode: int = 0
    dropped: int = 0

    def add(self, scored: Scored) -> None:
        if scored.status == "dropped":
            self.dropped += 1
            return
        self.count += 1
        self.correct += int(scored.correct)
        mode = scored.rollout.mode
        self.personalized += int(mode is Mode.PERSONALIZED)
        self.no_mode += int(mode is None)

    def as_dict(self) -> dict[str, float | int]:
        total = max(self.count, 1)
        return {
            "accuracy": self.correct / total,
            "personalized_mode_rate": self.personalized / total,
            "no_mode_rate": self.no_mode / total,
            "count": self.count,
            "dropped": self.dropped,
        }


def summarize(scored: Iterable[Scored]) -> dict[str, dict]:
    """``{setting: metrics}`` over every benchmark, plus ``by_benchmark[name][setting]``
    whenever a batch mixes benchmarks."""
    overall: dict[str, SettingResult] = defaultdict(SettingResult)
    per_benchmark: dict[str, dict[str, SettingResult]] = defaultdict(lambda: defaultdict(SettingResult))
    for item in scored:
        setting = setting_of(item.rollout.prompt)
        overall[setting].add(item)
        per_benchmark[item.rollout.prompt.benchmark][setting].add(item)
    result: dict[str, dict] = {s: overall[s].as_dict() for s in EVAL_SETTINGS if s in overall}
    if result:
        result["mean_accuracy"] = sum(r["accuracy"] for r in result.values()) / len(result)
    if len(per_benchmark) > 1:
        result["by_benchmark"] = {
            name: {s: r.as_dict() for s, r in settings.items()} for name, settings in per_benchmark.items()}
    return result


def forced_mode_summary(scored: Iterable[Scored]) -> dict[str, dict[str, float]]:
    """From forced-prefix responses (one or more per prompt and mode): accuracy when always
    forcing each mode (the single-mode baselines) and the upper bound where a prompt counts
    as solved when either mode's response is correct (the paper's Table 8)."""
    per_prompt: dict[str, dict[Mode, list[bool]]] = defaultdict(lambda: defaultdict(list))
    setting: dict[str, str] = {}
    for item in scored:
        if item.status == "dropped" or item.rollout.mode is None:
            continue
        prompt = item.rollout.prompt
        per_prompt[prompt.id][item.rollout.mode].append(bool(item.correct))
        setting[prompt.id] = setting_of(prompt)
    result: dict[str, dict[str, float]] = {"force_general": {}, "force_personalized": {}, "upper_bound": {}}
    for name in EVAL_SETTINGS:
        ids = [pid for pid, s in setting.items() if s == name]
        if not ids:
            continue
        for mode, key in ((Mode.GENERAL, "force_general"), (Mode.PERSONALIZED, "force_personalized")):
            outcomes = [o for pid in ids for o in per_prompt[pid][mode]]
            result[key][name] = sum(outcomes) / len(outcomes) if outcomes else 0.0
        result["upper_bound"][name] = sum(
            any(per_prompt[pid][Mode.GENERAL]) or any(per_prompt[pid][Mode.PERSONALIZED]) for pid in ids) / len(ids)
    return result


def mode_alignment(turns: Iterable[tuple[str, Scored, Mode]]) -> dict[str, float]:
    """``turns``: (case order, the second turn's response, its best mode). The rate at which
    the model's chosen mode matches the best one, per order and overall (the paper's RQ6)."""
    totals: dict[str, list[bool]] = defaultdict(list)
    for order, scored, best in turns:
        aligned = scored.rollout.mode is best
        totals[order].append(aligned)
        totals["overall"].append(aligned)
    return {order: sum(v) / len(v) for order, v in totals.items() if v}
