"""The learner as a group of Ray actors, one per data-parallel rank.

Each actor holds one ``learner.engine.Learner``; the ranks meet in a torch.distributed
rendezvous at rank 0's node address on a free port (127.0.0.1 locally; gloo on CPU, NCCL
on GPU), every collective bounded by ``collective_timeout_s``. The group computes DualGRPO
advantages over the whole scored batch, shards it by token count, runs every rank's step
concurrently and returns rank 0's metrics (the ranks reduce them among themselves).

Batches are built (``learner.batch``, torch) inside the methods that send them: the driver
imports this module before it starts its actors, and torch's import (about 2 s of one core)
would hold every actor's start back (docs/ARCHITECTURE.md, "The driver, by job").
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import ray

from actors.placement import in_bundle
from actors.supervision import dead_actors, one_line
from actors.threads import apply_threads, read_threads, runtime_env
from actors.waiting import gather_first_failure
from learner.config import LearnerConfig
from personadual.algo_config import AlgoConfig
from personadual.fault_hooks import fault_window
from personadual.records import Scored

if TYPE_CHECKING:
    from learner.batch import PolicyBatch, SftSample
    from personadual.sft_data import TokenizedExample


@ray.remote
class LearnerActor:
    """One learner rank. Created bare; ``setup`` joins the group and builds the engine."""

    def __init__(self, rank: int, world_size: int, threads: int | None = None) -> None:
        apply_threads(threads)  # before DeepSpeed and the model (actors/threads.py)
        # Ray forwards a worker's stdout to the driver's stdout, which may carry machine-
        # readable output (a benchmark's JSON); a rank's logs (DeepSpeed's go to stdout)
        # are diagnostics, so they go to stderr.
        os.dup2(2, 1)
        self.rank, self.world_size = rank, world_size
        self.learner = None
        self.weight_sender = None

    def address(self) -> tuple[str, int]:
        from learner.distributed import free_port

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def setup(self, config: LearnerConfig, algo: AlgoConfig, model_path: str, master_address: str,
              master_port: int) -> int:
        from learner import distributed
        from learner.engine import Learner

        distributed.init_process_group(rank=self.rank, world_size=self.world_size, master_address=master_address,
                                       master_port=master_port, backend=distributed.backend_for(config.device),
                                       timeout_s=config.collective_timeout_s)
        self.learner = Learner(config, model_path, algo=algo, rank=self.rank, world_size=self.world_size,
                               device=config.device)
        return self.learner.weight_version

    def pid(self) -> int:
        return os.getpid()

    def threads(self) -> dict[str, Any]:
        return read_threads()

    def set_threads(self, threads: int) -> dict[str, Any]:
        apply_threads(threads)
        return read_threads()

    def sft_step(self, samples: list[SftSample]) -> dict[str, float]:
        with fault_window("train", f"rank{self.rank}"):
            return self.learner.sft_step(samples)

    def policy_step(self, batch: PolicyBatch) -> dict[str, float]:
        with fault_window("train", f"rank{self.rank}"):
            return self.learner.policy_step(batch)

    def weight_metadata(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(name, str(dtype).removeprefix("torch."), shape) for name, dtype, shape in
                self.learner.weight_metadata()]

    def save_checkpoint(self, path: str, client_state: dict[str, Any], reference_dir: str | None = None) -> None:
        self.learner.save_checkpoint(path, client_state, reference_dir)

    def load_checkpoint(self, path: str) -> tuple[dict[str, Any], int]:
        client_state = self.learner.load_checkpoint(path)
        return client_state, self.learner.weight_version

    def save_hf(self, path: str) -> None:
        self.learner.save_hf(path)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.learner, *args, **kwargs)

    def init_weight_sender(self, backend: str, master_address: str, master_port: int, world_size: int,
                           bucket_bytes: int, timeout_s: float, engines: list[Any]) -> None:
        """Join the weight-transfer group to the rollout engines (rank 0 sends; the others
        only take part in the ZeRO-3 gathers). The engines' actor handles are vLLM's
        weight-sync control plane."""
        from actors.weight_sync import EngineSyncClient
        from learner.transfer_sender import make_weight_sender

        self._close_weight_sender()
        self.sync_client = EngineSyncClient(engines, timeout_s)
        self.weight_sender = make_weight_sender(
            self.learner, rank=self.rank, backend=backend, master_address=master_address,
            master_port=master_port, world_size=world_size, bucket_bytes=bucket_bytes, timeout_s=timeout_s,
            client=self.sync_client)

    def send_weights(self, checksums: bool = True) -> dict[str, float]:
        """Send the current weights; the engines take them live at this rank's weight version
        (after checking each bucket's hash when ``checksums``)."""
        self.sync_client.version = self.learner.weight_version
        self.sync_client.checksums = checksums
        self.weight_sender.send_weights()
        return dict(getattr(self.weight_sender, "last_round", {}))

    def _close_weight_sender(self) -> None:
        if self.weight_sender is not None:
            self.weight_sender.shutdown()  # removes its shared bucket file
            self.weight_sender = None

    def close(self) -> None:
        import torch.distributed as dist

        self._close_weight_sender()
        if self.learner is not None:
            self.learner.close()
            self.learner = None
        if dist.is_initialized():
            dist.destroy_process_group()


class LearnerRankDied(RuntimeError):
    """A learner rank's process is gone: its optimizer state and collectives went with it, so
    the group cannot go on (the run stops; ``--resume`` continues from a checkpoint)."""



def configure(config: LearnerConfig, algo: AlgoConfig, *, total_sft_steps: int | None = None,
              total_rl_steps: int | None = None) -> LearnerConfig:
    """The learner config with each optimizer schedule spanning its stage's optimizer steps
    (an RL step takes ``algo.updates_per_step`` of them)."""
    config = dataclasses.replace(config)
    if total_sft_steps is not None:
        config.sft_optim = dataclasses.replace(config.sft_optim, total_steps=max(1, int(total_sft_steps)))
    if total_rl_steps is not None:
        steps = max(1, int(total_rl_steps)) * algo.updates_per_step
        config.optim = dataclasses.replace(config.optim, total_steps=steps)
    config.validate()
    return config


class LearnerGroup:
    def __init__(self, config: LearnerConfig, model_path: str | Path, *, algo: AlgoConfig | None = None,
                 total_sft_steps: int | None = None, total_rl_steps: int | None = None,
                 placement_group: Any = None, rollout_temperature: float = 1.0,
                 threads: Sequence[int] | None = None, set_up: bool = True) -> None:
        """``config``: how to train (ranks, their resources, ...); ``algo``: the objective (its
        defaults when None); ``rollout_temperature``: what the engines sample at, so the
        learner compares its log-probs with theirs under the same tempered distribution;
        ``threads``: each rank's torch/OpenMP threads (actors/threads.py; default
        ``learner.threads``, else Ray's reservation). ``set_up=False`` returns once the ranks'
        processes are starting; ``set_up`` then gives them the stage lengths (the driver
        starts the ranks while it still loads the data those lengths come from)."""
        self.algo = algo if algo is not None else AlgoConfig()
        self.rollout_temperature = rollout_temperature
        self.config = configure(config, self.algo, total_sft_steps=total_sft_steps, total_rl_steps=total_rl_steps)
        self.model_path = str(model_path)
        self.num_ranks = self.config.num_ranks
        self.actors = []
        self.failed = False  # a rank died: shut down without waiting for the others' goodbyes
        for rank in range(self.num_ranks):
            count = threads[rank] if threads is not None else self.config.threads
            options = {"runtime_env": runtime_env(count)} if count is not None else {}
            self.actors.append(LearnerActor.options(num_cpus=self.config.num_cpus_per_rank,
                                                    num_gpus=self.config.num_gpus_per_rank,
                                                    **in_bundle(placement_group, rank), **options,
                                                    ).remote(rank, self.num_ranks, count))
        if set_up:
            self.set_up()

    def set_up(self, *, total_sft_steps: int | None = None, total_rl_steps: int | None = None) -> None:
        """Each rank builds its model, optimizer and process group; returns once all have.
        The totals, when given, set each optimizer schedule's length (``configure``)."""
        self.config = configure(self.config, self.algo, total_sft_steps=total_sft_steps, total_rl_steps=total_rl_steps)
        try:
            self.master_address, self.master_port = ray.get(self.actors[0].address.remote())
            versions = gather_first_failure([actor.setup.remote(self.config, self.algo, self.model_path,
                                                                self.master_address, self.master_port)
                                             for actor in self.actors])
        except BaseException:
            self.shutdown()
            raise
        self._weight_version = versions[0]

    @property
    def weight_version(self) -> int:
        """Optimizer steps taken so far (restored with a checkpoint)."""
        return self._weight_version

    def _all(self, method: str, per_rank: Sequence[Any] | None = None, *args: Any) -> list[Any]:
        refs = [getattr(actor, method).remote(*((per_rank[rank],) if per_rank is not None else ()), *args)
                for rank, actor in enumerate(self.actors)]
        return self._gather(refs, method)

    def _gather(self, refs: list[ray.ObjectRef], what: str) -> list[Any]:
        """``gather_first_failure``, naming the rank when a failure comes from a rank that died (its peers
        then fail too, e.g. a gloo "connection closed", which would hide the cause)."""
        try:
            return gather_first_failure(refs)
        except Exception as error:
            dead = list(dead_actors(self.actors, "pid"))
            if not dead:
                raise
            self.failed = True
            raise LearnerRankDied(f"learner rank {', '.join(map(str, dead))} of {self.num_ranks} died during "
                                  f"{what} ({one_line(error)})") from error

    def pids(self) -> list[int]:
        return self._gather([actor.pid.remote() for actor in self.actors], "pid")

    def threads(self) -> list[dict[str, Any]]:
        """Each rank's threads as read inside it (actors/threads.py, ``read_threads``)."""
        return self._gather([actor.threads.remote() for actor in self.actors], "threads")

    def set_threads(self, threads: Sequence[int]) -> list[dict[str, Any]]:
        """Each rank to ``threads[rank]`` threads (e.g. the RL stage's share of a node shared
        with a pipelined engine); the counts read back."""
        return self._gather([actor.set_threads.remote(count) for actor, count in zip(self.actors, threads)],
                            "set_threads")

    def sft_step(self, examples: Sequence[TokenizedExample | SftSample]) -> dict[str, float]:
        from learner.batch import SftSample, shard  # torch: once the actors have started (module docstring)

        samples = [SftSample(e.prompt_token_ids, e.response_token_ids) for e in examples]
        results = self._all("sft_step", [shard(samples, r, self.num_ranks) for r in range(self.num_ranks)])
        self._weight_version = int(results[0]["weight_version"])
        return results[0]

    def build_batch(self, scored: Sequence[Scored]) -> PolicyBatch:
        from learner.batch import build_policy_batch

        return build_policy_batch(scored, advantage=self.algo.advantage, scale=self.algo.scale,
                                  sampling_temperature=self.rollout_temperature)

    def policy_step(self, scored: Sequence[Scored]) -> dict[str, float]:
        from learner.batch import shard

        batch = self.build_batch(scored)
        by_prompt = self.config.shared_prefix  # each prompt on one rank: computed once in the step
        results = self._all("policy_step", [shard(batch, r, self.num_ranks, by_prompt=by_prompt)
                                            for r in range(self.num_ranks)])
        self._weight_version = int(results[0]["weight_version"])
        return results[0]

    def weight_metadata(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype name, full shape) of every tensor a weight sync sends, in its order."""
        return ray.get(self.actors[0].weight_metadata.remote())

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``fn(learner, *args, **kwargs)`` on every rank at once (for collectives such as a
        weight-transfer engine's send); the per-rank results."""
        return self._gather(self.call_async(fn, *args, **kwargs), getattr(fn, "__name__", "call"))

    def call_async(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        return [actor.call.remote(fn, *args, **kwargs) for actor in self.actors]

    def init_weight_sender(self, *, backend: str, engines: list[Any], world_size: int, bucket_bytes: int,
                           timeout_s: float) -> None:
        """A transfer group of its own from rank 0 to every engine worker, rendezvousing at
        rank 0's node on a fresh port (not the learner's default group)."""
        host, port = ray.get(self.actors[0].address.remote())
        self._all("init_weight_sender", None, backend, host, port, world_size, bucket_bytes, timeout_s, engines)

    def send_weights(self, checksums: bool = True) -> dict[str, float]:
        """Broadcast the current weights to every engine (each bucket hashed and checked at the
        engines when ``checksums``); rank 0's timing and bytes."""
        return self._all("send_weights", None, checksums)[0]

    def save_checkpoint(self, path: str | Path, client_state: dict[str, Any],
                        reference_dir: str | Path | None = None) -> None:
        self._all("save_checkpoint", None, str(path), client_state,
                  None if reference_dir is None else str(reference_dir))

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        results = self._all("load_checkpoint", None, str(path))
        client_state, self._weight_version = results[0]
        return client_state

    def save_hf(self, path: str | Path) -> None:
        self._all("save_hf", None, str(path))

    def shutdown(self) -> None:
        """Close every rank's engine and process group, then end the actors."""
        if not self.actors:
            return
        if not self.failed:  # after a rank died the others sit in a collective: no goodbyes
            try:
                ray.get([actor.close.remote() for actor in self.actors], timeout=30)
            except Exception:  # a dead or hung rank must not keep the others alive
                pass
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
