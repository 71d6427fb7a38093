"""How the actors layer words an error in one line (the fault log, sync errors, the stop line)."""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when there is no message)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
