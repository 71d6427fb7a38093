"""What `launch.py` runs: load the config, check everything that needs no cluster, prepare
the run folder, connect Ray, drive.

The checks come first and import neither torch nor vLLM, so a bad input fails in about a
second, before a cluster or a run folder exists. Ray and the driver are imported only once
the run is going to start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from actors.config import MOVED_KEYS, ConfigError, load_config, to_container


def _resume_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there (not a run folder)")
    _migrate_saved_keys(saved)
    cfg = load_config(saved, overrides)
    before = OmegaConf.load(saved)
    for key in ("model.path", "model.tiny_preset"):
        if OmegaConf.select(before, key) != OmegaConf.select(cfg, key):
            raise ConfigError(f"{key}: --resume of a run trained from {OmegaConf.select(before, key)!r} "
                              f"with {OmegaConf.select(cfg, key)!r}; the checkpoint's model differs")
    return cfg


def _migrate_saved_keys(saved: Path) -> None:
    """A run folder written before a key moved (``run.wandb_mode`` to ``wandb.mode``,
    ``learner.kl_coef`` to ``algo.kl_coef``, ...) holds it at its old place; the saved value
    moves to the new key, so such runs still resume. (A user's own config with an old key
    exits 2 naming the new one instead: there, a silent move would hide a typo'd intent.)"""
    before, moved = _migrated(saved)
    if moved:
        OmegaConf.save(before, saved)


def _migrated(saved: Path) -> tuple[DictConfig, bool]:
    """The saved config with moved keys at their new places, and whether any moved."""
    before = OmegaConf.load(saved)
    moves = {**MOVED_KEYS, "run.wandb_mode": "wandb.mode", "run.wandb_project": "wandb.project"}
    moved = False
    for old, new in moves.items():
        value = OmegaConf.select(before, old, default="__absent__")
        if value == "__absent__":
            continue
        OmegaConf.update(before, new, value, force_add=True)
        parent, _, leaf = old.rpartition(".")
        del OmegaConf.select(before, parent)[leaf]
        moved = True
    return before, moved


# What an SFT checkpoint was trained on and for: a run branching from it (--init-from) must
# agree, or its "SFT" row would describe another model, world or stage length.
BRANCH_KEYS = ("model.path", "model.tiny_preset", "data.source", "data.world_seed", "data.world_sft_aligned_kinds",
               "data.world_kind_prior", "data.world_hold_back_misleading", "data.world_expertise_facts",
               "data.world_misleading_experts", "data.world_sft_personalized_without_persona",
               "data.world_sft_other_mode_given", "data.sft_files",
               "sft.steps", "sft.epochs", "sft.batch_size", "sft.max_length")
CHECKPOINT_COMPLETE = "COMPLETE"  # actors/run_state.py COMPLETE_MARKER (not imported here: it imports the data loaders)


def check_init_from(cfg: DictConfig, checkpoint: Path) -> None:
    """``--init-from RUN/checkpoints/sft_step_N``: a complete SFT checkpoint whose run trained
    this config's model on this config's world for this config's SFT stage."""
    state_file = checkpoint / "driver_state.json"
    if not (checkpoint / CHECKPOINT_COMPLETE).is_file() or not state_file.is_file():
        raise ConfigError(f"--init-from {checkpoint}: not a complete checkpoint (expected RUN/checkpoints/sft_step_N)")
    import json

    if json.loads(state_file.read_text()).get("stage") != "sft":
        raise ConfigError(f"--init-from {checkpoint}: an RL checkpoint; branch from the SFT one "
                          f"(RUN/checkpoints/sft_step_N), or --resume its run")
    saved = checkpoint.parent.parent / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--init-from {checkpoint}: no config.yaml in its run folder {saved.parent}")
    # Read, never rewritten: the source run stays as it was.
    with tempfile.TemporaryDirectory() as scratch:
        migrated = Path(scratch) / "config.yaml"
        OmegaConf.save(_migrated(saved)[0], migrated)
        source = load_config(migrated, [])
    for key in BRANCH_KEYS:
        if OmegaConf.select(source, key) != OmegaConf.select(cfg, key):
            raise ConfigError(f"{key}: --init-from a checkpoint trained with {OmegaConf.select(source, key)!r}, "
                              f"this run has {OmegaConf.select(cfg, key)!r}")


def branch_run_dir(cfg: DictConfig, checkpoint: Path) -> Path:
    """A new run folder holding a copy of ``checkpoint``: the driver restores it as a resumed
    run would, so the SFT stage is skipped and RL starts from the same state."""
    from actors.run_state import CHECKPOINTS, prepare_run_dir

    run_dir = prepare_run_dir(cfg)
    target = run_dir / CHECKPOINTS / checkpoint.name
    if target.exists():
        raise ConfigError(f"run.name: {run_dir} already holds {target.name}; name the branch anew")
    shutil.copytree(checkpoint, target)
    return run_dir


def resolve_config(config_path: Path | None, overrides: list[str], resume: Path | None) -> DictConfig:
    return _resume_config(Path(resume), overrides) if resume is not None else load_config(config_path, overrides)


def check_hub_model(repo_id: str) -> None:
    """A hub id that is neither cached nor reachable fails here in one line, not as a
    hundred-line traceback from inside the learner."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"model.path: {repo_id} is not a local folder nor in the Hugging Face cache, "
                          f"and HF_HUB_OFFLINE is set")
    try:
        HfApi().model_info(repo_id, timeout=10)
    except Exception as error:  # noqa: BLE001  (huggingface_hub's HTTP client raises its own kinds)
        kinds = {cls.__name__ for cls in type(error).__mro__}
        if "RepositoryNotFoundError" in kinds:
            raise ConfigError(f"model.path: {repo_id} is not a local folder and no such model is on the "
                              f"Hugging Face Hub") from None
        if "GatedRepoError" in kinds:
            raise ConfigError(f"model.path: {repo_id} is gated on the Hugging Face Hub; accept its licence "
                              f"and set HF_TOKEN") from None
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.path: {repo_id} is not a local folder nor in the Hugging Face cache, and the "
                          f"Hub is unreachable ({reason}); download it and pass its folder") from None


def _check_local_cluster_fits(cfg: DictConfig) -> None:
    """A local cluster's CPUs are known before Ray starts (num_cpus or the machine's); a run
    that asks for more fails now. A joined cluster (RAY_ADDRESS) is checked once joined."""
    from actors.placement import check_fits, plan_groups

    if os.environ.get("RAY_ADDRESS"):
        return
    cpus = float(cfg.cluster.num_cpus or os.cpu_count() or 1)
    specs = [spec for spec in plan_groups(cfg) if all(set(b) <= {"CPU"} for b in spec.bundles)]
    check_fits(specs, {"CPU": cpus}, [{"CPU": cpus}])


def preflight(cfg: DictConfig) -> None:
    """Every check that needs no cluster: data files and their rows, each stage having
    data, the model path, and the local cluster's size."""
    from personadual.data import DataError, check_data_files, resolve_model

    if cfg.data.source == "files":
        check_data_files(cfg.data.train_files, cfg.data.eval_files, cfg.data.sft_files,
                         skip_invalid=cfg.data.skip_invalid)
        if (cfg.sft.steps > 0 or cfg.sft.epochs > 0) and not cfg.data.sft_files:
            raise ConfigError("sft.steps: the SFT stage has no data (set data.sft_files, or sft.steps=0)")
    if cfg.model.path is not None:
        try:
            resolved = resolve_model(cfg.model.path, cfg.model.tiny_preset)
        except DataError as error:
            raise ConfigError(str(error)) from None
        if not Path(resolved).expanduser().exists():
            check_hub_model(resolved)
    _check_local_cluster_fits(cfg)


