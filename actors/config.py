"""The experiment config: one OmegaConf structured schema composed of each room's config.

``load_config`` merges the schema's defaults, a YAML file and command-line dotlist
overrides, and turns every unknown or ill-typed key into a one-line ``ConfigError``
naming the key, which ``launch.py`` reports with exit code 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from learner.config import LearnerConfig
from personadual.advantage import ADVANTAGE_KINDS
from personadual.world import KINDS
from rewards.config import RewardConfig
from rollout.config import RolloutConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A bad config key or value; the message is one line and names the key."""


@dataclass
class RunSection:
    name: Optional[str] = None  # run folder name; default: a timestamp
    out_dir: str = "runs"
    seed: int = 0
    save_every: int = 0  # RL steps between checkpoints; 0: only the final one
    eval_every: int = 0  # RL steps between free-mode evals; 0: only after SFT and at the end
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "personadual"
    # Rollout engines and reward workers that die are replaced; this many failures in a row
    # (no step completing in between) stop the run after a checkpoint (actors/supervision.py).
    max_consecutive_failures: int = 3


@dataclass
class ModelSection:
    path: Optional[str] = None  # HF hub id or local folder; None builds the tiny model
    tiny_preset: str = "tiny"


@dataclass
class DataSection:
    source: str = "world"  # world | files
    world_seed: int = 0
    # How many of the world's kinds have their aligned-persona questions demonstrated in SFT
    # (the others' are RL prompts only, so RL has a mode choice left to learn); null: all.
    world_sft_aligned_kinds: Optional[int] = 3
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    sft_files: list[str] = field(default_factory=list)
    skip_invalid: bool = False
    max_eval_prompts: int = 0  # 0: all
    max_prompt_tokens: int = 2048  # longer prompts are dropped and counted
    # RL prompts: every setting (no persona, unaligned, aligned, personalized) equally often,
    # the rarer ones repeated, so each setting's evidence weighs the same in the RL stage.
    balance_settings: bool = False


@dataclass
class SftSection:
    steps: int = 200  # 0 with epochs > 0: as many steps as `epochs` passes over the data take
    epochs: float = 0.0
    batch_size: int = 32
    max_length: int = 4096  # longer examples (prompt + response tokens) are dropped and counted


@dataclass
class AlgoSection:
    steps: int = 20  # 0 with epochs > 0: as many steps as `epochs` passes over the prompts take
    epochs: float = 0.0
    prompts_per_step: int = 16
    n_per_mode: int = 4  # forced-prefix: n per mode (2n per prompt); free mode: 2n per prompt
    forced_prefix: bool = True
    advantage: str = "dual"  # dual | grpo | dual_released
    scale: str = "none"  # none | group_std
    beta: float = 2.0  # weight of the mode-prefix token's advantage
    prefix_tokens: int = 1
    kl_coef: float = 0.04
    clip_range: float = 0.2
    max_staleness: int = 0  # RL steps a rollout's weights may lag the learner (0 or 1)


@dataclass
class EvalSection:
    at_start: bool = True  # evaluate the SFT checkpoint before RL
    greedy: bool = True
    samples_logged: int = 8
    baselines: bool = True  # after SFT and at the end: forced single-mode accuracy and the upper bound
    two_turn_cases: int = 48  # synthetic world: two-turn mode-alignment cases (0: off)


