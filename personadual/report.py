"""Reports of runs: a run's own plots (``plots/*.png``), and the comparison of several runs
in the shape of the paper's Table 1.

    python -m personadual.report runs/A [runs/B ...] [--out DIR]

prints the markdown table and writes it with PNG plots (mode rate per setting per run,
reward curves) to ``--out`` (default: ``report/`` beside the first run). Given one sweep
folder (``python -m personadual.sweep``'s ``--out``) it reports the sweep instead: mean and
spread over seeds and paired bootstrap intervals (personadual/sweep_report.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError  # omegaconf's parser

from personadual.evaluation import EVAL_SETTINGS
from personadual.run_targets import check_targets, format_targets
from personadual.sweep_report import is_sweep_folder, report_sweep
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
    _legend_outside(ax)
    written.append(_save(fig, out / "reward_per_mode.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*_series(rl, "learner", "kl"), label="KL (k3)")
    ax.set(xlabel="RL step", ylabel="KL to reference", title="KL")
    written.append(_save(fig, out / "kl.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(rl)
    steps = [r["step"] for r in rl]
    for phase in TIME_PHASES:
        values = [float((r.get("timing_s") or {}).get(phase) or 0.0) for r in rl]
        ax.bar(steps, values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="RL step", ylabel="seconds", title="Step time breakdown")
    _legend_outside(ax)
    written.append(_save(fig, out / "step_time.png"))

    sft = [r for r in records if r.get("stage") == "sft"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*_series(sft, "sft", "loss"), label="SFT loss")
    ax.set(xlabel="SFT step", ylabel="cross-entropy (response tokens)", title="SFT loss")
    written.append(_save(fig, out / "sft_loss.png"))

    evals = eval_records(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    for setting in EVAL_SETTINGS:
        points = [(step, float(result[setting]["accuracy"])) for step, _, result in evals if setting in result]
        if points:
            ax.plot(*zip(*points), marker="o", label=setting)
    ax.set(xlabel="RL step (0: after SFT)", ylabel="free-mode accuracy", ylim=(0, 1),
           title="Eval accuracy per persona setting")
    _legend_outside(ax)
    written.append(_save(fig, out / "eval_accuracy.png"))

    written.append(write_probe_plot(records, out / "mode_probe.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(evals), 1)
    for index, (_, label, result) in enumerate(evals):
        rates = [float(result.get(s, {}).get("personalized_mode_rate", 0.0)) for s in EVAL_SETTINGS]
        ax.bar([x + index * width for x in range(len(EVAL_SETTINGS))], rates, width=width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(EVAL_SETTINGS))], EVAL_SETTINGS)
    ax.set(ylabel="personalized-mode rate", ylim=(0, 1), title="Mode choice per setting")
    _legend_outside(ax)
    written.append(_save(fig, out / "mode_rate_per_setting.png"))
    return written


def probe_series(records: list[dict[str, Any]], setting: str,
                 name: str = "p_personalized") -> tuple[list[int], list[float]]:
    """The probe's value for one setting over RL steps: step 0 from the eval after SFT, then
    every RL step's ``mode/probe/<setting>/<name>``."""
    steps, values = [], []
    for record in records:
        if record.get("stage") == "eval" and record.get("tag") == "sft":
            value = ((record.get("eval") or {}).get("probe") or {}).get(setting, {}).get(name)
        elif record.get("stage") == "rl":
            value = record.get(f"mode/probe/{setting}/{name}")
        else:
            continue
        if isinstance(value, (int, float)):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def write_probe_plot(records: list[dict[str, Any]], path: Path) -> Path:
    """P(personalized mode token at the first response position) per persona setting over RL
    steps, on the run's fixed probe prompts."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for setting in EVAL_SETTINGS:
        steps, values = probe_series(records, setting)
        if steps:
            ax.plot(steps, values, marker=".", label=setting)
    ax.set(xlabel="RL step (0: after SFT)", ylabel="mean P(personalized mode token)", ylim=(0, 1),
           title="Mode-token probe per persona setting")
    _legend_outside(ax)
    return _save(fig, path)


def eval_records(records: list[dict[str, Any]]) -> list[tuple[int, str, dict[str, Any]]]:
    """(RL step, label, eval result) of every eval a run logged, in order: after SFT (step 0),
    every ``run.eval_every`` steps (inside the RL step's record), and the final one."""
    evals = []
    for record in records:
        if record.get("stage") == "eval":
            evals.append((record["step"], str(record.get("tag")), record["eval"]))
        elif record.get("stage") == "rl" and isinstance(record.get("eval"), dict):
            evals.append((record["step"], f"step_{record['step']}", record["eval"]))
    return evals


def _legend_outside(ax: Any) -> None:
    """The legend right of the axes, where it covers no bars or lines."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def format_eval_table(summary: dict[str, Any], run_dir: Path | str = "", method: str = "DualGRPO") -> str:
    """A markdown table of free-mode accuracy and personalized-mode rate per setting;
    ``method`` names the RL checkpoint's row (``method_label`` of the run's config)."""
    rows = ["| checkpoint | setting | accuracy | personalized-mode rate |", "|---|---|---|---|"]
    for tag, result in (("SFT", summary.get("eval_sft")), (method, summary.get("eval"))):
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


# ---- comparing runs (the paper's Table 1) -------------------------------------------------
OBJECTIVE_COLUMNS = (("no_persona", "None"), ("unaligned", "Unaligned"), ("aligned", "Aligned"))
SFT_METHODS = ("SFT", "checkpoint eval")  # method_label's names for runs without an RL stage
COLLAPSE_RATE = 0.9  # one mode in over 90% of responses in every setting: the paper's collapse


@dataclass
class RunReport:
    run_dir: Path
    method: str
    summary: dict[str, Any]
    records: list[dict[str, Any]]


def method_label(config: dict[str, Any]) -> str:
    """The paper's name for what a run's ``algo`` section trained; a run without an RL stage
    is its SFT row, or (no training at all) the evaluation of the checkpoint it loaded."""
    algo = config.get("algo") or {}
    if algo.get("steps", 1) == 0 and not algo.get("epochs"):  # a config without them has the default RL stage
        sft = config.get("sft") or {}
        return "SFT" if sft.get("steps", 1) or sft.get("epochs") else "checkpoint eval"
    labels = {"dual": "DualGRPO", "grpo": "w/o DualAdv (GRPO)", "dual_released": "DualGRPO, released-code advantage"}
    label = labels.get(algo.get("advantage", "dual"), str(algo.get("advantage")))
    if not algo.get("forced_prefix", True):
        label = "w/o PfxSmp" if label == "DualGRPO" else f"{label}, w/o PfxSmp"
    return label


def load_run(run_dir: Path) -> RunReport:
    run_dir = Path(run_dir)
    for name in ("summary.json", "config.yaml"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir / name}: missing (is {run_dir} a finished run?)")
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")) or {}
    return RunReport(run_dir, method_label(config), load_summary(run_dir), read_metrics(run_dir))


def _benchmarks(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{benchmark: {setting: metrics}}``; a single-benchmark run has no by_benchmark."""
    if result.get("by_benchmark"):
        return result["by_benchmark"]
    return {"synthetic": {s: result[s] for s in EVAL_SETTINGS if s in result}}


