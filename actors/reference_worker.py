"""The reference worker: the frozen KL reference on the engines' side, scoring each generation
round as soon as its rollouts exist (``cluster.reference: worker``).

In the pipelined schedule the engines generate step t+1 while the learner trains on step t,
and the learner's side is the longer one: its reference pass sits on the critical path while
the engines' cores idle after generating. The worker lives in engine 0's placement bundle,
computes on the engines' threads (the engines are done generating when it starts), and is
handed every engine's generate call as Ray arguments, so it starts the moment the last engine
finishes, without a round trip through the driver. The learner then receives the reference
log-probs with the batch (``Rollout.reference_logprobs``) and skips its own pass
(learner/policy_step.py). The numbers are the learner's: same weights (sent once by the
learner when the RL stage starts: the SFT result, or a checkpoint's reference on resume), same
batch cutting and forward (learner/reference_scorer.py).

A round whose engine was replaced is scored again from the final rollouts; a worker that died
stops the run with an error naming it (``ReferenceWorkerDied``), like a learner rank.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Sequence

import ray
from omegaconf import DictConfig

from actors.config import section
from actors.placement import in_bundle
from actors.rollout_actor import ENGINE_START_TIMEOUT_S
from actors.supervision import dead_actors, one_line
from actors.threads import apply_threads, read_threads, runtime_env
from actors.waiting import CALL_ERRORS, gather_first_failure, unfinished
from personadual.records import Rollout, Scored


class ReferenceWorkerDied(RuntimeError):
    """The reference worker's process is gone, or it did not answer in time; the message names
    it and the step."""


@ray.remote
class ReferenceWorker:
    def __init__(self, model_path: str, plan: Any, dtype: str, threads: int | None) -> None:
        apply_threads(threads)  # before torch builds the model (actors/threads.py)
        os.dup2(2, 1)  # diagnostics to stderr: the driver's stdout may carry a benchmark's JSON
        import torch

        from learner.reference_scorer import ReferenceScorer

        self.scorer = ReferenceScorer(model_path, plan, dtype=getattr(torch, dtype))

    def pid(self) -> int:
        return os.getpid()

    def threads(self) -> dict[str, Any]:
        return read_threads()

    def load(self, state: dict[str, Any]) -> None:
        self.scorer.load(state)

    def score(self, *rounds: Sequence[Rollout]) -> tuple[list[list[float]], float]:
        """Reference log-probs of every rollout of ``rounds`` (each engine's output, in engine
        order, as one batch), and the seconds spent."""
        if not self.scorer.loaded:
            raise RuntimeError("reference worker: asked to score before the reference weights arrived")
        start = time.perf_counter()
        found = self.scorer.response_logprobs([(r.prompt_token_ids, r.response_token_ids)
                                               for rollouts in rounds for r in rollouts])
        return found, time.perf_counter() - start


class ReferenceService:
    """The driver's side of the worker: start it, give it the reference, hand it rounds, and
    attach what it computed to the scored rollouts."""

    def __init__(self, model_path: str, plan: Any, *, dtype: str, threads: int | None, slot: tuple[Any, int],
                 timeout_s: float | None) -> None:
        group, bundle = slot
        # A round's reference pass is shorter than generating it, so the engines' limit
        # (rollout.generate_timeout_s) bounds it too: a hung worker stops the run, named.
        self.timeout_s = timeout_s
        options = {"runtime_env": runtime_env(threads)} if threads is not None else {}
        # No CPUs of its own: it computes on the engines' cores while they are idle.
        self.actor = ReferenceWorker.options(num_cpus=0, **in_bundle(group, bundle), **options).remote(
            str(model_path), plan, dtype, threads)
        self.seconds = 0.0  # the worker's compute time for the last round collected
        self.wait_s = 0.0  # how long the driver waited for it

    def threads(self) -> dict[str, Any]:
        # The first call waits for the worker's constructor (it loads the model), so it gets the
        # engines' start-up budget, not the per-round limit.
        return self._get(self.actor.threads.remote(), "start-up", ENGINE_START_TIMEOUT_S)

    def load_from(self, learner: Any) -> None:
        """The learner's frozen reference, rank 0's tensors straight into the worker."""
        refs = learner.call_async(_reference_weights)
        loaded = self.actor.load.remote(refs[0])
        gather_first_failure(refs[1:])
        self._get(loaded, "loading the reference weights")

    def submit(self, pending: Any) -> Any:
        """Score the round ``pending`` (actors/generation.py) once every engine is done."""
        calls = sorted(pending.refs.items(), key=lambda item: item[1])
        return self.actor.score.remote(*[ref for ref, _ in calls])

    def attach(self, submitted: Any, scored: list[Scored], what: str) -> list[Scored]:
        """``scored`` with each rollout's reference log-probs. A round that lost an engine (its
        call failed and was run again on a replacement) is scored from the final rollouts."""
        start = time.perf_counter()
        found: list[list[float]] | None = None
        try:
            found, self.seconds = self._get_in_time(submitted, what)
        except CALL_ERRORS as error:
            self._stop_if_dead(error, what)
        if found is None or len(found) != len(scored):
            found, self.seconds = self._score_now([s.rollout for s in scored], what)
        self.wait_s = time.perf_counter() - start
        return [replace(item, rollout=replace(item.rollout, reference_logprobs=values))
                if len(values) == len(item.rollout.response_token_ids) else item
                for item, values in zip(scored, found)]

    def fill(self, scored: list[Scored], what: str) -> list[Scored]:
        """``scored`` with the rollouts that lack reference log-probs scored now (dynamic
        sampling's top-up rounds)."""
        missing = [i for i, item in enumerate(scored) if not item.rollout.reference_logprobs]
        if not missing:
            return scored
        found, seconds = self._score_now([scored[i].rollout for i in missing], what)
        self.seconds += seconds
        filled = list(scored)
        for i, values in zip(missing, found):
            filled[i] = replace(scored[i], rollout=replace(scored[i].rollout, reference_logprobs=values))
        return filled

    def metrics(self) -> dict[str, float]:
        """The last round's: the worker's compute seconds (beside the learner's step when
        pipelined) and the driver's wait for them (on the step's critical path)."""
        return {"worker_s": self.seconds, "wait_s": self.wait_s}

    def _score_now(self, rollouts: list[Rollout], what: str) -> tuple[list[list[float]], float]:
        """The worker's log-probs of ``rollouts``, asked for and waited on now."""
        return self._get(self.actor.score.remote(rollouts), what)

    def _get(self, ref: Any, what: str, timeout_s: float | None = None) -> Any:
        try:
            return self._get_in_time(ref, what, timeout_s)
        except CALL_ERRORS as error:
            self._stop_if_dead(error, what)
            raise

    def _get_in_time(self, ref: Any, what: str, timeout_s: float | None = None) -> Any:
        limit = self.timeout_s if timeout_s is None else timeout_s
        if unfinished({ref: "reference worker"}, limit):
            named = f"rollout.generate_timeout_s={limit:g} s" if timeout_s is None else f"{limit:g} s"
            raise ReferenceWorkerDied(f"the reference worker (cluster.reference=worker) gave no answer within "
                                      f"{named} during {what}")
        return ray.get(ref)

    def _stop_if_dead(self, error: BaseException, what: str) -> None:
        dead = dead_actors([self.actor], "pid")
        if dead:
            raise ReferenceWorkerDied(f"the reference worker (cluster.reference=worker) died during {what} "
                                      f"({one_line(dead[0])})") from error

    def shutdown(self) -> None:
        ray.kill(self.actor)


def reference_service_for_run(cfg: DictConfig, model_path: str, threads: int | None,
                              slot: tuple[Any, int]) -> ReferenceService:
    """The run's worker, in engine 0's bundle (``slot``) on the engines' threads, cutting
    batches as the learner does and in the learner's precision."""
    # Here, not at the top: the scorer's module brings transformers' model classes, seconds of
    # imports a run without the worker (cluster.reference=learner, the default) never needs.
    from learner.reference_scorer import ReferencePlan

    plan = ReferencePlan(num_ranks=cfg.learner.num_ranks, mini_batches=cfg.algo.mini_batches,
                         micro_batch_tokens=cfg.learner.micro_batch_tokens,
                         shared_prefix=bool(cfg.learner.shared_prefix))
    learner = section(cfg, "learner")
    precision = learner.resolved_precision(learner.device)
    return ReferenceService(model_path, plan, dtype="bfloat16" if precision == "bf16" else "float32",
                            threads=threads, slot=slot, timeout_s=cfg.rollout.generate_timeout_s)


def _reference_weights(learner: Any) -> dict[str, Any]:
    return learner.reference_weights(device="cpu")


__all__ = ["ReferenceService", "ReferenceWorker", "ReferenceWorkerDied", "reference_service_for_run"]