@dataclass
class ClusterSection:
    num_cpus: Optional[int] = None  # local Ray only; None: what the machine has
    reward_workers: int = 1
    reward_cpus: float = 0.1
    learner_cpus: float = 1.0
    learner_gpus: float = 0.0
    # Placement groups (actors/placement.py): one for the learner ranks, one per rollout
    # engine, one for the reward workers, each placed with this strategy.
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    placement_timeout_s: float = 300.0  # a group not placed by then fails the run, naming it
    # Extra Ray resources every bundle of a role asks for, e.g. {node_b: 1} (a custom resource
    # of one node, `ray start --resources`) or {"node:10.0.0.7": 0.01}: pins a role to nodes.
    learner_resources: dict[str, float] = field(default_factory=dict)
    rollout_resources: dict[str, float] = field(default_factory=dict)
    reward_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    sft: SftSection = field(default_factory=SftSection)
    algo: AlgoSection = field(default_factory=AlgoSection)
    eval: EvalSection = field(default_factory=EvalSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


_CHOICES: dict[str, tuple[Any, ...]] = {
    "run.wandb_mode": ("offline", "online", "disabled"),
    "data.source": ("world", "files"),
    "algo.advantage": ADVANTAGE_KINDS,
    "algo.scale": ("none", "group_std"),
    "algo.max_staleness": (0, 1),
    "rollout.engine": ("vllm", "hf"),
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}
_POSITIVE = ("sft.batch_size", "algo.prompts_per_step", "algo.n_per_mode", "cluster.reward_workers",
             "run.max_consecutive_failures")
# A placement bundle may not be empty: each role's CPUs stay above zero.
_POSITIVE_FLOATS = ("cluster.learner_cpus", "cluster.reward_cpus", "cluster.placement_timeout_s")
_RESOURCE_DICTS = ("cluster.learner_resources", "cluster.rollout_resources", "cluster.reward_resources")
_NON_NEGATIVE = ("sft.steps", "algo.steps", "sft.epochs", "algo.epochs", "run.save_every", "run.eval_every",
                 "algo.kl_coef")


def _validate(cfg: DictConfig) -> None:
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {value!r}")
    for key in _POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {OmegaConf.select(cfg, key)!r}")
    for key in _NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {OmegaConf.select(cfg, key)!r}")
    for key in _POSITIVE_FLOATS:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be > 0, got {OmegaConf.select(cfg, key)!r}")
    for key in _RESOURCE_DICTS:
        for name, amount in OmegaConf.select(cfg, key).items():
            if name in ("CPU", "GPU"):
                raise ConfigError(f"{key}.{name}: CPUs and GPUs have their own keys (cluster.*_cpus, "
                                  f"cluster.learner_gpus, rollout.num_*_per_engine)")
            if amount <= 0:
                raise ConfigError(f"{key}.{name}: must be > 0, got {amount!r}")
    kinds = cfg.data.world_sft_aligned_kinds
    if kinds is not None and not 0 <= kinds <= len(KINDS):
        raise ConfigError(f"data.world_sft_aligned_kinds: must be null or 0..{len(KINDS)}, got {kinds!r}")
    rl_stage = cfg.algo.steps > 0 or cfg.algo.epochs > 0
    if cfg.data.source == "files" and rl_stage and not cfg.data.train_files:
        raise ConfigError("data.train_files: data.source=files needs at least one training file")
    if cfg.data.source == "files":
        for key in ("train_files", "eval_files", "sft_files"):
            for index, name in enumerate(cfg.data[key]):
                if not Path(name).expanduser().is_file():
                    raise ConfigError(f"data.{key}[{index}]: {name}: data file not found")


def _one_line(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{key}: {message}" if key else message


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix]
    keys = []
    for name, child in node.items():
        keys.extend(_dotted_keys(child, f"{prefix}.{name}" if prefix else str(name)))
    return keys


def _check_required(from_file: Any, overrides: list[str] | tuple[str, ...]) -> None:
    """A config file marks what only the user can supply (a model path, data files) as ``???``;
    the first one the overrides leave unset is a one-line error naming the key. Checked on the
    file and overrides alone: merged onto the schema's defaults, ``???`` would silently keep
    the default (``model.path: null`` builds the tiny model)."""
    given = OmegaConf.merge(from_file, OmegaConf.from_dotlist(list(overrides)))
    unset = OmegaConf.missing_keys(given)
    # In the file's order, so the first named is the first a reader of the file meets.
    missing = [key for key in _dotted_keys(OmegaConf.to_container(given)) if key in unset]
    if missing:
        more = f" (also unset: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(f"{missing[0]}: required, set it on the command line "
                          f"({missing[0]}=...){more}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema defaults <- YAML file <- dotlist overrides, validated; errors name the key."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        from_file = OmegaConf.load(path)
    except Exception as error:  # YAML syntax errors carry their own line numbers
        raise ConfigError(f"{path}: {str(error).splitlines()[0]}") from None
    try:
        cfg = OmegaConf.merge(schema, from_file, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as error:
        raise ConfigError(f"config {_one_line(error)}") from None
    _check_required(from_file, overrides)
    _validate(cfg)
    try:  # each room's dataclass checks its own values (on construction or validate()), naming the key
        experiment = OmegaConf.to_object(cfg)
        for name in ("rollout", "learner", "reward"):
            validate = getattr(getattr(experiment, name), "validate", None)
            if callable(validate):
                validate()
    except OmegaConfBaseException as error:
        raise ConfigError(f"config {_one_line(error)}") from None
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def section(cfg: DictConfig, name: str) -> Any:
    """A section as its dataclass instance (what each room's code takes)."""
    return OmegaConf.to_object(cfg[name])
