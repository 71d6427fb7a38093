"""The experiment config's map: one home per knob, moved keys named, seeds derived from run.seed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from actors.config import DERIVED_SEEDS, MOVED_KEYS, ConfigError, load_config, section
from personadual.algo_config import AlgoConfig
from personadual.estimators import ADVANTAGE_ESTIMATORS

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.mark.parametrize("old,new", sorted(MOVED_KEYS.items()))
def test_a_moved_key_names_its_new_home(old, new):
    value = "{node_a: 1}" if old.endswith("resources") else "1"
    with pytest.raises(ConfigError, match=f"^{old}: moved to {new}$"):
        load_config(SMOKE, [f"{old}={value}"])
    assert OmegaConf.select(load_config(SMOKE), new) is not None  # the new key exists


def test_a_moved_key_in_a_file_names_the_file_too(tmp_path):
    old_style = tmp_path / "old.yaml"
    old_style.write_text("learner:\n  kl_coef: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^learner.kl_coef: moved to algo.kl_coef \(in {old_style}\)$"):
        load_config(old_style)


def test_unset_seeds_are_run_seed_and_a_set_one_is_kept():
    assert [OmegaConf.select(load_config(SMOKE), key) for key in DERIVED_SEEDS] == [0, 0, 0]
    cfg = load_config(SMOKE, ["run.seed=7", "learner.seed=3"])
    assert [OmegaConf.select(cfg, key) for key in DERIVED_SEEDS] == [7, 3, 7]


def test_the_learner_gets_the_objective_from_algo_only():
    cfg = load_config(SMOKE, ["algo.kl_coef=0.1", "algo.ppo_epochs=2"])
    algo = section(cfg, "algo")
    assert isinstance(algo, AlgoConfig) and (algo.kl_coef, algo.updates_per_step) == (0.1, 2)
    assert not {"kl_coef", "clip_range", "beta", "advantage", "ppo_epochs"} & set(cfg.learner)


def test_the_allowed_advantage_names_are_the_registry_names():
    for name in ADVANTAGE_ESTIMATORS:
        assert load_config(SMOKE, [f"algo.advantage={name}"]).algo.advantage == name
    with pytest.raises(ConfigError, match=r"^algo.advantage: expected one of \['dual', 'grpo', 'dual_released'\]"):
        load_config(SMOKE, ["algo.advantage=dual_grpo"])


def test_every_role_keeps_its_count_and_resources_in_its_own_section():
    cfg = load_config(SMOKE, ["learner.num_cpus_per_rank=0.5", "reward.num_workers=2", "rollout.resources={b: 1}"])
    assert (cfg.learner.num_cpus_per_rank, cfg.reward.num_workers, dict(cfg.rollout.resources)) == (0.5, 2, {"b": 1})
    assert set(cfg.cluster) == {"num_cpus", "placement_strategy", "placement_timeout_s", "schedule",
                                 "reference"}
    with pytest.raises(ConfigError, match=r"^reward.resources.CPU: CPUs and GPUs have their own keys"):
        load_config(SMOKE, ["reward.resources={CPU: 1}"])


def test_loading_the_config_does_not_import_torch():
    # A config error is reported before the heavy libraries load.
    code = "import sys, actors.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.stdout.strip() == "False", result.stderr[-2000:]
