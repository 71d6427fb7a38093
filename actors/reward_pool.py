"""Reward workers as Ray actors: a batch of Rollouts is split across workers and scored there.

Each ``RewardWorker`` holds a ``BatchScorer``. ``RewardPool.submit`` plans which worker
scores which response, sends each worker only (prompt, response text) pairs (token ids and
logprobs stay in the driver) and returns at once with the ObjectRefs, so the driver can
score one engine's rollouts while others still generate; ``collect`` gathers the results
back into the submitted order and sums the workers' counts.

Judge calls dominate scoring time, so they are spread evenly over workers; copies of one
response go to the same worker (it judges them once), and each response prefers the worker
its cache key hashes to, so a response seen in an earlier step tends to meet its cached
verdict. Judge concurrency is per worker: in total ``num_workers x judge.max_concurrency``.

A worker that dies is replaced (same bundle) and its chunk scored again by the replacement;
results are placed by batch index, so each rollout is scored exactly once in what ``collect``
returns. Replacements are counted in the ``FaultLog`` (actors/supervision.py), which stops the
run after too many failures in a row.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup

from actors.placement import in_bundle
from actors.supervision import FaultLog
from personadual.fault_hooks import fault_window
from personadual.records import Prompt, Rollout, Scored
from rewards.config import RewardConfig, RewardConfigError
from rewards.judge import ApiKey, JudgeError, cache_key
from rewards.scorer import BatchScorer, Outcome, merge_counts

WORKER_START_TIMEOUT_S = 120.0


@ray.remote
class RewardWorker:
    """One process scoring chunks of (prompt, response text) pairs, one chunk at a time.

    A plain (not async) actor on purpose: math-verify's timeouts need the main thread, and
    the judge's concurrency comes from asyncio inside each chunk.
    """

    def __init__(self, config: RewardConfig, api_key: ApiKey | None = None) -> None:
        self.scorer = BatchScorer(config, api_key=api_key)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def score(self, items: list[tuple[Prompt, str]]) -> tuple[list[Outcome], dict[str, int]]:
        with fault_window("score", "worker"):
            return self.scorer.score_texts(items)


def plan_chunks(items: Sequence[tuple[Prompt, str]], num_workers: int, judge_model: str) -> list[list[int]]:
    """Indices of ``items`` for each worker: judge items balanced (copies of one response kept
    together, each preferring its cache key's worker while that one holds no more than an even
    share), the other items dealt round-robin."""
    chunks: list[list[int]] = [[] for _ in range(num_workers)]
    groups: dict[str, list[int]] = {}
    local: list[int] = []
    for index, (prompt, text) in enumerate(items):
        if prompt.scorer == "judge":
            groups.setdefault(cache_key(judge_model, prompt, text), []).append(index)
        else:
            local.append(index)
    share = math.ceil(sum(len(g) for g in groups.values()) / num_workers)
    load = [0] * num_workers
    for key, group in groups.items():
        worker = int(key[:8], 16) % num_workers
        if load[worker] + len(group) > share:
            worker = min(range(num_workers), key=load.__getitem__)
        chunks[worker].extend(group)
        load[worker] += len(group)
    # Local scoring is cheap: deal it out so the least judge-loaded workers get the first items.
    order = sorted(range(num_workers), key=load.__getitem__)
    for position, index in enumerate(local):
        chunks[order[position % num_workers]].append(index)
    return [sorted(chunk) for chunk in chunks]


@dataclass
class ScorePart:
    """One worker's share of a batch: the batch indices it scores and the pending result."""

    worker: int
    handle: ActorHandle
    indices: list[int]
    ref: ray.ObjectRef


@dataclass
class PendingScores:
    """A submitted batch: each worker's part."""

    rollouts: list[Rollout]
    parts: list[ScorePart] = field(default_factory=list)

    @property
    def refs(self) -> list[ray.ObjectRef]:
        return [part.ref for part in self.parts]

    def items(self, indices: Sequence[int]) -> list[tuple[Prompt, str]]:
        return [(self.rollouts[i].prompt, self.rollouts[i].text) for i in indices]


