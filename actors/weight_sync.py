"""Weight sync: learner rank 0 broadcasts to every rollout engine after each update.

A transfer group of its own (not the learner's default group) spans learner rank 0 and
every engine worker, rendezvousing at rank 0's node. It is vLLM's weight-transfer API on
both ends: the "nccl" backend on GPU, our "gloo" backend on CPU, one code path. The
control plane (init / start / update / finish) reaches the engines as Ray actor calls;
the tensors travel in buckets through the group, each collective with a timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.errors import one_line
from actors.waiting import outcomes, unfinished
from personadual.records import Prompt


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
        self.version: int | None = None  # the version the update in progress brings; set by the caller
        self.checksums = True  # whether its buckets are hashed and checked; set by the caller
        self._starting: dict[Any, int] | None = None  # start calls sent, their answers not read yet

    def _all(self, method: str, per_engine: list[tuple] | None = None) -> list[Any]:
        return self._collect(method, self._submit(method, per_engine))

    def _submit(self, method: str, per_engine: list[tuple] | None = None) -> dict[Any, int]:
        return {getattr(engine, method).remote(*(per_engine[i] if per_engine else ())): i
                for i, engine in enumerate(self.engines)}

    def _collect(self, method: str, refs: dict[Any, int]) -> list[Any]:
        pending = unfinished(refs, self.timeout_s)
        if pending:
            # A frozen engine leaves the others stuck in the same collective: they come back
            # with their own timeout error within one more timeout; the frozen one does not.
            stuck = sorted((unfinished(pending, self.timeout_s) or pending).values())
            raise WeightSyncError(f"weight sync: rollout engine(s) {stuck} did not finish {method} "
                                  f"within {self.timeout_s:.0f} s")
        own_errors = []
        results: dict[int, Any] = {}
        for index, value, error in outcomes(refs):
            if isinstance(error, ray.exceptions.RayActorError):  # a death explains the others' errors: it comes first
                raise WeightSyncError(f"weight sync: rollout engine {index} died during {method}") from None
            if isinstance(error, ray.exceptions.RayTaskError):
                own_errors.append((index, error.cause if error.cause is not None else error))
            results[index] = value
        if own_errors:
            index, error = own_errors[0]
            raise WeightSyncError(f"weight sync: rollout engine {index} failed {method} ({one_line(error)})") from error
        return [results[i] for i in range(len(self.engines))]

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._started()
        offsets = [init_info["rank_offset"] + sum(self.workers[:i]) for i in range(len(self.engines))]
        self._all("init_weight_transfer_engine", [(dict(init_info, rank_offset=o),) for o in offsets])

    def start_weight_update(self) -> None:
        """Sent, not awaited: the update call follows it to each engine (an actor runs one
        caller's calls in order), and its answer is read with the update's, one round trip
        (~3 ms here) saved per sync."""
        self._started()
        self._starting = self._submit("start_weight_update")

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        refs = self._submit("update_weights", [(update_info,)] * len(self.engines))
        self._started()  # an engine that failed to start is named for that, not for its update
        self._collect("update_weights", refs)

    def _started(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            self._collect("start_weight_update", starting)

    def finish_weight_update(self, weight_version: str | int | None = None,
                             checksums: list[int | None] | None = None) -> None:
        """Every engine takes the update live at the version this sync brings (so no second
        round trip confirms it), after checking the buckets against the sent ``checksums``."""
        self._started()
        version = weight_version if weight_version is not None else self.version
        versions = self._all("finish_weight_update", [(version, checksums)] * len(self.engines))
        if version is not None and any(v != int(version) for v in versions):
            raise WeightSyncError(f"weight sync: engines report weight versions {versions}, expected {version}")


class SyncVerificationError(WeightSyncError):
    """An engine that does not serve the learner's weights after a sync."""


def _learner_response_logprobs(learner: Any, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    return learner.response_logprobs(pairs)


def verify_tolerance(cfg: Any) -> float:
    """rollout.verify_tolerance, or its default for the run's precisions (rollout/config.py);
    ``cfg`` is the run's config."""
    if cfg.rollout.verify_tolerance is not None:
        return float(cfg.rollout.verify_tolerance)
    learner_fp32 = cfg.learner.precision == "fp32" or (cfg.learner.precision == "auto"
                                                        and cfg.learner.num_gpus_per_rank == 0)
    return 0.01 if cfg.rollout.dtype == "float32" and learner_fp32 else 0.25


@dataclass
class SyncVerification:
    """Every ``every`` syncs (0: never) each engine answers the fixed ``prompts`` greedily and
    its log-probs of its own answers are compared with the learner's; past ``tolerance`` the
    sync fails, naming the engine and the tensors it did not load."""

    every: int = 0
    tolerance: float = 1e-3
    prompts: list[Prompt] = field(default_factory=list)


class WeightSync:
    def __init__(self, learner: Any, engines: list[ActorHandle], *, backend: str,
                 bucket_bytes: int, timeout_s: float, verification: SyncVerification | None = None) -> None:
        self.learner = learner
        self.engines = engines  # the driver's list: an engine replaced there is replaced here
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.verification = verification or SyncVerification()
        self.syncs = 0
        self.last: dict[str, float] = {}
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
        """Send the learner's current weights; the engines take them live at its version (the
        version travels with the update's finish). Every ``verification.every`` syncs the sync
        is verified: each bucket's hash, taken at both ends, is compared at the engines, and
        the probe checks what they serve. The hashes cost ~11 ms per 100 MB at each end, on
        cores the transfer itself keeps busy, so the other syncs go without."""
        version = self.learner.weight_version
        every = self.verification.every
        verified = bool(every) and (self.syncs + 1) % every == 0
        start = time.perf_counter()
        try:
            stats = self.learner.send_weights(checksums=verified)
        except ray.exceptions.RayTaskError as error:
            # The sender's own error names the engine (and bucket) that failed it: one line.
            cause = error.cause
            if isinstance(cause, WeightSyncError):
                raise cause from None
            if cause is not None and type(cause).__name__ == "WeightSendError":
                raise WeightSyncError(str(cause)) from None
            raise
        self.syncs += 1
        result = {"seconds": time.perf_counter() - start, "bytes": float(stats.get("bytes", 0.0)),
                  "version": float(version),
                  **{key: float(stats[key]) for key in ("start_s", "transfer_s", "finish_s", "direct_bytes",
                                                                     "shared_memory")
                     if key in stats}}
        if verified and self.verification.prompts:
            probe_start = time.perf_counter()
            result["probe_max_abs_logprob_diff"] = self.verify()
            result["probe_seconds"] = time.perf_counter() - probe_start
        self.last = result
        return result

    def verify(self) -> float:
        """Each engine's greedy answers to the probe prompts, scored by the engine and by the
        learner; the largest |difference| of any token's log-prob over every engine. An engine
        past the tolerance fails the sync, named with the tensors it did not load."""
        prompts = self.verification.prompts
        refs = {engine.probe.remote(prompts): index for index, engine in enumerate(self.engines)}
        pending = unfinished(refs, self.timeout_s)
        if pending:
            raise WeightSyncError(f"weight sync check: rollout engine(s) {sorted(pending.values())} did "
                                  f"not answer the probe within {self.timeout_s:.0f} s")
        answers = []
        for index, value, error in outcomes(refs):
            if isinstance(error, ray.exceptions.RayActorError):
                raise WeightSyncError(f"weight sync check: rollout engine {index} died during the probe") from None
            if error is not None:
                raise error
            answers.append(value)
        pairs = [(list(r.prompt_token_ids), list(r.response_token_ids)) for rollouts in answers for r in rollouts]
        learner = self.learner.call(_learner_response_logprobs, pairs)[0]
        worst, position = [], 0
        for rollouts in answers:
            diffs = [0.0]
            for rollout in rollouts:
                theirs = learner[position]
                position += 1
                diffs.extend(abs(a - b) for a, b in zip(rollout.response_logprobs, theirs))
            worst.append(max(diffs))
        for index, diff in enumerate(worst):
            if diff > self.verification.tolerance:
                raise SyncVerificationError(self._diagnose(index, diff))
        return max(worst, default=0.0)

    def _diagnose(self, index: int, diff: float) -> str:
        sent = [name for name, _, _ in self.learner.weight_metadata()]
        loaded = set(ray.get(self.engines[index].loaded_tensors.remote(), timeout=self.timeout_s))
        missing = [name for name in sent if name not in loaded]
        where = (f"tensor(s) it did not load in the last sync: {', '.join(missing[:5])}"
                 f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}" if missing else
                 "it loaded every tensor sent, each bucket intact, so its loader kept old values somewhere")
        return (f"weight sync check: rollout engine {index} does not serve the learner's weights at version "
                f"{self.learner.weight_version} (probe max |log-prob difference| {diff:.3g} > "
                f"rollout.verify_tolerance={self.verification.tolerance:g}); {where}")


def weight_sync_for_run(cfg: Any, learner: Any, engines: list[ActorHandle], probe: list[Prompt]) -> WeightSync:
    """The run's weight sync over ``engines``, on the one transfer backend they all report;
    ``probe`` is the fixed batch each verification asks every engine (rollout.verify_every)."""
    backends = set(ray.get([engine.weight_transfer_backend.remote() for engine in engines]))
    if len(backends) != 1 or None in backends:
        raise RuntimeError(f"rollout engines report weight-transfer backends {sorted(map(str, backends))}; "
                           f"set rollout.weight_transfer_backend")
    return WeightSync(learner, engines, backend=backends.pop(), bucket_bytes=cfg.learner.bucket_bytes,
                      timeout_s=cfg.learner.collective_timeout_s,
                      verification=SyncVerification(cfg.rollout.verify_every, verify_tolerance(cfg), probe))
