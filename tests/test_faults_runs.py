"""Faults injected into whole runs through launch.py (configs/smoke.yaml, no SFT, tiny eval):

- run "engines" (vLLM, the default engine): a rollout engine SIGKILLed mid-generation in
  step 1 and the reward worker SIGKILLed mid-batch in step 2 are replaced, their work redone,
  and both steps keep every sample (with run.max_consecutive_failures=2 these two failures do
  not stop the run: a completed step resets the count); in step 3 the reward worker is killed
  twice in a row, which stops the run (exit 3, one line) after checkpointing step 2.
- run "learner" (two DeepSpeed ranks on gloo, HF engine): rank 1 SIGKILLed mid policy step
  stops the run within the collective timeout (exit 3, one line naming the rank); `--resume`
  then crashes rank 0 while it writes the step-2 checkpoint, which leaves step 1 intact and
  unpublished step 2; a last `--resume` continues from step 1 to the end.

- run "hangs" (vLLM, the one-update-lag pipeline): the engine SIGSTOPped mid-generation in
  step 1 is killed by the generation watchdog (rollout.generate_timeout_s), replaced, resynced
  and its prompts generated again with the same seeds; the engine SIGKILLed while it receives a
  weight bucket in step 2's sync is replaced and synced in place; the run finishes without
  ``--resume``, every sync's probe agrees with the learner, no sample is lost, and the
  engine/learner log-prob mismatch is ~0 on step 1 (on-policy) and clearly above 0 on the
  lagged steps.

Processes are found and caught mid-work through personadual/fault_hooks.py (PERSONADUAL_FAULT_DIR
markers and holds). Each fault prints one JSON line with what it cost:
``pytest -s tests/test_faults_runs.py | grep '"fault": '``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from personadual.fault_hooks import FAULT_DIR_ENV
from tests.helpers import LAUNCH, ROOT, run_launch
from tests.ray_head import launch_env

SAMPLES = 4 * 2 * 2  # smoke: prompts x modes x n per mode
COLLECTIVE_TIMEOUT_S = 60
STOP_MARGIN_S = 60  # a loaded 2-core machine: the bound is the collective timeout plus this
SMALL = ["--config", str(ROOT / "configs/smoke.yaml"), "sft.steps=0", "eval.baselines=false",
         "eval.two_turn_cases=0", "data.max_eval_prompts=4", "wandb.mode=disabled"]

pytestmark = [pytest.mark.slow]


def report(record: dict) -> None:
    print(json.dumps(record, sort_keys=True), flush=True)


class FaultRun:
    """launch.py in a subprocess with fault markers on; the test kills marked processes."""

    def __init__(self, fault_dir: Path, args: list[str], log: Path) -> None:
        self.fault_dir = fault_dir
        fault_dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        env = launch_env({**os.environ, FAULT_DIR_ENV: str(fault_dir)})
        self._out = log.open("w")
        self.process = subprocess.Popen([*LAUNCH, *args], cwd=ROOT, env=env,
                                        stdout=self._out, stderr=subprocess.STDOUT, text=True)
        self.killed: set[int] = set()

    def kill_mid(self, kind: str, label: str = "*", timeout_s: float = 400) -> float:
        """SIGKILL the process doing the next ``kind`` work; returns the monotonic time of the kill."""
        return self.signal_mid(kind, label, signal.SIGKILL, timeout_s)[1]

    def signal_mid(self, kind: str, label: str, signum: int, timeout_s: float = 400) -> tuple[int, float]:
        """Hold the next ``kind`` work labelled ``label`` ("*": any; personadual/fault_hooks.py),
        send ``signum`` to the process doing it, let the others go on; returns its pid and the
        monotonic time of the signal."""
        hold = self.fault_dir / (f"hold.{kind}" if label == "*" else f"hold.{kind}.{label}")
        hold.touch()
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for marker in sorted(self.fault_dir.glob(f"{kind}.{label}.*")):
                    pid = int(marker.name.rsplit(".", 1)[1])
                    if pid in self.killed:
                        continue
                    os.kill(pid, signum)
                    self.killed.add(pid)
                    marker.unlink(missing_ok=True)
                    return pid, time.monotonic()
                if self.process.poll() is not None:
                    raise AssertionError(f"the run ended before any {kind} {label} work:\n{self.tail()}")
                time.sleep(0.01)
            raise AssertionError(f"no {kind} {label} work within {timeout_s} s:\n{self.tail()}")
        finally:
            hold.unlink(missing_ok=True)

    def wait_for(self, condition, what: str, timeout_s: float = 400) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return time.monotonic()
            if self.process.poll() is not None:
                raise AssertionError(f"the run ended before {what}:\n{self.tail()}")
            time.sleep(0.02)
        raise AssertionError(f"no {what} within {timeout_s} s:\n{self.tail()}")

    def finish(self, timeout_s: float = 600) -> tuple[int, float]:
        try:
            code = self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._out.close()
        return code, time.monotonic()

    def tail(self, lines: int = 40) -> str:
        self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop_line(self) -> str:
        return [line for line in self.log.read_text().splitlines() if line.startswith("error: ")][-1]


def rl_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return [r for r in records if r["stage"] == "rl"]


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.timeout(1200)
def test_dead_engines_and_reward_workers_are_replaced_until_too_many_fail_in_a_row(tmp_path):
    run_dir = tmp_path / "runs" / "engines"
    run = FaultRun(tmp_path / "faults", [*SMALL, f"run.out_dir={tmp_path / 'runs'}", "run.name=engines",
                                         "algo.steps=3", "run.save_every=0", "run.max_consecutive_failures=2"],
                   tmp_path / "engines.log")
    engine_killed = run.kill_mid("generate")
    step1_done = run.wait_for(lambda: len(rl_records(run_dir)) >= 1, "RL step 1")
    worker_killed = run.kill_mid("score")
    step2_done = run.wait_for(lambda: len(rl_records(run_dir)) >= 2, "RL step 2")
    run.kill_mid("score")
    again_killed = run.kill_mid("score")  # the replacement, before step 3 completes
    code, stopped = run.finish()

    assert code == 3, run.tail()
    line = run.stop_line()
    assert "reward worker 0 failed" in line and "run.max_consecutive_failures=2" in line, line
    assert f"--resume {run_dir}" in line and "step_2" in line, line
    step1, step2 = rl_records(run_dir)
    assert step1["samples"] == step2["samples"] == SAMPLES
    assert step1["mode/rate_general"] == step1["mode/rate_personalized"] == 0.5
    assert (step1["faults/rollout_restarts"], step1["faults/reward_restarts"]) == (1, 0)
    assert (step2["faults/rollout_restarts"], step2["faults/reward_restarts"]) == (0, 1)
    # The replacement engine generated on the weights the learner had (version 1 after step 1).
    assert step1["staleness"]["max"] == step2["staleness"]["max"] == 0
    assert step2["weight_version"] == step1["weight_version"] + 1
    checkpoint = run_dir / "checkpoints" / "step_2"
    assert (checkpoint / "COMPLETE").exists() and not (run_dir / "checkpoints" / "step_3").exists()
    state = json.loads((checkpoint / "driver_state.json").read_text())
    assert state["step"] == 2 and state["rl_cursor"]["position"] == 2 * 4  # step 3's prompts come again
    report({"fault": "rollout_engine_killed_mid_generation", "engine": "vllm",
            "samples": step1["samples"], "samples_lost": SAMPLES - step1["samples"],
            "kill_to_step_done_s": round(step1_done - engine_killed, 2),
            "replace_and_resync_s": round(step1["faults/recovery_s"], 2)})
    report({"fault": "reward_worker_killed_mid_batch", "samples": step2["samples"],
            "samples_lost": SAMPLES - step2["samples"], "kill_to_step_done_s": round(step2_done - worker_killed, 2),
            "replace_s": round(step2["faults/recovery_s"], 2)})
    report({"fault": "reward_worker_killed_twice_in_a_row", "max_consecutive_failures": 2,
            "kill_to_exit_s": round(stopped - again_killed, 2), "checkpoint": "step_2", "message": line})


@pytest.mark.timeout(1800)
def test_learner_rank_death_stops_the_run_and_a_crashed_save_keeps_the_last_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    run_dir = runs / "learner"
    learner = [f"run.out_dir={runs}", "run.name=learner", "algo.steps=2", "run.save_every=1",
               "rollout.engine=hf", "learner.num_ranks=2", "learner.num_cpus_per_rank=0.5",
               f"learner.collective_timeout_s={COLLECTIVE_TIMEOUT_S}"]

    # A learner rank dies in the middle of step 2's policy step.
    run = FaultRun(tmp_path / "faults-1", [*SMALL, *learner], tmp_path / "learner-1.log")
    run.wait_for(lambda: (run_dir / "checkpoints" / "step_1" / "COMPLETE").exists(), "the step-1 checkpoint")
    rank_killed = run.kill_mid("train", "rank1")
    code, stopped = run.finish()
    assert code == 3, run.tail()
    line = run.stop_line()
    assert "run stopped: learner rank 1 of 2 died during policy_step" in line, line
    assert "step_1" in line and f"--resume {run_dir}" in line, line
    assert stopped - rank_killed < COLLECTIVE_TIMEOUT_S + STOP_MARGIN_S
    report({"fault": "learner_rank_killed_mid_step", "collective_timeout_s": COLLECTIVE_TIMEOUT_S,
            "kill_to_exit_s": round(stopped - rank_killed, 2), "message": line})

    # --resume; the learner process dies while it writes the step-2 checkpoint.
    step1 = run_dir / "checkpoints" / "step_1"
    before = folder_digest(step1)
    run = FaultRun(tmp_path / "faults-2", ["--resume", str(run_dir)], tmp_path / "learner-2.log")
    save_killed = run.kill_mid("save", "rank0")
    code, stopped = run.finish()
    assert code == 3, run.tail()
    assert "learner rank 0 of 2 died during save_checkpoint" in run.stop_line()
    assert stopped - save_killed < COLLECTIVE_TIMEOUT_S + STOP_MARGIN_S
    assert (run_dir / "checkpoints" / ".tmp-step_2").is_dir()  # the save was under way ...
    assert not (run_dir / "checkpoints" / "step_2").exists()  # ... and never published
    assert folder_digest(step1) == before and (step1 / "COMPLETE").exists()
    report({"fault": "learner_killed_mid_checkpoint", "kill_to_exit_s": round(stopped - save_killed, 2),
            "previous_checkpoint_intact": True})

    # --resume continues from step 1, the last complete checkpoint, to the end (step 2).
    resumed = run_launch("--resume", str(run_dir), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {step1}" in resumed.stdout  # the console line, on stdout with the run lines
    rl = rl_records(run_dir)
    assert [r["step"] for r in rl] == [1, 2]  # step 2 once: the crashed run's line was dropped
    assert rl[1]["weight_version"] == rl[0]["weight_version"] + 1
    assert all(r["samples"] == SAMPLES for r in rl)
    assert (run_dir / "checkpoints" / "step_2" / "COMPLETE").exists()
    assert not (run_dir / "checkpoints" / ".tmp-step_2").exists()
    assert json.loads((run_dir / "summary.json").read_text())["faults"]["rollout_restarts"] == 0


@pytest.mark.timeout(1200)
def test_a_hung_engine_and_one_killed_mid_sync_are_replaced_in_place_and_the_run_finishes(tmp_path):
    run_dir = tmp_path / "runs" / "hangs"
    generate_timeout_s = 10
    run = FaultRun(tmp_path / "faults", [*SMALL, f"run.out_dir={tmp_path / 'runs'}", "run.name=hangs",
                                         "algo.steps=3", "run.save_every=0", "cluster.schedule=pipelined",
                                         f"rollout.generate_timeout_s={generate_timeout_s}",
                                         "rollout.verify_every=1", "learner.bucket_bytes=262144",
                                         # Rewards that vary, and updates that move the weights
                                         # visibly, so a lag shows in the mismatch.
                                         "sft.steps=30", "learner.optim.lr=1e-3"],
                   tmp_path / "hangs.log")
    stopped_pid, frozen_at = run.signal_mid("generate", "engine0", signal.SIGSTOP)
    try:
        step1_done = run.wait_for(lambda: len(rl_records(run_dir)) >= 1, "RL step 1")
    finally:
        try:
            os.kill(stopped_pid, signal.SIGKILL)  # the watchdog's ray.kill already did; never leave it stopped
        except ProcessLookupError:
            pass
    _, sync_killed_at = run.signal_mid("bucket", "2", signal.SIGKILL)
    step2_done = run.wait_for(lambda: len(rl_records(run_dir)) >= 2, "RL step 2")
    code, _ = run.finish()
    assert code == 0, run.tail()

    steps = rl_records(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["samples"] == SAMPLES for r in steps)  # all 2n samples of every prompt
    step1, step2, step3 = steps
    assert step1["faults/generate_timeouts"] == 1 and step1["faults/rollout_restarts"] == 1
    assert step2["faults/sync_deaths"] == 1 and step2["faults/rollout_restarts"] == 1
    assert step3["faults/rollout_restarts"] == 0
    assert step1["faults/recovery_s"] > 0 and step2["faults/recovery_s"] > 0
    # Every sync, the replacements' included, serves the learner's weights (probe at verify_every=1).
    for record in steps:
        assert record["sync"]["probe_max_abs_logprob_diff"] <= 0.02, record["sync"]
        assert record["sync"]["version"] == record["weight_version"]
    # Step 1 trains on its own weights' rollouts; steps 2 and 3 on rollouts one update old.
    assert step1["staleness"]["max"] == 0 and step2["staleness"]["max"] == step3["staleness"]["max"] == 1
    on_policy, lagged = step1["learner"]["mismatch/mean"], step2["learner"]["mismatch/mean"]
    assert on_policy < 1e-3, step1["learner"]
    assert lagged > 10 * max(on_policy, 1e-5), (on_policy, lagged)
    assert step2["learner"]["rollout_correction/weight_mean"] > 0  # tis, on by default with a lag
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["faults"]["generate_timeouts"] == 1 and summary["faults"]["sync_deaths"] == 1
    report({"fault": "rollout_engine_hung_mid_generation", "engine": "vllm", "generate_timeout_s": generate_timeout_s,
            "samples": step1["samples"], "samples_lost": SAMPLES - step1["samples"],
            "freeze_to_step_done_s": round(step1_done - frozen_at, 2),
            "replace_and_resync_s": round(step1["faults/recovery_s"], 2)})
    report({"fault": "rollout_engine_killed_mid_sync", "engine": "vllm", "samples": step2["samples"],
            "samples_lost": SAMPLES - step2["samples"], "kill_to_step_done_s": round(step2_done - sync_killed_at, 2),
            "replace_and_resync_s": round(step2["faults/recovery_s"], 2),
            "probe_max_abs_logprob_diff_after": step3["sync"]["probe_max_abs_logprob_diff"]})
    report({"fault": "none", "metric": "mismatch/mean", "on_policy_step": on_policy, "one_update_lag_step": lagged,
            "on_policy_max": step1["learner"]["mismatch/max"], "lagged_max": step2["learner"]["mismatch/max"],
            "probe_max_abs_logprob_diff": max(r["sync"]["probe_max_abs_logprob_diff"] for r in steps)})
