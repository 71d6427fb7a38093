"""The step benchmarks run: bench/step.py end to end on one tiny step, and the work both
benchmarks give our launch path accepted by its own config loader.

(bench/peer_trl.py's TRL side needs the separate environment that `--setup` installs; it is
run by hand, not here: see the README's Performance section.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.ours import launch_arguments
from tests.ray_head import launch_env

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmarks_work_is_a_valid_config_with_every_value_where_it_belongs(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--print-config",
                           *launch_arguments("tiny", 3, "bench-x", tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load(done.stdout)
    assert (config["algo"]["prompts_per_step"], config["algo"]["n_per_mode"]) == (8, 4)
    assert config["rollout"]["sampling"]["max_response_tokens"] == 17  # 16 sampled after the mode token
    assert (config["rollout"]["sampling"]["temperature"], config["algo"]["kl_coef"]) == (0.6, 0.04)
    assert (config["sft"]["steps"], config["algo"]["steps"], config["learner"]["precision"]) == (0, 3, "fp32")
    # The plain world and a probe every step, as the README's step figures were measured.
    assert not any(value for key, value in config["data"].items() if key.startswith("world_") and value is True)
    assert config["eval"]["probe_every"] == 1


def test_the_peer_benchmark_parses_its_arguments_without_trls_environment():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "peer_trl.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--rounds" in done.stdout and "--steps" in done.stdout, done.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_step_benchmark_runs_one_tiny_step_and_reports_every_phase_and_ratio_beside_its_target(tmp_path):
    from safetensors import safe_open

    from personadual.tiny import build_tiny_model

    done = subprocess.run([sys.executable, str(ROOT / "bench" / "step.py"), "--preset", "tiny", "--steps", "1",
                           "--warmup", "0", "--reps", "1", "--out-dir", str(tmp_path)],
                          cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=850)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)["results"][0]
    phases = result["phases_s"]
    assert set(phases) >= {"generate", "score", "reference", "train", "sync", "orchestration"}
    assert all(seconds >= 0 for seconds in phases.values()) and phases["generate"] > 0 and phases["train"] > 0
    assert sum(phases.values()) == pytest.approx(result["step_s"], abs=0.01)
    model = build_tiny_model("tiny")
    with safe_open(str(model / "model.safetensors"), framework="pt") as handle:
        weight_bytes = sum(handle.get_tensor(name).nbytes for name in handle.keys())
    assert result["components"]["sync"]["bytes"] == weight_bytes  # every tensor, once
    assert set(result["ratios"]) == set(result["targets"]) == set(result["meets"])
    assert all(math.isfinite(r) and r > 0 for r in result["ratios"].values()), result["ratios"]
    assert result["targets"] == {"rollout_over_raw_vllm": 0.8, "sync_over_raw_gloo": 0.5, "learner_over_matmul": 0.7}
    learner, rollout = result["components"]["learner"], result["components"]["rollout"]
    assert 0 < learner["token_positions"] <= learner["padded_positions"]  # real positions, padding left out
    assert rollout["raw_vllm_our_options"] > 0 and rollout["raw_vllm_sampled_tokens_per_s"] > 0
