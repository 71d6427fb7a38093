"""The optional format term, and how it mixes with correctness into one reward.

reward = accuracy_weight x correct + format_weight x format. The format term is 1.0 for a
response that starts with a mode token and (``format_check="mode_and_answer"``) ends with
an ``Answer:`` line in the form its task expects, else 0.0. The authors' released code
rewards the leading mode tag alone (``format_check="mode"``), weighted 0.1 against 0.9.
"""

from __future__ import annotations

from typing import Any

from rewards.config import RewardConfig
from rewards.normalize import Extraction


def single_line_answer(answer: str) -> bool:
    """The free-text answer form: something, on one line."""
    return bool(answer) and "\n" not in answer


def format_term(extraction: Extraction, *, check: str, answer_ok: bool) -> float:
    """1.0 when the response has the trained shape, else 0.0 (``answer_ok``: the scorer's
    verdict on whether the extracted answer has its task's expected form)."""
    if extraction.mode is None:
        return 0.0
    if check == "mode":
        return 1.0
    return 1.0 if extraction.has_marker and answer_ok else 0.0


def compose(config: RewardConfig, *, correct: bool, extraction: Extraction, answer_ok: bool,
            detail: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """The reward for a correctness verdict, with the format term recorded in ``detail``."""
    fmt = format_term(extraction, check=config.format_check, answer_ok=answer_ok)
    detail["correct"] = bool(correct)
    detail["format"] = fmt
    reward = config.accuracy_weight * float(correct) + config.format_weight * fmt
    return reward, detail
