"""The advantage estimators' names, importable without torch: the config is validated
(and `launch.py --help` answers) before torch, Ray or vLLM are imported."""

from __future__ import annotations

ADVANTAGE_KINDS = ("dual", "grpo", "dual_released")
