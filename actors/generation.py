"""Generation fan-out: each engine gets its share of a round's prompts, each engine's rollouts
are scored as soon as they arrive, and an engine that dies or hangs past
``rollout.generate_timeout_s`` is replaced (actors/supervision.py) and its call run again
with the same seeds, so no sample is lost or changed."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.actor import ActorHandle

from actors.reward_pool import RewardPool
from actors.supervision import EngineHung, EngineSupervisor, FaultLog
from actors.waiting import unfinished
from personadual.group_filter import fill_batch
from personadual.modes import Mode
from personadual.records import Prompt, Rollout, Scored
from personadual.seeds import step_seeds

log = logging.getLogger(__name__)


@dataclass
class PendingGeneration:
    """A generation round in flight: each engine's ObjectRef (to its engine index)."""

    step: int = 0
    refs: dict[Any, int] = field(default_factory=dict)
    # Per engine index: the engine and its call, to generate again on a replacement if it dies.
    engines: dict[int, Any] = field(default_factory=dict)
    calls: dict[int, tuple[list[Prompt], dict[str, Any]]] = field(default_factory=dict)
    started: dict[Any, float] = field(default_factory=dict)  # each ObjectRef's submission (monotonic)

    def submit(self, index: int, engine: Any, chunk: list[Prompt], kwargs: dict[str, Any]) -> None:
        ref = engine.generate.remote(chunk, **kwargs)
        self.refs[ref] = index
        self.started[ref] = time.monotonic()
        self.engines[index], self.calls[index] = engine, (chunk, kwargs)

    def take(self, ref: Any) -> int:
        """Stop tracking ``ref`` (finished, or its engine lost); its engine index."""
        self.started.pop(ref, None)
        return self.refs.pop(ref)


def sampling_seeds(run_seed: int, stage: str, step: int, count: int, greedy: bool = False) -> list[int] | None:
    """Per-prompt sampling seeds of one generation round (None when greedy)."""
    return None if greedy else step_seeds(run_seed, stage, step, count)


class GenerationFanOut:
    """Generation rounds over ``engines`` (the driver's list, which the supervisor changes in
    place when it replaces one), scored by ``rewards``."""

    def __init__(self, engines: list[ActorHandle], rewards: RewardPool, supervisor: EngineSupervisor,
                 faults: FaultLog, *, generate_timeout_s: float) -> None:
        self.engines = engines
        self.rewards = rewards
        self.supervisor = supervisor
        self.faults = faults
        self.generate_timeout_s = generate_timeout_s

    def start(self, prompts: list[Prompt], *, forced: bool, n: int, greedy: bool = False,
              modes: list[Mode] | None = None, histories: list[list[dict[str, str]]] | None = None,
              seeds: list[int] | None = None, step: int = 0) -> PendingGeneration:
        """Send each engine its share of the prompts; returns at once."""
        engines = len(self.engines)
        pending = PendingGeneration(step=step)
        for i, engine in enumerate(self.engines):
            chunk = prompts[i::engines]
            if chunk:
                kwargs = dict(forced=forced, n=n, greedy=greedy, modes=modes,
                              histories=histories[i::engines] if histories else None,
                              seeds=seeds[i::engines] if seeds is not None else None)
                pending.submit(i, engine, chunk, kwargs)
        return pending

    def wait(self, pending: PendingGeneration) -> None:
        """Wait until every engine's call is done (results left in place), replacing an engine
        that hangs past rollout.generate_timeout_s and rerunning its call."""
        while True:
            if not unfinished(pending.refs, self._replace_overdue(pending)):
                return

    def finish(self, pending: PendingGeneration) -> tuple[list[Scored], dict[str, float], dict[str, int]]:
        """Score each engine's output as soon as it arrives; the scored rollouts in engine
        order, the seconds spent generating and scoring, and the reward counts."""
        wait_start = time.perf_counter()
        score_refs: dict[int, Any] = {}
        while pending.refs:
            next_deadline = self._replace_overdue(pending)
            done, _ = ray.wait(list(pending.refs), num_returns=1, timeout=next_deadline)
            if not done:
                continue
            try:
                rollouts: list[Rollout] = ray.get(done[0])
            except ray.exceptions.RayActorError as error:
                # A dead engine is replaced (actors/supervision.py) and its prompts generated again.
                self._rerun(pending, done[0], error)
                continue
            score_refs[pending.take(done[0])] = self.rewards.submit(rollouts)
        generated = time.perf_counter()
        # Engine order, not arrival order: the learner's batch must not depend on timing.
        scored, counts = self.rewards.collect([score_refs[i] for i in sorted(score_refs)])
        finished = time.perf_counter()
        return scored, {"generate": generated - wait_start, "score": finished - generated}, counts

    def generate_and_score(self, prompts: list[Prompt], *, forced: bool, n: int, greedy: bool = False,
                           modes: list[Mode] | None = None, histories: list[list[dict[str, str]]] | None = None,
                           seeds: list[int] | None = None,
                           ) -> tuple[list[Scored], dict[str, float], dict[str, int]]:
        """Generate on every engine and score each engine's output as soon as it arrives."""
        return self.finish(self.start(prompts, forced=forced, n=n, greedy=greedy, modes=modes,
                                      histories=histories, seeds=seeds))

    def _rerun(self, pending: PendingGeneration, ref: Any, error: BaseException) -> None:
        """Engine ``pending.refs[ref]`` died or hung: replace it (actors/supervision.py) and send
        its replacement the same call, same seeds, so the samples are the ones it would have made."""
        index = pending.take(ref)
        engine = self.supervisor.replace(index, pending.engines[index], error)
        chunk, kwargs = pending.calls[index]
        pending.submit(index, engine, chunk, kwargs)

    def _replace_overdue(self, pending: PendingGeneration) -> float | None:
        """Replace every engine whose call runs past rollout.generate_timeout_s (its call run
        again); the seconds until the next deadline of the calls still running, if any."""
        while True:
            late, next_deadline = self._overdue(pending)
            if not late:
                return next_deadline
            limit = self.generate_timeout_s
            for ref in late:
                index = pending.refs[ref]
                self.faults.event("generate_timeouts")
                log.warning("rollout engine %d: no answer within rollout.generate_timeout_s=%g s; replacing it",
                            index, limit)
                self._rerun(pending, ref, EngineHung(f"rollout engine {index} generated for more than "
                                                     f"rollout.generate_timeout_s={limit:g} s"))

    def _overdue(self, pending: PendingGeneration) -> tuple[list[Any], float | None]:
        """The calls still running past rollout.generate_timeout_s, and the seconds until the
        next deadline of the others. A finished call is never late, however long ago it was
        sent (a pipelined generation waits out the learner's step)."""
        if not pending.refs:
            return [], None
        limit = self.generate_timeout_s
        refs = list(unfinished(pending.refs, 0))
        now = time.monotonic()
        late = [ref for ref in refs if now - pending.started[ref] >= limit]
        rest = [pending.started[ref] + limit - now for ref in refs if ref not in late]
        return late, (max(0.0, min(rest)) if rest else None)


