"""Evaluation metrics: accuracy and mode choice per persona setting (docs/ARCHITECTURE.md, "The run folder")."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from personadual.modes import Mode
from personadual.records import Prompt, Scored

EVAL_SETTINGS = ("no_persona", "unaligned", "aligned", "personalized")
_OBJECTIVE_SETTING = {"none": "no_persona", "unaligned": "unaligned", "aligned": "aligned"}


EVALS_DIR = "evals"  # per-item outcomes of every eval: evals/<tag>_step_<N>.jsonl


class KindSource(Protocol):
    """What names an eval item's kind and pool (the synthetic world does: entity kinds, and
    whether training taught the entity's colour)."""

    def kind_of(self, prompt: Prompt) -> str: ...

    def pool_of(self, prompt: Prompt) -> str: ...


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


# ---- per-item outcomes ----------------------------------------------------------------------
def item_rows(scored: Iterable[Scored], *, kinds: KindSource | None = None,
              probe: dict[str, tuple[float, float]] | None = None) -> list[dict[str, Any]]:
    """One row per scored response: item id, setting, kind (the world's entity kind or
    "preference"; otherwise the benchmark), pool (the world's entity pool: known or unseen;
    otherwise null), the forced mode (null: the model chose), the mode
    it answered in, and whether it was right (null when its score was dropped). ``probe``:
    per prompt id, log p of the general and personalized mode token at the first response
    position (``mode_probe_values``), added as ``p_personalized`` and ``logit_gap``
    (personalized minus general: greedy decoding picks personalized mode when it is > 0)."""
    rows = []
    for item in scored:
        prompt = item.rollout.prompt
        mode = item.rollout.mode
        row: dict[str, Any] = {
            "id": prompt.id, "setting": setting_of(prompt),
            "kind": kinds.kind_of(prompt) if kinds is not None else prompt.benchmark,
            "pool": kinds.pool_of(prompt) if kinds is not None else None,
            "benchmark": prompt.benchmark,
            "forced": item.rollout.mode.name.lower() if item.rollout.forced and mode is not None else None,
            "mode": mode.name.lower() if mode is not None else None,
            "correct": None if item.status == "dropped" else bool(item.correct),
        }
        if probe is not None and prompt.id in probe:
            general, personalized = probe[prompt.id]
            row["p_personalized"] = math.exp(personalized)
            row["logit_gap"] = personalized - general
        rows.append(row)
    return rows


def eval_items_path(run_dir: Path | str, tag: str, step: int) -> Path:
    """``evals/sft_step_0.jsonl``, ``evals/rl_step_10.jsonl`` (the evals every
    ``run.eval_every``, tagged ``step_10``), ``evals/final_step_40.jsonl``."""
    name = f"rl_step_{step}" if tag == f"step_{step}" else f"{tag}_step_{step}"
    return Path(run_dir) / EVALS_DIR / f"{name}.jsonl"


def write_eval_items(run_dir: Path | str, tag: str, step: int, rows: Sequence[dict[str, Any]]) -> Path:
    """``evals/<tag>_step_<step>.jsonl``, written whole or not at all."""
    path = eval_items_path(run_dir, tag, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    os.replace(tmp, path)
    return path


def read_eval_items(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def free_outcomes(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """``{item id: 1.0 correct / 0.0 wrong}`` over the model's own mode choice (forced rows
    and dropped scores left out): what ``paired_bootstrap`` pairs runs on."""
    return {row["id"]: float(row["correct"]) for row in rows
            if row.get("forced") is None and row.get("correct") is not None}


# ---- the mode-token probe ------------------------------------------------------------------
def probe_prompts(prompts: Sequence[Prompt], per_setting: int, seed: int = 0) -> list[Prompt]:
    """A fixed probe set: up to ``per_setting`` prompts of each eval setting, a seeded sample
    (the eval lists are grouped by entity pool, so a prefix would hold only known entities)."""
    import random

    chosen: list[Prompt] = []
    for setting in EVAL_SETTINGS:
        group = [p for p in prompts if setting_of(p) == setting]
        chosen += random.Random(f"{seed}/probe/{setting}").sample(group, min(per_setting, len(group)))
    return chosen


def probe_summary(prompts: Sequence[Prompt], logprobs: Sequence[tuple[float, float]],
                  ) -> dict[str, dict[str, float]]:
    """Per eval setting: the mean probability of the personalized mode token at the first
    response position, and the mean logit gap (personalized minus general)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for prompt, (general, personalized) in zip(prompts, logprobs, strict=True):
        total = sums[setting_of(prompt)]
        total[0] += math.exp(personalized)
        total[1] += personalized - general
        total[2] += 1
    return {setting: {"p_personalized": sums[setting][0] / sums[setting][2],
                      "logit_gap": sums[setting][1] / sums[setting][2]}
            for setting in EVAL_SETTINGS if setting in sums}
