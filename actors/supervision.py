"""Fault handling for the driver: what can be replaced is replaced, what cannot stops the run.

- A rollout engine that dies is replaced by a fresh actor (same index, same placement), the
  weight-transfer group is rebuilt over every engine on a fresh port (the old group has a
  dead member), the learner's current weights are sent, and the dead engine's prompts are
  generated again: no sample is lost.
- A reward worker that dies is replaced and its chunk scored again (actors/reward_pool.py).
- A learner rank that dies takes its optimizer state and collectives with it: the run stops
  with one line and ``--resume`` continues from the last complete checkpoint.

- A rollout engine that hangs in generation past ``rollout.generate_timeout_s`` is killed and
  replaced the same way, and its prompts generated again with the same seeds (the driver's
  watchdog, actors/generation.py); counted in ``faults/generate_timeouts``.
- A rollout engine that dies during a weight sync is replaced and brought to the current
  version in place (``faults/sync_deaths``); the run goes on. One that freezes mid-sync fails
  the sync with an error naming it and the bucket: a frozen engine cannot be told from a slow
  one before the collective timeout, and the run stops (exit 3).

Every replacement is one failure; a completed step resets the count. The
``run.max_consecutive_failures``-th failure in a row stops the run (``RunStopped``) instead
of replacing again. Restarts and the wall time spent recovering are logged per step
(``faults/*`` in metrics.jsonl) and in total (summary.json ``faults``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import ray
from ray.actor import ActorHandle

from actors.errors import one_line
from actors.waiting import outcomes, unfinished
from actors.weight_sync import WeightSync, WeightSyncError

log = logging.getLogger(__name__)

RESTART_KINDS = ("rollout", "reward")
EVENT_KINDS = ("generate_timeouts", "sync_deaths")  # counted beside the restarts they cause
PING_TIMEOUT_S = 10.0

__all__ = ["EngineHung", "EngineSupervisor", "FaultLog", "RunStopped", "dead_actors", "one_line"]


class RunStopped(RuntimeError):
    """The run cannot go on; the message is one line: what failed, what was saved, how to resume."""


class EngineHung(RuntimeError):
    """A rollout engine that did not finish a generation within rollout.generate_timeout_s."""


def dead_actors(actors: list[ActorHandle], ping: str, timeout_s: float = PING_TIMEOUT_S,
                ) -> dict[int, ray.exceptions.RayActorError]:
    """The actors whose process is gone, by index, with the error that says so. A live actor
    busy with other work (or stuck in a collective) may not answer ``ping`` in time: it counts
    as alive."""
    refs = {getattr(actor, ping).remote(): index for index, actor in enumerate(actors)}
    pending = unfinished(refs, timeout_s)
    answered = {ref: index for ref, index in refs.items() if ref not in pending}
    dead = {}
    for index, _, error in outcomes(answered):
        if isinstance(error, ray.exceptions.RayActorError):
            dead[index] = error
        elif error is not None:
            raise error
    return dict(sorted(dead.items()))


@dataclass
class FaultLog:
    """Failures in a row, and restarts and recovery time per step and in total."""

    max_consecutive: int
    consecutive: int = 0
    step_restarts: Counter = field(default_factory=Counter)
    step_recovery_s: float = 0.0
    total_restarts: Counter = field(default_factory=Counter)
    total_recovery_s: float = 0.0
    step_events: Counter = field(default_factory=Counter)
    total_events: Counter = field(default_factory=Counter)

    def failure(self, what: str, error: BaseException) -> None:
        """Count a failure of ``what``; raises RunStopped when it is one too many in a row."""
        self.consecutive += 1
        log.warning("%s failed (%d in a row): %s", what, self.consecutive, one_line(error))
        if self.consecutive >= self.max_consecutive:
            raise RunStopped(f"{what} failed ({one_line(error)}), {self.consecutive} failures in a row "
                             f"(run.max_consecutive_failures={self.max_consecutive})")

    def restarted(self, kind: str, seconds: float, count: int = 1) -> None:
        self.step_restarts[kind] += count
        self.total_restarts[kind] += count
        self.step_recovery_s += seconds
        self.total_recovery_s += seconds

    def event(self, kind: str) -> None:
        """Count what caused a restart (one of EVENT_KINDS): a hung generation, a death mid-sync."""
        self.step_events[kind] += 1
        self.total_events[kind] += 1

    def step_done(self) -> dict[str, float]:
        """This step's fault metrics; a completed step also ends a run of failures."""
        metrics: dict[str, float] = {f"faults/{kind}_restarts": self.step_restarts[kind] for kind in RESTART_KINDS}
        metrics.update({f"faults/{kind}": self.step_events[kind] for kind in EVENT_KINDS})
        metrics["faults/recovery_s"] = self.step_recovery_s
        self.step_restarts.clear()
        self.step_events.clear()
        self.step_recovery_s = 0.0
        self.consecutive = 0
        return metrics

    def totals(self) -> dict[str, float]:
        return {**{f"{kind}_restarts": self.total_restarts[kind] for kind in RESTART_KINDS},
                **{kind: self.total_events[kind] for kind in EVENT_KINDS},
                "recovery_s": self.total_recovery_s}


