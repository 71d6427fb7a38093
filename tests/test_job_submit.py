"""`ray job submit` of the smoke run to a Ray head this test starts (127.0.0.1, token auth
on, as Ray 2.60 has it): the job uploads the repository as its working dir, launch.py joins
the cluster through RAY_ADDRESS, and the run folder holds what docs/ARCHITECTURE.md lists
under "The run folder".

The head is this test's own (tests/ray_head.py), with the dashboard `ray job submit` talks to.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from tests.ray_head import VENV_BIN, RayHead

ROOT = Path(__file__).resolve().parent.parent
# What the job does not need: kept out of the working-dir upload (Ray also honours .gitignore).
UPLOAD_EXCLUDES = [".venv", ".git", ".whl", "runs", "wandb", ".pytest_cache", ".hypothesis", "*.egg-info",
                   "__pycache__", ".ci"]

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(dashboard=True).start()
    try:
        yield {"address": head.dashboard_address, "env": head.env, "temp": head.temp}
    finally:
        head.stop()


def _ray(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(1200)
def test_job_submit_runs_the_smoke_config_on_the_cluster(ray_head, tmp_path):
    env, address = ray_head["env"], ray_head["address"]
    refused = _ray(["job", "list", "--address", address], {**env, "RAY_AUTH_TOKEN": "not-the-token"}, 120)
    assert refused.returncode != 0  # the head checks tokens

    out = tmp_path / "runs"
    submission = f"smoke-{secrets.token_hex(4)}"
    submitted = _ray(["job", "submit", "--address", address, "--submission-id", submission,
                      "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}),
                      "--", "python", "launch.py", "--config", "configs/smoke.yaml",
                      f"run.out_dir={out}", "run.name=job"], env, 1100)
    status = _ray(["job", "status", "--address", address, submission], env, 120)
    assert submitted.returncode == 0, submitted.stdout[-6000:] + submitted.stderr[-3000:]
    assert f"Job '{submission}' succeeded" in status.stdout, status.stdout + status.stderr
    run_dir = out / "job"
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "policy" / "config.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["eval"]) >= {"no_persona", "unaligned", "aligned", "personalized"}
    rl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rl if r["stage"] == "rl"] == [1, 2]
    # launch.py joined the head (RAY_ADDRESS from the job), it did not start a Ray of its own.
    logs = _ray(["job", "logs", "--address", address, submission], env, 120).stdout
    assert "Ray: joined the cluster at" in logs, logs[-3000:]  # launch.py's line (Ray's own INFO lines are off)
    assert "| DualGRPO | aligned |" in logs