def _columns(results: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(benchmark, setting, header) for every cell any run has: objective benchmarks get
    None/Unaligned/Aligned, personalized ones Aligned (the paper's Table 1)."""
    seen: dict[str, set[str]] = {}
    for result in results:
        for name, settings in _benchmarks(result).items():
            seen.setdefault(name, set()).update(settings)
    columns = []
    for name in sorted(seen, key=lambda n: ("personalized" in seen[n], n)):
        for setting, header in OBJECTIVE_COLUMNS:
            if setting in seen[name]:
                columns.append((name, setting, f"{name} {header}"))
        if "personalized" in seen[name]:
            columns.append((name, "personalized", f"{name} (personalized) Aligned"))
    return columns


def collapse(result: dict[str, Any]) -> str | None:
    """The mode a policy chose in over 90% of responses in every setting, if any."""
    rates = [result[s]["personalized_mode_rate"] for s in EVAL_SETTINGS if s in result]
    if rates and all(r > COLLAPSE_RATE for r in rates):
        return "personalized"
    if rates and all(r < 1 - COLLAPSE_RATE for r in rates):
        return "general"
    return None


def comparison_rows(runs: list[RunReport]) -> list[tuple[str, dict[str, Any]]]:
    """(label, eval result): the first run's SFT checkpoint (when it was evaluated and the
    run went on to RL: an SFT-only run's final eval is that same eval), then every run's
    final policy."""
    rows = []
    if runs and runs[0].summary.get("eval_sft") and runs[0].method not in SFT_METHODS:
        rows.append((f"SFT ({runs[0].run_dir.name})", runs[0].summary["eval_sft"]))
    rows += [(f"{run.method} ({run.run_dir.name})", run.summary["eval"]) for run in runs]
    return rows


def format_table1(runs: list[RunReport]) -> str:
    rows = comparison_rows(runs)
    columns = _columns([result for _, result in rows])
    header = ["method", *[c[2] for c in columns], "mean", "pers. rate U / A / P", "collapse"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, result in rows:
        benchmarks = _benchmarks(result)
        cells = [f"{benchmarks.get(b, {}).get(s, {}).get('accuracy', float('nan')):.3f}" for b, s, _ in columns]
        rates = " / ".join(f"{result[s]['personalized_mode_rate']:.2f}" if s in result else "-"
                           for s in ("unaligned", "aligned", "personalized"))
        lines.append("| " + " | ".join([label, *cells, f"{result.get('mean_accuracy', float('nan')):.3f}", rates,
                                        collapse(result) or "no"]) + " |")
    notes = ["", "Free-mode accuracy (greedy) per benchmark and persona setting; mean over settings; "
             "personalized-mode rate on unaligned / aligned / personalized; collapse: one mode in over "
             f"{COLLAPSE_RATE:.0%} of responses in every setting."]
    forced = [(label, result["baselines"]) for label, result in rows if result.get("baselines")]
    if forced:
        notes += ["", "| forced single mode / upper bound | " + " | ".join(EVAL_SETTINGS) + " |",
                  "|---" * (len(EVAL_SETTINGS) + 1) + "|"]
        for label, baselines in forced:
            for key in ("force_general", "force_personalized", "upper_bound"):
                notes.append(f"| {label}: {key} | " + " | ".join(
                    f"{baselines[key][s]:.3f}" if s in baselines.get(key, {}) else "-" for s in EVAL_SETTINGS) + " |")
    alignment = [(label, result["two_turn_alignment"]) for label, result in rows if result.get("two_turn_alignment")]
    if alignment:
        notes.append("")
        notes += [f"two-turn mode alignment, {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items())
                  for label, values in alignment]
    targets = []
    for run in runs:
        trained_rl = run.method not in SFT_METHODS
        sft = run.summary.get("eval_sft") if trained_rl else None
        if found := check_targets(run.summary["eval"], sft):
            unchecked = trained_rl and sft is None
            targets.append(format_targets(f"{run.method} ({run.run_dir.name})", found)
                           + (" (no SFT eval in this run, so the targets against SFT are not checked: "
                              "a sweep's report checks them against the seed's SFT run)" if unchecked else ""))
    if targets:
        notes += ["", *targets]
    return "\n".join(lines + notes)


def write_comparison_plots(runs: list[RunReport], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison_rows(runs)
    written = []
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(rows), 1)
    for index, (label, result) in enumerate(rows):
        rates = [float(result.get(s, {}).get("personalized_mode_rate", 0.0)) for s in EVAL_SETTINGS]
        ax.bar([x + index * width for x in range(len(EVAL_SETTINGS))], rates, width=width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(EVAL_SETTINGS))], EVAL_SETTINGS)
    ax.set(ylabel="personalized-mode rate", ylim=(0, 1), title="Mode choice per setting")
    ax.legend(fontsize=6)
    written.append(_save(fig, out / "mode_rate_per_setting.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        rl = [r for r in run.records if r.get("stage") == "rl"]
        ax.plot(*_series(rl, "reward/mean"), label=f"{run.method} ({run.run_dir.name})")
    ax.set(xlabel="RL step", ylabel="mean reward (forced-prefix rollouts)", title="Reward")
    ax.legend(fontsize=6)
    written.append(_save(fig, out / "reward.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personadual.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (runs/NAME)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: report/ beside the first run)")
    args = parser.parse_args(argv)
    if len(args.runs) == 1 and is_sweep_folder(args.runs[0]):
        return report_sweep(args.runs[0])
    try:
        runs = [load_run(path) for path in args.runs]
    except (FileNotFoundError, json.JSONDecodeError, YAMLError, OmegaConfBaseException) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or args.runs[0].resolve().parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = format_table1(runs)
    (out / "table1.md").write_text(table + "\n")
    plots = write_comparison_plots(runs, out)
    print(table)
    print(f"\nwrote {out / 'table1.md'} and {', '.join(p.name for p in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
