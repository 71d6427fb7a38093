"""The rollout engine interface both engines implement, and the factory picking one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

from personadual.modes import Mode
from personadual.records import Prompt, Rollout
from rollout.config import RolloutConfig

if TYPE_CHECKING:  # torch: the driver imports this module before it starts its actors
    from personadual.weight_wire import ReceivedUpdate
    from rollout.weights import NamedTensors


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates Rollouts and takes new weights in place.

    The engine's weight version is stamped on every Rollout it returns. An engine is a
    vLLM ``VLLMWeightSyncClient`` (``init_weight_transfer_engine`` / ``start_weight_update``
    / ``update_weights`` / ``finish_weight_update``): the learner's sender broadcasts into
    it through a process group of its own. ``load_weights`` takes tensors already in the
    engine's process (the colocated smoke's CUDA IPC handover, a benchmark's reload).
    """

    weight_version: int

    def generate(self, prompts: Sequence[Prompt], *, forced: bool, n: int,
                 greedy: bool = False, histories: Sequence[Sequence[dict[str, str]]] | None = None,
                 modes: Sequence[Mode] | None = None, seeds: Sequence[int] | None = None) -> list[Rollout]:
        """forced=True: for each prompt, n responses forced to start with each mode of
        ``modes`` (default both: 2n per prompt). forced=False: n responses per prompt whose
        mode is read from the first sampled token (None when it is not a mode token).
        ``histories`` holds earlier chat turns; ``seeds`` (one per prompt) make the samples a
        function of the seeds, not of the engine's history."""
        ...

    def load_weights(self, named_tensors: NamedTensors, version: int | None = None) -> int:
        """Replace every weight in place (HF names, full tensors in this process); sets the
        weight version to ``version`` (default: current + 1) and returns it."""
        ...

    def update_weight_version(self, version: int) -> int: ...

    def num_workers(self) -> int: ...

    def weight_transfer_backend(self) -> str | None: ...

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None: ...

    def finish_weight_update(self, weight_version: str | int | None = None,
                             checksums: Sequence[int | None] | None = None) -> None:
        """End an update: the weights go live and the version becomes ``weight_version``;
        with the sender's per-bucket ``checksums``, a bucket that arrived otherwise than it
        was sent raises ``CorruptUpdateError``."""
        ...

    def loaded_tensors(self) -> list[str]:
        """The tensors handed to the model in the last transfer-engine update."""
        ...

    def shutdown_weight_transfer_engine(self) -> None: ...

    def sleep(self) -> bool:
        """Give the device up between generations (a colocated learner trains on it): KV cache
        freed, weights dropped (the next weight update rewrites them all); False when this
        engine cannot (vLLM's CPU worker has no sleep mode, the HF engine none at all)."""
        ...

    def wake_up(self) -> None:
        """Take the device back after ``sleep`` (a no-op when it did not sleep)."""
        ...

    def shutdown(self) -> None:
        """Release the engine (an in-process vLLM engine frees its distributed state)."""
        ...


def make_engine(model_path: str | Path, config: RolloutConfig, *, engine_index: int = 0,
                sleep_between_phases: bool = False) -> RolloutEngine:
    """The engine ``config.engine`` names. ``engine_index`` offsets the sampling seed so
    several engines do not draw the same random streams; ``sleep_between_phases``: built so
    that ``sleep`` frees the device (vLLM's sleep mode, on GPU)."""
    config.validate()
    if config.engine == "vllm":
        from rollout.vllm_engine import VllmEngine

        return VllmEngine(model_path, config, engine_index=engine_index, sleep_between_phases=sleep_between_phases)
    from rollout.hf_engine import HfEngine

    return HfEngine(model_path, config, engine_index=engine_index)


class CorruptUpdateError(RuntimeError):
    """A weight update whose received bytes differ from what the learner sent."""


def check_received(received: ReceivedUpdate, checksums: Sequence[int | None] | None) -> None:
    """Compare what arrived with the sender's checksums (None: nothing to compare)."""
    if checksums is None:
        return
    mismatch = received.mismatch(list(checksums))
    if mismatch is not None:
        raise CorruptUpdateError(f"weight update corrupted in transit: {mismatch}")


def parse_version(version: str | int, current: int) -> int:
    """A weight version from an int or vLLM's string form; never older than ``current``."""
    try:
        value = int(version)
    except (TypeError, ValueError):
        raise ValueError(f"weight version: expected an integer, got {version!r}") from None
    if value < current:
        raise ValueError(f"weight version {value} is older than the engine's {current}")
    return value
