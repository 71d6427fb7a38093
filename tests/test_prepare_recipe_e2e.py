"""The paper's recipe end to end at tiny scale with the README's commands, every endpoint being
vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``):

``prepare tiny-models`` (a base without mode tokens, and a teacher trained on the recipe's
rows), the teacher served by vLLM, ``prepare model``, ``prepare data`` (teacher, persona writer
and judge: that server), SFT, DualGRPO from the SFT policy (its judge: that server), an
eval-only run of the final policy, and the Table 1 report over the runs. One server for the
module; a re-run of ``prepare data`` with the server gone is answered by the cache alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import vllm  # noqa: F401  a broken vLLM install must fail here, not skip

from personadual.modes import MODE_TOKENS
from personadual.prepare.tiny_models import DOMAIN_PERSONAS
from tests.ray_head import launch_env
from tests.vllm_server import vllm_api_server

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "PERSONADUAL_TEACHER_KEY"  # the variable configs/recipe_tiny*.yaml name
CANARY = "sk-canary-recipe-vllm-5b1e0c"  # vLLM checks it (VLLM_API_KEY): proves every client sends it
SETTINGS = ("no_persona", "unaligned", "aligned", "personalized")
MAX_MODEL_LEN = 1024  # the teacher's max_position_embeddings; its longest chat is ~180 tokens

pytestmark = [pytest.mark.slow]


def _run(*command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    start = time.monotonic()
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=launch_env({**os.environ, KEY_ENV: CANARY}),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (command, result.stderr[-4000:])
    print(f"[{time.monotonic() - start:.1f} s] {' '.join(command[:4])}")  # the README's per-stage times (-s)
    return result


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Iterator[dict]:
    """The models, the server and the prepared data, as the README's commands leave them."""
    root = tmp_path_factory.mktemp("recipe")
    models, data = root / "models", root / "data"
    _run("-m", "personadual.prepare", "tiny-models", "--recipe", "configs/recipe_tiny.yaml", "--out", str(models))
    _run("-m", "personadual.prepare", "model", "--base", str(models / "tiny_base"), "--out",
         str(models / "tiny_modes"))
    start = time.monotonic()
    with vllm_api_server(models / "tiny_teacher", root / "serve.log", served_name="teacher", api_key=CANARY,
                         max_model_len=MAX_MODEL_LEN) as base_url:
        print(f"[{time.monotonic() - start:.1f} s] vllm api_server healthy")
        endpoints = [f"{role}.base_url={base_url}" for role in ("teacher", "persona_writer", "reward.judge")]
        _run("-m", "personadual.prepare", "data", "--recipe", "configs/recipe_tiny.yaml", "--no-progress",
             f"out_dir={data}", *endpoints)
        yield {"root": root, "models": models, "data": data, "base_url": base_url, "endpoints": endpoints}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _manifest(data: Path, name: str) -> dict:
    return json.loads((data / f"{name}.manifest.json").read_text())


def test_vllm_writes_the_personas_answers_as_trained_and_judges_and_sft_keeps_the_papers_mode(recipe):
    data = recipe["data"]
    prompts = {row["id"]: row for name in ("rl", "eval") for row in _rows(data / f"{name}.jsonl")}
    prompts.update({row["prompt"]["id"]: row["prompt"] for row in _rows(data / "sft.jsonl")})
    aligned = [p for p in prompts.values() if p["persona_setting"] == "aligned" and p["task_type"] == "objective"]
    # The persona writer (vLLM, sampling at 0.7) wrote each aligned persona of its question's domain.
    assert aligned and all(p["persona"] == DOMAIN_PERSONAS[p["benchmark"]] for p in aligned)
    teacher = _rows(data / "teacher.jsonl")
    for row in teacher:
        # Right in general mode; in personalized mode right unless the persona is PersonaHub's.
        expected = row["mode"] == "general" or not row["id"].endswith("-unaligned")
        assert row["correct"] == expected, row
        assert row["response"].startswith(MODE_TOKENS)
    manifest = _manifest(data, "teacher")
    assert manifest["endpoint"]["teacher"]["requests"] == len(teacher) == manifest["rows"]
    assert manifest["scoring"].get("judge/requests", 0) > 0 and not any(
        k.startswith("judge/error") or k == "fallback" for k in manifest["scoring"]), manifest["scoring"]
    # The paper's rule: personalized where the persona yields the right answer (aligned, and
    # the personalized tasks), general elsewhere; none dropped, as the teacher was right once.
    sft = {row["prompt"]["id"]: row["response"] for row in _rows(data / "sft.jsonl")}
    assert set(sft) == {row["id"] for row in teacher}
    for prompt_id, response in sft.items():
        personalized = prompt_id.endswith("-aligned")
        assert response.startswith(MODE_TOKENS[1] if personalized else MODE_TOKENS[0]), (prompt_id, response)
    sft_manifest = _manifest(data, "sft")
    assert sft_manifest["dropped"] == {"no_correct_teacher_trajectory": 0}
    assert sft_manifest["by_mode"] == {"general": sum(not r.startswith(MODE_TOKENS[1]) for r in sft.values()),
                                       "personalized": sum(r.startswith(MODE_TOKENS[1]) for r in sft.values())}
    assert min(sft_manifest["by_mode"].values()) > 0
    evals = _manifest(data, "eval")
    assert manifest["endpoint"]["persona_writer"]["requests"] == len({p["id"].rsplit("-", 1)[0] for p in aligned})
    assert set(evals["by_source"]) == {"pubmedqa", "triviaqa", "mmlu_pro", "supergpqa", "math500",
                                       "personafeedback", "fspo_roleplay"}


