"""A learner rank's checkpoint: DeepSpeed's state beside what is not DeepSpeed's (RNG state
and JSON state, stored as plain JSON: nothing that needs unpickling), the shared frozen
reference, and the atomic publication of a finished folder."""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from learner import distributed
from personadual.fault_hooks import fault_point

LEARNER_DIR = "learner"
DS_TAG = "state"


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


def save_learner(learner: Any, path: str | Path, client_state: dict[str, Any],
                 reference_dir: str | Path | None = None) -> None:
    """``learner``'s model, optimizer, scheduler, step counters, RNG, the reference (in the RL stage) and
    the caller's ``client_state`` (JSON: e.g. the data position), under ``path/learner``,
    which appears only complete.

    The reference is frozen for the whole RL stage, so with ``reference_dir`` it is written
    there once (skipped when already complete) and the checkpoint only names it, instead of
    a full copy of the model in every checkpoint."""
    final = Path(path) / LEARNER_DIR
    staging = staging_dir(final)
    if learner.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    learner.engine.save_checkpoint(str(staging / "deepspeed"), tag=DS_TAG, save_latest=False)
    fault_point("save", f"rank{learner.rank}")  # tests crash a save here: written, not yet published
    write_json(staging / f"rng_rank{learner.rank}.json", rng_state())
    reference_link = None
    if learner.reference is not None and reference_dir is not None:
        shared = Path(reference_dir)
        if not (shared / "config.json").is_file():  # published whole, so present means complete
            if learner.rank == 0:
                shutil.rmtree(staging_dir(shared), ignore_errors=True)
                shared.parent.mkdir(parents=True, exist_ok=True)
            learner._write_hf(learner.reference, staging_dir(shared), tokenizer=False)
            if learner.rank == 0:
                publish(staging_dir(shared), shared)
        reference_link = os.path.relpath(shared, final)
    elif learner.reference is not None:
        learner._write_hf(learner.reference, staging / "reference", tokenizer=False)
    distributed.barrier()
    if learner.rank == 0:
        write_json(staging / "client_state.json", client_state)
        write_json(staging / "learner_state.json", {
            "stage": learner.stage, "weight_version": learner.weight_version, "steps": learner.steps,
            "world_size": learner.world_size, "zero_stage": learner.config.zero_stage, "precision": learner.precision,
            "has_reference": learner.reference is not None, "reference_dir": reference_link,
            "config": asdict(learner.config), "algo": asdict(learner.algo)})
        publish(staging, final)
    distributed.barrier()

def load_learner(learner: Any, path: str | Path) -> dict[str, Any]:
    """Restore into ``learner`` what ``save_learner`` wrote; returns its ``client_state``."""
    root = Path(path) / LEARNER_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint {path}: no learner state ({root} is missing)")
    state = read_json(root / "learner_state.json")
    if (state["world_size"], state["zero_stage"]) != (learner.world_size, learner.config.zero_stage):
        raise ValueError(f"checkpoint {path}: saved by {state['world_size']} ranks at ZeRO-{state['zero_stage']}, "
                         f"this learner has {learner.world_size} at ZeRO-{learner.config.zero_stage}")
    stage = state["stage"]
    if stage is not None:
        learner._reset_optimizer(stage)
    learner.reference = None
    if state["has_reference"]:
        linked = state.get("reference_dir")
        reference = (root / linked).resolve() if linked else root / "reference"
        if not (reference / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {path}: its reference model {reference} is missing")
        learner._build_reference(reference)
    with weights_only_loads(learner.engine):
        learner.engine.load_checkpoint(str(root / "deepspeed"), tag=DS_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
    learner.stage = stage
    learner.weight_version = int(state["weight_version"])
    learner.steps = {key: int(value) for key, value in state["steps"].items()}
    rng_file = root / f"rng_rank{learner.rank}.json"
    if rng_file.is_file():
        set_rng_state(read_json(rng_file))
    return read_json(root / "client_state.json")
