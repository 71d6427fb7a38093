"""Rollout engines as Ray actors: one engine per actor, resources from ``RolloutConfig``.

Locally an actor asks for a fraction of the CPUs and runs its engine in its own process
(vLLM's in-process "uni" executor). On a cluster an engine asks for GPUs: with tensor
parallelism the actor sits in a placement group of ``tensor_parallel_size`` GPU bundles
and vLLM's Ray executor places one worker in each (it uses the actor's placement group;
``VLLM_RAY_BUNDLE_INDICES`` names the bundles when several engines share one group).

The actor exposes the engine's methods unchanged, including vLLM's weight-transfer control
plane (init / start / update / finish), so a learner drives it as a ``VLLMWeightSyncClient``.
Ray does not restart them (a restarted engine would come back on the initial weights):
actors/supervision.py replaces a dead one with ``start_rollout_actor`` and resends the weights.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.placement import in_bundle
from actors.threads import apply_threads, read_threads, runtime_env
from personadual.fault_hooks import fault_window
from personadual.modes import Mode
from personadual.records import Prompt, Rollout
from rollout.config import RolloutConfig
from rollout.engine import make_engine

if TYPE_CHECKING:
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, WeightTransferUpdateRequest

ENGINE_START_TIMEOUT_S = 1800.0  # a first start compiles kernels; 8B weights load for minutes


@ray.remote
class RolloutActor:
    def __init__(self, model_path: str, config: RolloutConfig, engine_index: int = 0,
                 sleep_between_phases: bool = False) -> None:
        os.dup2(2, 1)  # diagnostics to stderr: the driver's stdout may carry a benchmark's JSON
        self.engine_index = engine_index
        # Before the engine: vLLM's CPU worker makes torch.set_num_threads a no-op once it starts.
        apply_threads(config.threads)
        self.engine = make_engine(model_path, config, engine_index=engine_index,
                                  sleep_between_phases=sleep_between_phases)
        from actors.console import quiet_libraries

        quiet_libraries()  # after vLLM set up its loggers: drops its per-sync false alarm

    def ready(self) -> dict[str, Any]:
        return {"engine_index": self.engine_index, "engine": type(self.engine).__name__,
                "num_workers": self.engine.num_workers(), "weight_version": self.engine.weight_version,
                "node": ray.get_runtime_context().get_node_id()}

    def generate(self, prompts: Sequence[Prompt], *, forced: bool, n: int, greedy: bool = False,
                 histories: Sequence[Sequence[dict[str, str]]] | None = None,
                 modes: Sequence[Mode] | None = None, seeds: Sequence[int] | None = None) -> list[Rollout]:
        with fault_window("generate", f"engine{self.engine_index}"):
            return self.engine.generate(prompts, forced=forced, n=n, greedy=greedy, histories=histories,
                                        modes=modes, seeds=seeds)

    def probe(self, prompts: Sequence[Prompt]) -> list[Rollout]:
        """Greedy answers with their log-probs, for the weight-sync check (actors/weight_sync.py);
        not a rollout, so outside the generation fault window."""
        return self.engine.generate(prompts, forced=False, n=1, greedy=True)

    def threads(self) -> dict[str, Any]:
        return read_threads()

    def sleep(self) -> bool:
        """Free the device for the learner (colocated schedule); False where the engine cannot."""
        return self.engine.sleep()

    def wake_up(self) -> None:
        self.engine.wake_up()

    def get_weight_version(self) -> int:
        return self.engine.weight_version

    def update_weight_version(self, version: int) -> int:
        return self.engine.update_weight_version(version)

    def num_workers(self) -> int:
        return self.engine.num_workers()

    def weight_transfer_backend(self) -> str | None:
        return self.engine.weight_transfer_backend()

    # vLLM's own RayVLLMWeightSyncClient wraps the dicts in request objects: accept both.
    def init_weight_transfer_engine(self, init_info: dict[str, Any] | WeightTransferInitRequest) -> None:
        self.engine.init_weight_transfer_engine(getattr(init_info, "init_info", init_info))

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]] | WeightTransferUpdateRequest,
                       ) -> None:
        with fault_window("sync", f"engine{self.engine_index}"):
            self.engine.update_weights(getattr(update_info, "update_info", update_info))

    def finish_weight_update(self, weight_version: str | int | None = None,
                             checksums: list[int | None] | None = None) -> int:
        """The update goes live at ``weight_version``, after the received buckets were checked
        against the sender's ``checksums``; returns the engine's version."""
        self.engine.finish_weight_update(weight_version, checksums)
        return self.engine.weight_version

    def loaded_tensors(self) -> list[str]:
        return self.engine.loaded_tensors()

    def shutdown_weight_transfer_engine(self) -> None:
        self.engine.shutdown_weight_transfer_engine()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(engine, *args, **kwargs)`` in the actor (inspection, e.g. reading its weights)."""
        return fn(self.engine, *args, **kwargs)


