"""Bad input at the command line: exit code 2 and one line naming the key or file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, SMOKE, run_launch


def _launch(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # A local cluster of its own: some checks here are the ones launch.py makes before starting it.
    return run_launch(*args, cwd=cwd, timeout=120, env={**os.environ, **(env or {})}, own_cluster=True)


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
    ("data.world_kind_prior=1.0", "data.world_kind_prior: must be in [0, 1)"),
    ("eval.probe_per_setting=-1", "eval.probe_per_setting: must be >= 0"),
    ("eval.probe_every=0", "eval.probe_every: must be >= 1"),
    ("reward.judge.failure_policy=ignore", "reward.judge.failure_policy"),
    ("nonsense=1", "nonsense"),
    ("learner.kl_coef=0.1", "learner.kl_coef: moved to algo.kl_coef"),
])
def test_bad_config_key_or_value_exits_2_naming_it(override, needle, tmp_path):
    _assert_one_line_error(_launch("--config", str(SMOKE), override,
                                   f"run.out_dir={tmp_path}"), needle)
    assert not any(tmp_path.iterdir())  # nothing was started or written


def test_missing_config_and_data_files_exit_2(tmp_path):
    _assert_one_line_error(_launch("--config", str(tmp_path / "absent.yaml")), "absent.yaml", "not found")
    _assert_one_line_error(_launch("--config", str(SMOKE), "data.source=files",
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
    _assert_one_line_error(_launch("--config", str(SMOKE), "data.source=files",
                                   f"data.train_files=[{train}]", f"data.skip_invalid={str(skip_invalid).lower()}",
                                   "sft.steps=0", f"run.out_dir={out}"), *needles)
    assert not out.exists()  # no run folder, no cluster: the data was read first


def test_bad_eval_and_sft_rows_name_their_file(tmp_path):
    train, evals, sft = tmp_path / "train.jsonl", tmp_path / "eval.jsonl", tmp_path / "sft.jsonl"
    train.write_bytes(GOOD + b"\n")
    evals.write_bytes(GOOD + b"\n" + json.dumps({**GOOD_ROW, "persona_setting": "maybe"}).encode() + b"\n")
    sft.write_bytes(json.dumps({"prompt": GOOD_ROW, "response": "Answer: red"}).encode() + b"\n")
    common = ("--config", str(SMOKE), "data.source=files", f"data.train_files=[{train}]",
              f"run.out_dir={tmp_path / 'runs'}")
    _assert_one_line_error(_launch(*common, f"data.eval_files=[{evals}]"), "eval.jsonl:2", "Prompt.persona_setting")
    _assert_one_line_error(_launch(*common, f"data.sft_files=[{sft}]"), "sft.jsonl:1", "response",
                           "mode token")


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  seed: 1\nalgo:\n  steps: [1\n")
    _assert_one_line_error(_launch("--config", str(bad)), "bad.yaml:5:1", "did not find expected ',' or ']'")


def test_bad_value_in_a_yaml_file_names_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  seed: 1\nalgo:\n  prompts_per_step: 4\n  steps: three\n")
    _assert_one_line_error(_launch("--config", str(bad)), "bad.yaml:5", "algo.steps", "three")


NO_CLUSTER_NEEDED = {  # case: (overrides, what the one line must name)
    "scalar-for-a-list": (["data.source=files", "data.train_files=prompts.jsonl"],
                          ["data.train_files", "expected a list", "data.train_files=["]),
    "sft-data-missing": (["data.source=files", "data.train_files=[{train}]"], ["sft.steps", "no data"]),
    "model-path-missing": (["model.path={tmp}/no-such-model"], ["model.path", "no-such-model", "not found"]),
    "model-folder-without-config": (["model.path={tmp}"], ["model.path", "config.json"]),
    "unreachable-hub-id": (["model.path=personadual-tests/no-such-model-7f3a"], ["model.path", "no-such-model-7f3a"]),
    "too-big-for-the-cluster": (["cluster.num_cpus=1", "rollout.num_engines=3"], ["cluster", "CPU", "rollout"]),
}


@pytest.mark.parametrize("case", list(NO_CLUSTER_NEEDED))
def test_bad_input_found_before_ray_exits_2_in_one_line_without_a_run_folder(case, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(GOOD + b"\n")
    overrides, needles = NO_CLUSTER_NEEDED[case]
    out = tmp_path / "runs"
    result = _launch("--config", str(ROOT / "configs/smoke.yaml"), f"run.out_dir={out}",
                     *[o.format(train=train, tmp=tmp_path) for o in overrides], env={"HF_HUB_OFFLINE": "1"}
                     if case == "unreachable-hub-id" else None)
    _assert_one_line_error(result, *needles)
    assert not out.exists()
    assert "Traceback" not in result.stderr


def test_config_checks_import_neither_torch_nor_ray_workers():
    """Config errors come fast because the config, its checks and launch.py's error path
    import no torch (4 s here) and start no Ray."""
    code = ("import sys, launch; code = launch.main(['--config', 'configs/smoke.yaml', 'algo.steps=-1']); "
            "print(code, 'torch' in sys.modules, 'vllm' in sys.modules, 'deepspeed' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False", "False", "False"], result.stdout + result.stderr
    assert "algo.steps: must be >= 0" in result.stderr


def test_the_driver_starts_its_actors_before_it_imports_torch():
    """Everything the driver imports before it creates its actors (the modules that define
    them included) imports no torch: about 2 s of one core that would hold every actor's start
    back (docs/ARCHITECTURE.md, "The driver, by job")."""
    code = ("import sys; import actors.launcher, actors.driver, actors.rollout_actor, actors.learner_group; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stdout + result.stderr


def test_help_lists_the_config_sections_and_their_keys():
    result = _launch("--help")
    assert result.returncode == 0
    for line in ("  run: ", "  algo: ", "  learner: ", "  wandb: ", "keep_last=0", "sampling.temperature=0.6"):
        assert line in result.stdout, line


def test_print_config_prints_the_resolved_config_and_starts_nothing(tmp_path):
    from omegaconf import OmegaConf

    result = _launch("--config", str(ROOT / "configs/smoke.yaml"), "--print-config", "algo.steps=7",
                     f"run.out_dir={tmp_path}/runs")
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.algo.steps == 7 and printed.sft.steps == 30 and printed.learner.sft_optim.lr == 3.0e-3
    assert printed.rollout.sampling.temperature == 0.6  # a schema default the file does not set
    assert not (tmp_path / "runs").exists()


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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stage_left_without_data_once_the_cluster_is_up_exits_2_without_a_run_folder(tmp_path):
    """Prompt lengths need the tokenizer, so this one is found after Ray started: still one
    line, exit 2, and the folder the run had made is gone (it never started)."""
    out = tmp_path / "runs"
    result = _launch("--config", str(ROOT / "configs/smoke.yaml"), f"run.out_dir={out}", "data.max_prompt_tokens=1",
                     "sft.steps=0")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]  # Ray's and the actors' warnings may come before it
    assert last.startswith("error: algo.steps:") and "no prompts" in last, last
    assert "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_run_folder_from_before_the_wandb_section_keeps_its_wandb_settings_on_resume(tmp_path):
    from omegaconf import OmegaConf

    from actors.config import load_config, to_container
    from actors.launcher import resolve_config

    old = to_container(load_config(ROOT / "configs/smoke.yaml"))
    del old["wandb"]
    old["run"].update(wandb_mode="disabled", wandb_project="older")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(old))
    cfg = resolve_config(None, [], tmp_path)
    assert (cfg.wandb.mode, cfg.wandb.project, cfg.algo.steps) == ("disabled", "older", 2)
