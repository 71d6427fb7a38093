"""Bad input at the command line: exit code 2 and one line naming the key or file."""

from __future__ import annotations

import json
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
    ("data.world_sft_aligned_kinds=7", "data.world_sft_aligned_kinds"),
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


GOOD_ROW = {"id": "p1", "question": "What color is the flower Zor?", "persona": None, "persona_setting": "none",
            "task_type": "objective", "gold": ["red"], "scorer": "exact_match"}
GOOD = json.dumps(GOOD_ROW).encode()
BAD_DATA = {  # case: (train.jsonl's lines, data.skip_invalid, what the one line must name)
    "malformed-json": ([GOOD, b'{"id": "p2", "question": '], False, ["train.jsonl:2", "invalid JSON"]),
    "missing-field": ([GOOD, json.dumps({k: v for k, v in GOOD_ROW.items() if k != "gold"}).encode()], False,
                      ["train.jsonl:2", "Prompt.gold", "missing"]),
    "ill-typed-field": ([json.dumps({**GOOD_ROW, "question": 7}).encode(), GOOD], False,
                        ["train.jsonl:1", "Prompt.question", "expected a string, got int"]),
    "non-utf8": ([GOOD, b'{"id": "p\xff2"}'], False, ["train.jsonl:2", "not UTF-8", "0xff"]),
    "empty": ([], False, ["train.jsonl", "empty dataset"]),
    "empty-even-skipping": ([], True, ["train.jsonl", "empty dataset"]),
    "every-row-skipped": ([b"{oops", b"\xfe"], True, ["train.jsonl", "all 2 row(s) were invalid and skipped"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_exits_2_naming_file_line_and_field(case, tmp_path):
    lines, skip_invalid, needles = BAD_DATA[case]
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"".join(line + b"\n" for line in lines))
    out = tmp_path / "runs"
    _assert_one_line_error(_launch("--config", str(ROOT / "configs/smoke.yaml"), "data.source=files",
                                   f"data.train_files=[{train}]", f"data.skip_invalid={str(skip_invalid).lower()}",
                                   "sft.steps=0", f"run.out_dir={out}"), *needles)
    assert not out.exists()  # no run folder, no cluster: the data was read first


def test_bad_eval_and_sft_rows_name_their_file(tmp_path):
    train, evals, sft = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "sft.jsonl"
    train.write_bytes(GOOD + b"\n")
    evals.write_bytes(GOOD + b"\n" + json.dumps({**GOOD_ROW, "persona_setting": "maybe"}).encode() + b"\n")
    sft.write_bytes(json.dumps({"prompt": GOOD_ROW, "response": "Answer: red"}).encode() + b"\n")
    common = ("--config", str(ROOT / "configs/smoke.yaml"), "data.source=files", f"data.train_files=[{train}]",
              f"run.out_dir={tmp_path / 'runs'}")
    _assert_one_line_error(_launch(*common, f"data.eval_files=[{evals}]"), "eval.jsonl:2", "Prompt.persona_setting")
    _assert_one_line_error(_launch(*common, f"data.sft_files=[{sft}]"), "sft.jsonl:1", "response",
                           "mode token")


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
    from personadual.prepare.recipe import load_recipe

    for path in paths:
        if path.name in ("recipe_tiny.yaml", "recipe_paper.yaml"):  # data recipes, not run configs
            unset = sorted(OmegaConf.missing_keys(OmegaConf.load(path)))
            load_recipe(path, [f"{key}={tmp_path}" for key in unset])
            continue
        from_file = OmegaConf.load(path)
        needs_files = from_file.get("data", {}).get("source") == "files"
        # What a config marks required (`???`) is given as the user would: a folder or files.
        required = [f"{key}=[{data}]" if key.startswith("data.") else f"{key}={tmp_path}"
                    for key in sorted(OmegaConf.missing_keys(from_file))]
        load_config(path, ([f"data.train_files=[{data}]"] if needs_files else []) + required)
