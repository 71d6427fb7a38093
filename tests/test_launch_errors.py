"""Bad input at the command line: exit code 2 and one line naming the key or file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _launch(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("override,needle", [
    ("algo.stepz=3", "algo.stepz"),
    ("algo.steps=three", "algo.steps"),
    ("algo.advantage=ppo", "algo.advantage"),
    ("learner.zero_stage=7", "learner.zero_stage"),
    ("reward.judge.failure_policy=ignore", "reward.judge.failure_policy"),
    ("nonsense=1", "nonsense"),
])
def test_bad_config_key_or_value_exits_2_naming_it(override, needle, tmp_path):
    _assert_one_line_error(_launch("--config", str(ROOT / "configs/smoke.yaml"), override,
                                   f"run.out_dir={tmp_path}"), needle)
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_missing_config_and_data_files_exit_2(tmp_path):
    _assert_one_line_error(_launch("--config", str(tmp_path / "absent.yaml")), "absent.yaml", "not found")
    _assert_one_line_error(_launch("--config", str(ROOT / "configs/smoke.yaml"), "data.source=files",
                                   f"data.train_files=[{tmp_path}/missing.jsonl]", f"run.out_dir={tmp_path}"),
                           "data.train_files[0]", "missing.jsonl", "not found")


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  steps: [1\n")
    _assert_one_line_error(_launch("--config", str(bad)), "bad.yaml")


def test_every_shipped_config_loads(tmp_path):
    from omegaconf import OmegaConf

    from actors.config import load_config

    data = tmp_path / "prompts.jsonl"
    data.write_text("")
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in paths} >= {"default.yaml", "smoke.yaml", "qwen3_8b_sft.yaml", "qwen3_8b_dualgrpo.yaml"}
    for path in paths:
        needs_files = OmegaConf.load(path).get("data", {}).get("source") == "files"
        load_config(path, [f"data.train_files=[{data}]"] if needs_files else [])
