"""The report of a sweep (``python -m personadual.sweep``): per method, the mean and spread
over seeds of each column, each seed's run alone, and paired bootstrap intervals of DualGRPO
minus every other row, from the per-item eval outcomes every run writes
(``evals/final_step_N.jsonl``).

    python -m personadual.report OUT   (OUT: a sweep's folder, holding seed_S/<method>/)
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from personadual.evaluation import EVAL_SETTINGS, EVALS_DIR, free_outcomes, read_eval_items
from personadual.run_targets import check_targets, format_missed
from personadual.sweep import SFT as SFT_RUN

LABELS = {"sft": "SFT", "dual": "DualGRPO", "grpo": "w/o DualAdv (GRPO)", "no_prefix": "w/o PfxSmp",
          "dual_released": "DualGRPO, released-code advantage"}
REFERENCE = "dual"  # the differences are DualGRPO minus each other row
HEADERS = {"no_persona": "None", "unaligned": "Unaligned", "aligned": "Aligned", "personalized": "Personalized"}


# ---- the paired bootstrap -------------------------------------------------------------------
@dataclass(frozen=True)
class PairedDifference:
    """Mean accuracy of B minus A over the items both were scored on, with a percentile
    bootstrap interval."""

    mean: float
    low: float
    high: float
    items: int
    seeds: int

    def cell(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap(a: dict[tuple[int, str], float], b: dict[tuple[int, str], float], *,
                     strata: dict[tuple[int, str], str] | None = None, resamples: int = 2000,
                     confidence: float = 0.95, rng_seed: int = 0) -> PairedDifference:
    """Two methods scored on the same (seed, eval item) keys (1.0 correct, 0.0 wrong): each
    resample draws seeds with replacement, then items with replacement within each drawn
    seed, so the interval covers both the eval set's and the seeds' variation. Pairing
    (the same item for both methods) removes the item difficulty both share.

    The statistic is the mean over seeds of each seed's mean difference; with ``strata``
    (an item's setting), each seed's difference is the mean over strata of the stratum's
    mean, items resampled within their stratum: the difference of "mean accuracy over
    settings", each setting weighing the same whatever its item count."""
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[:3]
        raise ValueError(f"paired_bootstrap: the two methods were scored on different items, e.g. {missing}")
    if not a:
        raise ValueError("paired_bootstrap: no items")
    groups: dict[int, dict[str, list[float]]] = {}
    for key in sorted(a):
        stratum = strata[key] if strata is not None else ""
        groups.setdefault(key[0], {}).setdefault(stratum, []).append(b[key] - a[key])
    seeds = sorted(groups)

    def statistic(per_seed: list[dict[str, list[float]]]) -> float:
        return sum(sum(sum(d) / len(d) for d in strata_of.values()) / len(strata_of)
                   for strata_of in per_seed) / len(per_seed)

    point = statistic([groups[s] for s in seeds])
    rng = random.Random(rng_seed)
    means = []
    for _ in range(resamples):
        drawn = [{name: rng.choices(diffs, k=len(diffs)) for name, diffs in groups[seed].items()}
                 for seed in rng.choices(seeds, k=len(seeds))]
        means.append(statistic(drawn))
    means.sort()
    tail = (1.0 - confidence) / 2
    low = means[int(tail * (resamples - 1))]
    high = means[int(round((1.0 - tail) * (resamples - 1)))]
    return PairedDifference(point, low, high, len(a), len(seeds))


# ---- loading a sweep ------------------------------------------------------------------------
@dataclass
class SweepRun:
    seed: int
    name: str
    run_dir: Path
    result: dict[str, Any]  # the final eval (summary.json "eval")
    outcomes: dict[str, float]  # item id -> 1.0 / 0.0, the model's own mode choice
    settings: dict[str, str]  # item id -> eval setting


def load_sweep_run(run_dir: Path, seed: int, name: str) -> SweepRun:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path}: missing (has the sweep finished this run?)")
    items = sorted((run_dir / EVALS_DIR).glob("final_step_*.jsonl"))
    if not items:
        raise FileNotFoundError(f"{run_dir / EVALS_DIR}/final_step_N.jsonl: missing (a run from before "
                                f"per-item evals; rerun it)")
    rows = read_eval_items(items[-1])
    settings = {row["id"]: row["setting"] for row in rows}
    return SweepRun(seed, name, run_dir, json.loads(summary_path.read_text())["eval"], free_outcomes(rows), settings)


