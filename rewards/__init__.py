"""Scorers (exact match, multiple choice, math, LLM judge) and the batch scorer routing by task.

Imports ``personadual`` and third-party libraries only, never Ray: ``actors/reward_pool.py``
wraps ``BatchScorer`` in Ray actors. Names below load on first use, so reading the config
(``rewards.config``) does not pull in openai, sympy and math-verify.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RewardConfig": "rewards.config", "JudgeConfig": "rewards.config", "RewardConfigError": "rewards.config",
    "ApiKey": "rewards.judge", "JudgeClient": "rewards.judge", "JudgeError": "rewards.judge",
    "BatchScorer": "rewards.scorer", "Outcome": "rewards.scorer", "merge_counts": "rewards.scorer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rewards' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
