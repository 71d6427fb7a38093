"""``ray job submit`` of the tiny recipe's SFT stage (the README's cluster command): the run
folder, and the SFT policy the RL stage is handed, land under ``run.out_dir``, not in Ray's
temporary copy of the working directory."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.judge_server import JudgeServer
from tests.test_job_submit import ROOT, UPLOAD_EXCLUDES, _ray, ray_head  # noqa: F401  (the head fixture)
from tests.test_prepare_data import prepare, script_server
from tests.test_prepare_model import build_base_without_mode_tokens

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(1200)
def test_job_submit_of_the_tiny_recipe_writes_the_run_and_its_policy_under_out_dir(ray_head, tmp_path):  # noqa: F811
    model, data, out = tmp_path / "tiny_modes", tmp_path / "data", tmp_path / "shared" / "runs"
    base = build_base_without_mode_tokens(tmp_path / "base")
    made = subprocess.run([sys.executable, "-m", "personadual.prepare", "model", "--base", str(base),
                           "--out", str(model)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    with JudgeServer() as server:
        script_server(server)
        prepared = prepare(data, server)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    submission = f"tiny-sft-{secrets.token_hex(4)}"
    submitted = _ray(["job", "submit", "--address", ray_head["address"], "--submission-id", submission,
                      "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
                      "--", "python", "launch.py", "--config", "configs/recipe_tiny_sft.yaml", "sft.steps=4",
                      f"run.out_dir={out}", "run.name=tiny_sft", f"model.path={model}",
                      f"data.sft_files=[{data / 'sft.jsonl'}]", f"data.eval_files=[{data / 'eval.jsonl'}]"],
                     ray_head["env"], 1100)
    assert submitted.returncode == 0, submitted.stdout[-6000:] + submitted.stderr[-3000:]
    run_dir = out / "tiny_sft"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "policy/config.json", "policy/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert Path(summary["policy"]) == run_dir / "policy"
    # Nothing of the run was left in the job's working-dir copy on the head.
    assert not list(Path(ray_head["temp"]).rglob("tiny_sft"))
