"""`python -m personadual.report`: the Table-1 comparison of runs, its labels, collapse
detection and plots, on run folders laid out as the driver writes them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from personadual.report import collapse, format_eval_table, format_table1, load_run, main, method_label

ROOT = Path(__file__).resolve().parent.parent


def setting(accuracy: float, rate: float) -> dict:
    return {"accuracy": accuracy, "personalized_mode_rate": rate, "no_mode_rate": 0.0, "count": 10, "dropped": 0}


def eval_result(none: float, unaligned: float, aligned: float, personalized: float, rates: tuple) -> dict:
    result = {"no_persona": setting(none, rates[0]), "unaligned": setting(unaligned, rates[1]),
              "aligned": setting(aligned, rates[2]), "personalized": setting(personalized, rates[3])}
    result["mean_accuracy"] = (none + unaligned + aligned + personalized) / 4
    return result


def write_run(root: Path, name: str, algo: str, final: dict, sft: dict | None = None,
              rewards: tuple = (0.2, 0.4)) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(algo)
    summary = {"run": name, "eval": final}
    if sft:
        summary["eval_sft"] = sft
    (run / "summary.json").write_text(json.dumps(summary))
    rows = [{"step": i + 1, "stage": "rl", "reward/mean": r} for i, r in enumerate(rewards)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_method_labels_follow_the_algo_section() -> None:
    assert method_label({"algo": {"advantage": "dual", "forced_prefix": True}}) == "DualGRPO"
    assert method_label({"algo": {"advantage": "grpo", "forced_prefix": True}}) == "w/o DualAdv (GRPO)"
    assert method_label({"algo": {"advantage": "dual", "forced_prefix": False}}) == "w/o PfxSmp"
    assert method_label({"algo": {"advantage": "dual_released"}}) == "DualGRPO, released-code advantage"


def test_a_runs_own_table_names_its_rl_row_by_method() -> None:
    summary = {"eval_sft": eval_result(0.5, 0.5, 0.7, 0.9, (0, 0, 1, 1)),
               "eval": eval_result(0.5, 0.5, 0.8, 1.0, (0, 0, 1, 1))}
    label = method_label({"algo": {"advantage": "grpo"}})
    rows = [line.split(" | ")[0] for line in format_eval_table(summary, "runs/x", label).splitlines()
            if line.startswith("| ") and "| aligned |" in line]
    assert rows == ["| SFT", "| w/o DualAdv (GRPO)"]


def test_collapse_needs_one_mode_in_every_setting() -> None:
    assert collapse(eval_result(0.5, 0.5, 0.5, 0.5, (0.95, 0.92, 0.99, 1.0))) == "personalized"
    assert collapse(eval_result(0.5, 0.5, 0.5, 0.5, (0.0, 0.05, 0.09, 0.02))) == "general"
    assert collapse(eval_result(0.5, 0.5, 0.5, 0.5, (0.0, 0.05, 0.95, 1.0))) is None


def test_table_has_a_row_per_run_and_the_first_runs_sft(tmp_path: Path) -> None:
    sft = eval_result(0.74, 0.65, 1.0, 0.94, (0.0, 0.26, 1.0, 0.94))
    dual = write_run(tmp_path, "dual", "algo:\n  advantage: dual\n  forced_prefix: true\n",
                     eval_result(0.74, 0.72, 1.0, 1.0, (0.0, 0.02, 1.0, 1.0)), sft=sft)
    free = write_run(tmp_path, "free", "algo:\n  advantage: dual\n  forced_prefix: false\n",
                     eval_result(0.70, 0.40, 0.98, 0.99, (0.97, 0.96, 0.99, 1.0)), sft=sft)
    table = format_table1([load_run(dual), load_run(free)])
    lines = table.splitlines()
    assert lines[0].startswith("| method | synthetic None | synthetic Unaligned | synthetic Aligned |")
    assert "synthetic (personalized) Aligned" in lines[0]
    assert lines[2].startswith("| SFT (dual) | 0.740 | 0.650 | 1.000 | 0.940 |")
    assert lines[3].startswith("| DualGRPO (dual) | 0.740 | 0.720 | 1.000 | 1.000 | 0.865 | 0.02 / 1.00 / 1.00 | no |")
    assert lines[4].startswith("| w/o PfxSmp (free) | 0.700 | 0.400 | 0.980 | 0.990 |")
    assert lines[4].endswith("| personalized |")


def test_per_benchmark_columns_when_a_run_mixes_benchmarks(tmp_path: Path) -> None:
    final = eval_result(0.6, 0.5, 0.7, 0.8, (0.1, 0.2, 0.8, 0.9))
    final["by_benchmark"] = {
        "triviaqa": {"no_persona": setting(0.6, 0.1), "unaligned": setting(0.5, 0.2), "aligned": setting(0.7, 0.8)},
        "personafeedback": {"personalized": setting(0.8, 0.9)},
    }
    run = write_run(tmp_path, "mixed", "algo:\n  advantage: dual\n", final)
    header = format_table1([load_run(run)]).splitlines()[0]
    assert header.startswith("| method | triviaqa None | triviaqa Unaligned | triviaqa Aligned | "
                             "personafeedback (personalized) Aligned | mean |")


def test_cli_writes_table_and_plots(tmp_path: Path) -> None:
    run = write_run(tmp_path / "runs", "a", "algo:\n  advantage: grpo\n",
                    eval_result(0.7, 0.6, 0.9, 0.95, (0.0, 0.3, 0.9, 0.95)))
    result = subprocess.run([sys.executable, "-m", "personadual.report", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| w/o DualAdv (GRPO) (a) |" in result.stdout
    out = tmp_path / "runs" / "report"
    assert (out / "table1.md").read_text().startswith("| method |")
    for plot in ("mode_rate_per_setting.png", "reward.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_cli_names_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nope")]) == 2
    assert "nope/summary.json: missing" in capsys.readouterr().err


def test_a_runs_plots_show_sft_loss_and_eval_accuracy_over_steps(tmp_path) -> None:
    from personadual.report import eval_records, write_plots

    run = tmp_path / "run"
    run.mkdir()
    sft = [{"stage": "sft", "step": i, "sft": {"loss": 3.0 / i}, "timing_s": {"step": 0.1}} for i in (1, 2, 3)]
    rl = [{"stage": "rl", "step": i, "reward/general": 0.2, "reward/personalized": 0.4, "learner": {"kl": 0.01},
           "timing_s": {"generate": 1.0, "train": 0.5}} for i in (1, 2)]
    rl[0]["eval"] = eval_result(0.5, 0.5, 0.6, 0.9, (0, 0, 1, 1))
    records = [*sft, {"stage": "eval", "tag": "sft", "step": 0, "eval": eval_result(0.4, 0.4, 0.5, 0.8, (0, 0, 1, 1))},
               *rl, {"stage": "eval", "tag": "final", "step": 2, "eval": eval_result(0.5, 0.6, 0.7, 1.0, (0, 0, 1, 1))}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [(step, label, result["aligned"]["accuracy"]) for step, label, result in eval_records(records)] == [
        (0, "sft", 0.5), (1, "step_1", 0.6), (2, "final", 0.7)]
    written = {path.name for path in write_plots(run)}
    assert written == {"reward_per_mode.png", "kl.png", "step_time.png", "sft_loss.png", "eval_accuracy.png", "mode_probe.png",
                       "mode_rate_per_setting.png"}
    assert all((run / "plots" / name).stat().st_size > 0 for name in written)


def test_paired_bootstrap_finds_a_known_difference_and_none_where_there_is_none() -> None:
    import random

    from personadual.sweep_report import paired_bootstrap

    rng = random.Random(1)
    a = {(seed, f"q{i}"): float(rng.random() < 0.6) for seed in range(3) for i in range(200)}
    # B answers what A answers, plus exactly 20 of A's misses per seed: +0.10 by construction.
    b = dict(a)
    for seed in range(3):
        for key in [k for k in sorted(a) if k[0] == seed and not a[k]][:20]:
            b[key] = 1.0
    result = paired_bootstrap(a, b)
    assert result.mean == pytest.approx(0.10) and (result.items, result.seeds) == (600, 3)
    assert 0 < result.low < 0.10 < result.high < 0.2
    # A near-miss: B flips 10 misses to right and 10 rights to wrong in each seed: no difference.
    c = dict(a)
    for seed in range(3):
        keys = [k for k in sorted(a) if k[0] == seed]
        for key in [k for k in keys if not a[k]][:10] + [k for k in keys if a[k]][:10]:
            c[key] = 1.0 - a[key]
    even = paired_bootstrap(a, c)
    assert even.mean == pytest.approx(0.0) and even.low < 0 < even.high
    assert paired_bootstrap(a, a).low == paired_bootstrap(a, a).high == 0.0


def test_paired_bootstrap_refuses_items_only_one_method_was_scored_on() -> None:
    from personadual.sweep_report import paired_bootstrap

    with pytest.raises(ValueError, match="different items"):
        paired_bootstrap({(0, "q1"): 1.0, (0, "q2"): 0.0}, {(0, "q1"): 1.0})


def test_stratified_bootstrap_weighs_each_setting_equally_whatever_its_item_count() -> None:
    from personadual.sweep_report import paired_bootstrap

    # 100 items of setting "x" where B gains 0.20, 300 of "y" where B equals A, at two seeds:
    # over pooled items the gain is 0.05, over settings (each weighing the same) 0.10.
    a, b, strata = {}, {}, {}
    for seed in (0, 1):
        for i in range(400):
            key = (seed, f"q{i}")
            a[key] = float(i % 2)
            b[key] = 1.0 if i < 40 else a[key]  # items 0, 2, ..., 38 (20 misses of the first 100) flipped
            strata[key] = "x" if i < 100 else "y"
    assert paired_bootstrap(a, b).mean == pytest.approx(0.05)
    stratified = paired_bootstrap(a, b, strata=strata)
    assert stratified.mean == pytest.approx(0.10) and 0.0 < stratified.low < 0.10 < stratified.high


def test_probe_series_starts_after_sft_and_follows_every_rl_step() -> None:
    from personadual.report import probe_series

    records = [{"stage": "sft", "step": 1, "sft": {"loss": 1.0}},
               {"stage": "eval", "tag": "sft", "step": 0, "eval": {"probe": {"unaligned": {"p_personalized": 0.02}}}},
               {"stage": "rl", "step": 1, "mode/probe/unaligned/p_personalized": 0.05},
               {"stage": "rl", "step": 2, "mode/probe/unaligned/p_personalized": 0.11,
                "eval": {"probe": {"unaligned": {"p_personalized": 0.5}}}},
               {"stage": "eval", "tag": "final", "step": 2, "eval": {"probe": {"unaligned": {"p_personalized": 0.11}}}}]
    assert probe_series(records, "unaligned") == ([0, 1, 2], [0.02, 0.05, 0.11])
    assert probe_series(records, "aligned") == ([], [])


def world_eval(none: int, unaligned: int, aligned: int, rate_unaligned: int, *, none_bound: int | None = None,
               aligned_bound: int = 190, personalized: int = 150) -> dict:
    """An eval of the persona world's size (200 items per objective setting, 150 personalized),
    accuracies and rates given as item counts."""
    counts = {"no_persona": 200, "unaligned": 200, "aligned": 200, "personalized": 150}
    right = {"no_persona": none, "unaligned": unaligned, "aligned": aligned, "personalized": personalized}
    result = {s: {"accuracy": right[s] / n, "personalized_mode_rate": 1.0 if s == "personalized" else 0.5,
                  "count": n} for s, n in counts.items()}
    result["unaligned"]["personalized_mode_rate"] = rate_unaligned / 200
    result["mean_accuracy"] = sum(r["accuracy"] for r in result.values()) / 4
    result["baselines"] = {"upper_bound": {"no_persona": (none if none_bound is None else none_bound) / 200,
                                           "unaligned": unaligned / 200, "aligned": aligned_bound / 200,
                                           "personalized": 1.0}}
    return result


def missed(final: dict, sft: dict | None) -> set[str]:
    """The targets missed, each named by its first and last word ("RL bound")."""
    from personadual.run_targets import check_targets

    return {t.name.split(" ")[0] + " " + t.name.split(" ")[-1] for t in check_targets(final, sft) if not t.met}


def test_run_targets_tell_one_item_over_from_one_item_under_each_limit() -> None:
    from personadual.run_targets import check_targets

    sft = world_eval(50, 50, 127, 0, aligned_bound=176)  # aligned 0.635, its bound 0.880: half the gap is 0.7575
    met = world_eval(50, 46, 152, 10, none_bound=60)  # unaligned -0.020, bound +0.050, rate U 0.050, 0.51 closed
    assert len(check_targets(met, sft)) == 8 and missed(met, sft) == set()
    assert missed(world_eval(50, 46, 151, 10, none_bound=60), sft) == {"RL bound"}  # 0.49 of the gap
    assert missed(world_eval(50, 45, 152, 10, none_bound=60), sft) == {"unaligned persona"}  # -0.025
    assert missed(world_eval(50, 46, 152, 11, none_bound=60), sft) == {"personalized-mode 0.05"}  # 0.055
    assert missed(world_eval(50, 46, 152, 10, none_bound=61), sft) == {"no bound"}  # 0.055 under its bound
    assert missed(world_eval(50, 46, 152, 10, none_bound=60, personalized=142), sft) == {"personalized 0.95"}
    assert missed(world_eval(50, 46, 69, 10, none_bound=60), None) == {"aligned 0.10"}  # +0.095; no SFT: 6 targets
    assert len(check_targets(world_eval(50, 46, 152, 10), None)) == 6


def test_run_targets_skip_an_eval_without_the_worlds_settings_or_baselines() -> None:
    from personadual.run_targets import check_targets

    assert check_targets(eval_result(0.5, 0.5, 0.8, 1.0, (0, 0, 1, 1)), None) == []  # no forced-mode baselines
    assert check_targets({"aligned": setting(1.0, 1.0), "baselines": {}, "mean_accuracy": 1.0}, None) == []


def test_table_lists_each_runs_targets_against_its_own_sft(tmp_path: Path) -> None:
    sft = world_eval(50, 50, 127, 0, aligned_bound=176)
    dual = write_run(tmp_path, "dual", "algo:\n  advantage: dual\n", world_eval(50, 46, 151, 10, none_bound=60), sft=sft)
    sft_only = write_run(tmp_path, "sft", "algo:\n  steps: 0\nsft:\n  steps: 400\n", sft, sft=sft)
    lines = format_table1([load_run(dual), load_run(sft_only)]).splitlines()
    assert "targets, DualGRPO (dual): 7 of 8 met; missed: RL closes half of SFT's aligned gap to its upper bound " \
           "(0.49 (0.635 -> 0.755, bound 0.880))" in lines
    assert "targets, SFT (sft): 6 of 6 met" in lines  # an SFT run is not held to RL's targets


def test_an_sft_run_first_is_one_row_and_a_branch_without_sft_eval_says_what_is_unchecked(tmp_path: Path) -> None:
    sft = world_eval(50, 50, 127, 0, aligned_bound=176)
    sft_only = write_run(tmp_path, "sft", "algo:\n  steps: 0\nsft:\n  steps: 400\n", sft, sft=sft)
    branch = write_run(tmp_path, "grpo", "algo:\n  advantage: grpo\n", world_eval(50, 46, 151, 10, none_bound=60))
    lines = format_table1([load_run(sft_only), load_run(branch)]).splitlines()
    assert [line.split(" |")[0] for line in lines[2:4]] == ["| SFT (sft)", "| w/o DualAdv (GRPO) (grpo)"]
    assert lines[4] == ""
    assert "targets, w/o DualAdv (GRPO) (grpo): 6 of 6 met (no SFT eval in this run, so the targets against SFT " \
           "are not checked: a sweep's report checks them against the seed's SFT run)" in lines
