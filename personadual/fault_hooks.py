"""Test-only windows for fault injection (tests/test_faults_*.py); inert in real runs.

With ``PERSONADUAL_FAULT_DIR`` unset (every real run) ``fault_window`` does nothing but read
that variable. Set to a folder, a process doing a tracked piece of work -- a rollout engine
generating, a reward worker scoring, a learner rank training or saving a checkpoint -- holds
the file ``DIR/<kind>.<label>.<pid>`` while it works, so a test can find that process and
SIGKILL it mid-work. While ``DIR/hold.<kind>`` (or ``DIR/hold.<kind>.<label>``) exists the work waits first (at most
``HOLD_LIMIT_S``): that is how a test hits a window that is otherwise milliseconds long, e.g.
a checkpoint save after its files are written but before it is published. A file
``DIR/<name>`` read by ``fault_text`` injects one fault of that name (a corrupted weight
bucket, a tensor left unloaded).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FAULT_DIR_ENV = "PERSONADUAL_FAULT_DIR"
HOLD_LIMIT_S = 120.0


def fault_env() -> dict[str, str]:
    """The setting for a run's Ray workers when it is set here: workers of a cluster the run
    joins (RAY_ADDRESS) do not inherit the driver's environment, only its job's runtime env."""
    folder = os.environ.get(FAULT_DIR_ENV)
    return {FAULT_DIR_ENV: folder} if folder else {}


@contextmanager
def fault_window(kind: str, label: str) -> Iterator[None]:
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        yield
        return
    root = Path(folder)
    marker = root / f"{kind}.{label}.{os.getpid()}"
    marker.touch()
    try:
        holds = (root / f"hold.{kind}", root / f"hold.{kind}.{label}")
        deadline = time.monotonic() + HOLD_LIMIT_S
        while any(hold.exists() for hold in holds) and time.monotonic() < deadline:
            time.sleep(0.02)
        yield
    finally:
        marker.unlink(missing_ok=True)


def fault_point(kind: str, label: str) -> None:
    """A window around nothing: a place where a held test crashes the process, e.g. between
    writing a checkpoint's files and publishing it."""
    with fault_window(kind, label):
        pass


def fault_text(name: str) -> str | None:
    """The text of ``DIR/<name>`` when a test left that file, consumed on the first read (one
    injected fault per file); None in real runs."""
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        return None
    path = Path(folder) / name
    try:
        text = path.read_text()
        path.unlink()
    except FileNotFoundError:
        return None
    return text.strip()
