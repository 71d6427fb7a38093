"""The paper's recipe end to end at tiny scale, with the README's commands: prepare a base model
that has no mode tokens, prepare the data from real-format snapshot folders and JSONL files
(a real HTTP OpenAI-protocol server as teacher, persona writer and judge), SFT, DualGRPO from
the SFT policy, an eval-only run of the final policy, and the Table 1 report over the runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.judge_server import JudgeServer
from tests.test_prepare_data import CANARY, KEY_ENV, script_server
from tests.test_prepare_model import build_base_without_mode_tokens

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("no_persona", "unaligned", "aligned", "personalized")

pytestmark = [pytest.mark.slow]


def _run(*command: str, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env={**os.environ, KEY_ENV: CANARY},
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (command, result.stderr[-4000:])
    return result


@pytest.mark.timeout(2400)
def test_prepare_sft_dualgrpo_evaluate_and_report_from_downloaded_files(tmp_path):
    base = build_base_without_mode_tokens(tmp_path / "base")
    model, data, runs = tmp_path / "models" / "tiny_modes", tmp_path / "data", tmp_path / "runs"
    _run("-m", "personadual.prepare", "model", "--base", str(base), "--out", str(model))
    with JudgeServer() as server:
        script_server(server)
        endpoints = [f"teacher.base_url={server.base_url}", f"persona_writer.base_url={server.base_url}",
                     f"reward.judge.base_url={server.base_url}"]
        _run("-m", "personadual.prepare", "data", "--recipe", "configs/recipe_tiny.yaml", "--no-progress",
             f"out_dir={data}", *endpoints)
        manifests = {n: json.loads((data / f"{n}.manifest.json").read_text()) for n in ("sft", "rl", "eval")}
        assert all(m["rows"] > 0 for m in manifests.values())
        common = [f"run.out_dir={runs}", f"data.eval_files=[{data / 'eval.jsonl'}]"]
        _run("launch.py", "--config", "configs/recipe_tiny_sft.yaml", "run.name=tiny_sft", f"model.path={model}",
             f"data.sft_files=[{data / 'sft.jsonl'}]", *common)
        _run("launch.py", "--config", "configs/recipe_tiny_dualgrpo.yaml", "run.name=tiny_dualgrpo",
             f"model.path={runs / 'tiny_sft' / 'policy'}", f"data.train_files=[{data / 'rl.jsonl'}]",
             f"reward.judge.base_url={server.base_url}", *common)
        _run("launch.py", "--config", "configs/recipe_tiny_eval.yaml", "run.name=tiny_eval",
             f"model.path={runs / 'tiny_dualgrpo' / 'policy'}", *common)
    sft_rows = len((data / "sft.jsonl").read_text().splitlines())
    sft_metrics = [json.loads(line) for line in (runs / "tiny_sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_metrics if r["stage"] == "sft"] == list(range(1, 41)) and sft_rows > 0
    rl_metrics = [json.loads(line) for line in (runs / "tiny_dualgrpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl_metrics if r["stage"] == "rl"] == [1, 2]
    eval_run = runs / "tiny_eval"
    assert not [line for line in (eval_run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["stage"] in ("sft", "rl")]
    summary = json.loads((eval_run / "summary.json").read_text())
    benchmarks = set(summary["eval"]["by_benchmark"])
    assert benchmarks <= set(manifests["eval"]["by_source"]) and len(benchmarks) >= 5, benchmarks
    for setting in SETTINGS:
        assert 0 <= summary["eval"][setting]["accuracy"] <= 1
    # The eval-only run evaluated the RL run's final policy: the same greedy numbers.
    rl_summary = json.loads((runs / "tiny_dualgrpo" / "summary.json").read_text())
    for setting in SETTINGS:
        assert summary["eval"][setting] == rl_summary["eval"][setting], setting
    report = _run("-m", "personadual.report", str(runs / "tiny_sft"), str(runs / "tiny_dualgrpo"),
                  str(eval_run), "--out", str(tmp_path / "report"))
    table = (tmp_path / "report" / "table1.md").read_text()
    assert table.strip() in report.stdout and table.count("\n| ") >= 3
    for path in [*runs.rglob("*"), *data.rglob("*")]:
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".md", ".log", ".txt"):
            assert CANARY not in path.read_text(errors="replace"), path
