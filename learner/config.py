"""Learner settings: the ``learner`` section of the experiment config, how to train.

The objective (clip range, KL weight, advantage estimator, updates per batch) is the
``algo`` section's (``personadual/algo_config.py``), handed to the learner beside this one;
this section holds how the ranks execute it: how many and on what resources, precision,
ZeRO stage, optimisers, micro-batch size, weight buckets, timeouts.
Plain dataclasses with OmegaConf-compatible fields (the experiment schema embeds them).
Values are checked on construction, so a bad value fails with one line naming its key,
e.g. ``learner.zero_stage: expected one of [0, 1, 2, 3], got 4``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SECTION = "learner"
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 on GPU, fp32 on CPU


class LearnerConfigError(ValueError):
    """A learner config value is invalid; the message is one line naming the key."""


def _check(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise LearnerConfigError(f"{key}: {problem}")


def _one_of(key: str, value: object, allowed: tuple) -> None:
    _check(value in allowed, key, f"expected one of {list(allowed)}, got {value!r}")


@dataclass
class OptimConfig:
    """AdamW with a warm-up then cosine/linear decay (to 0) or a constant rate."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.0  # fraction of total_steps spent warming up linearly from 0
    total_steps: int = 100  # optimizer steps the schedule spans (the driver sets it from the stage's steps)

    def validate(self, key: str) -> None:
        _check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr!r}")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
               f"expected two values in [0, 1), got {list(self.betas)!r}")
        _check(self.eps > 0, f"{key}.eps", f"must be > 0, got {self.eps!r}")
        _one_of(f"{key}.schedule", self.schedule, SCHEDULES)
        _check(0 <= self.warmup_ratio < 1, f"{key}.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        _check(self.total_steps >= 1, f"{key}.total_steps", f"must be >= 1, got {self.total_steps!r}")


@dataclass
class LearnerConfig:
    zero_stage: int = 2  # DeepSpeed ZeRO stage; 3 partitions parameters (and the reference model)
    num_ranks: int = 1  # data-parallel learner ranks (Ray actors), one placement bundle each
    num_cpus_per_rank: float = 1.0
    num_gpus_per_rank: float = 0.0  # > 0 puts the ranks on GPUs
    # torch/OpenMP threads of each rank; null: its node's cores for the schedule (actors/threads.py),
    # not Ray's OMP_NUM_THREADS (= num_cpus_per_rank, i.e. one thread).
    threads: Optional[int] = None
    # Extra Ray resources each rank's bundle asks for, e.g. {node_a: 1}: pins the ranks to
    # nodes (checked with the placement keys in actors/config.py).
    resources: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"  # fp32 | bf16 | auto
    gradient_checkpointing: bool = False
    # Padded tokens (sequences x longest sequence) per forward/backward: long batches are
    # split into more micro-batches, so memory stays bounded whatever the batch holds.
    micro_batch_tokens: int = 4096
    # The policy step packs each prompt's responses into one row after a single copy of the
    # prompt (its keys and values computed once; learner/shared_prefix.py): same log-probs and
    # gradients, fewer positions. Needs sdpa or eager attention (a 4D mask).
    shared_prefix: bool = True
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: Optional[int] = None  # torch's seed on every rank; None: run.seed (0 outside a run)
    # Weight export / sync.
    bucket_bytes: int = 64 << 20
    # On CPU (gloo), engines on the learner's host read the buckets where rank 0 wrote them,
    # a file in /dev/shm, instead of receiving them through a socket; false: always the socket.
    sync_shared_memory: bool = True
    collective_timeout_s: float = 300.0
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft_optim: OptimConfig = field(default_factory=OptimConfig)  # the SFT stage's own rate and schedule
    # An update whose loss or gradients are not finite (on any rank) is skipped, weights
    # untouched; this many skipped in a row stop the run after checkpointing (actors/driver.py).
    max_consecutive_nonfinite: int = 3
    # FAULT INJECTION, for tests only: RL steps (1-based) whose loss rank 0 multiplies by NaN.
    fault_nan_loss_at_rl_steps: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # OmegaConf hands lists for tuple fields.
        for optim in (self.optim, self.sft_optim):
            if isinstance(optim, OptimConfig):
                optim.betas = tuple(optim.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        key = SECTION
        _one_of(f"{key}.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _check(self.num_ranks >= 1, f"{key}.num_ranks", f"must be >= 1, got {self.num_ranks!r}")
        # A placement bundle may not be empty: a rank's CPUs stay above zero.
        _check(self.num_cpus_per_rank > 0, f"{key}.num_cpus_per_rank", f"must be > 0, got {self.num_cpus_per_rank!r}")
        _check(self.threads is None or self.threads >= 1, f"{key}.threads",
               f"must be null or >= 1, got {self.threads!r}")
        _check(self.num_gpus_per_rank >= 0, f"{key}.num_gpus_per_rank", f"must be >= 0, got {self.num_gpus_per_rank!r}")
        _one_of(f"{key}.precision", self.precision, PRECISIONS)
        _check(self.micro_batch_tokens >= 1, f"{key}.micro_batch_tokens",
               f"must be >= 1, got {self.micro_batch_tokens!r}")
        _check(self.max_grad_norm >= 0, f"{key}.max_grad_norm", f"must be >= 0, got {self.max_grad_norm!r}")
        _check(self.bucket_bytes > 0, f"{key}.bucket_bytes", f"must be > 0, got {self.bucket_bytes!r}")
        _check(self.collective_timeout_s > 0, f"{key}.collective_timeout_s",
               f"must be > 0, got {self.collective_timeout_s!r}")
        _check(self.max_consecutive_nonfinite >= 1, f"{key}.max_consecutive_nonfinite",
               f"must be >= 1, got {self.max_consecutive_nonfinite!r}")
        steps = list(self.fault_nan_loss_at_rl_steps)
        _check(all(isinstance(s, int) and s >= 1 for s in steps), f"{key}.fault_nan_loss_at_rl_steps",
               f"expected RL steps >= 1, got {steps!r}")
        for name in ("optim", "sft_optim"):
            optim = getattr(self, name)
            _check(isinstance(optim, OptimConfig), f"{key}.{name}", "expected an optimizer section")
            optim.validate(f"{key}.{name}")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus_per_rank > 0 else "cpu"

    def resolved_precision(self, device: str) -> str:
        if self.precision != "auto":
            return self.precision
        return "bf16" if device.startswith("cuda") else "fp32"