class RLRollouts:
    """The RL stage's rollouts (personadual/rl_step.py's ``RolloutSource``): each step's
    prompts from ``cursor``, forced-prefix groups of ``algo.n_per_mode`` per mode (or
    ``2 * n_per_mode`` free ones), seeded per step. ``cursor_state`` is the data position
    after the prompts of the step last finished: what a checkpoint of that step resumes from.

    With ``filter_max_rounds`` (``algo.filter_groups``; personadual/group_filter.py) a step's
    uniform-reward groups leave its batch and further rounds of fresh prompts top it up, all
    before the next step's prompts are drawn; ``filter_metrics`` holds the last step's counts.

    With ``reference`` (actors/reference_worker.py) each step's round goes to the reference
    worker as it is sent, and its rollouts come back with their reference log-probs."""

    def __init__(self, generation: GenerationFanOut, prompts: list[Prompt], cursor: Any, *,
                 prompts_per_step: int, n_per_mode: int, forced_prefix: bool, run_seed: int,
                 filter_max_rounds: int | None = None, reference: Any = None) -> None:
        self.generation = generation
        self.prompts = prompts
        self.cursor = cursor
        self.prompts_per_step = prompts_per_step
        self.n_per_mode = n_per_mode
        self.forced = forced_prefix
        self.run_seed = run_seed
        self.cursor_state: dict[str, int] | None = None
        self.filter_max_rounds = filter_max_rounds
        self.filter_metrics: dict[str, float] = {}
        self.reference = reference

    def step_metrics(self) -> dict[str, Any]:
        """The last step's filter counts and, with a reference worker, its seconds and wait."""
        reference = {"reference": self.reference.metrics()} if self.reference is not None else {}
        return {**self.filter_metrics, **reference}

    def start(self, step: int) -> tuple[PendingGeneration, dict[str, int], Any]:
        prompts = [self.prompts[i] for i in self.cursor.take(self.prompts_per_step)]
        n = self.n_per_mode if self.forced else 2 * self.n_per_mode
        pending = self.generation.start(prompts, forced=self.forced, n=n, step=step,
                                        seeds=sampling_seeds(self.run_seed, "rl", step, len(prompts)))
        return pending, self.cursor.state(), self.reference.submit(pending) if self.reference else None

    def finish(self, started: tuple[PendingGeneration, dict[str, int], Any],
               ) -> tuple[list[Scored], dict[str, float], dict[str, int]]:
        pending, cursor_state, reference = started
        scored, times, counts = self.generation.finish(pending)
        if self.reference is not None:
            what = f"RL step {pending.step}'s reference log-probs"
            scored = self.reference.attach(reference, scored, what)
            times["reference_wait"] = self.reference.wait_s
        if self.filter_max_rounds is not None:
            scored = self._filter(pending.step, scored, times, counts)
            cursor_state = self.cursor.state()  # past the extra rounds' prompts too
            if self.reference is not None:
                scored = self.reference.fill(scored, f"RL step {pending.step}'s top-up reference log-probs")
        self.cursor_state = cursor_state  # only once scored: a stop while scoring resumes before this step
        return scored, times, counts

    def _filter(self, step: int, scored: list[Scored], times: dict[str, float],
                counts: dict[str, int]) -> list[Scored]:
        """The step's groups with a reward spread, topped up by extra rounds (their seconds and
        reward counts added to the step's)."""
        n = self.n_per_mode if self.forced else 2 * self.n_per_mode

        def generate(round_index: int, count: int) -> list[Scored]:
            prompts = [self.prompts[i] for i in self.cursor.take(count)]
            more, round_times, round_counts = self.generation.generate_and_score(
                prompts, forced=self.forced, n=n,
                seeds=sampling_seeds(self.run_seed, f"rl-fill{round_index}", step, len(prompts)))
            for key, value in round_times.items():
                times[key] = times.get(key, 0.0) + value
            for key, value in round_counts.items():
                counts[key] = counts.get(key, 0) + value
            return more

        kept, found = fill_batch(scored, target_groups=self.prompts_per_step, max_rounds=self.filter_max_rounds,
                                 generate=generate)
        self.filter_metrics = found.metrics()
        return kept

    def wait(self, started: tuple[PendingGeneration, dict[str, int], Any]) -> None:
        self.generation.wait(started[0])
