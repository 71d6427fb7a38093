"""``prepare data`` against vLLM's own OpenAI-compatible server (the tiny model behind
``python -m vllm.entrypoints.openai.api_server``) as teacher, persona writer and judge.

The tiny model is randomly initialised, so what it writes is noise: the test proves the
protocol round trip of all three roles (auth, chat template, seeded sampling, replies parsed
into personas, trajectories and verdicts) and that a re-run is served from the cache alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_rewards_vllm_serve import CANARY, KEY_ENV, SERVED_NAME, vllm_server  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
TRIVIA = ROOT / "tests" / "fixtures" / "hub" / "mandarjoshi--trivia_qa"

pytestmark = [pytest.mark.slow]


def _prepare(out: Path, base_url: str) -> subprocess.CompletedProcess:
    dataset = (f"{{name: triviaqa, source: {TRIVIA}, subset: rc.nocontext, "
               f"persona_settings: [none, unaligned, aligned]}}")
    endpoint = [f"{role}.{key}={value}" for role in ("teacher", "persona_writer", "reward.judge")
                for key, value in (("base_url", base_url), ("model", SERVED_NAME), ("api_key_env", KEY_ENV),
                                   ("max_tokens", 32))]
    return subprocess.run(
        [sys.executable, "-m", "personadual.prepare", "data", "--recipe", "configs/recipe_tiny.yaml", "--no-progress",
         f"out_dir={out}", f"sft=[{dataset}]", "rl=[]", f"eval=[{dataset}]", *endpoint],
        cwd=ROOT, env={**os.environ, KEY_ENV: CANARY}, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_vllm_serve_is_teacher_persona_writer_and_judge_and_a_rerun_asks_it_nothing(
        vllm_server, tmp_path):  # noqa: F811
    out = tmp_path / "data"
    first = _prepare(out, vllm_server)
    assert first.returncode == 0, first.stderr[-4000:]
    teacher = json.loads((out / "teacher.manifest.json").read_text())
    evals = json.loads((out / "eval.manifest.json").read_text())
    assert teacher["endpoint"]["teacher"]["requests"] == teacher["rows"] > 0
    # one persona per aligned row, written once and shared by the SFT and eval sets
    assert teacher["endpoint"]["persona_writer"]["requests"] == evals["by_setting"]["aligned"] > 0
    rows = [json.loads(line) for line in (out / "teacher.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in rows} == {"general", "personalized"}
    assert all(r["response"].startswith(("[General_mode]", "[Personalized_mode]")) for r in rows)
    hashes = {n: json.loads((out / f"{n}.manifest.json").read_text())["sha256"] for n in ("sft", "eval", "teacher")}
    second = _prepare(out, "http://127.0.0.1:9/v1")  # nothing listens there: every call must come from the cache
    assert second.returncode == 0, second.stderr[-4000:]
    again = json.loads((out / "teacher.manifest.json").read_text())["endpoint"]["teacher"]
    assert (again["requests"], again["cache_hits"]) == (0, teacher["rows"])
    assert {n: json.loads((out / f"{n}.manifest.json").read_text())["sha256"] for n in hashes} == hashes
    for path in out.rglob("*"):
        if path.is_file():
            assert CANARY not in path.read_text(errors="replace"), path