class RewardPool:
    def __init__(self, config: RewardConfig, *, num_workers: int = 1, num_cpus: float = 0.1,
                 api_key: ApiKey | None = None, placement_group: PlacementGroup | None = None,
                 faults: FaultLog | None = None, wait: bool = True) -> None:
        """``wait=False`` returns once the workers are created; call ``wait_ready`` before
        scoring (the driver starts them while another actor is still setting up)."""
        if num_workers < 1:
            raise ValueError(f"reward.num_workers: must be >= 1, got {num_workers}")
        self.config = config
        if api_key is None and config.judge.api_key_env and os.environ.get(config.judge.api_key_env):
            # Workers on other machines may lack the variable: hand them the key in an object
            # whose repr hides it, never in a runtime env or config (both get logged).
            api_key = ApiKey(os.environ[config.judge.api_key_env])
        self.api_key = api_key
        self.num_cpus = num_cpus
        self.placement_group = placement_group
        self.faults = faults if faults is not None else FaultLog(max_consecutive=3)
        self.workers = [self._start_worker(index) for index in range(num_workers)]
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Returns once every worker is up; a worker's start-up error (a missing judge key) is raised here."""
        ray.get([w.ready.remote() for w in self.workers], timeout=WORKER_START_TIMEOUT_S)

    def _start_worker(self, index: int) -> ActorHandle:
        # No Ray restarts: the pool replaces a dead worker itself, so the replacement is counted
        # and a worker that keeps dying stops the run. With a placement group (one bundle per
        # worker, actors/placement.py) worker i sits in bundle i.
        return RewardWorker.options(num_cpus=self.num_cpus, max_restarts=0,
                                    **in_bundle(self.placement_group, index)).remote(self.config, self.api_key)

    def _replace(self, index: int, error: BaseException) -> None:
        started = time.perf_counter()
        self.faults.failure(f"reward worker {index}", error)
        ray.kill(self.workers[index], no_restart=True)
        self.workers[index] = self._start_worker(index)
        ray.get(self.workers[index].ready.remote(), timeout=WORKER_START_TIMEOUT_S)
        self.faults.restarted("reward", time.perf_counter() - started)

    def submit(self, rollouts: Sequence[Rollout]) -> PendingScores:
        """Start scoring; returns at once. Pass the result to ``collect``."""
        pending = PendingScores(list(rollouts))
        items = [(r.prompt, r.text) for r in pending.rollouts]
        chunks = plan_chunks(items, len(self.workers), self.config.judge.model)
        for index, (worker, chunk) in enumerate(zip(self.workers, chunks)):
            if chunk:
                pending.parts.append(ScorePart(index, worker, chunk, worker.score.remote([items[i] for i in chunk])))
        return pending

    def _result(self, batch: PendingScores, part: ScorePart,
                deadline: float | None) -> tuple[list[Outcome], dict[str, int]]:
        """A part's outcomes; when its worker died, from a replacement scoring it again."""
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return ray.get(part.ref, timeout=timeout)
            except ray.exceptions.RayActorError as error:
                if self.workers[part.worker] is part.handle:  # not yet replaced (another part may have)
                    self._replace(part.worker, error)
                worker = self.workers[part.worker]
                part = ScorePart(part.worker, worker, part.indices, worker.score.remote(batch.items(part.indices)))
            except ray.exceptions.RayTaskError as error:
                # The scorer's own errors (policy "fail", a missing key) reach the driver as
                # themselves: one line naming the prompt or the key, not a remote traceback.
                if isinstance(error.cause, (JudgeError, RewardConfigError)):
                    raise error.cause from None
                raise

    def collect(self, pending: PendingScores | Sequence[PendingScores],
                timeout_s: float | None = None) -> tuple[list[Scored], dict[str, int]]:
        """Scored records of every submitted batch, batches in the order given and each in its
        submitted order, and the counts summed.

        Under policy "fail" every worker's part of every batch is still gathered before
        anything is raised: the JudgeError raised then names the first failed prompt and
        carries the counts of all the batches together (failures by kind, requests, retries,
        cache hits), not those of the one worker that happened to fail first.
        """
        batches = [pending] if isinstance(pending, PendingScores) else list(pending)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        scored: list[Scored] = []
        counts: list[dict[str, int]] = []
        judge_errors: list[JudgeError] = []
        for batch in batches:
            outcomes: list[Outcome | None] = [None] * len(batch.rollouts)
            for part in batch.parts:
                try:
                    results, part_counts = self._result(batch, part, deadline)
                except JudgeError as error:
                    judge_errors.append(error)
                    counts.append(error.counts)
                    continue
                counts.append(part_counts)
                for index, outcome in zip(part.indices, results):
                    outcomes[index] = outcome
            if judge_errors:
                continue  # this step fails: the other batches are gathered only for their counts
            for rollout, outcome in zip(batch.rollouts, outcomes):
                assert outcome is not None, "a worker returned fewer results than it was sent"
                scored.append(outcome.attach(rollout))
        totals = merge_counts(counts)
        if judge_errors:
            first = judge_errors[0]
            raise JudgeError(first.prompt_id, first.kind, first.attempts, totals["judge/failures"], totals)
        return scored, totals

    def score(self, rollouts: Sequence[Rollout]) -> tuple[list[Scored], dict[str, int]]:
        return self.collect(self.submit(rollouts))

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
