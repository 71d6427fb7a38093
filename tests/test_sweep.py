"""`python -m personadual.sweep`: SFT once per seed, every method branched from it, per-item
evals paired by the report's bootstrap; resumable. The real sweep runs on configs/smoke.yaml
(one seed, DualGRPO only, to keep the suite short: each run is mostly its start-up); the plan
of several seeds, each method branched from its own seed's SFT, is checked without running it,
and the report's other rows and its spread over seeds on sweep folders written here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from personadual.evaluation import read_eval_items
from personadual.sweep import METHOD_OVERRIDES, Sweep, _parse
from personadual.tracking import read_metrics
from tests.helpers import ROOT, SMOKE
from tests.ray_head import launch_env

SWEEP = [sys.executable, "-m", "personadual.sweep"]


def test_plan_runs_sft_once_per_seed_and_branches_every_method_from_it(tmp_path: Path) -> None:
    sweep = Sweep(tmp_path, [0, 2], ["dual", "no_prefix"], SMOKE, ["algo.steps=3"])
    plan = sweep.plan()
    assert [(r.seed, r.name) for r in plan] == [(0, "sft"), (0, "dual"), (0, "no_prefix"),
                                                 (2, "sft"), (2, "dual"), (2, "no_prefix")]
    sft, dual, no_prefix = plan[3:]
    assert sft.run_dir == tmp_path / "seed_2" / "sft"
    assert "algo.steps=0" in sft.overrides and "run.seed=2" in sft.overrides
    # The method's keys come after the user's, so they win.
    assert no_prefix.overrides[-2:] == list(METHOD_OVERRIDES["no_prefix"])
    assert dual.overrides[0] == "algo.steps=3" and "run.name=dual" in dual.overrides
    assert sweep.command(sft)[-len(sft.overrides):] == sft.overrides and "--init-from" not in sweep.command(sft)
    (sft.run_dir / "checkpoints" / "sft_step_30").mkdir(parents=True)
    (sft.run_dir / "checkpoints" / "sft_step_4").mkdir(parents=True)
    command = sweep.command(dual)
    assert command[command.index("--init-from") + 1] == str(sft.run_dir / "checkpoints" / "sft_step_30")
    assert sweep.command(sft)[2:4] == ["--resume", str(sft.run_dir)]  # its folder exists: resumed


@pytest.mark.parametrize("argv, message", [
    (["--methods", "dual", "ppo"], "'ppo' is not one of"),
    (["--seeds", "0", "0"], "each value once"),
    (["run.seed=3"], "run.seed: set by the sweep"),
    (["algo.advantage=grpo"], "algo.advantage: set by the sweep"),
    (["algo.steps"], "overrides are key=value"),
    (["--config", "nope.yaml"], "--config nope.yaml: no such file"),
])
def test_bad_arguments_exit_2_naming_them(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        _parse(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    result = subprocess.run([*SWEEP, "--seeds", "1", "--methods", "dual", "--out", str(out),
                             "--config", str(SMOKE)], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                            timeout=1800)
    return out, result


@pytest.mark.slow
def test_smoke_sweep_shares_one_sft_per_seed_and_reports_the_paired_intervals(smoke_sweep) -> None:
    out, result = smoke_sweep
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "sweep.json").read_text())
    assert [(r["seed"], r["run"]) for r in record] == [(1, "sft"), (1, "dual")]
    seed = 1
    sft_run = out / f"seed_{seed}" / "sft"
    sft_rows = [r for r in read_metrics(sft_run) if r.get("stage") == "sft"]
    assert len(sft_rows) == 30 and not [r for r in read_metrics(sft_run) if r.get("stage") == "rl"]
    sft_state = (sft_run / "checkpoints" / "sft_step_30" / "driver_state.json").read_text()
    # The seed the sweep gave, not smoke.yaml's run.seed (0), in every run of it.
    assert yaml.safe_load((sft_run / "config.yaml").read_text())["run"]["seed"] == seed
    assert yaml.safe_load((out / f"seed_{seed}" / "dual" / "config.yaml").read_text())["run"]["seed"] == seed
    for method in ("dual",):
        run = out / f"seed_{seed}" / method
        metrics = read_metrics(run)
        # No SFT of its own: RL from a copy of the seed's SFT checkpoint.
        assert not [r for r in metrics if r.get("stage") == "sft"]
        assert (run / "checkpoints" / "sft_step_30" / "driver_state.json").read_text() == sft_state
        rl = [r for r in metrics if r.get("stage") == "rl"]
        assert len(rl) == 2 and all(0.0 <= r["mode/probe/unaligned/p_personalized"] <= 1.0 for r in rl)
    table = (out / "table1.md").read_text()
    assert table.strip() in result.stdout
    for row in ("| SFT | 1 |", "| DualGRPO | 1 |", "| DualGRPO − SFT |"):
        assert row in table
    # Each run's targets: the smoke eval is too small for the item target (24 per setting), and
    # the RL run is also held to its seed's SFT run (the gap and the mean).
    dual_row = [line for line in table.splitlines() if line.startswith("| DualGRPO | 1 |")][-1]  # the run's own row
    assert "eval items >= 200 per objective setting" in dual_row
    from personadual.run_targets import check_targets
    from personadual.sweep_report import load_sweep_run

    dual_targets = check_targets(load_sweep_run(out / "seed_1" / "dual", 1, "dual").result,
                                 load_sweep_run(sft_run, 1, "sft").result)
    assert len(dual_targets) == 8
    assert all((t.name in dual_row) == (not t.met) for t in dual_targets)
    assert {p.name for p in (out / "plots").iterdir()} == {
        "accuracy_per_method.png", "mode_rate_per_method.png", "mode_probe_per_method.png"}


@pytest.mark.slow
def test_every_eval_writes_its_items_and_they_add_up_to_the_summary(smoke_sweep) -> None:
    out, _ = smoke_sweep
    run = out / "seed_1" / "dual"
    summary = json.loads((run / "summary.json").read_text())["eval"]
    rows = read_eval_items(run / "evals" / "final_step_2.jsonl")
    free = [r for r in rows if r["forced"] is None]
    assert len(free) == 24 and len({r["id"] for r in free}) == 24  # smoke: data.max_eval_prompts=24
    for setting, result in summary.items():
        if isinstance(result, dict) and "accuracy" in result:
            mine = [r for r in free if r["setting"] == setting]
            assert len(mine) == result["count"]
            assert sum(r["correct"] for r in mine) / len(mine) == pytest.approx(result["accuracy"])
            assert sum(r["mode"] == "personalized" for r in mine) / len(mine) == pytest.approx(
                result["personalized_mode_rate"])
    # Forced rows: one per item and mode (the baselines after SFT and at the end).
    assert sorted((r["id"], r["forced"]) for r in rows if r["forced"]) == sorted(
        (r["id"], m) for r in free for m in ("general", "personalized"))
    assert {r["kind"] for r in rows} <= {"flower", "bird", "stone", "fish", "star", "moth", "preference"}
    # The learner's probe and vLLM's greedy choice agree on the mode wherever it is not a near tie.
    decided = [r for r in free if abs(r["logit_gap"]) > 1e-3 and r["mode"] is not None]
    assert decided and all((r["logit_gap"] > 0) == (r["mode"] == "personalized") for r in decided)
    # The SFT run's one eval is its final one, at step 0.
    assert [p.name for p in (out / "seed_1" / "sft" / "evals").iterdir()] == ["final_step_0.jsonl"]


@pytest.mark.slow
def test_a_sweep_run_again_reruns_nothing_it_finished(smoke_sweep) -> None:
    out, _ = smoke_sweep
    before = json.loads((out / "sweep.json").read_text())
    result = subprocess.run([*SWEEP, "--seeds", "1", "--methods", "dual", "--out", str(out),
                             "--config", str(SMOKE)], cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("finished before, kept") == 2 and ": running" not in result.stdout
    assert json.loads((out / "sweep.json").read_text()) == before
    assert "| DualGRPO − SFT |" in result.stdout


def _write_sweep_run(root: Path, seed: int, name: str, outcomes: dict[str, tuple[str, bool, str]]) -> None:
    """A finished run as the sweep reads it: summary.json and evals/final_step_N.jsonl;
    ``outcomes``: item id -> (setting, correct, chosen mode)."""
    run = root / f"seed_{seed}" / name
    (run / "evals").mkdir(parents=True)
    rows = [{"id": i, "setting": s, "kind": "flower", "forced": None, "mode": m, "correct": c}
            for i, (s, c, m) in outcomes.items()]
    rows.append({"id": "x", "setting": "aligned", "kind": "flower", "forced": "general", "mode": "general",
                 "correct": True})  # forced rows are not paired
    (run / "evals" / f"final_step_{0 if name == 'sft' else 40}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    result = {}
    for setting in ("no_persona", "unaligned", "aligned", "personalized"):
        mine = [(c, m) for s, c, m in outcomes.values() if s == setting]
        result[setting] = {"accuracy": sum(c for c, _ in mine) / len(mine), "count": len(mine),
                           "personalized_mode_rate": sum(m == "personalized" for _, m in mine) / len(mine)}
    result["mean_accuracy"] = sum(r["accuracy"] for r in result.values()) / 4
    (run / "summary.json").write_text(json.dumps({"eval": result}))


def test_sweep_report_gives_mean_spread_every_run_and_intervals_of_dual_minus_each_row(tmp_path: Path) -> None:
    from personadual.report import main as report_main

    settings = ["no_persona", "unaligned", "aligned", "personalized"]
    for seed in (0, 1, 2):
        base = {f"s{seed}-{s}-{i}": (s, i % 2 == 0, "general") for s in settings for i in range(40)}
        _write_sweep_run(tmp_path, seed, "sft", base)
        _write_sweep_run(tmp_path, seed, "grpo", base)
        # DualGRPO: 8 more aligned items right (+0.2 aligned, +0.05 over settings), in personalized mode.
        better = dict(base)
        for i in range(1, 17, 2):
            better[f"s{seed}-aligned-{i}"] = ("aligned", True, "personalized")
        _write_sweep_run(tmp_path, seed, "dual", better)
    assert report_main([str(tmp_path)]) == 0
    table = (tmp_path / "table1.md").read_text()
    assert "| SFT | 3 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 |" in table
    assert "| DualGRPO | 3 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.700 ± 0.000 | 0.500 ± 0.000 | 0.550 ± 0.000 |" in table
    assert "| DualGRPO | 1 | 0.500 / 0.500 / 0.700 / 0.500 | 0.550 | 0.00 / 0.20 / 0.00 | 40/40/40/40 |" in table
    for other in ("SFT", "w/o DualAdv (GRPO)"):
        row = next(line for line in table.splitlines() if line.startswith(f"| DualGRPO − {other} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert cells[0] == cells[1] == cells[3] == "+0.000 [+0.000, +0.000]"
        aligned_low = float(cells[2].split("[")[1].split(",")[0])
        assert cells[2].startswith("+0.200") and 0.05 < aligned_low < 0.2
        assert cells[4].startswith("+0.050")  # each setting weighs the same
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "accuracy_per_method.png", "mode_rate_per_method.png", "mode_probe_per_method.png"}
