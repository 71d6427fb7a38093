"""How many torch/OpenMP threads each learner rank and rollout engine computes on.

Ray starts every worker with ``OMP_NUM_THREADS`` set to the actor's CPU reservation
(rounded down, at least 1), so a learner reserving 1 CPU and an engine reserving 0.5 each
compute on ONE thread, whatever the node holds (measured on a 2-core machine: in every
phase one process at ~96% of a core, the other at ~2%). A reservation is a scheduling
token, not the cores a phase may use: in the serial and colocated schedules the phases
never overlap, so each may use every core of its node; in the pipelined schedule
generation of step t+1 runs beside training of step t, so the node's cores are split.

``plan_threads`` turns the schedule, the explicit ``learner.threads`` / ``rollout.threads``
(null: derived) and where each actor was placed into one count per actor. The count
reaches the actor twice: as ``OMP_NUM_THREADS`` in its runtime environment (read by the
OpenMP runtime when the process starts, so every thread of it, vLLM's own kernels
included, sees it) and through ``torch.set_num_threads`` in the actor, which is what
``read_threads`` reads back. Reward workers match strings and call HTTP: one thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

# Pipelined on a shared node: the engines' share of its cores. Measured on the default run
# (26.2M model, one engine, one learner rank): generation is ~19% of a serial step, the
# learner's reference + train ~79%; generating step t+1 beside training step t is balanced
# when the engines hold about a fifth of the cores (at least one core each side).
PIPELINED_ROLLOUT_SHARE = 0.2
THREADS_ENV = "OMP_NUM_THREADS"


@dataclass(frozen=True)
class ThreadPlan:
    """Threads per learner rank and per rollout engine, in rank / engine order. ``learner``
    is the RL stage's; ``learner_sft`` the SFT stage's, when no generation runs beside it
    (they differ only in the pipelined schedule)."""

    learner: list[int]
    rollout: list[int]
    derived: dict[str, bool] = field(default_factory=dict)  # role -> null in the config
    learner_sft: list[int] = field(default_factory=list)

    def describe(self) -> str:
        def one(role: str, counts: list[int]) -> str:
            source = "derived" if self.derived.get(role) else "config"
            shown = str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))
            return f"{role} {shown} ({source})"
        if self.learner_sft and self.learner_sft != self.learner:
            return ("threads: " + one("learner", self.learner) + f" in RL, {one('learner', self.learner_sft)}"
                    f" in SFT, {one('rollout', self.rollout)}")
        return "threads: " + ", ".join([one("learner", self.learner), one("rollout", self.rollout)])


def split_pipelined(cores: int) -> tuple[int, int]:
    """(learner cores, rollout cores) of a node that hosts both roles in the pipelined schedule."""
    if cores <= 1:
        return 1, 1  # nothing to split: both on the one core
    rollout = min(cores - 1, max(1, round(cores * PIPELINED_ROLLOUT_SHARE)))
    return cores - rollout, rollout


def plan_threads(schedule: str, *, learner_threads: int | None, rollout_threads: int | None,
                 learner_nodes: Sequence[str], engine_nodes: Sequence[str],
                 node_cpus: dict[str, float]) -> ThreadPlan:
    """Each actor's thread count: the configured one, else its node's cores for its phase.

    ``learner_nodes[i]`` / ``engine_nodes[j]``: the node learner rank i / engine j was placed
    on; ``node_cpus``: each node's CPUs as Ray counts them. Serial and colocated: a role's
    actors on a node share all its cores (their phases never overlap the other role's).
    Pipelined: a node holding both roles is split (``PIPELINED_ROLLOUT_SHARE``), then each
    role's share is divided among its actors there."""
    def cores(node: str) -> int:
        return max(1, int(node_cpus.get(node, 1)))

    def share(node: str, role: str, overlapped: bool = True) -> int:
        own = list(learner_nodes if role == "learner" else engine_nodes).count(node)
        other = list(engine_nodes if role == "learner" else learner_nodes).count(node)
        total = cores(node)
        if schedule == "pipelined" and other and overlapped:
            learner_cores, rollout_cores = split_pipelined(total)
            total = learner_cores if role == "learner" else rollout_cores
        return max(1, total // max(own, 1))

    learner = [learner_threads or share(node, "learner") for node in learner_nodes]
    rollout = [rollout_threads or share(node, "rollout") for node in engine_nodes]
    learner_sft = [learner_threads or share(node, "learner", overlapped=False) for node in learner_nodes]
    return ThreadPlan(learner, rollout, {"learner": learner_threads is None, "rollout": rollout_threads is None},
                      learner_sft)


def plan_for_run(cfg: Any, placement: Any) -> ThreadPlan:
    """``plan_threads`` for a run's config and its placed groups (actors/placement.py)."""
    from actors.placement import node_cpus

    engine_nodes = []
    for index in range(cfg.rollout.num_engines):
        group, bundle = placement.engine_slot(index)
        engine_nodes.append(placement.nodes(group)[bundle])
    return plan_threads(cfg.cluster.schedule, learner_threads=cfg.learner.threads,
                        rollout_threads=cfg.rollout.threads,
                        learner_nodes=placement.nodes(placement.learner)[:cfg.learner.num_ranks],
                        engine_nodes=engine_nodes, node_cpus=node_cpus())


def threads_metrics(learner: Sequence[dict[str, Any]], rollout: Sequence[dict[str, Any]],
                    reference: dict[str, Any] | None = None) -> dict[str, float]:
    """``perf/threads/*``: the torch threads read back from each rank and engine (the
    fewest, when they differ) and from the reference worker, if there is one."""
    metrics: dict[str, float] = {}
    if learner:
        metrics["threads/learner"] = float(min(r["torch"] for r in learner))
    if rollout:
        metrics["threads/rollout"] = float(min(r["torch"] for r in rollout))
    if reference:
        metrics["threads/reference"] = float(reference["torch"])
    return metrics


class RunThreads:
    """A run's thread plan and the counts its actors read back, stage by stage."""

    def __init__(self, plan: ThreadPlan, schedule: str) -> None:
        self.plan, self.schedule = plan, schedule
        self.read: dict[str, float] = {}
        self._engines: list[dict[str, Any]] = []
        self._reference: dict[str, Any] | None = None

    def read_back(self, learner: Any, engines: Sequence[Any], reference: Any = None) -> str:
        """Ask every rank and engine (and the reference worker: the engines' threads, used after
        they generate) what it computes on; the console line saying so."""
        import ray

        self._engines = ray.get([engine.threads.remote() for engine in engines])
        self._reference = reference.threads() if reference is not None else None
        self.read = threads_metrics(learner.threads(), self._engines, self._reference)
        read = ", ".join(f"{key.split('/')[1]} {value:g}" for key, value in self.read.items())
        return f"schedule: {self.schedule}; {self.plan.describe()}; read back: {read}"

    def enter_rl(self, learner: Any) -> None:
        """The RL stage starts: ranks whose share differs from SFT's (pipelined) switch to it."""
        if self.plan.learner != self.plan.learner_sft:
            self.read = threads_metrics(learner.set_threads(self.plan.learner), self._engines, self._reference)

    def metrics(self, stage: str) -> dict[str, float]:
        """``perf`` entries of a step of ``stage`` (an SFT step has no engine working)."""
        return dict(self.read) if stage == "rl" else {k: v for k, v in self.read.items() if k == "threads/learner"}


def runtime_env(threads: int, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ray's ``runtime_env`` for an actor computing on ``threads`` threads (``base``'s
    env_vars kept): Ray leaves an ``OMP_NUM_THREADS`` given here as it is."""
    env = dict(base or {})
    env["env_vars"] = {**env.get("env_vars", {}), THREADS_ENV: str(int(threads))}
    return env


def apply_threads(threads: int | None) -> None:
    """Inside an actor, before its engine is built: torch's intra-op pool at ``threads``
    (vLLM's CPU worker turns ``torch.set_num_threads`` into a no-op once it starts)."""
    if threads is None:
        return
    import torch

    os.environ[THREADS_ENV] = str(int(threads))
    torch.set_num_threads(int(threads))


def read_threads() -> dict[str, Any]:
    """What this process computes on: torch's intra-op threads, the OpenMP setting it
    started with, and the cores it may run on."""
    import torch

    return {"torch": torch.get_num_threads(), "omp_env": os.environ.get(THREADS_ENV),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


__all__ = ["PIPELINED_ROLLOUT_SHARE", "RunThreads", "ThreadPlan", "apply_threads", "plan_for_run", "plan_threads",
           "read_threads", "runtime_env", "split_pipelined", "threads_metrics"]