def actor_options(config: RolloutConfig, engine_index: int,
                  group: PlacementGroup | None, *, own_group: bool = False,
                  bundle: int | None = None) -> dict[str, Any]:
    """Ray options of engine ``engine_index``. In a placement group shared by the engines,
    engine i owns bundles [i*tp, (i+1)*tp) (bundle i without tensor parallelism); in a group
    of its own (``own_group``, actors/placement.py), bundles [0, tp); ``bundle`` names the
    first one outright (the colocated group: engine i beside learner rank i). With
    ``config.threads`` set the actor's process starts with that many OpenMP threads."""
    tp = config.tensor_parallel_size
    first = bundle if bundle is not None else 0 if own_group else engine_index * tp
    threads = {"runtime_env": runtime_env(config.threads)} if config.threads is not None else {}
    if tp == 1:
        return {"num_cpus": config.num_cpus_per_engine, "num_gpus": config.num_gpus_per_engine,
                **in_bundle(group, first), **threads}
    bundles = list(range(first, first + tp)) if group is not None else list(range(tp))
    if group is None:
        group = placement_group([{"GPU": 1, "CPU": config.num_cpus_per_engine}] * tp, strategy="PACK")
        ray.get(group.ready(), timeout=ENGINE_START_TIMEOUT_S)
    # The actor itself holds no GPU: vLLM's Ray workers take one per bundle.
    return {"num_cpus": 0, "num_gpus": 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=bundles[0], placement_group_capture_child_tasks=True),
            "runtime_env": _with_threads(config.threads, {"env_vars": {"VLLM_RAY_BUNDLE_INDICES": ",".join(
                map(str, bundles))}})}


def _with_threads(threads: int | None, env: dict[str, Any]) -> dict[str, Any]:
    return runtime_env(threads, env) if threads is not None else env


def create_rollout_actors(model_path: str | Path, config: RolloutConfig,
                          placement_group: PlacementGroup | None = None, *,
                          start_timeout_s: float = ENGINE_START_TIMEOUT_S, **placement: Any) -> list[ActorHandle]:
    """``launch_rollout_actors`` and wait until every engine can generate."""
    actors = launch_rollout_actors(model_path, config, placement_group, **placement)
    engines_ready(actors, start_timeout_s)
    return actors


def launch_rollout_actors(model_path: str | Path, config: RolloutConfig,
                          placement_group: PlacementGroup | None = None, *,
                          placement_groups: Sequence[PlacementGroup] | None = None,
                          slots: Sequence[tuple[PlacementGroup, int]] | None = None,
                          threads: Sequence[int] | None = None,
                          sleep_between_phases: bool = False) -> list[ActorHandle]:
    """Start ``config.num_engines`` engines without waiting for them (``engines_ready``
    does): each in ``placement_groups[i]`` when given (a group per engine), or at
    ``slots[i]`` (group, first bundle), else in ``placement_group``. ``threads[i]``: engine
    i's torch/OpenMP threads (default ``config.threads``)."""
    config.validate()
    if placement_groups is not None and len(placement_groups) != config.num_engines:
        raise ValueError(f"{len(placement_groups)} placement groups for {config.num_engines} rollout engines")

    def options(index: int, own: RolloutConfig) -> dict[str, Any]:
        if slots is not None:
            return actor_options(own, index, slots[index][0], bundle=slots[index][1])
        if placement_groups is not None:
            return actor_options(own, index, placement_groups[index], own_group=True)
        return actor_options(own, index, placement_group)

    configs = [config if threads is None else dataclasses.replace(config, threads=threads[index])
               for index in range(config.num_engines)]
    return [RolloutActor.options(**options(index, own)).remote(str(model_path), own, index, sleep_between_phases)
            for index, own in enumerate(configs)]


def engines_ready(actors: Sequence[ActorHandle], start_timeout_s: float = ENGINE_START_TIMEOUT_S) -> None:
    """Wait until every engine can generate; on a failure or the timeout, kill them all."""
    try:
        ray.get([actor.ready.remote() for actor in actors], timeout=start_timeout_s)
    except Exception:
        for actor in actors:
            ray.kill(actor)
        raise


def start_rollout_actor(model_path: str | Path, config: RolloutConfig, engine_index: int,
                        placement_group: PlacementGroup | None = None, *, bundle: int | None = None,
                        sleep_between_phases: bool = False,
                        start_timeout_s: float = ENGINE_START_TIMEOUT_S) -> ActorHandle:
    """One engine, ``engine_index``, in its own ``placement_group`` when given (a replacement
    takes the bundle its dead predecessor freed; ``bundle``: that bundle's index in a shared
    group); returns once it can generate."""
    actor = RolloutActor.options(**actor_options(config, engine_index, placement_group,
                                                 own_group=placement_group is not None, bundle=bundle)).remote(
        str(model_path), config, engine_index, sleep_between_phases)
    try:
        ray.get(actor.ready.remote(), timeout=start_timeout_s)
    except Exception:
        ray.kill(actor)
        raise
    return actor
