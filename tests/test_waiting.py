"""actors/waiting.py on real Ray with tiny actors: a stuck call is named by its label, a
death and a task's exception are told apart, and a collective's first failure is raised
without waiting for its stuck peers."""

from __future__ import annotations

import os
import time

import pytest
import ray

from actors.waiting import gather_first_failure, outcomes, unfinished

pytestmark = [pytest.mark.slow]


@ray.remote(num_cpus=0)
class Worker:
    def answer(self, value: int, delay_s: float = 0.0) -> int:
        time.sleep(delay_s)
        return value

    def fail(self) -> None:
        raise ValueError("bad input")

    def die(self) -> None:
        os._exit(1)


@pytest.fixture(scope="module")
def workers(ray_cluster):
    actors = [Worker.remote() for _ in range(3)]
    ray.get([actor.answer.remote(0) for actor in actors])
    yield actors
    for actor in actors:
        ray.kill(actor)


def test_the_calls_still_running_after_the_timeout_are_named_by_their_labels(workers):
    slow = Worker.remote()  # its own actor: the 120 s call would hold up a shared one
    refs = {workers[0].answer.remote(0): "engine 0", slow.answer.remote(1, 120.0): "engine 1",
            workers[2].answer.remote(2): "engine 2"}
    start = time.monotonic()
    stuck = unfinished(refs, 2.0)
    ray.kill(slow)
    assert list(stuck.values()) == ["engine 1"]
    assert 1.5 < time.monotonic() - start < 60  # it waited for the timeout, not for the stuck call
    assert unfinished({ref: label for ref, label in refs.items() if label != "engine 1"}, 0) == {}
    assert unfinished({}, 0) == {}


def test_values_task_errors_and_deaths_come_back_per_label_in_order(workers):
    victim = Worker.remote()
    refs = {workers[0].answer.remote(7): 0, workers[1].fail.remote(): 1, victim.die.remote(): 2}
    assert unfinished(refs, 60) == {}
    found = outcomes(refs)
    assert [label for label, _, _ in found] == [0, 1, 2]
    assert found[0][1:] == (7, None)
    assert isinstance(found[1][2], ray.exceptions.RayTaskError) and "bad input" in str(found[1][2])
    assert isinstance(found[2][2], ray.exceptions.RayActorError)
    # A task error is not a death: callers that replace dead actors must not take it for one.
    assert not isinstance(found[1][2], ray.exceptions.RayActorError)


def test_the_first_failure_is_raised_while_its_peers_still_run(workers):
    slow = Worker.remote()
    start = time.monotonic()
    with pytest.raises(ray.exceptions.RayTaskError, match="bad input"):
        gather_first_failure([slow.answer.remote(0, 120.0), workers[1].fail.remote()])
    assert time.monotonic() - start < 60
    ray.kill(slow)
    assert gather_first_failure([workers[2].answer.remote(5), workers[1].answer.remote(6)]) == [5, 6]
