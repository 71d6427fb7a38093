"""Faults injected into real actors on a local Ray cluster: a reward worker SIGKILLed mid-batch
is replaced and its chunk scored again (each rollout scored exactly once), and a rollout
engine that stops answering (SIGSTOP) or dies (SIGKILL) during a weight sync fails the sync
with an error naming that engine, within the configured timeout.

Each test prints one JSON line (``{"fault": ...}``) with what it measured:
``pytest -s tests/test_faults_actors.py | grep '"fault": '``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
import ray

from actors.learner_group import LearnerGroup
from actors.reward_pool import RewardPool
from actors.rollout_actor import create_rollout_actors
from actors.supervision import FaultLog, RunStopped
from actors.weight_sync import WeightSync, WeightSyncError
from learner.config import LearnerConfig
from personadual.algo_config import AlgoConfig
from personadual.modes import Mode
from rewards.config import JudgeConfig, RewardConfig
from rollout.config import RolloutConfig, SamplingConfig
from tests.judge_server import JudgeServer, Reply, make_prompt, make_rollout

pytestmark = [pytest.mark.slow]

SYNC_TIMEOUT_S = 10.0
MARGIN_S = 30.0
KEY_ENV = "PERSONADUAL_TEST_FAULTS_JUDGE_KEY"  # a loaded 2-core machine: the bound is the timeout plus this


def report(record: dict) -> None:
    print(json.dumps({"fault": record.pop("fault"), **record}, sort_keys=True), flush=True)


def test_fault_log_stops_at_the_limit_and_a_completed_step_resets_the_count():
    faults = FaultLog(max_consecutive=2)
    faults.failure("rollout engine 0", RuntimeError("gone"))
    faults.restarted("rollout", 1.5)
    faults.event("generate_timeouts")
    assert faults.step_done() == {"faults/rollout_restarts": 1, "faults/reward_restarts": 0,
                                  "faults/generate_timeouts": 1, "faults/sync_deaths": 0,
                                  "faults/recovery_s": 1.5}
    faults.failure("reward worker 0", RuntimeError("gone"))  # one in a row again: goes on
    faults.restarted("reward", 0.5)
    with pytest.raises(RunStopped, match=r"reward worker 1 failed \(RuntimeError: again\), 2 failures in a row "
                                         r"\(run.max_consecutive_failures=2\)"):
        faults.failure("reward worker 1", RuntimeError("again\nsecond line"))
    assert faults.totals() == {"rollout_restarts": 1, "reward_restarts": 1, "generate_timeouts": 1,
                               "sync_deaths": 0, "recovery_s": 2.0}


def _pid(engine) -> int:
    return ray.get(engine.call.remote(lambda _engine: os.getpid()), timeout=60)


@pytest.mark.timeout(300)
def test_reward_worker_killed_mid_batch_is_replaced_and_each_rollout_scored_once(ray_cluster, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-faults")
    with JudgeServer(Reply.slow(1.0)) as server:
        config = RewardConfig(judge=JudgeConfig(base_url=server.base_url, model="judge-test", api_key_env=KEY_ENV,
                                                timeout_s=20.0, max_retries=1, max_concurrency=1))
        pool = RewardPool(config, num_workers=2, num_cpus=0.25)
        try:
            rollouts = [make_rollout(make_prompt(f"k{i // 2}"), f"{Mode.GENERAL.token} {i}. Answer: "
                                     f"{'teal' if i % 2 else 'red'}", sample_index=i % 2) for i in range(8)]
            pids = ray.get([worker.pid.remote() for worker in pool.workers])
            pending = pool.submit(rollouts)
            assert all(part.indices for part in pending.parts) and len(pending.parts) == 2
            deadline = time.monotonic() + 60
            while server.in_flight < 2 and time.monotonic() < deadline:  # both workers are mid-batch
                time.sleep(0.01)
            assert server.in_flight == 2
            killed_at = time.monotonic()
            os.kill(pids[1], signal.SIGKILL)
            scored, counts = pool.collect(pending)
            recovered_at = time.monotonic()
        finally:
            pool.shutdown()
    ids = Counter((s.rollout.prompt.id, s.rollout.sample_index) for s in scored)
    assert ids == Counter((r.prompt.id, r.sample_index) for r in rollouts) and max(ids.values()) == 1
    assert [s.rollout for s in scored] == rollouts  # each once, in the submitted order
    assert [s.correct for s in scored] == [i % 2 == 1 for i in range(8)]
    assert pool.faults.total_restarts["reward"] == 1
    assert counts["total"] == len(rollouts)  # the dead worker's partial work counts nowhere
    # The killed worker's chunk was judged again by its replacement: more requests than rollouts.
    assert len(server.requests) > len(rollouts)
    report({"fault": "reward_worker_killed_mid_batch", "samples": len(rollouts), "samples_lost": 0,
            "scored_twice": 0, "recover_s": round(recovered_at - killed_at, 2),
            "judge_requests": len(server.requests)})


@pytest.fixture(scope="module")
def sync_rig(ray_cluster, tiny_model_dir):
    """One learner rank and two HF engines joined by the gloo weight-transfer group."""
    learner = LearnerGroup(LearnerConfig(num_cpus_per_rank=0.5, collective_timeout_s=60), tiny_model_dir,
                           algo=AlgoConfig(kl_coef=0.0))
    engines = create_rollout_actors(tiny_model_dir, RolloutConfig(
        engine="hf", num_engines=2, num_cpus_per_engine=0.25, max_model_len=256,
        sampling=SamplingConfig(max_response_tokens=8)))
    try:
        yield learner, engines
    finally:
        for engine in engines:
            ray.kill(engine)
        learner.shutdown()


@pytest.mark.timeout(300)
def test_weight_sync_names_the_engine_that_stops_answering_or_dies(sync_rig):
    learner, engines = sync_rig
    sync = WeightSync(learner, engines, backend="gloo", bucket_bytes=1 << 20, timeout_s=SYNC_TIMEOUT_S)
    assert sync.sync()["bytes"] > 0  # the group works before the fault

    frozen = _pid(engines[1])
    os.kill(frozen, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(WeightSyncError) as stuck:
            sync.sync()
        stuck_s = time.monotonic() - start
    finally:
        os.kill(frozen, signal.SIGCONT)
    message = str(stuck.value)
    assert "rollout engine(s) [1]" in message and f"within {SYNC_TIMEOUT_S:.0f} s" in message, message
    assert len(message.splitlines()) == 1
    assert SYNC_TIMEOUT_S * 0.9 <= stuck_s <= SYNC_TIMEOUT_S + MARGIN_S

    os.kill(frozen, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WeightSyncError) as dead:
        sync.sync()
    dead_s = time.monotonic() - start
    assert "rollout engine 1 died" in str(dead.value), str(dead.value)
    assert dead_s <= SYNC_TIMEOUT_S + MARGIN_S
    report({"fault": "weight_sync_peer_stopped", "timeout_s": SYNC_TIMEOUT_S, "error_after_s": round(stuck_s, 2),
            "error": message})
    report({"fault": "weight_sync_peer_killed", "timeout_s": SYNC_TIMEOUT_S, "error_after_s": round(dead_s, 2),
            "error": str(dead.value)})
