"""Plots of a run (``plots/*.png``) from its metrics.jsonl and summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from personadual.evaluation import EVAL_SETTINGS
from personadual.tracking import read_metrics

TIME_PHASES = ("generate", "score", "reference", "train", "sync", "idle")


def _series(records: list[dict[str, Any]], *path: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value: Any = record
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def write_plots(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    records = read_metrics(run_dir)
    rl = [r for r in records if r.get("stage") == "rl"]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("general", "personalized"):
        ax.plot(*_series(rl, f"reward/{mode}"), label=mode)
    ax.set(xlabel="RL step", ylabel="mean reward", title="Reward per mode")
    ax.legend()
    written.append(_save(fig, out / "reward_per_mode.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*_series(rl, "learner", "kl"), label="KL (k3)")
    ax.set(xlabel="RL step", ylabel="KL to reference", title="KL")
    written.append(_save(fig, out / "kl.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(rl)
    steps = [r["step"] for r in rl]
    for phase in TIME_PHASES:
        values = [float((r.get("time") or {}).get(phase) or 0.0) for r in rl]
        ax.bar(steps, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="RL step", ylabel="seconds", title="Step time breakdown")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "step_time.png"))

    evals = [r for r in records if r.get("stage") == "eval" or "eval" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [r.get("tag") or f"step_{r['step']}" for r in evals]
    width = 0.8 / max(len(evals), 1)
    for index, (label, record) in enumerate(zip(labels, evals)):
        rates = [float(record["eval"].get(s, {}).get("personalized_mode_rate", 0.0)) for s in EVAL_SETTINGS]
        ax.bar([x + index * width for x in range(len(EVAL_SETTINGS))], rates, width=width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(EVAL_SETTINGS))], EVAL_SETTINGS)
    ax.set(ylabel="personalized-mode rate", ylim=(0, 1), title="Mode choice per setting")
    ax.legend(fontsize=7)
    written.append(_save(fig, out / "mode_rate_per_setting.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def format_eval_table(summary: dict[str, Any], run_dir: Path | str = "") -> str:
    """A markdown table of free-mode accuracy and personalized-mode rate per setting."""
    rows = ["| checkpoint | setting | accuracy | personalized-mode rate |", "|---|---|---|---|"]
    for tag, result in (("SFT", summary.get("eval_sft")), ("DualGRPO", summary.get("eval"))):
        if not result:
            continue
        for setting in EVAL_SETTINGS:
            if setting in result:
                r = result[setting]
                rows.append(f"| {tag} | {setting} | {r['accuracy']:.3f} | {r['personalized_mode_rate']:.3f} |")
    final = summary.get("eval") or {}
    baselines = final.get("baselines")
    if baselines:
        rows += ["", "| final policy, forced | " + " | ".join(EVAL_SETTINGS) + " |",
                 "|---" * (len(EVAL_SETTINGS) + 1) + "|"]
        for key in ("force_general", "force_personalized", "upper_bound"):
            rows.append(f"| {key} | " + " | ".join(f"{baselines[key].get(s, float('nan')):.3f}"
                                                   for s in EVAL_SETTINGS) + " |")
    if final.get("two_turn_alignment"):
        rows.append("\ntwo-turn mode alignment: " + ", ".join(
            f"{k} {v:.3f}" for k, v in final["two_turn_alignment"].items()))
    header = f"Run {run_dir}" if run_dir else "Run"
    return "\n".join([header, *rows])