def discover(out: Path) -> tuple[list[int], list[str]]:
    """Seeds and run names present in a sweep folder (SFT first, then the methods)."""
    seeds = sorted(int(p.name.split("_", 1)[1]) for p in out.glob("seed_*") if p.is_dir())
    names = {p.name for seed in seeds for p in (out / f"seed_{seed}").iterdir() if (p / "summary.json").is_file()}
    order = list(LABELS)
    return seeds, sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def is_sweep_folder(path: Path) -> bool:
    return not (path / "config.yaml").exists() and any(p.is_dir() for p in path.glob("seed_*"))


# ---- the tables -----------------------------------------------------------------------------
def _spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def _accuracy(result: dict[str, Any], setting: str) -> float:
    return float(result.get(setting, {}).get("accuracy", float("nan")))


def _rate(result: dict[str, Any], setting: str) -> float:
    return float(result.get(setting, {}).get("personalized_mode_rate", float("nan")))


def format_sweep(runs: dict[tuple[int, str], SweepRun], seeds: list[int], names: list[str]) -> str:
    label = lambda name: LABELS.get(name, name)  # noqa: E731
    lines = [f"Seeds {', '.join(map(str, seeds))}: mean ± sd over seeds of free-mode (greedy) accuracy per "
             "persona setting; mean over settings; personalized-mode rate on unaligned prompts.", "",
             "| method | seeds | " + " | ".join(HEADERS.values()) + " | mean | pers. rate U |",
             "|---|---|" + "---|" * (len(HEADERS) + 2)]
    for name in names:
        present = [runs[(s, name)] for s in seeds if (s, name) in runs]
        if not present:
            continue
        cells = [_spread([_accuracy(r.result, s) for r in present]) for s in HEADERS]
        cells.append(_spread([float(r.result.get("mean_accuracy", float("nan"))) for r in present]))
        cells.append(_spread([_rate(r.result, "unaligned") for r in present]))
        lines.append(f"| {label(name)} | {len(present)} | " + " | ".join(cells) + " |")

    lines += ["", "Each run alone (accuracy None / Unaligned / Aligned / Personalized; personalized-mode rate "
              "U / A / P; items per setting):", "",
              "| method | seed | accuracy N / U / A / P | mean | pers. rate U / A / P | items | targets missed |",
              "|---|---|---|---|---|---|---|"]
    for name in names:
        for seed in seeds:
            run = runs.get((seed, name))
            if run is None:
                continue
            r = run.result
            sft = runs.get((seed, SFT_RUN))
            targets = check_targets(r, sft.result if sft is not None and name != SFT_RUN else None)
            missed = format_missed(targets) if targets else "-"
            lines.append(f"| {label(name)} | {seed} | " + " / ".join(f"{_accuracy(r, s):.3f}" for s in HEADERS)
                         + f" | {float(r.get('mean_accuracy', float('nan'))):.3f} | "
                         + " / ".join(f"{_rate(r, s):.2f}" for s in ("unaligned", "aligned", "personalized"))
                         + " | " + "/".join(str(r.get(s, {}).get("count", 0)) for s in HEADERS)
                         + f" | {missed or 'none'} |")

    if REFERENCE in names:
        lines += ["", f"Paired bootstrap, {label(REFERENCE)} minus each row: mean difference [95% interval], "
                  "resampling seeds, then eval items within each seed (paired: the same items for both); "
                  "'mean' weighs each setting equally.", "",
                  "| difference | " + " | ".join(HEADERS.values()) + " | mean |", "|---|" + "---|" * (len(HEADERS) + 1)]
        for other in (n for n in names if n != REFERENCE):
            shared = [s for s in seeds if (s, other) in runs and (s, REFERENCE) in runs]
            if not shared:
                continue
            cells = []
            for setting in [*HEADERS, None]:
                a, b, strata = paired_outcomes(runs, shared, other, REFERENCE, setting)
                cells.append(paired_bootstrap(a, b, strata=strata).cell() if a else "-")
            lines.append(f"| {label(REFERENCE)} − {label(other)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_outcomes(runs: dict[tuple[int, str], SweepRun], seeds: list[int], a_name: str, b_name: str,
                    setting: str | None) -> tuple[dict, dict, dict]:
    """(a, b, strata) keyed by (seed, item id) over the items both runs scored, of one setting
    (None: every setting, with the setting as the stratum)."""
    a: dict[tuple[int, str], float] = {}
    b: dict[tuple[int, str], float] = {}
    strata: dict[tuple[int, str], str] = {}
    for seed in seeds:
        first, second = runs[(seed, a_name)], runs[(seed, b_name)]
        for item in sorted(set(first.outcomes) & set(second.outcomes)):
            if setting is None or first.settings[item] == setting:
                a[(seed, item)], b[(seed, item)] = first.outcomes[item], second.outcomes[item]
                strata[(seed, item)] = first.settings[item]
    return a, b, strata