class EngineSupervisor:
    """Replaces dead rollout engines in ``engines`` (the driver's own list, changed in place)
    and brings every engine to the learner's current weights through a rebuilt group."""

    def __init__(self, engines: list[ActorHandle], weight_sync: WeightSync, start_engine: Callable[[int], ActorHandle],
                 faults: FaultLog) -> None:
        self.engines = engines
        self.weight_sync = weight_sync
        self.start_engine = start_engine
        self.faults = faults

    def replace(self, index: int, dead: ActorHandle, error: BaseException) -> ActorHandle:
        """The engine now serving ``index``, after ``dead`` failed with ``error``. A failure
        while recovering (the replacement, or another engine, dying) counts as one more."""
        if self.engines[index] is not dead:  # already replaced while recovering another engine
            return self.engines[index]
        started = time.perf_counter()
        broken, replaced = [index], 0
        while True:
            self.faults.failure(f"rollout engine {', '.join(map(str, broken))}", error)
            try:
                for i in broken:
                    ray.kill(self.engines[i], no_restart=True)
                    self.engines[i] = self.start_engine(i)
                    replaced += 1
                self.weight_sync.rebuild()
                self.weight_sync.sync()
                break
            except Exception as again:  # noqa: BLE001  (only dead engines are retried, else re-raised)
                broken = list(dead_actors(self.engines, "num_workers"))
                if not broken:
                    raise
                error = again
        seconds = time.perf_counter() - started
        log.warning("rollout engine %d replaced and synced to weight version %d in %.1f s",
                    index, self.weight_sync.learner.weight_version, seconds)
        self.faults.restarted("rollout", seconds, replaced)
        return self.engines[index]

    def sync(self) -> dict[str, float]:
        """The weight sync. Engines are pinged only when it fails: those that died (before or
        during it) are replaced, and ``replace`` brings every engine to the current version,
        so the sync is done in place; a failure without a death (a frozen engine, a corrupt
        or unverified update) is the run's to stop on."""
        try:
            return self.weight_sync.sync()
        except WeightSyncError as error:
            dead = dead_actors(self.engines, "num_workers")
            if not dead:
                raise
            for index, death in dead.items():
                self.faults.event("sync_deaths")
                log.warning("rollout engine %d died during the weight sync (%s)", index, one_line(error))
                self.replace(index, self.engines[index], death)
            return dict(self.weight_sync.last)


def stop_if_diverged(stage: str, step: int, learner_metrics: dict, limit: int, weight_version: int) -> None:
    """A skipped update (non-finite loss or gradients) leaves the weights as they were; ``limit``
    (learner.max_consecutive_nonfinite) of them in a row raise RunStopped, and the driver then
    checkpoints this step: the last good weights."""
    skipped = int(learner_metrics.get("skipped_updates", 0))
    in_a_row = int(learner_metrics.get("consecutive_skipped_updates", 0))
    if skipped:
        log.warning("%s step %d: %d update(s) skipped for a non-finite loss or gradients (%d in a row)",
                    stage, step, skipped, in_a_row)
    if in_a_row >= limit:
        raise RunStopped(f"{stage} step {step}: {in_a_row} updates in a row had a non-finite loss or "
                         f"gradients and were skipped (learner.max_consecutive_nonfinite={limit}); "
                         f"the weights are the last good ones (weight version {weight_version})")
