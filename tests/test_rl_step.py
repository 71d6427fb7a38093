"""personadual/rl_step.py's contract, with plain Python pieces in place of engines and a
learner (the driver runs it on Ray actors, tests/test_e2e.py; scripts/gpu_smoke.py without):
the order of generation, training and the weight push, with and without pipelining, and
the refusal of rollouts staler than algo.max_staleness."""

from __future__ import annotations

import pytest

from personadual.modes import Mode
from personadual.rl_step import RLStep
from personadual.staleness import StaleRolloutsError
from tests.helpers import make_scored


class World:
    """Engines and a learner that log what happens, in order; the engines generate with the
    weight version they last received."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.engine_version = 0
        self.weight_version = 0

    # RolloutSource
    def start(self, step: int) -> dict:
        self.log.append(f"start {step}")
        return {"step": step, "version": self.engine_version}

    def wait(self, pending: dict) -> None:
        self.log.append(f"wait {pending['step']}")

    def finish(self, pending: dict):
        self.log.append(f"finish {pending['step']}")
        scored = [make_scored(f"p{pending['step']}", mode, 1.0, weight_version=pending["version"])
                  for mode in (Mode.GENERAL, Mode.PERSONALIZED)]
        return scored, {"generate": 0.5, "score": 0.25}, {"ok": len(scored)}

    # PolicyLearner
    def policy_step(self, scored) -> dict:
        self.log.append(f"train on version {scored[0].rollout.weight_version}")
        self.weight_version += 1
        return {"loss": 0.1, "time/reference": 0.125, "time/train": 1.0, "time/old_logprob": 0.0}

    def sync(self) -> dict:
        self.log.append(f"sync {self.weight_version}")
        self.engine_version = self.weight_version
        return {"seconds": 0.0625, "version": self.weight_version}


def test_on_policy_each_step_generates_trains_then_pushes_the_new_weights():
    world = World()
    step = RLStep(world, world, world.sync, max_staleness=0, total_steps=2)
    results = [step(1), step(2)]
    assert world.log == ["start 1", "finish 1", "train on version 0", "sync 1",
                         "start 2", "finish 2", "train on version 1", "sync 2"]
    assert [r.staleness for r in results] == [[0, 0], [0, 0]]
    times = results[0].times
    assert (times["generate"], times["score"], times["reference"], times["train"], times["sync"]) == (
        0.5, 0.25, 0.125, 1.0, 0.0625)
    assert "generate_next" not in times and times["step"] >= 0 and times["idle"] >= 0
    assert results[0].learner_metrics == {"loss": 0.1}  # the time/* keys moved to times
    assert results[0].reward_counts == {"ok": 2} and results[1].sync["version"] == 2


def test_pipelined_the_next_rollouts_are_generated_during_training_and_the_weights_wait_for_them():
    world = World()
    step = RLStep(world, world, world.sync, max_staleness=1, total_steps=3)
    results = [step(1), step(2), step(3)]
    assert world.log == ["start 1", "finish 1", "start 2", "train on version 0", "wait 2", "sync 1",
                         "finish 2", "start 3", "train on version 0", "wait 3", "sync 2",
                         "finish 3", "train on version 1", "sync 3"]  # the last step starts nothing
    assert [r.staleness for r in results] == [[0, 0], [1, 1], [1, 1]]
    assert "generate_next" in results[0].times and "generate_next" not in results[2].times


def test_rollouts_staler_than_allowed_are_refused_naming_the_step():
    world = World()
    step = RLStep(world, world, lambda: {"seconds": 0.0}, max_staleness=0, total_steps=3)
    step(1)  # the weights never reach the engines: step 2's rollouts are one update old
    with pytest.raises(StaleRolloutsError, match="offered to RL step 2 are 1 learner updates old"):
        step(2)
