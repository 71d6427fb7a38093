"""One RL step, whatever runs the pieces: generate and score this step's rollouts, refuse them
if staler than ``algo.max_staleness``, take the learner's policy step, and send the new
weights to the engines. The driver runs it on Ray actors (actors/driver.py);
``scripts/gpu_smoke.py`` runs it on one GPU without Ray.

With ``max_staleness >= 1`` the engines generate step+1's rollouts (on the weights they hold,
one update behind once trained) while the learner trains on this step's; the weights go out
once that generation is done, so an engine never changes weights mid-generation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from personadual.records import Scored
from personadual.staleness import check_staleness


class RolloutSource(Protocol):
    """Where a step's rollouts come from: ``start`` sends a step's generation and returns at
    once; ``finish`` waits for it and scores it (scored rollouts, seconds spent generating and
    scoring, reward counts); ``wait`` waits for it without taking the results."""

    def start(self, step: int) -> Any: ...

    def finish(self, pending: Any) -> tuple[list[Scored], dict[str, float], dict[str, int]]: ...

    def wait(self, pending: Any) -> None: ...


class PolicyLearner(Protocol):
    """The learner: its weight version, and one policy step on scored rollouts that returns its
    metrics with the seconds spent as ``time/reference``, ``time/train``, ``time/old_logprob``."""

    weight_version: int

    def policy_step(self, scored: list[Scored]) -> dict[str, Any]: ...


@dataclass
class RLStepResult:
    scored: list[Scored]
    learner_metrics: dict[str, Any]  # without its time/* keys, which are in ``times``
    # generate, score, [reference_wait], reference, train, [generate_next], sync, idle, step, train_old_logprob
    times: dict[str, float]
    reward_counts: dict[str, int]
    sync: dict[str, float]
    staleness: list[int]  # each rollout's age in learner updates


class RLStep:
    """Runs RL steps in order over ``rollouts``, ``learner`` and ``sync`` (the weight push to
    the engines, returning at least its ``seconds``)."""

    def __init__(self, rollouts: RolloutSource, learner: PolicyLearner, sync: Callable[[], dict[str, float]],
                 *, max_staleness: int = 0, total_steps: int) -> None:
        self.rollouts = rollouts
        self.learner = learner
        self.sync = sync
        self.max_staleness = max_staleness
        self.total_steps = total_steps
        self.update_versions: list[int] = []  # the learner's weight version after each RL step run here
        self.next_generation: tuple[int, Any] | None = None  # step+1's rollouts in flight (pipelined)

    def __call__(self, step: int) -> RLStepResult:
        step_start = time.perf_counter()
        pending_step, pending = self.next_generation or (step, self.rollouts.start(step))
        self.next_generation = None
        assert pending_step == step, f"rollouts of step {pending_step} offered to step {step}"
        scored, times, counts = self.rollouts.finish(pending)
        staleness = check_staleness(step, [s.rollout.weight_version for s in scored], self.update_versions,
                                    self.max_staleness)
        if self.max_staleness >= 1 and step < self.total_steps:
            self.next_generation = (step + 1, self.rollouts.start(step + 1))
        learner_metrics = self.learner.policy_step(scored)
        self.update_versions.append(self.learner.weight_version)
        times["reference"] = learner_metrics.pop("time/reference", 0.0)
        times["train"] = learner_metrics.pop("time/train", 0.0)
        if self.next_generation is not None:
            wait_start = time.perf_counter()
            self.rollouts.wait(self.next_generation[1])
            times["generate_next"] = time.perf_counter() - wait_start
        sync = self.sync()
        times["sync"] = sync["seconds"]
        total = time.perf_counter() - step_start
        times["idle"] = max(0.0, total - sum(times.values()))
        times["step"] = total
        times["train_old_logprob"] = learner_metrics.pop("time/old_logprob", 0.0)  # part of train
        return RLStepResult(scored, learner_metrics, times, counts, sync, staleness)
