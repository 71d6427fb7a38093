"""cluster.schedule (serial | colocated | pipelined) and the threads each actor computes on.

Pure checks first (the thread plan, the config rules, the colocated placement plan), then
two smoke runs on the real stack that share one module fixture: serial and colocated at
the same seed must give the same learner numbers, and each actor's thread count, read back
from inside the actor, is what the schedule (or the config) says. The pipelined schedule's
run (staleness 1, threads split) is tests/test_e2e.py's pipelined test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from actors.config import ConfigError, load_config
from actors.placement import plan_groups
from actors.threads import PIPELINED_ROLLOUT_SHARE, plan_threads, runtime_env
from personadual.algo_config import AlgoConfig
from tests.helpers import SMOKE, run_launch


# ---- the thread plan ---------------------------------------------------------------------
def test_serial_and_colocated_give_each_role_every_core_of_its_node():
    for schedule in ("serial", "colocated"):
        plan = plan_threads(schedule, learner_threads=None, rollout_threads=None, learner_nodes=["a"],
                            engine_nodes=["a"], node_cpus={"a": 2.0})
        assert (plan.learner, plan.rollout) == ([2], [2])
        assert plan.derived == {"learner": True, "rollout": True}


def test_pipelined_splits_a_shared_node_by_phase_cost_and_never_below_one_core_each():
    two = plan_threads("pipelined", learner_threads=None, rollout_threads=None, learner_nodes=["a"],
                       engine_nodes=["a"], node_cpus={"a": 2.0})
    assert (two.learner, two.rollout) == ([1], [1])
    assert two.learner_sft == [2]  # no generation beside SFT: the learner takes the node again
    sixteen = plan_threads("pipelined", learner_threads=None, rollout_threads=None, learner_nodes=["a"],
                           engine_nodes=["a"], node_cpus={"a": 16.0})
    rollout = round(16 * PIPELINED_ROLLOUT_SHARE)
    assert (sixteen.learner, sixteen.rollout) == ([16 - rollout], [rollout])
    one = plan_threads("pipelined", learner_threads=None, rollout_threads=None, learner_nodes=["a"],
                       engine_nodes=["a"], node_cpus={"a": 1.0})
    assert (one.learner, one.rollout) == ([1], [1])


def test_actors_of_one_role_on_a_node_share_its_cores_and_other_nodes_are_not_split():
    plan = plan_threads("serial", learner_threads=None, rollout_threads=None, learner_nodes=["a", "a"],
                        engine_nodes=["a", "b"], node_cpus={"a": 8.0, "b": 6.0})
    assert (plan.learner, plan.rollout) == ([4, 4], [8, 6])
    # Pipelined: node a holds both roles (split 6/2, then halved among the two ranks); node b
    # only an engine, which keeps all of it.
    plan = plan_threads("pipelined", learner_threads=None, rollout_threads=None, learner_nodes=["a", "a"],
                        engine_nodes=["a", "b"], node_cpus={"a": 8.0, "b": 6.0})
    assert (plan.learner, plan.rollout) == ([3, 3], [2, 6])


def test_configured_threads_win_over_the_derived_ones():
    plan = plan_threads("pipelined", learner_threads=3, rollout_threads=None, learner_nodes=["a"],
                        engine_nodes=["a"], node_cpus={"a": 2.0})
    assert (plan.learner, plan.rollout) == ([3], [1])
    assert plan.derived == {"learner": False, "rollout": True}
    assert "learner 3 (config)" in plan.describe() and "rollout 1 (derived)" in plan.describe()


def test_the_thread_count_rides_in_the_runtime_env_beside_the_env_vars_already_there():
    env = runtime_env(3, {"env_vars": {"VLLM_RAY_BUNDLE_INDICES": "0,1"}, "pip": ["x"]})
    assert env == {"env_vars": {"VLLM_RAY_BUNDLE_INDICES": "0,1", "OMP_NUM_THREADS": "3"}, "pip": ["x"]}


# ---- the config: one source of truth for staleness ----------------------------------------
def test_max_staleness_follows_the_schedule_when_left_unset():
    assert load_config(SMOKE).algo.max_staleness == 0
    assert load_config(SMOKE, ["cluster.schedule=colocated"]).algo.max_staleness == 0
    pipelined = load_config(SMOKE, ["cluster.schedule=pipelined"])
    assert pipelined.algo.max_staleness == 1
    assert load_config(SMOKE, ["cluster.schedule=pipelined", "algo.max_staleness=1"]).algo.max_staleness == 1
    assert AlgoConfig().correction == "none" and AlgoConfig(max_staleness=1).correction == "tis"


@pytest.mark.parametrize("overrides", [["cluster.schedule=pipelined", "algo.max_staleness=0"],
                                       ["algo.max_staleness=1"],
                                       ["cluster.schedule=colocated", "algo.max_staleness=1"]])
def test_a_staleness_that_contradicts_the_schedule_is_one_line_naming_both_keys(overrides):
    with pytest.raises(ConfigError) as error:
        load_config(SMOKE, overrides)
    message = str(error.value)
    assert "algo.max_staleness" in message and "cluster.schedule" in message and "\n" not in message


def test_colocated_refuses_tensor_parallel_engines_and_a_gpu_shared_with_nothing():
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size"):
        load_config(SMOKE, ["cluster.schedule=colocated", "rollout.tensor_parallel_size=2",
                            "rollout.num_gpus_per_engine=1", "learner.num_gpus_per_rank=1"])
    with pytest.raises(ConfigError, match="learner.num_gpus_per_rank"):
        load_config(SMOKE, ["cluster.schedule=colocated", "rollout.num_gpus_per_engine=0.5"])
    on_gpu = load_config(SMOKE, ["cluster.schedule=colocated", "rollout.num_gpus_per_engine=0.5",
                                 "learner.num_gpus_per_rank=0.5"])
    assert on_gpu.rollout.weight_transfer_backend == "ipc"  # CUDA IPC between processes on one GPU
    assert load_config(SMOKE, ["cluster.schedule=colocated"]).rollout.weight_transfer_backend == "auto"


@pytest.mark.parametrize("override", ["cluster.schedule=overlapped", "learner.threads=0", "rollout.threads=-1"])
def test_bad_schedule_and_thread_values_exit_2_naming_the_key(override, tmp_path):
    result = run_launch("--config", str(SMOKE), f"run.out_dir={tmp_path}", override, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert override.split("=")[0] in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_colocated_puts_engine_i_and_learner_rank_i_in_one_bundle():
    cfg = load_config(SMOKE, ["cluster.schedule=colocated", "learner.num_ranks=2", "rollout.num_engines=2",
                              "learner.num_cpus_per_rank=0.5", "rollout.num_cpus_per_engine=0.25"])
    specs = plan_groups(cfg)
    assert [s.name for s in specs] == ["colocated", "reward"]
    assert specs[0].bundles == [{"CPU": 0.75}, {"CPU": 0.75}]
    serial = plan_groups(load_config(SMOKE))
    assert [s.name for s in serial] == ["learner", "rollout_0", "reward"]


# ---- the real stack: serial and colocated, same seed -------------------------------------
# Few steps, no baselines or two-turn eval: the runs exist to compare learner numbers. The
# colocated run branches from the serial run's SFT checkpoint (`--init-from`), so both RL stages,
# where the schedules differ, start from the same bytes. (Once, in CI, a run's first SFT step
# came out 6 ulps off every other run of this config, never reproduced since; 30 SFT steps grew
# it past 1e-6 before RL began.)
SHARED = ("algo.steps=2", "eval.baselines=false", "eval.two_turn_cases=0", "data.max_eval_prompts=8",
          "run.save_every=0", "run.log_samples_every=0")
NODE_CPUS = os.cpu_count() or 1
LEARNER_KEYS = ("loss", "pg_loss", "kl", "entropy", "grad_norm", "ratio_mean", "mode_token_prob", "tokens")


@pytest.fixture(scope="module")
def schedule_runs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("schedules")
    runs = {"serial": ("cluster.schedule=serial",),
            # Colocated with the thread counts given explicitly (the serial run derives the same).
            "colocated": ("cluster.schedule=colocated", f"learner.threads={NODE_CPUS}",
                          f"rollout.threads={NODE_CPUS}", "--init-from", str(out / "serial/checkpoints/sft_step_30"))}
    for name, overrides in runs.items():
        result = run_launch("--config", str(SMOKE), f"run.out_dir={out}", f"run.name={name}", *SHARED, *overrides,
                            timeout=840)
        assert result.returncode == 0, f"{name}: {result.stderr[-4000:]}"
        assert f"schedule: {name}" in result.stdout
    return {name: out / name for name in runs}


def _records(run_dir: Path, stage: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == stage]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_serial_and_colocated_give_the_same_learner_numbers_at_one_seed(schedule_runs):
    assert len(_records(schedule_runs["serial"], "sft")) == 30 and not _records(schedule_runs["colocated"], "sft")
    serial, colocated = (_records(schedule_runs[n], "rl") for n in ("serial", "colocated"))
    assert [r["step"] for r in serial] == [r["step"] for r in colocated] == [1, 2]
    for one, other in zip(serial, colocated):
        assert one["reward/mean"] == other["reward/mean"]
        for key in LEARNER_KEYS:
            a, b = one["learner"][key], other["learner"][key]
            assert a == pytest.approx(b, rel=1e-6, abs=1e-12), (one["step"], key, a, b)
        assert one["staleness"]["max"] == other["staleness"]["max"] == 0
    summary = {n: json.loads((schedule_runs[n] / "summary.json").read_text())["eval"] for n in schedule_runs}
    assert summary["serial"]["aligned"]["accuracy"] == summary["colocated"]["aligned"]["accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_each_actor_computes_on_the_threads_its_schedule_or_config_gives(schedule_runs):
    """Read back inside the actors (torch.get_num_threads), not taken from the config: Ray
    alone would leave the learner (1 CPU) and the engine (0.5 CPU) on one thread each."""
    for name in ("serial", "colocated"):
        for record in _records(schedule_runs[name], "rl"):
            assert record["perf"]["threads/learner"] == NODE_CPUS
            assert record["perf"]["threads/rollout"] == NODE_CPUS
            if name == "colocated":
                assert record["schedule/engine_sleep_calls"] == 1
            else:
                assert "schedule/engine_sleep_calls" not in record
        assert all(r["perf"]["threads/learner"] == NODE_CPUS for r in _records(schedule_runs[name], "sft"))
    colocated = _records(schedule_runs["colocated"], "rl")
    # vLLM's CPU worker has no sleep mode: the engine was asked, and stayed awake.
    assert [r["schedule/engines_slept"] for r in colocated] == [0, 0]
    config = OmegaConf.load(schedule_runs["colocated"] / "config.yaml")
    assert (config.learner.threads, config.rollout.threads) == (NODE_CPUS, NODE_CPUS)
