"""Weight syncs that can be trusted, on real actors (a DeepSpeed learner rank and two HF engines
joined by the gloo weight-transfer group, a local Ray cluster):

- a clean sync: every engine serves the learner's tensors exactly, and the probe agrees;
- a bucket corrupted in transit (test hook) is caught by its checksum at the engine;
- a tensor an engine silently did not load (test hook) passes the checksums and is caught by
  the probe, which names the engine and the tensor;
- an engine frozen mid-broadcast fails the sync within the timeout, naming engine and bucket;
- an engine SIGKILLed mid-sync is replaced and brought to the learner's weights in place.

Faults are injected through personadual/fault_hooks.py; each prints one JSON line
(``pytest -s tests/test_weight_verification.py | grep '"fault": '``).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from actors.learner_group import LearnerGroup
from actors.rollout_actor import create_rollout_actors, start_rollout_actor
from actors.supervision import EngineSupervisor, FaultLog
from actors.weight_sync import SyncVerification, SyncVerificationError, WeightSync, WeightSyncError
from learner.config import LearnerConfig
from personadual.algo_config import AlgoConfig
from personadual.fault_hooks import FAULT_DIR_ENV
from rollout.config import RolloutConfig, SamplingConfig
from tests.judge_server import make_prompt

pytestmark = [pytest.mark.slow]

TIMEOUT_S = 10.0
MARGIN_S = 40.0  # a loaded 2-core machine
TOLERANCE = 1e-3
BUCKET_BYTES = 64 << 10  # the tiny model travels in many buckets


def report(record: dict) -> None:
    print(json.dumps({"fault": record.pop("fault"), **record}, sort_keys=True), flush=True)


class Rig:
    def __init__(self, model_dir: Path, fault_dir: Path) -> None:
        self.fault_dir = fault_dir
        self.config = RolloutConfig(engine="hf", num_engines=2, num_cpus_per_engine=0.25, max_model_len=256,
                                    sampling=SamplingConfig(max_response_tokens=8))
        self.model_dir = model_dir
        self.learner = LearnerGroup(LearnerConfig(num_cpus_per_rank=0.5, collective_timeout_s=60), model_dir,
                                    algo=AlgoConfig(kl_coef=0.0))
        self.engines = create_rollout_actors(model_dir, self.config)
        prompts = [make_prompt(i, question=f"What color is the flower Zor{i}?") for i in range(3)]
        self.sync = WeightSync(self.learner, self.engines, backend="gloo", bucket_bytes=BUCKET_BYTES,
                               timeout_s=TIMEOUT_S, verification=SyncVerification(1, TOLERANCE, prompts))
        self.faults = FaultLog(max_consecutive=3)
        self.supervisor = EngineSupervisor(self.engines, self.sync, self.start_engine, self.faults)

    def start_engine(self, index: int):
        return start_rollout_actor(self.model_dir, self.config, index)

    def perturb(self, seed: int) -> None:
        """Move the learner's weights (as an update would) so a stale engine shows."""
        def move(learner, seed):
            torch.manual_seed(seed)
            with torch.no_grad():
                for parameter in learner.engine.module.parameters():
                    parameter.add_(torch.randn_like(parameter) * 0.05)
        self.learner.call(move, seed)

    def learner_weights(self) -> dict[str, torch.Tensor]:
        return self.learner.call(lambda learner: {n: t.clone() for n, t in learner.full_weights(device="cpu")})[0]

    def engine_weights(self, index: int) -> dict[str, torch.Tensor]:
        return ray.get(self.engines[index].call.remote(
            lambda engine: {n: t.detach().clone() for n, t in engine.model.state_dict().items()}), timeout=60)

    def assert_engines_serve_the_learners_weights(self) -> None:
        expected = self.learner_weights()
        for index in range(len(self.engines)):
            served = self.engine_weights(index)
            for name, tensor in expected.items():
                assert torch.equal(served[name], tensor), f"engine {index}: {name} differs"

    def pid_at(self, kind: str, label: str, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            markers = sorted(self.fault_dir.glob(f"{kind}.{label}.*"))
            if markers:
                return int(markers[0].name.rsplit(".", 1)[1])
            time.sleep(0.01)
        raise AssertionError(f"no {kind} {label} work within {timeout_s} s")

    def close(self) -> None:
        for engine in self.engines:
            ray.kill(engine)
        self.learner.shutdown()


@pytest.fixture(scope="module")
def rig(tiny_model_dir, tmp_path_factory):
    from actors import cluster

    fault_dir = tmp_path_factory.mktemp("faults")
    cluster.connect(num_cpus=2, extra_env={FAULT_DIR_ENV: str(fault_dir)})
    rig = Rig(tiny_model_dir, fault_dir)
    try:
        yield rig
    finally:
        rig.close()
        cluster.shutdown()


@pytest.mark.timeout(600)
def test_a_clean_sync_is_verified_and_a_corrupted_bucket_is_caught_by_its_checksum(rig):
    rig.perturb(1)
    stats = rig.sync.sync()
    assert stats["probe_max_abs_logprob_diff"] <= TOLERANCE, stats
    rig.assert_engines_serve_the_learners_weights()

    rig.perturb(2)
    (rig.fault_dir / "corrupt_bucket").write_text("1")
    with pytest.raises(WeightSyncError) as caught:
        rig.sync.sync()
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "failed finish_weight_update" in message and "corrupted in transit: bucket 1 of " in message, message
    assert "arrived with checksum" in message, message
    report({"fault": "weight_bucket_corrupted", "caught_by": "checksum", "error": message})

    stats = rig.sync.sync()  # the next sync is clean again
    assert stats["probe_max_abs_logprob_diff"] <= TOLERANCE
    rig.assert_engines_serve_the_learners_weights()
    report({"fault": "none", "probe_max_abs_logprob_diff": stats["probe_max_abs_logprob_diff"],
            "engine": "hf", "precision": "fp32"})


@pytest.mark.timeout(600)
def test_a_tensor_an_engine_did_not_load_passes_the_checksums_and_is_caught_by_the_probe(rig):
    rig.perturb(3)
    (rig.fault_dir / "skip_tensor").write_text("lm_head.weight")
    with pytest.raises(SyncVerificationError) as caught:
        rig.sync.sync()
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "rollout.verify_tolerance=0.001" in message and "did not load in the last sync: lm_head.weight" in message
    assert "rollout engine 0 " in message or "rollout engine 1 " in message, message
    report({"fault": "weight_tensor_not_loaded", "caught_by": "probe", "error": message})
    assert rig.sync.sync()["probe_max_abs_logprob_diff"] <= TOLERANCE  # a full resync repairs it


@pytest.mark.timeout(600)
def test_an_engine_frozen_mid_broadcast_is_named_with_the_bucket_and_one_killed_mid_sync_is_replaced(rig):
    rig.perturb(4)
    hold = rig.fault_dir / "hold.bucket.3"
    hold.touch()
    outcome: dict = {}

    def run_sync() -> None:
        start = time.monotonic()
        try:
            rig.sync.sync()
        except WeightSyncError as error:
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - start

    worker = threading.Thread(target=run_sync)
    worker.start()
    frozen = rig.pid_at("bucket", "3")
    os.kill(frozen, signal.SIGSTOP)
    frozen_index = None
    hold.unlink()
    worker.join(TIMEOUT_S + MARGIN_S + 60)
    try:
        assert not worker.is_alive()
        message = str(outcome.get("error"))
        assert len(message.splitlines()) == 1
        assert "did not finish update_weights" in message and "bucket 3 of " in message, message
        assert outcome["seconds"] <= TIMEOUT_S + MARGIN_S
        named = [i for i in range(2) if f"[{i}]" in message]
        assert len(named) == 1, message
        frozen_index = named[0]
        report({"fault": "weight_sync_peer_frozen_mid_broadcast", "timeout_s": TIMEOUT_S,
                "error_after_s": round(outcome["seconds"], 2), "error": message})
    finally:
        os.kill(frozen, signal.SIGKILL)  # a frozen engine is beyond saving: the next sync replaces it
    started = time.monotonic()
    rig.supervisor.sync()  # the dead engine is found only now, when the sync fails on it
    replaced_s = time.monotonic() - started
    assert rig.faults.total_restarts["rollout"] == 1 and rig.faults.total_events["sync_deaths"] == 1
    rig.assert_engines_serve_the_learners_weights()

    # SIGKILL an engine while it receives bucket 2: the supervisor's sync replaces it in place.
    rig.perturb(5)
    hold = rig.fault_dir / "hold.bucket.2"
    hold.touch()
    killed: dict = {}

    def kill_mid_sync() -> None:
        pid = rig.pid_at("bucket", "2")
        os.kill(pid, signal.SIGKILL)
        killed["at"] = time.monotonic()
        hold.unlink()

    killer = threading.Thread(target=kill_mid_sync)
    killer.start()
    stats = rig.supervisor.sync()
    done = time.monotonic()
    killer.join()
    assert stats["probe_max_abs_logprob_diff"] <= TOLERANCE
    assert stats["version"] == rig.learner.weight_version
    assert rig.faults.total_restarts["rollout"] == 2 and rig.faults.total_events["sync_deaths"] == 2
    rig.assert_engines_serve_the_learners_weights()
    report({"fault": "rollout_engine_killed_mid_sync", "engine": "hf", "frozen_engine": frozen_index,
            "replace_and_resync_s": round(done - killed["at"], 2), "after_freeze_replace_s": round(replaced_s, 2),
            "weights_equal_learner": True})
