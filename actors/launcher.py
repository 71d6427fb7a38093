"""What `launch.py` runs: load the config, prepare the run folder, connect Ray, drive."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from actors import cluster
from actors.config import ConfigError, load_config, to_container
from actors.driver import Driver, prepare_run_dir
from personadual.data import check_data_files
from personadual.report import format_eval_table, method_label


def _resume_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there (not a run folder)")
    cfg = load_config(saved, overrides)
    before = OmegaConf.load(saved)
    for key in ("model.path", "model.tiny_preset"):
        if OmegaConf.select(before, key) != OmegaConf.select(cfg, key):
            raise ConfigError(f"{key}: --resume of a run trained from {OmegaConf.select(before, key)!r} "
                              f"with {OmegaConf.select(cfg, key)!r}; the checkpoint's model differs")
    return cfg


def launch(config_path: Path | None, overrides: list[str], resume: Path | None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _resume_config(Path(resume), overrides) if resume is not None else load_config(config_path, overrides)
    if cfg.data.source == "files":  # bad data exits 2 before a run folder or a cluster exists
        check_data_files(cfg.data.train_files, cfg.data.eval_files, cfg.data.sft_files,
                         skip_invalid=cfg.data.skip_invalid)
    if resume is not None:
        run_dir = Path(resume)
        OmegaConf.save(cfg, run_dir / "config.yaml")  # the run folder states what the run now is
    else:
        run_dir = prepare_run_dir(cfg)
    cluster.connect(cfg.cluster.num_cpus)
    try:
        summary = Driver(cfg, run_dir, resume=resume is not None).run()
    finally:
        cluster.shutdown()
    print(format_eval_table(summary, run_dir, method_label(to_container(cfg))))
    return summary



