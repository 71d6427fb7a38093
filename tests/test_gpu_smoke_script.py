"""scripts/gpu_smoke.py on this CPU: the same stages (engine process, DeepSpeed learner,
bucketed sync, version and weight checks) that the GPU smoke runs on CUDA, so the script is
not first exercised on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_smoke_script_cpu_path(tmp_path: Path) -> None:
    env = {**os.environ, "PERSONADUAL_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "scripts/gpu_smoke.py", "--device", "cpu", "--preset", "tiny", "--steps", "2",
         "--prompts", "4", "--n-per-mode", "2", "--lr", "1e-4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    stages = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"stage"')]
    by_stage = {line["stage"]: line for line in stages}
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    steps = [line for line in stages if line["stage"] == "rl_step"]
    assert [s["step"] for s in steps] == [1, 2]
    for step in steps:
        assert step["samples"] == 4 * 2 * 2  # prompts x modes x n per mode
        assert step["engine_version"] == step["learner_version"] == step["step"]
        assert step["sync_bytes"] == by_stage["sync_start"]["bytes"] > 0
        assert step["reward_mean"] == 0.5  # the personalized-mode half of the smoke reward
    assert by_stage["learner_start"]["backend"] == "gloo"
    weights = by_stage["weights_equal"]
    assert weights["ok"] and weights["mismatched"] == [] and weights["changed_by_training"] > 0
    assert by_stage["summary"]["ok"] is True


def test_gpu_smoke_script_loads_without_vllm_or_ray() -> None:
    """The GPU image has a CUDA torch but neither vLLM nor Ray: the script, and the sender it
    shares with the driver (learner/weight_push.py), must load with both unimportable."""
    blocker = ("import importlib.abc, sys\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('vllm', 'ray'):\n"
               "            raise ImportError(f'{name} is blocked')\n"
               "sys.meta_path.insert(0, Block())\n"
               "import runpy\n"
               "sys.path.insert(0, 'scripts')  # as when the script runs: its folder first\n"
               "module = runpy.run_path('scripts/gpu_smoke.py', run_name='not_main')\n"
               "assert 'WeightPusher' in module and 'Sync' in module\n"
               "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'ray')))\n")
    result = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
