"""What one step or eval reports, as pure functions of what the step produced: the RL step's
record (rollout metrics named as TRL and verl users look for them; README: Metrics), the SFT
step's, sample-table rows, the console's eval line, and the clock behind ``perf/elapsed_s``,
``perf/stage_eta_s`` and ``perf/eta_s``."""

from __future__ import annotations

import math
import random
import time
from typing import Any, Sequence

from personadual.evaluation import EVAL_SETTINGS, setting_of
from personadual.modes import Mode
from personadual.records import Scored


def zero_variance_fraction(scored: list[Scored]) -> dict[str, float]:
    """Fraction of groups (and of each mode's sub-groups) whose rewards are all equal:
    they carry no signal for the policy gradient."""
    by_group: dict[str, list[float]] = {}
    by_mode: dict[tuple[str, int], list[float]] = {}
    for item in scored:
        if item.reward is None:
            continue
        by_group.setdefault(item.rollout.group_id, []).append(item.reward)
        if item.rollout.mode is not None:
            by_mode.setdefault((item.rollout.group_id, int(item.rollout.mode)), []).append(item.reward)

    def flat(groups: dict[Any, list[float]]) -> float:
        if not groups:
            return 0.0
        return sum(max(v) - min(v) < 1e-9 for v in groups.values()) / len(groups)

    return {"group": flat(by_group), "mode_group": flat(by_mode)}


def _stats(values: Sequence[float], prefix: str) -> dict[str, float | None]:
    """mean/std/min/max of ``values`` under ``prefix/`` (None when there are none)."""
    if not values:
        return {f"{prefix}/{name}": None for name in ("mean", "std", "min", "max")}
    mean = sum(values) / len(values)
    return {f"{prefix}/mean": mean, f"{prefix}/std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
            f"{prefix}/min": float(min(values)), f"{prefix}/max": float(max(values))}


def rollout_metrics(scored: list[Scored]) -> dict[str, Any]:
    """One RL step's rollouts, named as TRL and verl users look for them (README: Metrics)."""
    kept = [s for s in scored if s.status != "dropped"]
    count = max(len(scored), 1)
    metrics: dict[str, Any] = {"samples": len(scored), "kept": len(kept)}
    metrics.update(_stats([s.reward for s in kept], "reward"))
    for mode in Mode:
        rewards = [s.reward for s in kept if s.rollout.mode is mode]
        name = mode.name.lower()
        metrics[f"reward/{name}"] = sum(rewards) / len(rewards) if rewards else None
        metrics[f"mode/rate_{name}"] = sum(s.rollout.mode is mode for s in scored) / count
    metrics["mode/rate_none"] = sum(s.rollout.mode is None for s in scored) / count
    if scored and not any(s.rollout.forced for s in scored):  # free choice: the mode rate per setting means something
        for setting in EVAL_SETTINGS:
            chosen = [s for s in scored if setting_of(s.rollout.prompt) == setting]
            if chosen:
                metrics[f"mode/{setting}/rate_personalized"] = (
                    sum(s.rollout.mode is Mode.PERSONALIZED for s in chosen) / len(chosen))
    metrics["reward/accuracy"] = sum(s.correct for s in kept) / len(kept) if kept else None
    lengths = [float(len(s.rollout.response_token_ids)) for s in scored]
    metrics.update({k: v for k, v in _stats(lengths, "response_length").items() if not k.endswith("/std")})
    metrics["response_length/clip_ratio"] = sum(s.rollout.finish_reason == "length" for s in scored) / count
    metrics["zero_variance"] = zero_variance_fraction(kept)
    return metrics


def mode_prob_name(learner_key: str) -> str:
    """The ``mode/*`` name of a learner's ``mode_token_prob[/SETTING][/MODE]`` metric:
    ``token_prob``, ``token_prob_general``, ``aligned/token_prob_personalized``."""
    parts = learner_key.split("/")[1:]
    mode = f"_{parts[-1]}" if parts else ""
    return "/".join([*parts[:-1], f"token_prob{mode}"])


