"""Our side of the step benchmarks: an RL run through the real launch path (`launch.py`), on
the work both benchmarks share, and its per-step records read back from `metrics.jsonl`.

The work (issue #18): 8 prompts x 8 completions per step (forced prefix: 4 per mode), 16
sampled tokens after the forced mode token, temperature 0.6, KL 0.04, fp32, one learner
rank, one engine, from the model as `personadual/tiny.py` builds it (no SFT stage, no eval,
no checkpoints: only RL steps are timed).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

PROMPTS_PER_STEP = 8
COMPLETIONS_PER_PROMPT = 8
SAMPLED_TOKENS = 16
TEMPERATURE = 0.6
KL_COEF = 0.04
PRESET_SIZES = {"small26m": "26.2M", "tiny": "0.85M"}
# The world and the probe cadence the README's step figures were measured on: the default
# config's world options change which prompts RL draws, and its probe runs every 20 steps.
BENCH_CONFIG = ROOT / "configs" / "plain_world.yaml"


def work_overrides(preset: str, steps: int, run_name: str, out_dir: Path) -> list[str]:
    """launch.py overrides for the shared work on ``preset``, ``steps`` RL steps."""
    return [f"model.tiny_preset={preset}", "sft.steps=0", f"algo.steps={steps}",
            f"algo.prompts_per_step={PROMPTS_PER_STEP}", f"algo.n_per_mode={COMPLETIONS_PER_PROMPT // 2}",
            "algo.forced_prefix=true", f"algo.kl_coef={KL_COEF}",
            f"rollout.sampling.temperature={TEMPERATURE}",
            f"rollout.sampling.max_response_tokens={SAMPLED_TOKENS + 1}",  # + the forced mode token
            "rollout.num_engines=1", "learner.num_ranks=1", "learner.precision=fp32",
            "eval.at_start=false", "run.eval_every=0", "run.save_every=0", "run.log_samples_every=0",
            "wandb.mode=disabled", f"run.out_dir={out_dir}", f"run.name={run_name}"]


def launch_arguments(preset: str, steps: int, run_name: str, out_dir: Path) -> list[str]:
    """launch.py's arguments for the shared work: the bench config, then the work's overrides."""
    return ["--config", str(BENCH_CONFIG), *work_overrides(preset, steps, run_name, out_dir)]


@dataclass
class OurRun:
    rows: list[dict[str, Any]]  # the RL steps' metrics.jsonl records, warm-up steps dropped
    wall_s: float  # the whole launch, start-up included
    run_dir: Path

    def median(self, phase: str) -> float:
        return statistics.median(float(row["timing_s"].get(phase, 0.0)) for row in self.rows)

    @property
    def completions_per_s(self) -> float:
        """Completions over the timed steps' summed wall time (steady state, no start-up)."""
        return sum(row["samples"] for row in self.rows) / sum(row["timing_s"]["step"] for row in self.rows)


def run_ours(preset: str, *, steps: int, warmup: int, out_dir: Path, extra: list[str] | None = None,
             timeout_s: float = 1800.0) -> OurRun:
    """``warmup + steps`` RL steps through launch.py in a fresh process; raises with the log's
    tail when the run fails."""
    name = f"bench-{preset}-{time.strftime('%H%M%S')}-{os.getpid()}"
    command = [sys.executable, str(ROOT / "launch.py"), *launch_arguments(preset, warmup + steps, name, out_dir),
               *(extra or [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"our run on {preset} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    run_dir = out_dir / name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rl = [r for r in records if r.get("stage") == "rl"]
    if len(rl) != warmup + steps:
        raise RuntimeError(f"our run on {preset}: {len(rl)} RL records in {run_dir}, expected {warmup + steps}")
    return OurRun(rl[warmup:], wall, run_dir)


def machine(load_at_start: float) -> dict[str, float | int | None]:
    """The machine as every bench reports it: its cores and the 1-minute load at the start and now."""
    return {"cpus": os.cpu_count(), "load_avg_1m_at_start": load_at_start,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
