"""The paper's configs and their tiny twins: what only the user can supply (``???``) is
required, and a run without it exits 2 naming it before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from actors.config import ConfigError, load_config
from tests.helpers import run_launch

ROOT = Path(__file__).resolve().parent.parent
RUN_CONFIGS = ("qwen3_8b_sft", "qwen3_8b_dualgrpo", "qwen3_8b_eval",
               "recipe_tiny_sft", "recipe_tiny_dualgrpo", "recipe_tiny_eval")


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_a_config_without_model_path_exits_2_naming_it(name, tmp_path):
    result = run_launch("--config", str(ROOT / f"configs/{name}.yaml"), f"run.out_dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: model.path: required"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # no run folder


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_with_model_path_given_the_next_required_key_is_a_data_file(name, tmp_path):
    data_keys = [k for k in OmegaConf.missing_keys(OmegaConf.load(ROOT / f"configs/{name}.yaml")) if k != "model.path"]
    assert data_keys and all(k.startswith("data.") for k in data_keys)
    with pytest.raises(ConfigError, match=r"^data\.\w+_files: required"):
        load_config(ROOT / f"configs/{name}.yaml", [f"model.path={tmp_path}"])


def test_a_required_key_given_in_the_file_or_on_the_command_line_is_accepted(tmp_path):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("")
    cfg = load_config(ROOT / "configs/qwen3_8b_eval.yaml", [f"model.path={tmp_path}", f"data.eval_files=[{prompts}]"])
    assert cfg.model.path == str(tmp_path) and cfg.sft.steps == 0 and cfg.algo.steps == 0
    assert list(cfg.data.train_files) == []  # an eval-only run needs no training prompts


def test_the_paper_configs_carry_table_6():
    sft = load_config(ROOT / "configs/qwen3_8b_sft.yaml", ["model.path=x", "data.sft_files=[]", "data.eval_files=[]"])
    rl = load_config(ROOT / "configs/qwen3_8b_dualgrpo.yaml",
                     ["model.path=x", "data.train_files=[README.md]", "data.eval_files=[]"])
    assert (sft.sft.batch_size, sft.learner.sft_optim.lr, sft.learner.sft_optim.schedule, sft.sft.epochs,
            sft.learner.sft_optim.warmup_ratio, sft.sft.max_length) == (16, 5e-5, "cosine", 1, 0.01, 4096)
    assert (rl.algo.prompts_per_step, rl.learner.optim.lr, rl.learner.optim.schedule, rl.algo.epochs,
            rl.learner.optim.warmup_ratio, rl.data.max_prompt_tokens, rl.rollout.sampling.max_response_tokens,
            rl.algo.kl_coef, rl.rollout.sampling.temperature, rl.algo.n_per_mode, rl.algo.beta) == (
        64, 1e-6, "linear", 5, 0.1, 2048, 1024, 0.04, 0.6, 4, 2.0)
    for cfg in (sft, rl):
        assert (cfg.learner.precision, cfg.learner.zero_stage) == ("bf16", 3)


def test_the_report_labels_an_sft_only_run_sft_and_an_untrained_one_a_checkpoint_eval(tmp_path):
    from actors.config import to_container
    from personadual.report import method_label

    files = [f"data.{k}_files=[{ROOT / 'README.md'}]" for k in ("sft", "train", "eval")]
    for scale in ("recipe_tiny", "qwen3_8b"):
        labels = [method_label(to_container(load_config(ROOT / f"configs/{scale}_{stage}.yaml",
                                                        [f"model.path={tmp_path}", *files])))
                  for stage in ("sft", "dualgrpo", "eval")]
        assert labels == ["SFT", "DualGRPO", "checkpoint eval"], scale
