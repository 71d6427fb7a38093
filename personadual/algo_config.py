"""The ``algo`` section: the RL method and its objective, in one place.

What belongs here changes what is optimised, whatever the hardware: how many responses per
prompt and how they are forced, the advantage estimator, the token weighting, the clipped
surrogate's range and KL weight, and how many updates each batch feeds (``ppo_epochs`` x
``mini_batches``: more than one makes the old and current policy differ, so the clip acts).
How a rank executes it (precision, ZeRO stage, optimiser, micro-batch size, buckets) is the
``learner`` section's. The driver reads the schedule fields; the learner gets this dataclass
as an argument and reads the objective fields. Torch-free: config validation imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from personadual.estimators import ADVANTAGE_ESTIMATORS, ADVANTAGE_SCALES

SECTION = "algo"
# How the policy-gradient term treats tokens the engine sampled from other weights or numerics
# than the learner's (learner/losses.py): none, truncated importance weights, or masking.
ROLLOUT_CORRECTIONS = ("none", "tis", "mask")


class AlgoConfigError(ValueError):
    """An ``algo`` value is invalid; the message is one line naming the key."""


def _check(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise AlgoConfigError(f"{SECTION}.{key}: {problem}")


@dataclass
class AlgoConfig:
    # The RL stage's schedule (read by the driver).
    steps: int = 20  # 0 with epochs > 0: as many steps as `epochs` passes over the prompts take
    epochs: float = 0.0
    prompts_per_step: int = 16
    n_per_mode: int = 4  # forced-prefix: n per mode (2n per prompt); free mode: 2n per prompt
    forced_prefix: bool = True
    # RL steps a rollout's weights may lag the learner (0 or 1); null: what cluster.schedule
    # gives (1 when pipelined, else 0). A value that contradicts the schedule exits 2.
    max_staleness: Optional[int] = None
    # Dynamic sampling (DAPO; personadual/group_filter.py): groups whose rewards are all equal
    # leave the batch and more prompts are generated, up to filter_max_rounds generation rounds
    # per step (the first included). Off: the paper trains on every group.
    filter_groups: bool = False
    filter_max_rounds: int = 4
    # The objective (read by the learner).
    advantage: str = "dual"  # a name in personadual/estimators.py: dual | grpo | dual_released
    scale: str = "none"  # none | group_std
    beta: float = 2.0  # weight of the mode-prefix token's advantage
    prefix_tokens: int = 1
    kl_coef: float = 0.04  # k3 KL to the frozen reference; 0 skips the reference model
    clip_range: float = 0.2
    ppo_epochs: int = 1  # passes over each batch; > 1 makes old and current policy differ
    mini_batches: int = 1  # optimizer steps per pass over a batch
    # Importance correction by each sampled token's learner/engine probability ratio: none | tis |
    # mask; null: tis when rollouts may be one update old (max_staleness=1), else none.
    rollout_correction: Optional[str] = None
    rollout_correction_cap: float = 2.0  # tis: weights capped here; mask: ratios outside [1/cap, cap]
    mismatch_threshold: float = 0.1  # |engine - learner| log-prob counted in mismatch/*/over_fraction

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("steps", "epochs", "kl_coef", "prefix_tokens"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)!r}")
        for name in ("prompts_per_step", "n_per_mode", "ppo_epochs", "mini_batches", "filter_max_rounds"):
            _check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)!r}")
        _check(self.max_staleness in (None, 0, 1), "max_staleness",
               f"expected one of [null, 0, 1], got {self.max_staleness!r}")
        _check(self.advantage in ADVANTAGE_ESTIMATORS, "advantage",
               f"expected one of {list(ADVANTAGE_ESTIMATORS)}, got {self.advantage!r}")
        _check(self.scale in ADVANTAGE_SCALES, "scale", f"expected one of {list(ADVANTAGE_SCALES)}, got {self.scale!r}")
        _check(0 < self.clip_range < 1, "clip_range", f"must be in (0, 1), got {self.clip_range!r}")
        _check(self.rollout_correction is None or self.rollout_correction in ROLLOUT_CORRECTIONS,
               "rollout_correction", f"expected one of {[None, *ROLLOUT_CORRECTIONS]}, got {self.rollout_correction!r}")
        _check(self.rollout_correction_cap > 1, "rollout_correction_cap",
               f"must be > 1, got {self.rollout_correction_cap!r}")
        _check(self.mismatch_threshold > 0, "mismatch_threshold", f"must be > 0, got {self.mismatch_threshold!r}")

    @property
    def correction(self) -> str:
        """``rollout_correction`` with null resolved: truncated importance weights when the
        rollouts may be one update old, none for on-policy runs."""
        if self.rollout_correction is not None:
            return self.rollout_correction
        return "tis" if (self.max_staleness or 0) >= 1 else "none"

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps one RL step takes."""
        return self.ppo_epochs * self.mini_batches
