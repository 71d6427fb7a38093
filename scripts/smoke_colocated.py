"""The GPU smoke test's colocated schedule (``bash scripts/gpu_smoke.sh --schedule colocated``):
learner and engine on ONE GPU, the engine asleep while the learner trains, the new weights
handed over by CUDA IPC instead of a host-staged broadcast.

- The engine process is built with ``sleep_between_phases``: vLLM's sleep mode (level 2:
  KV cache freed, weights dropped, rewritten by the next update), or for the HF engine its
  model moved to host memory. ``EnginesAsleepLearner`` puts it to sleep before the policy
  step and wakes it after, as ``actors/schedule.py`` does for a colocated Ray run.
- ``IpcSync`` shares each full tensor of the learner (on the GPU) with the engine process
  through ``torch.multiprocessing``'s CUDA IPC handles; the engine rebuilds them as views
  of the learner's memory and copies them into its model (``load_ipc``). No bytes cross the
  host. Without CUDA (``--device cpu``) there is no IPC: the host-staged sync is kept.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class EnginesAsleepLearner:
    """A ``PolicyLearner`` whose policy step runs while the engine process sleeps."""

    def __init__(self, learner: Any, engine: Any) -> None:
        self.learner, self.engine = learner, engine
        self.slept: list[bool] = []  # per step: whether the engine really gave the device up

    @property
    def weight_version(self) -> int:
        return self.learner.weight_version

    def policy_step(self, scored: list[Any]) -> dict[str, Any]:
        self.slept.append(bool(self.engine.call("sleep")))
        if torch.cuda.is_available():
            free_before = torch.cuda.mem_get_info()[0]
        try:
            metrics = self.learner.policy_step(scored)
        finally:
            self.engine.call("wake_up")
        if torch.cuda.is_available():
            metrics["gpu_free_gib_while_engine_slept"] = free_before / 2**30
        return metrics


class IpcSync:
    """Learner -> engine on the same GPU through CUDA IPC handles, one call per update."""

    def __init__(self, learner: Any, engine: Any) -> None:
        self.learner, self.engine = learner, engine

    def push(self) -> dict[str, float]:
        from torch.multiprocessing.reductions import reduce_tensor

        start = time.perf_counter()
        # Kept alive until the engine has copied them: the handles point into this memory.
        tensors = [(name, tensor.contiguous()) for name, tensor in self.learner.full_weights()]
        torch.cuda.synchronize()
        handles = [(name, reduce_tensor(tensor)) for name, tensor in tensors]
        self.engine.call("load_ipc", handles, self.learner.weight_version)
        sent = sum(tensor.numel() * tensor.element_size() for _, tensor in tensors)
        del tensors
        return {"seconds": time.perf_counter() - start, "bytes": float(sent)}


def load_ipc(engine: Any, handles: list[tuple[str, tuple[Any, tuple[Any, ...]]]], version: int) -> int:
    """In the engine process: rebuild the learner's tensors from their handles and load them."""
    named = [(name, rebuild(*args)) for name, (rebuild, args) in handles]
    loaded = engine.load_weights(named, version)
    torch.cuda.synchronize()
    return loaded
