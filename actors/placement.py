"""Placement groups from the config: the learner ranks, each rollout engine, the reward workers.

One group per role (one per engine), each bundle asking for what its actor takes:
- ``learner``: one bundle per rank (``learner.num_cpus_per_rank``, ``learner.num_gpus_per_rank``);
- ``rollout_<i>``: one bundle per engine, or with tensor parallelism one per TP worker
  (a GPU each; vLLM's Ray executor puts a worker in each bundle);
- ``reward``: one bundle per reward worker (``reward.num_cpus_per_worker``).
Every bundle of a role also asks for ``<role>.resources`` (custom node resources: the way
to pin a role to nodes). Groups are placed with ``cluster.placement_strategy``.

The same plan sizes the early resource check (``check_fits``: the run's totals against the
cluster's, and each bundle against the largest node), so what the check admits is what
the groups ask for. A group Ray cannot place within ``cluster.placement_timeout_s`` fails
the run with one line naming the group and its bundles instead of waiting forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import ray
from omegaconf import DictConfig
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.config import ConfigError
from actors.waiting import unfinished

Bundle = dict[str, float]


class PlacementError(ConfigError):
    """The cluster cannot place what the config asks for (launch.py: one line, exit 2)."""


@dataclass(frozen=True)
class GroupSpec:
    name: str  # learner | rollout_<i> | reward
    bundles: list[Bundle]
    strategy: str
    keys: str  # the config keys that size it, named in errors

    def describe(self) -> str:
        shapes: dict[str, int] = {}
        for bundle in self.bundles:
            shape = "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"
            shapes[shape] = shapes.get(shape, 0) + 1
        asked = " + ".join(f"{count} x {shape}" for shape, count in shapes.items())
        return f"placement group {self.name!r} ({asked}, {self.strategy}; set by {self.keys})"


def make_bundle(cpus: float, gpus: float, extra: dict[str, float] | None = None) -> Bundle:
    bundle = {"CPU": float(cpus), "GPU": float(gpus), **{k: float(v) for k, v in (extra or {}).items()}}
    return {key: amount for key, amount in bundle.items() if amount > 0}


def in_bundle(group: PlacementGroup | None, index: int) -> dict[str, PlacementGroupSchedulingStrategy]:
    """Ray actor options that put an actor in bundle ``index`` of ``group`` (none without one)."""
    if group is None:
        return {}
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}


def plan_groups(cfg: DictConfig) -> list[GroupSpec]:
    """The groups a run needs, learner first."""
    learner, rollout, reward = cfg.learner, cfg.rollout, cfg.reward
    strategy = cfg.cluster.placement_strategy
    learner_bundle = make_bundle(learner.num_cpus_per_rank, learner.num_gpus_per_rank, dict(learner.resources))
    specs = [GroupSpec("learner", [learner_bundle] * learner.num_ranks, strategy,
                       "learner.num_ranks, learner.num_cpus/gpus_per_rank, learner.resources")]
    tp = rollout.tensor_parallel_size
    if tp == 1:
        engine_bundles = [make_bundle(rollout.num_cpus_per_engine, rollout.num_gpus_per_engine,
                                      dict(rollout.resources))]
    else:  # one GPU per tensor-parallel worker, as vLLM's Ray executor takes them
        engine_bundles = [make_bundle(rollout.num_cpus_per_engine, 1.0, dict(rollout.resources))] * tp
    for index in range(rollout.num_engines):
        specs.append(GroupSpec(f"rollout_{index}", engine_bundles, strategy,
                               "rollout.num_cpus/gpus_per_engine, rollout.tensor_parallel_size, "
                               "rollout.resources"))
    reward_bundle = make_bundle(reward.num_cpus_per_worker, 0.0, dict(reward.resources))
    specs.append(GroupSpec("reward", [reward_bundle] * reward.num_workers, strategy,
                           "reward.num_workers, reward.num_cpus_per_worker, reward.resources"))
    return specs


def totals(specs: Iterable[GroupSpec]) -> Bundle:
    summed: Bundle = {}
    for spec in specs:
        for bundle in spec.bundles:
            for key, amount in bundle.items():
                summed[key] = summed.get(key, 0.0) + amount
    return summed


def check_fits(specs: list[GroupSpec], cluster_resources: Bundle, node_resources: list[Bundle]) -> None:
    """Fail at once, naming the keys, when the groups can never be placed: the run's total of
    some resource exceeds the cluster's, or a bundle fits on no node."""
    for resource, amount in sorted(totals(specs).items()):
        have = cluster_resources.get(resource, 0.0)
        if amount > have + 1e-9:
            users = [s.keys for s in specs if any(resource in b for b in s.bundles)]
            raise ConfigError(f"cluster: the run needs {amount:g} {resource} ({'; '.join(dict.fromkeys(users))}), "
                              f"the cluster has {have:g}")
    for spec in specs:
        for bundle in spec.bundles:
            if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in node_resources):
                raise ConfigError(f"cluster: no node can hold one bundle of the {spec.describe()}")
        if spec.strategy == "STRICT_PACK":
            whole = totals([spec])
            if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in whole.items()) for node in node_resources):
                raise ConfigError(f"cluster: no node can hold the whole {spec.describe()}")
        if spec.strategy == "STRICT_SPREAD" and len(spec.bundles) > len(node_resources):
            raise ConfigError(f"cluster: the {spec.describe()} needs {len(spec.bundles)} nodes, "
                              f"the cluster has {len(node_resources)}")


