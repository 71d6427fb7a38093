"""A run's state on disk: its folder, the data cursors, its metrics log and W&B run (the log
cut back to a checkpoint on resume), and checkpoints (written whole or not at all, the newest
found again on ``--resume``, the oldest dropped past ``run.keep_last``)."""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from actors.config import ConfigError, to_container
from personadual.data import RunData, load_run_data
from personadual.tracking import RunTracker, WandbSettings, read_metrics, write_json_atomic
from personadual.world_config import WorldConfig

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
REFERENCE_DIR = "reference"  # checkpoints/reference: the frozen KL reference, written once per run
DRIVER_STATE = "driver_state.json"


@dataclass
class DataCursor:
    """Where a stage is in its data, reshuffled each epoch from (seed, epoch); saved in
    checkpoints so a resumed run takes the same batches."""

    seed: int
    size: int
    epoch: int = 0
    position: int = 0
    order: list[int] = field(default_factory=list)

    def _shuffle(self) -> None:
        self.order = list(range(self.size))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(self.order)

    def take(self, count: int) -> list[int]:
        if not self.order:
            self._shuffle()
        taken: list[int] = []
        while len(taken) < count:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._shuffle()
            taken.append(self.order[self.position])
            self.position += 1
        return taken

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._shuffle()


def stage_steps(steps: int, epochs: float, dataset_size: int, batch_size: int) -> int:
    """A stage's optimizer steps: ``steps`` when set, else enough for ``epochs`` passes."""
    if steps > 0 or epochs <= 0:
        return steps
    return math.ceil(epochs * dataset_size / batch_size)


def world_config(data: DictConfig) -> WorldConfig:
    """The world's options from ``data.world_<field>``: every ``WorldConfig`` field the data
    section exposes under that name (the rest keep their defaults)."""
    return WorldConfig(**{f.name: data[f"world_{f.name}"] for f in fields(WorldConfig) if f"world_{f.name}" in data})


def load_stages(cfg: DictConfig, tokenizer: Any) -> tuple[RunData, int, int]:
    """The run's data, and the SFT and RL stages' step counts; a stage with steps and no data
    is a ConfigError naming its key."""
    data = load_run_data(
        cfg.data.source, tokenizer, world=world_config(cfg.data),
        train_files=list(cfg.data.train_files), eval_files=list(cfg.data.eval_files),
        sft_files=list(cfg.data.sft_files), skip_invalid=cfg.data.skip_invalid,
        max_eval_prompts=cfg.data.max_eval_prompts, max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_sft_tokens=cfg.sft.max_length, balance_settings=cfg.data.balance_settings)
    if any(data.skipped.values()):
        log.warning("data rows skipped: %s", data.skipped)
    sft_steps = stage_steps(cfg.sft.steps, cfg.sft.epochs, len(data.sft), cfg.sft.batch_size)
    rl_steps = stage_steps(cfg.algo.steps, cfg.algo.epochs, len(data.train), cfg.algo.prompts_per_step)
    if sft_steps and not data.sft:
        raise ConfigError("sft.steps: the SFT stage has no data (set data.sft_files, or sft.steps=0)")
    if rl_steps and not data.train:
        raise ConfigError("algo.steps: the RL stage has no prompts (set data.train_files, or algo.steps=0)")
    return data, sft_steps, rl_steps