def test_a_rerun_with_the_server_gone_is_answered_by_the_cache_and_writes_the_same_files(recipe, tmp_path):
    data = shutil.copytree(recipe["data"], tmp_path / "data")
    dead = [f"{role}.base_url=http://127.0.0.1:9/v1" for role in ("teacher", "persona_writer", "reward.judge")]
    _run("-m", "personadual.prepare", "data", "--recipe", "configs/recipe_tiny.yaml", "--no-progress",
         f"out_dir={data}", *dead)
    again = _manifest(data, "teacher")["endpoint"]
    assert again["teacher"]["requests"] == 0 and again["teacher"]["cache_hits"] == _manifest(data, "teacher")["rows"]
    assert again["persona_writer"]["requests"] == 0
    for name in ("rl", "eval", "teacher", "sft"):
        assert _manifest(data, name)["sha256"] == _manifest(recipe["data"], name)["sha256"], name


@pytest.mark.timeout(2400)
def test_sft_dualgrpo_evaluate_and_report_from_the_prepared_files(recipe):
    root, data, model = recipe["root"], recipe["data"], recipe["models"] / "tiny_modes"
    runs = root / "runs"
    common = [f"run.out_dir={runs}", f"data.eval_files=[{data / 'eval.jsonl'}]"]
    _run("launch.py", "--config", "configs/recipe_tiny_sft.yaml", "run.name=tiny_sft", f"model.path={model}",
         f"data.sft_files=[{data / 'sft.jsonl'}]", *common)
    _run("launch.py", "--config", "configs/recipe_tiny_dualgrpo.yaml", "run.name=tiny_dualgrpo",
         f"model.path={runs / 'tiny_sft' / 'policy'}", f"data.train_files=[{data / 'rl.jsonl'}]",
         f"reward.judge.base_url={recipe['base_url']}", *common)
    _run("launch.py", "--config", "configs/recipe_tiny_eval.yaml", "run.name=tiny_eval",
         f"model.path={runs / 'tiny_dualgrpo' / 'policy'}", *common)
    sft_metrics = _rows(runs / "tiny_sft" / "metrics.jsonl")
    assert [r["step"] for r in sft_metrics if r["stage"] == "sft"] == list(range(1, 41))
    rl_metrics = [r for r in _rows(runs / "tiny_dualgrpo" / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["step"] for r in rl_metrics] == [1, 2]
    # UltraMedical's open RL prompts were judged by the vLLM server (or fell back, counted).
    counts = [r.get("reward_counts", {}) for r in rl_metrics]
    assert sum(c.get("judge/requests", 0) + c.get("judge/cache_hits", 0) for c in counts) > 0, counts
    eval_run = runs / "tiny_eval"
    assert not [r for r in _rows(eval_run / "metrics.jsonl") if r["stage"] in ("sft", "rl")]
    summary = json.loads((eval_run / "summary.json").read_text())
    manifest = _manifest(data, "eval")
    benchmarks = set(summary["eval"]["by_benchmark"])
    assert benchmarks <= set(manifest["by_source"]) and len(benchmarks) >= 5, benchmarks
    # The eval-only run evaluated the RL run's final policy: the same greedy numbers.
    rl_summary = json.loads((runs / "tiny_dualgrpo" / "summary.json").read_text())
    for setting in SETTINGS:
        assert 0 <= summary["eval"][setting]["accuracy"] <= 1
        assert summary["eval"][setting] == rl_summary["eval"][setting], setting
    report = _run("-m", "personadual.report", str(runs / "tiny_sft"), str(runs / "tiny_dualgrpo"),
                  str(eval_run), "--out", str(root / "report"))
    table = (root / "report" / "table1.md").read_text()
    assert table.strip() in report.stdout and table.count("\n| ") >= 3
    print(report.stdout)  # the README quotes this run's table (pytest -s shows it)
    for path in [*runs.rglob("*"), *data.rglob("*")]:
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".md", ".log", ".txt"):
            assert CANARY not in path.read_text(errors="replace"), path
