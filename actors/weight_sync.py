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

from actors.supervision import one_line


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
        own_errors = []
        for ref, index in refs.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:  # a death explains the others' errors: it comes first
                raise WeightSyncError(f"weight sync: rollout engine {index} died during {method}") from None
            except ray.exceptions.RayTaskError as error:
                own_errors.append((index, error.cause if error.cause is not None else error))
        if own_errors:
            index, error = own_errors[0]
            raise WeightSyncError(f"weight sync: rollout engine {index} failed {method} ({one_line(error)})") from error

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
        self.engines = engines  # the driver's list: an engine replaced there is replaced here
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.init_seconds = self.rebuild()

    def rebuild(self) -> float:
        """(Re)open the transfer group over every engine now in ``engines``, on a fresh port.
        After an engine was replaced the old group has a dead member; the survivors and the
        learner drop it for the new one. Returns the seconds it took."""
        workers = ray.get([engine.num_workers.remote() for engine in self.engines], timeout=self.timeout_s)
        self.world_size = 1 + sum(workers)
        start = time.perf_counter()
        self.learner.init_weight_sender(backend=self.backend, engines=list(self.engines), world_size=self.world_size,
                                        bucket_bytes=self.bucket_bytes, timeout_s=self.timeout_s)
        return time.perf_counter() - start

    def sync(self) -> dict[str, float]:
        """Send the learner's current weights; every engine then reports that version."""
        version = self.learner.weight_version
        start = time.perf_counter()
        try:
            stats = self.learner.send_weights()
        except ray.exceptions.RayTaskError as error:
            # The sender's own error names the engine that failed it: surface that one line.
            if isinstance(error.cause, WeightSyncError):
                raise error.cause from None
            raise
        refs = {engine.update_weight_version.remote(version): index for index, engine in enumerate(self.engines)}
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            stuck = sorted(refs[ref] for ref in pending)
            raise WeightSyncError(f"rollout engine(s) {stuck} did not confirm weight version {version} "
                                  f"within {self.timeout_s:.0f} s")
        versions = []
        for ref, index in refs.items():
            try:
                versions.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                raise WeightSyncError(f"rollout engine {index} died before confirming weight version "
                                      f"{version}") from None
        if any(v != version for v in versions):
            raise WeightSyncError(f"engines report weight versions {versions}, expected {version}")
        return {"seconds": time.perf_counter() - start, "bytes": float(stats.get("bytes", 0.0)),
                "version": float(version)}
