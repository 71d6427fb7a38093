"""Checkpoint pieces that are not DeepSpeed's: RNG state and JSON state, stored as plain
JSON (nothing that needs unpickling), and the atomic publication of a finished folder."""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

LEARNER_DIR = "learner"


def deepspeed_safe_globals() -> list[type]:
    """The DeepSpeed classes its checkpoint files pickle (plain data holders). With them
    allowlisted, every ``.pt`` file of a learner checkpoint loads with
    ``torch.load(..., weights_only=True)``; everything else we write is JSON or safetensors."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_torch_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """A checkpoint ``.pt`` file, loaded without executing arbitrary pickled code."""
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


class WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose loads are ``weights_only=True``.

    DeepSpeed's ``TorchCheckpointEngine.load`` calls ``torch.load(..., weights_only=False)``
    and ``engine.load_checkpoint`` takes no argument to change that; every file it reads
    (model states, ZeRO optimizer states) goes through ``checkpoint_engine.load``, so the
    learner puts this wrapper in its place while it loads. Everything else is the wrapped
    engine's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_torch_file(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def weights_only_loads(engine: Any) -> Iterator[None]:
    """While inside, ``engine.load_checkpoint`` unpickles nothing but tensors and allowlisted
    DeepSpeed data classes."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = WeightsOnlyLoads(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} is missing")
    return json.loads(path.read_text())


def staging_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp")


def publish(staging: Path, final: Path) -> None:
    """Replace ``final`` by the finished ``staging`` folder so ``final`` only ever appears
    complete (an older copy is moved aside first and removed after)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
