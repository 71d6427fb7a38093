"""Faults a whole run must get through, end to end through launch.py on the real stack:

- a judge that fails 30% of judgements (HTTP 500, no answer, garbage) on a deterministic
  schedule: the run completes under the configured policy, and the fallbacks (or drops) in
  metrics.jsonl are exactly the judgements the server made fail for good; its API key
  reaches the judge and nothing else (run folder, checkpoints, W&B, stdout/stderr, Ray logs);
- invalid data rows with ``data.skip_invalid=true``: skipped, logged and counted;
- NaN losses: each such update is skipped and counted, and ``learner.max_consecutive_nonfinite``
  of them in a row stop the run with one line, exit 3, and a checkpoint of the last good weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from learner.checkpoint import load_torch_file
from personadual.world import PersonaWorld, WorldConfig
from tests.helpers import SMOKE, run_launch
from tests.judge_server import FaultSchedule, JudgeServer

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "PERSONADUAL_E2E_JUDGE_KEY"
CANARY = "sk-canary-judge-e2e-7d41b9"
MAX_RETRIES = 2
# The run's own settings for a small, judge-heavy run of the untrained tiny model (no SFT:
# sampled responses are then all distinct, so each failed judgement is one failed sample).
RUN_OVERRIDES = ["sft.steps=0", "algo.steps=2", "algo.prompts_per_step=4", "algo.n_per_mode=2",
                 "eval.baselines=false", "run.save_every=1", "data.source=files", "data.skip_invalid=true"]
INVALID_ROWS = [b"{not json", b'{"id": "broken", "question": 5}']

pytestmark = [pytest.mark.slow]


def _write_data(folder: Path) -> tuple[Path, Path]:
    """Synthetic-world prompts whose personalized questions the judge scores; the training
    file also carries two invalid rows."""
    world = PersonaWorld(WorldConfig(seed=0))

    def rows(prompts, judged: int, objective: int) -> list[bytes]:
        personalized = [p for p in prompts if p.task_type == "personalized"][:judged]
        plain = [p for p in prompts if p.task_type == "objective"][:objective]
        return [json.dumps({**p.to_dict(), "scorer": "judge"}).encode() for p in personalized] + \
            [json.dumps(p.to_dict()).encode() for p in plain]

    train, evals = folder / "train.jsonl", folder / "eval.jsonl"
    train_rows = rows(world.train_prompts(), judged=6, objective=2)
    train.write_bytes(b"\n".join(train_rows[:3] + INVALID_ROWS + train_rows[3:]) + b"\n")
    evals.write_bytes(b"\n".join(rows(world.eval_prompts(), judged=4, objective=2)) + b"\n")
    return train, evals


def _summed_counts(run_dir: Path) -> dict[str, int]:
    """Every scoring count the run logged: its RL steps and its evals."""
    total: dict[str, int] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for counts in (record.get("reward_counts"), record.get("eval", {}).get("reward_counts")):
            for key, value in (counts or {}).items():
                total[key] = total.get(key, 0) + value
    return total


# The Ray session's files are scanned for the key once: the fallback run starts a cluster of
# its own for that; the drop run joins the session's shared head (a cluster start less).
SCANS_RAY = "fallback_exact_match"


@pytest.fixture(scope="module", params=["fallback_exact_match", "drop"])
def judge_run(request, tmp_path_factory):
    policy = request.param
    folder = tmp_path_factory.mktemp(f"judge-{policy}")
    train, evals = _write_data(folder)
    own_cluster = policy == SCANS_RAY
    ray_tmp = Path(tempfile.mkdtemp(prefix="pdr", dir="/tmp"))  # short: Ray's socket paths live under it
    schedule = FaultSchedule(attempts=MAX_RETRIES + 1)
    env = {**os.environ, KEY_ENV: CANARY, **({"RAY_TMPDIR": str(ray_tmp)} if own_cluster else {})}
    try:
        with JudgeServer(faults=schedule) as server:
            result = run_launch("--config", str(SMOKE), *RUN_OVERRIDES,
                                f"data.train_files=[{train}]", f"data.eval_files=[{evals}]",
                                f"run.out_dir={folder}", "run.name=run", f"reward.judge.base_url={server.base_url}",
                                "reward.judge.model=judge-test", f"reward.judge.api_key_env={KEY_ENV}",
                                "reward.judge.timeout_s=1.5", f"reward.judge.max_retries={MAX_RETRIES}",
                                "reward.judge.backoff_initial_s=0.05", "reward.judge.backoff_max_s=0.2",
                                f"reward.judge.failure_policy={policy}", env=env, own_cluster=own_cluster)
            authorizations = {r.authorization for r in server.requests}
            requests = len(server.requests)
        ray_files = [p for p in ray_tmp.rglob("*") if p.is_file() and not p.is_symlink()]
        ray_leaks = [str(p) for p in ray_files if CANARY.encode() in _read(p)]
        yield {"policy": policy, "run_dir": folder / "run", "result": result, "schedule": schedule,
               "authorizations": authorizations, "requests": requests, "ray_files": len(ray_files),
               "ray_leaks": ray_leaks}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a socket or a file gone meanwhile
        return b""


@pytest.mark.timeout(1200)
def test_judge_failures_end_in_the_policy_with_exact_counts(judge_run):
    result, schedule = judge_run["result"], judge_run["schedule"]
    assert result.returncode == 0, result.stderr[-4000:]
    counts = _summed_counts(judge_run["run_dir"])
    print(judge_run["policy"], "server:", schedule.counts(), "run:",
          {k: v for k, v in sorted(counts.items()) if k.startswith(("judge/", "fallback", "dropped", "ok", "total"))})
    exhausted = schedule.exhausted
    # Every kind of fault happened, so the equalities below are about something.
    assert schedule.judgements() >= 10 and all(exhausted[k] > 0 for k in ("server_error", "timeout", "garbage"))
    assert schedule.injected["transient"] > 0 and exhausted["transient"] == 0
    fallback = judge_run["policy"] == "fallback_exact_match"
    failed, other = ("fallback", "dropped") if fallback else ("dropped", "fallback")
    assert counts[failed] == counts["judge/failures"] == schedule.failed(), (counts, schedule.counts())
    assert counts[other] == 0
    assert {k: counts.get(f"judge/error/{k}", 0) for k in ("server_error", "timeout", "parse")} == {
        "server_error": exhausted["server_error"], "timeout": exhausted["timeout"], "parse": exhausted["garbage"]}
    # A retry that succeeded is neither a fallback nor a drop, but it is counted as a retry.
    assert counts["judge/retries"] == schedule.retries()
    assert counts["judge/requests"] == judge_run["requests"]
    assert counts["ok"] + counts[failed] == counts["total"]
    run_dir = judge_run["run_dir"]
    rl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl if r["stage"] == "rl"] == [1, 2]
    assert (run_dir / "checkpoints" / "step_2" / "COMPLETE").exists() and (run_dir / "summary.json").is_file()


@pytest.mark.timeout(1200)
def test_judge_key_reaches_the_judge_and_nothing_else(judge_run):
    result, run_dir = judge_run["result"], judge_run["run_dir"]
    assert result.returncode == 0, result.stderr[-4000:]
    assert judge_run["authorizations"] == {f"Bearer {CANARY}"}  # it was used, on every request
    assert CANARY not in result.stdout + result.stderr
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    # The scan covers the checkpoints' binary files and the offline W&B run, not just text.
    assert any(p.suffix == ".pt" for p in files) and any(p.suffix == ".wandb" for p in files)
    assert [str(p) for p in files if CANARY.encode() in p.read_bytes()] == []
    if judge_run["policy"] == SCANS_RAY:
        assert judge_run["ray_files"] > 0 and judge_run["ray_leaks"] == []  # Ray's session logs


@pytest.mark.timeout(1200)
def test_invalid_rows_are_skipped_counted_and_logged(judge_run):
    result, run_dir = judge_run["result"], judge_run["run_dir"]
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_skipped"][str(run_dir.parent / "train.jsonl")] == len(INVALID_ROWS)
    assert "data rows skipped" in result.stderr and "train.jsonl" in result.stderr


@pytest.mark.timeout(900)
def test_consecutive_nonfinite_updates_stop_the_run_with_a_checkpoint(tmp_path):
    """NaN losses at RL steps 2, 3 and 4 (the fault-injection knob): each update is skipped
    and counted; the third in a row stops the run at step 4, exit 3, one line naming the key,
    and step 4's checkpoint holds the weights of step 1, the last good update."""
    result = run_launch("--config", str(SMOKE), "sft.steps=0", "algo.steps=6",
                        "run.save_every=1", "learner.fault_nan_loss_at_rl_steps=[2,3,4]",
                        "learner.max_consecutive_nonfinite=3", f"run.out_dir={tmp_path}", "run.name=nan")
    assert result.returncode == 3, result.stderr[-4000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run stopped: rl step 4: 3 updates in a row") and \
        "learner.max_consecutive_nonfinite=3" in last and "checkpoints/step_4" in last, last
    assert result.stderr.count("update(s) skipped for a non-finite loss") == 3

    run_dir = tmp_path / "nan"
    rl = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["stage"] == "rl"]
    assert [r["step"] for r in rl] == [1, 2, 3, 4]
    assert [r["learner"]["skipped_updates"] for r in rl] == [0, 1, 1, 1]
    assert [r["learner"]["consecutive_skipped_updates"] for r in rl] == [0, 1, 2, 3]
    assert [r["weight_version"] for r in rl] == [1, 1, 1, 1]
    checkpoints = run_dir / "checkpoints"
    # The step checkpoints, beside the frozen KL reference written once per run.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["reference", "step_1", "step_2", "step_3", "step_4"]
    assert (checkpoints / "step_4" / "COMPLETE").exists()
    state = json.loads((checkpoints / "step_4" / "learner" / "learner_state.json").read_text())
    assert state["weight_version"] == 1

    def weights(step: int) -> dict:
        files = list((checkpoints / f"step_{step}" / "learner" / "deepspeed").rglob("mp_rank_00_model_states.pt"))
        assert len(files) == 1
        return load_torch_file(files[0])["module"]

    good, stopped = weights(1), weights(4)
    assert stopped.keys() == good.keys() and all(stopped[k].equal(good[k]) for k in good)
