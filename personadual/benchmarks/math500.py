"""MATH-500 ``HuggingFaceH4/MATH-500``, split ``test``: ``problem`` str, ``solution`` str,
``answer`` str (the boxed final answer), ``subject`` str, ``level`` int, ``unique_id`` str
(e.g. ``test/precalculus/807.json``)."""

from __future__ import annotations

from typing import Any

from personadual.benchmarks.items import ObjectiveItem
from personadual.benchmarks.source import text

MATH500_COLUMNS = ("unique_id", "problem", "answer")


def math500_item(row: dict[str, Any], index: int, scorer: str) -> ObjectiveItem:
    answer = text(row, "answer")
    return ObjectiveItem(text(row, "unique_id"), text(row, "problem"),
                         (answer,), scorer, None, answer)