def write_sweep_plots(runs: dict[tuple[int, str], SweepRun], seeds: list[int], names: list[str],
                      out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from personadual.report import _legend_outside, _save, probe_series
    from personadual.tracking import read_metrics

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, ylabel, filename in (("accuracy", "free-mode accuracy", "accuracy_per_method.png"),
                                  ("personalized_mode_rate", "personalized-mode rate", "mode_rate_per_method.png")):
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / max(len(names), 1)
        for index, name in enumerate(names):
            means, errors = [], []
            for setting in EVAL_SETTINGS:
                values = [float(runs[(s, name)].result.get(setting, {}).get(key, float("nan")))
                          for s in seeds if (s, name) in runs]
                mean = sum(values) / len(values) if values else float("nan")
                means.append(mean)
                errors.append((max(max(values) - mean, 0.0), max(mean - min(values), 0.0)) if values else (0.0, 0.0))
            ax.bar([x + index * width for x in range(len(EVAL_SETTINGS))], means, width=width,
                   yerr=[[e[1] for e in errors], [e[0] for e in errors]], capsize=2, label=LABELS.get(name, name))
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(EVAL_SETTINGS))], EVAL_SETTINGS)
        ax.set(ylabel=ylabel, ylim=(0, 1), title=f"{ylabel} per setting (mean over seeds; bars: min to max)")
        _legend_outside(ax)
        written.append(_save(fig, out / filename))

    rl_names = [n for n in names if n != "sft"]
    if rl_names:
        fig, axes = plt.subplots(1, len(rl_names), figsize=(4 * len(rl_names), 3.5), squeeze=False, sharey=True)
        for ax, name in zip(axes[0], rl_names):
            for setting_index, setting in enumerate(EVAL_SETTINGS):
                for seed in seeds:
                    if (seed, name) not in runs:
                        continue
                    steps, values = probe_series(read_metrics(runs[(seed, name)].run_dir), setting)
                    sft = runs.get((seed, "sft"))
                    start = (sft.result.get("probe") or {}).get(setting, {}).get("p_personalized") if sft else None
                    if start is not None:
                        steps, values = [0, *steps], [float(start), *values]
                    ax.plot(steps, values, color=f"C{setting_index}", alpha=0.8,
                            label=setting if seed == seeds[0] else None)
            ax.set(title=LABELS.get(name, name), xlabel="RL step (0: SFT)", ylim=(0, 1))
        axes[0][0].set_ylabel("P(personalized mode token)")
        _legend_outside(axes[0][-1])
        written.append(_save(fig, out / "mode_probe_per_method.png"))
    return written


def report_sweep(out: Path, seeds: Sequence[int] | None = None, names: Sequence[str] | None = None) -> int:
    """Print the sweep's tables and write ``OUT/table1.md`` and ``OUT/plots/*.png``."""
    found_seeds, found_names = discover(out)
    seeds = list(seeds) if seeds is not None else found_seeds
    names = list(names) if names is not None else found_names
    try:
        runs = {(seed, name): load_sweep_run(out / f"seed_{seed}" / name, seed, name)
                for seed in seeds for name in names}
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = format_sweep(runs, seeds, names)
    (out / "table1.md").write_text(table + "\n")
    plots = write_sweep_plots(runs, seeds, names, out / "plots")
    print(table)
    print(f"\nwrote {out / 'table1.md'} and plots/{', plots/'.join(p.name for p in plots)}")
    return 0
