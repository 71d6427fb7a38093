"""How an RL step's phases share the hardware: ``cluster.schedule``.

- ``serial``: generate, score, reference, train, sync in turn; each phase computes on every
  core of its node (actors/threads.py), since no other phase runs beside it.
- ``colocated``: learner rank i and engine i share one placement bundle (actors/placement.py):
  the same node, on GPU the same device. Phases run in turn as in ``serial``; on GPU the
  engines sleep (vLLM sleep mode: KV cache freed, weights dropped) while the learner holds
  the device and wake for the weight update, which goes through CUDA IPC (vLLM's "ipc"
  weight-transfer engine) instead of a broadcast. vLLM's CPU worker has no sleep mode (it
  logs "sleep mode is not supported on CPU" and ignores the call), so on CPU the engines stay
  awake and colocated runs the serial step on the same placement; the sleep/wake calls are
  still made, and counted, so the control flow is the one a GPU run takes.
- ``pipelined``: the engines generate step t+1's rollouts on the weights they hold while the
  learner trains on step t's; the weights go out once that generation is done. Rollouts are
  then one learner update old: ``algo.max_staleness`` follows the schedule (1 here, 0 for
  the others) and an explicit value that contradicts it exits 2 naming both keys.

``cluster.reference`` says who computes the KL reference's log-probs: the ``learner`` in its
step, or a ``worker`` beside the engines (actors/reference_worker.py) that scores each round as
soon as it is generated, which takes the reference pass off the learner's side of a pipelined
step. Null picks the worker when pipelined (with a KL term, on CPU engines), else the learner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

SCHEDULES = ("serial", "colocated", "pipelined")
REFERENCE_PLACES = ("learner", "worker")


class ScheduleError(ValueError):
    """``cluster.schedule`` and another key disagree; the message is one line naming both."""


def staleness_of(schedule: str) -> int:
    """The learner updates a rollout may lag under ``schedule``."""
    return 1 if schedule == "pipelined" else 0


def resolve_schedule(cfg: DictConfig) -> None:
    """Fill the keys the schedule decides (``algo.max_staleness`` when null; the weight
    transfer of colocated GPU engines when ``auto``) and refuse a config that contradicts it."""
    schedule = cfg.cluster.schedule
    staleness = staleness_of(schedule)
    given = cfg.algo.max_staleness
    if given is None:
        OmegaConf.update(cfg, "algo.max_staleness", staleness)
    elif given != staleness:
        if schedule == "pipelined":
            raise ScheduleError(f"algo.max_staleness={given} contradicts cluster.schedule=pipelined, which trains "
                                f"on rollouts one update old (leave algo.max_staleness unset, or pick "
                                f"cluster.schedule=serial)")
        raise ScheduleError(f"algo.max_staleness={given} contradicts cluster.schedule={schedule}, whose rollouts "
                            f"are never stale (set cluster.schedule=pipelined instead; algo.max_staleness follows)")
    if schedule == "colocated":
        if cfg.rollout.tensor_parallel_size > 1:
            raise ScheduleError(f"rollout.tensor_parallel_size={cfg.rollout.tensor_parallel_size}: "
                                f"cluster.schedule=colocated pairs each engine with one learner rank's device "
                                f"(tensor parallelism 1)")
        on_gpu = cfg.rollout.num_gpus_per_engine > 0
        if on_gpu != (cfg.learner.num_gpus_per_rank > 0):
            raise ScheduleError("cluster.schedule=colocated: rollout.num_gpus_per_engine and "
                                "learner.num_gpus_per_rank must both be > 0 (sharing a GPU) or both 0")
        if on_gpu and cfg.rollout.weight_transfer_backend == "auto":
            OmegaConf.update(cfg, "rollout.weight_transfer_backend", "ipc")
    resolve_reference(cfg)


def resolve_reference(cfg: DictConfig) -> None:
    """Fill ``cluster.reference`` when null and refuse a worker that could not do its job."""
    gpu_engines = cfg.rollout.num_gpus_per_engine > 0
    kl = cfg.algo.kl_coef > 0
    place = cfg.cluster.reference
    if place is None:
        place = "worker" if cfg.cluster.schedule == "pipelined" and kl and not gpu_engines else "learner"
        OmegaConf.update(cfg, "cluster.reference", place)
    if place != "worker":
        return
    if not kl:
        raise ScheduleError(f"cluster.reference=worker: algo.kl_coef={cfg.algo.kl_coef} has no KL term, so there is "
                            f"no reference to compute (set cluster.reference=learner)")
    if gpu_engines:
        # The worker holds no device of its own yet: in a GPU engine's bundle it would compute on CPU.
        raise ScheduleError("cluster.reference=worker computes on the engines' CPU cores; with "
                            "rollout.num_gpus_per_engine > 0 set cluster.reference=learner")


@dataclass
class PhaseSwitch:
    """The colocated schedule's phase changes: engines asleep while the learner trains,
    awake for the weight update and the next generation. A no-op for the other schedules."""

    schedule: str
    switches: int = 0  # sleep calls made this step
    slept: int = 0  # of which an engine actually slept (0 on CPU: no sleep mode there)

    @property
    def active(self) -> bool:
        return self.schedule == "colocated"

    def learner_phase(self, engines: Sequence[Any]) -> None:
        """Generation is done: the engines give the device to the learner."""
        if not self.active:
            return
        import ray

        results = ray.get([engine.sleep.remote() for engine in engines])
        self.switches += len(results)
        self.slept += sum(bool(r) for r in results)

    def rollout_phase(self, engines: Sequence[Any]) -> None:
        """Training is done: the engines take the device back (weights first, then the KV cache)."""
        if not self.active:
            return
        import ray

        ray.get([engine.wake_up.remote() for engine in engines])

    def around(self, learner: Any, engines: Sequence[Any]) -> Any:
        """``learner`` as the RL step sees it: under the colocated schedule its policy step runs
        with ``engines`` (the driver's list, kept current by engine replacement) asleep."""
        return _EnginesAsleep(learner, engines, self) if self.active else learner

    def step_metrics(self) -> dict[str, float]:
        """This step's switches, then counters reset."""
        if not self.active:
            return {}
        metrics = {"schedule/engine_sleep_calls": float(self.switches), "schedule/engines_slept": float(self.slept)}
        self.switches = self.slept = 0
        return metrics


class _EnginesAsleep:
    """A learner whose policy step runs while the colocated engines sleep."""

    def __init__(self, learner: Any, engines: Sequence[Any], phases: PhaseSwitch) -> None:
        self.learner, self.engines, self.phases = learner, engines, phases

    @property
    def weight_version(self) -> int:
        return self.learner.weight_version

    def policy_step(self, scored: Any) -> dict[str, Any]:
        self.phases.learner_phase(self.engines)
        try:
            return self.learner.policy_step(scored)
        finally:
            self.phases.rollout_phase(self.engines)


__all__ = ["PhaseSwitch", "REFERENCE_PLACES", "SCHEDULES", "ScheduleError", "resolve_reference", "resolve_schedule",
           "staleness_of"]
