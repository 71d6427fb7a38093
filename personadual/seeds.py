"""Sampling seeds derived from where a sample sits in a run, not from an RNG's history.

A seed is a hash of (run seed, stage, step, prompt index, sample index): a run resumed from
a checkpoint, with freshly started engines, draws exactly the samples the uninterrupted run
drew, however the prompts are split across engines or batched inside one.
"""

from __future__ import annotations

import hashlib

# vLLM derives the seeds of a request's n samples as seed + i; torch generators take 64 bits.
SEED_BITS = 62


def derive_seed(*parts: int | str) -> int:
    """A well-mixed non-negative seed from the parts (order matters)."""
    text = "\x1f".join(str(part) for part in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def step_seeds(run_seed: int, stage: str, step: int, count: int) -> list[int]:
    """One seed per prompt of a step's batch (by its index in the whole batch)."""
    return [derive_seed(run_seed, stage, step, index) for index in range(count)]