def rng_state(rng: random.Random) -> list[Any]:
    """A ``random.Random``'s state as JSON-safe lists (checkpoints hold no pickles)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def progress_key(record: dict[str, Any]) -> tuple[int, int]:
    """Order of a metrics record in a run: SFT steps, the post-SFT eval, then RL steps."""
    if record.get("stage") == "sft":
        return (0, record["step"])
    if record.get("stage") == "eval" and record.get("tag") == "sft":
        return (1, 0)
    return (2, record["step"])


def open_tracker(cfg: DictConfig, run_dir: Path, *, resume: bool) -> RunTracker:
    """The run's metrics log and W&B run; the judge key's value is scrubbed from both."""
    return RunTracker(run_dir, config=to_container(cfg), secret_env=[cfg.reward.judge.api_key_env],
                      wandb=WandbSettings(**OmegaConf.to_container(cfg.wandb)), resume=resume)


def prepare_run_dir(cfg: DictConfig) -> Path:
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml")
    return run_dir


class CheckpointStore:
    """The run's ``checkpoints/`` folder: ``sft_step_N`` and ``step_N`` folders, each complete
    once it holds the ``COMPLETE`` marker, beside the shared ``reference/``."""

    def __init__(self, run_dir: Path, *, keep_last: int = 0, hf_export: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.keep_last = keep_last
        self.hf_export = hf_export

    def save(self, learner: Any, stage: str, step: int, state: dict[str, Any]) -> Path:
        """Write ``learner``'s checkpoint of ``stage`` step ``step`` with the driver's ``state``;
        an existing complete one is kept as it is."""
        final = self.root / f"{stage}_step_{step}" if stage == "sft" else self.root / f"step_{step}"
        if (final / COMPLETE_MARKER).exists():
            return final
        staging = self.root / f".tmp-{final.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        learner.save_checkpoint(staging, state, reference_dir=self.root / REFERENCE_DIR)
        if stage == "rl" and self.hf_export:
            learner.save_hf(staging / "hf")
        write_json_atomic(staging / DRIVER_STATE, state)
        (staging / COMPLETE_MARKER).write_text("")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)  # the step folder appears only complete
        if stage == "rl":
            self._drop_old()
        return final

    def _drop_old(self) -> None:
        """Keep the newest ``keep_last`` complete RL checkpoints (the SFT one and the shared
        reference stay: a resume into RL needs neither, but they are the stage's result)."""
        if not self.keep_last:
            return
        steps = sorted((int(p.name.split("_")[-1]), p) for p in self.root.glob("step_*")
                       if (p / COMPLETE_MARKER).exists())
        for _, path in steps[:-self.keep_last]:
            # The marker goes first: a folder half deleted is never taken for a checkpoint.
            (path / COMPLETE_MARKER).unlink()
            shutil.rmtree(path, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (any RL step after every SFT step), or None."""
        complete = ([p for p in self.root.glob("*step_*") if not p.name.startswith(".")
                     and (p / COMPLETE_MARKER).exists()] if self.root.exists() else [])
        if not complete:
            return None

        def order(path: Path) -> tuple[int, int]:
            state = self.state(path)
            return (0 if state["stage"] == "sft" else 1, state["step"])
        return max(complete, key=order)

    @staticmethod
    def state(checkpoint: Path) -> dict[str, Any]:
        """The driver state saved with ``checkpoint``."""
        return json.loads((checkpoint / DRIVER_STATE).read_text())

    def restore_latest(self, learner: Any, *, sft_cursor: DataCursor, rl_cursor: DataCursor,
                       rng: random.Random) -> tuple[str, int]:
        """Load the newest complete checkpoint into ``learner``, the data cursors and the
        driver's ``rng``, and drop the metric lines written after it (so resumed steps are not
        doubled). Its ``(stage, step)``, or ``("start", 0)`` when there is none."""
        checkpoint = self.latest()
        if checkpoint is None:
            return "start", 0
        state = self.state(checkpoint)
        learner.load_checkpoint(checkpoint)
        sft_cursor.restore(state["sft_cursor"])
        rl_cursor.restore(state["rl_cursor"])
        set_rng_state(rng, state["driver_rng"])
        self.truncate_metrics(state["stage"], state["step"])
        print(f"resumed from {checkpoint}", flush=True)
        return state["stage"], state["step"]

    def truncate_metrics(self, stage: str, step: int) -> None:
        """Drop metric lines written after the checkpoint, so resumed steps are not doubled."""
        limit = progress_key({"stage": stage, "step": step})
        kept = [r for r in read_metrics(self.run_dir) if progress_key(r) <= limit]
        path = self.run_dir / "metrics.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        tmp.replace(path)
