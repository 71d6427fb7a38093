"""Helpers the test modules share: free ports, launch.py in a subprocess, scored records.

Only the standard library and ``personadual`` records: importing this costs nothing, so
pure unit tests may use it as freely as the real-stack ones.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from personadual.modes import Mode
from personadual.records import Prompt, Rollout, Scored

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
LAUNCH = [sys.executable, str(ROOT / "launch.py")]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the caller binds it soon after)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports nothing listens on now (held together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def run_launch(*args: str, env: Mapping[str, str] | None = None, timeout: float = 900,
               cwd: Path = ROOT, own_cluster: bool = False) -> subprocess.CompletedProcess:
    """``python launch.py ARGS`` to completion, its output captured as text. The run joins the
    session's shared Ray head when one runs (tests/ray_head.py), unless ``own_cluster``: then
    it starts a local cluster of its own, as a plain `python launch.py` does."""
    from tests.ray_head import launch_env

    return subprocess.run([*LAUNCH, *args], cwd=cwd, env=launch_env(env, own_cluster=own_cluster),
                          capture_output=True, text=True, timeout=timeout)


def make_prompt(prompt_id: str = "p0", *, setting: str = "none", task_type: str = "objective",
                persona: str | None = None) -> Prompt:
    return Prompt(id=prompt_id, question="q", persona=persona, persona_setting=setting, task_type=task_type,
                  gold=("a",), scorer="exact_match")


def make_scored(prompt: Prompt | str, mode: Mode | None, reward: float | None, *,
                prompt_token_ids: Sequence[int] = (1, 2), response_token_ids: Sequence[int] = (7, 7, 7),
                correct: bool | None = None, forced: bool | None = None, finish_reason: str = "stop",
                weight_version: int = 0, sample_index: int = 0) -> Scored:
    """A scored rollout; ``reward`` None makes it dropped. ``correct`` defaults to a positive
    reward, ``forced`` to having a mode."""
    prompt = make_prompt(prompt) if isinstance(prompt, str) else prompt
    response = list(response_token_ids)
    rollout = Rollout(prompt, list(prompt_token_ids), response, [0.0] * len(response), "", mode,
                      mode is not None if forced is None else forced, finish_reason, weight_version, sample_index)
    return Scored(rollout, reward, bool(reward) if correct is None else correct,
                  status="dropped" if reward is None else "ok")


def forced_batches(*, prompt_ids: Callable[[int], list[int]], response: Callable[[Mode, int], list[int]],
                   reward: Callable[[int, int], float], steps: int = 2, groups: int = 2, per_mode: int = 2,
                   prompt_id: Callable[[int, int], str] = "p{}-{}".format) -> list[list[Scored]]:
    """``steps`` scored batches of forced-prefix groups: ``per_mode`` responses of each mode per
    prompt. The callables give a group's prompt ids, a (mode, sample)'s response ids (the mode
    token first) and a (group, sample)'s reward, called in that order (so a seeded generator
    behind them yields the same batches every time)."""
    batches = []
    for step in range(steps):
        scored = []
        for group in range(groups):
            prompt, ids = make_prompt(prompt_id(step, group)), prompt_ids(group)
            for mode in Mode:
                for sample in range(per_mode):
                    tokens = response(mode, sample)
                    value = reward(group, sample)
                    scored.append(make_scored(prompt, mode, value, prompt_token_ids=ids, response_token_ids=tokens,
                                              correct=value >= 1.0, sample_index=sample))
        batches.append(scored)
    return batches