def launch(cfg: DictConfig, resume: Path | None, init_from: Path | None = None) -> dict[str, Any]:
    """Run ``cfg`` (already loaded and preflighted) to the end; returns the run's summary.
    ``init_from``: an SFT checkpoint (``check_init_from`` passed) that RL starts from."""
    from actors import cluster
    from actors.console import quiet_libraries
    from actors.driver import Driver
    from actors.run_state import prepare_run_dir
    from personadual.data import DataError
    from personadual.fault_hooks import fault_env
    from personadual.report import format_eval_table, method_label

    quiet_libraries()
    if resume is not None:
        run_dir, fresh = Path(resume), False
        OmegaConf.save(cfg, run_dir / "config.yaml")  # the run folder states what the run now is
    elif init_from is not None:
        run_dir, fresh = branch_run_dir(cfg, Path(init_from)), True
        print(f"branching from {init_from}", flush=True)
    else:
        run_dir, fresh = prepare_run_dir(cfg), True
    print(f"run folder: {run_dir}", flush=True)
    driver = None
    try:
        joined = bool(os.environ.get("RAY_ADDRESS"))
        address = cluster.connect(cfg.cluster.num_cpus, extra_env=fault_env())["address"]
        print(f"Ray: joined the cluster at {address}" if joined else f"Ray: started a local cluster at {address}",
              flush=True)
        driver = Driver(cfg, run_dir, resume=resume is not None, restore=init_from is not None)
        summary = driver.run()
    except (ConfigError, DataError):
        # Found once the cluster was there (its size, a stage without data): the run never
        # started, so it leaves no folder behind that reports would take for a run.
        if fresh and (driver is None or not driver.started):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        cluster.shutdown()
    print(format_eval_table(summary, run_dir, method_label(to_container(cfg))))
    return summary
