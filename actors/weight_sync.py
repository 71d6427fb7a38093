"""Weight sync: learner rank 0 broadcasts to every rollout engine after each update.

A transfer group of its own (not the learner's default group) spans learner rank 0 and
every engine worker, rendezvousing at rank 0's node. It is vLLM's weight-transfer API on
both ends: the "nccl" backend on GPU, our "gloo" backend on CPU, one code path. The
control plane (init / start / update / finish) reaches the engines as Ray actor calls;
the tensors travel in buckets through the group, each collective with a timeout.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.actor import ActorHandle


class WeightSyncError(RuntimeError):
    """A sync that failed or timed out; the message names the engine when one is to blame."""


class EngineSyncClient:
    """vLLM's `VLLMWeightSyncClient` over our rollout actors: each call goes to every engine
    at once (their workers meet the sender inside the group's collectives), each engine on
    ranks of its own (vLLM's `RayVLLMWeightSyncClient` gives every actor the same
    rank_offset, so two engines would collide). An engine that does not answer within the
    timeout is named in the error."""

    def __init__(self, engines: list[ActorHandle], timeout_s: float) -> None:
        self.engines = engines
        self.timeout_s = timeout_s
        self.workers = ray.get([engine.num_workers.remote() for engine in engines], timeout=timeout_s)

    def _all(self, method: str, per_engine: list[tuple] | None = None) -> None:
        refs = {getattr(engine, method).remote(*(per_engine[i] if per_engine else ())): i
                for i, engine in enumerate(self.engines)}
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            stuck = sorted(refs[ref] for ref in pending)
            raise WeightSyncError(f"weight sync: rollout engine(s) {stuck} did not finish {method} "
                                  f"within {self.timeout_s:.0f} s")
        ray.get(list(refs))  # re-raise an engine's own error

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        offsets = [init_info["rank_offset"] + sum(self.workers[:i]) for i in range(len(self.engines))]
        self._all("init_weight_transfer_engine", [(dict(init_info, rank_offset=o),) for o in offsets])

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        self._all("update_weights", [(update_info,)] * len(self.engines))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", [(weight_version,)] * len(self.engines))


class WeightSync:
    def __init__(self, learner: Any, engines: list[ActorHandle], *, backend: str,
                 bucket_bytes: int, timeout_s: float) -> None:
        self.learner = learner
        self.engines = engines
        self.timeout_s = timeout_s
        workers = ray.get([engine.num_workers.remote() for engine in engines])
        self.world_size = 1 + sum(workers)
        start = time.perf_counter()
        learner.init_weight_sender(backend=backend, engines=engines, world_size=self.world_size,
                                   bucket_bytes=bucket_bytes, timeout_s=timeout_s)
        self.init_seconds = time.perf_counter() - start

    def sync(self) -> dict[str, float]:
        """Send the learner's current weights; every engine then reports that version."""
        version = self.learner.weight_version
        start = time.perf_counter()
        stats = self.learner.send_weights()
        refs = {engine.update_weight_version.remote(version): index for index, engine in enumerate(self.engines)}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            stuck = sorted(refs[ref] for ref in pending)
            raise WeightSyncError(f"rollout engine(s) {stuck} did not confirm weight version {version} "
                                  f"within {self.timeout_s:.0f} s")
        versions = ray.get(ready)
        if any(v != version for v in versions):
            raise WeightSyncError(f"engines report weight versions {versions}, expected {version}")
        return {"seconds": time.perf_counter() - start, "bytes": float(stats.get("bytes", 0.0)),
                "version": float(version)}