def sft_step_record(learner_metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    """One SFT step's metrics record (``learner_metrics`` loses its ``time/train``)."""
    learner_metrics.pop("time/train", None)
    return {"stage": "sft", "sft": learner_metrics, "timing_s": {"train": seconds, "step": seconds},
            "perf": {"train_tokens_per_s": float(learner_metrics.get("tokens", 0.0)) / max(seconds, 1e-9)}}


def rl_step_record(scored: list[Scored], learner_metrics: dict[str, Any], times: dict[str, float], *,
                   reward_counts: dict[str, int], sync: dict[str, float], staleness: list[int],
                   weight_version: int) -> dict[str, Any]:
    """One RL step's metrics record. ``times`` holds the step's phases (``generate``,
    ``train``...) and its total ``step``; ``learner_metrics`` has lost its ``time/*`` keys."""
    generated = sum(len(s.rollout.response_token_ids) for s in scored)
    perf = {"tokens_per_s": generated / max(times["generate"], 1e-9),
            "train_tokens_per_s": float(learner_metrics.get("tokens", 0.0)) / max(times["train"], 1e-9)}
    mode_probs = {mode_prob_name(key): learner_metrics[key]
                  for key in learner_metrics if key.startswith("mode_token_prob")}
    return {"stage": "rl", **rollout_metrics(scored), **{f"mode/{k}": v for k, v in mode_probs.items()},
            "reward_counts": reward_counts, "learner": learner_metrics, "sync": sync, "timing_s": times,
            "perf": perf, "weight_version": weight_version,
            "staleness": {"max": max(staleness, default=0),
                          "mean": sum(staleness) / len(staleness) if staleness else 0.0,
                          "rollout_weight_version": min((s.rollout.weight_version for s in scored), default=0)}}


def sample_row(item: Scored) -> dict[str, Any]:
    """A sample table row: what was asked, under which persona, what came back, and its score."""
    prompt = item.rollout.prompt
    return {"prompt_id": prompt.id, "setting": setting_of(prompt), "persona": prompt.persona or "",
            "question": prompt.question, "forced_mode": item.rollout.mode.name.lower()
            if item.rollout.forced and item.rollout.mode is not None else "",
            "mode": item.rollout.mode.name.lower() if item.rollout.mode is not None else "none",
            "response": item.rollout.text, "gold": " | ".join(prompt.gold), "reward": item.reward,
            "correct": item.correct}


def training_samples(scored: list[Scored], run_seed: int, step: int, count: int) -> list[dict[str, Any]]:
    """The sample-table rows shown for RL step ``step``: ``count`` of its rollouts, drawn by a
    generator of their own, so which are shown changes nothing else the run draws."""
    shown = random.Random(f"{run_seed}/samples/{step}").sample(scored, min(count, len(scored)))
    return [{"rl_step": step, **sample_row(s)} for s in shown]


def eval_line(tag: str, step: int, result: dict[str, Any]) -> str:
    """One console line per eval: accuracy and personalized-mode rate per setting."""
    cells = [f"{s} acc {result[s]['accuracy']:.3f} pers {result[s]['personalized_mode_rate']:.2f}"
             for s in EVAL_SETTINGS if s in result]
    mean = result.get("mean_accuracy")
    head = f"eval {tag} (RL step {step})" + (f": mean acc {mean:.3f}" if isinstance(mean, (int, float)) else "")
    return head + (" | " + " | ".join(cells) if cells else "")


class RunClock:
    """Elapsed time and the time left. An SFT step and an RL step differ by orders of
    magnitude, so each stage's steps left are costed at that stage's own mean step time;
    the run's total (``eta_s``) is left out (None) until a step of every stage still ahead
    has been timed, rather than guessed."""

    def __init__(self, sft_left: int, rl_left: int) -> None:
        self.start = time.monotonic()
        self.left = {"sft": sft_left, "rl": rl_left}
        self.seconds: dict[str, list[float]] = {"sft": [], "rl": []}

    def step_done(self, stage: str, seconds: float) -> dict[str, float | None]:
        self.left[stage] = max(self.left[stage] - 1, 0)
        self.seconds[stage].append(seconds)
        means = {name: sum(times) / len(times) for name, times in self.seconds.items() if times}
        stage_eta = self.left[stage] * means[stage]
        known = all(name in means for name, left in self.left.items() if left)
        return {"elapsed_s": time.monotonic() - self.start, "stage_eta_s": stage_eta,
                "eta_s": sum(left * means.get(name, 0.0) for name, left in self.left.items()) if known else None}


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