def cluster_shape() -> tuple[Bundle, list[Bundle]]:
    """The cluster's total resources and each live node's."""
    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    return dict(ray.cluster_resources()), nodes


class Placement:
    """The run's placement groups, created together and ready (or removed and failed)."""

    def __init__(self, specs: list[GroupSpec], groups: list[PlacementGroup]) -> None:
        self.specs = specs
        self.groups = groups
        self._by_name = dict(zip((s.name for s in specs), groups))

    @classmethod
    def create(cls, specs: list[GroupSpec], timeout_s: float) -> "Placement":
        groups: list[PlacementGroup] = []
        try:
            for spec in specs:
                groups.append(placement_group(spec.bundles, strategy=spec.strategy))
            placement = cls(specs, groups)
            placement.wait(timeout_s)
        except BaseException:
            for group in groups:
                remove_placement_group(group)
            raise
        return placement

    def wait(self, timeout_s: float) -> None:
        refs = {group.ready(): spec for spec, group in zip(self.specs, self.groups)}
        pending = unfinished(refs, timeout_s)
        if pending:
            waiting = list(pending.values())
            others = f" (and {len(waiting) - 1} more)" if len(waiting) > 1 else ""
            available = {k: round(v, 3) for k, v in sorted(ray.available_resources().items())
                         if k in ("CPU", "GPU") or not (k.startswith("node:") or "_group_" in k
                                                         or k in ("memory", "object_store_memory"))}
            raise PlacementError(f"{waiting[0].describe()} was not placed within {timeout_s:g} s "
                                 f"(cluster.placement_timeout_s){others}; free now: {available}")
        ray.get(list(refs))

    @property
    def learner(self) -> PlacementGroup:
        return self._by_name["learner"]

    @property
    def reward(self) -> PlacementGroup:
        return self._by_name["reward"]

    def engines(self) -> list[PlacementGroup]:
        return [group for spec, group in zip(self.specs, self.groups) if spec.name.startswith("rollout_")]

    def remove(self) -> None:
        for group in self.groups:
            try:
                remove_placement_group(group)
            except Exception:  # the cluster may already be gone at shutdown
                pass
        self.groups = []
        self._by_name = {}


__all__ = ["GroupSpec", "Placement", "PlacementError", "check_fits", "cluster_shape", "in_bundle", "make_bundle",
           "plan_groups", "totals"]
