"""The experiment config: one OmegaConf structured schema composed of each room's config.

``load_config`` merges the schema's defaults, a YAML file and command-line dotlist
overrides, and turns every unknown or ill-typed key into a one-line ``ConfigError``
naming the key, which ``launch.py`` reports with exit code 2. A key that moved to another
section names its new home (``learner.kl_coef: moved to algo.kl_coef``).

One home per thing (docs/ARCHITECTURE.md, "The config map"): the objective is ``algo``'s;
each role's count, CPUs/GPUs and extra Ray resources are its own section's (``learner``,
``rollout``, ``reward``); ``cluster`` holds only what concerns the whole cluster. Seeds left
null (``data.world_seed``, ``learner.seed``, ``rollout.sampling.seed``) are ``run.seed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from actors.schedule import REFERENCE_PLACES, SCHEDULES, ScheduleError, resolve_schedule
from learner.config import LearnerConfig
from personadual.algo_config import AlgoConfig
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
    keep_last: int = 0  # RL checkpoints kept (oldest deleted first); 0: all
    hf_export: bool = False  # also write each RL checkpoint's policy as an HF folder (checkpoints/*/hf)
    eval_every: int = 0  # RL steps between free-mode evals; 0: only after SFT and at the end
    log_samples_every: int = 5  # RL steps between training-rollout sample tables; 0: never
    samples_per_log: int = 8  # rollouts in each of those tables
    # Rollout engines and reward workers that die are replaced; this many failures in a row
    # (no step completing in between) stop the run after a checkpoint (actors/supervision.py).
    max_consecutive_failures: int = 3


@dataclass
class WandbSection:
    mode: str = "offline"  # offline | online | disabled
    project: str = "personadual"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    name: Optional[str] = None  # default: the run folder's name


@dataclass
class ModelSection:
    path: Optional[str] = None  # HF hub id or local folder; None builds the tiny model
    tiny_preset: str = "tiny"


@dataclass
class DataSection:
    source: str = "world"  # world | files
    world_seed: Optional[int] = None  # the synthetic world's questions and personas; null: run.seed
    # How many of the world's kinds have their aligned-persona questions demonstrated in SFT
    # (the others' are RL prompts only, so RL has a mode choice left to learn); null: all.
    world_sft_aligned_kinds: Optional[int] = 3
    # Share of each kind's entities in the kind's typical colour, which general mode answers for
    # entities it never learned (personadual/world.py WorldConfig.kind_prior); 0: off.
    world_kind_prior: float = 0.0
    # RL also asks the questions no mode can answer from the prompt, scoring "unknown" (SFT's
    # answer for them) as right (personadual/world.py WorldConfig.rl_credit_unknown); false: off.
    world_rl_credit_unknown: bool = False
    # The held-back kinds' questions of a non-expert about an unfamiliar entity are RL prompts
    # only, like their aligned ones (personadual/world.py WorldConfig.hold_back_misleading).
    world_hold_back_misleading: bool = False
    # SFT also teaches which profession knows each kind, in general mode (WorldConfig.expertise_facts).
    world_expertise_facts: bool = False
    # Unaligned personas are experts on another kind (WorldConfig.misleading_experts).
    world_misleading_experts: bool = False
    # SFT also shows personalized mode without a persona, its mode token given, not trained
    # (WorldConfig.sft_personalized_without_persona).
    world_sft_personalized_without_persona: bool = False
    # RL asks about known and unfamiliar entities equally often in each persona setting
    # (WorldConfig.rl_balance_familiarity).
    world_rl_balance_familiarity: bool = False
    # SFT also shows the other mode's answer to each demonstrated question with a persona, its
    # mode token given (WorldConfig.sft_other_mode_given).
    world_sft_other_mode_given: bool = False
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
class EvalSection:
    at_start: bool = True  # evaluate the SFT checkpoint before RL
    greedy: bool = True
    samples_logged: int = 8
    baselines: bool = True  # after SFT and at the end: forced single-mode accuracy and the upper bound
    two_turn_cases: int = 48  # synthetic world: two-turn mode-alignment cases (0: off)
    # Eval prompts per setting whose mode-token probability the learner logs every
    # `probe_every` RL steps and after the last (mode/probe/*; ~0.3 s a probe on the default
    # run); 0: off.
    probe_per_setting: int = 50
    probe_every: int = 1


@dataclass
class ClusterSection:
    """The whole cluster; each role's count and resources are in its own section."""

    num_cpus: Optional[int] = None  # local Ray only; None: what the machine has
    # Placement groups (actors/placement.py): one for the learner ranks, one per rollout
    # engine, one for the reward workers, each placed with this strategy.
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    placement_timeout_s: float = 300.0  # a group not placed by then fails the run, naming it
    # How the RL step's phases share the hardware (actors/schedule.py): serial (generate, score,
    # reference, train, sync in turn, each phase on every core of its node), colocated (learner
    # rank i and engine i in one placement bundle: same node, on GPU the same device, the
    # engines asleep while the learner trains) or pipelined (step t+1 generates while step t
    # trains, cores split between them; implies algo.max_staleness=1).
    schedule: str = "serial"
    # Who computes the KL reference's log-probs (actors/reference_worker.py): the learner, in its
    # step, or a worker beside the engines that scores each round as soon as it is generated
    # (off the learner's critical path when pipelined). null: worker when pipelined on CPU
    # engines with a KL term, else learner.
    reference: Optional[str] = None


@dataclass
class ExperimentConfig:
    run: RunSection = field(default_factory=RunSection)
    wandb: WandbSection = field(default_factory=WandbSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    sft: SftSection = field(default_factory=SftSection)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


_CHOICES: dict[str, tuple[Any, ...]] = {
    "wandb.mode": ("offline", "online", "disabled"),
    "data.source": ("world", "files"),
    "rollout.engine": ("vllm", "hf"),
    "cluster.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "cluster.schedule": SCHEDULES,
    "cluster.reference": (None, *REFERENCE_PLACES),
}
_POSITIVE = ("sft.batch_size", "run.max_consecutive_failures", "cluster.placement_timeout_s")
_NON_NEGATIVE = ("sft.steps", "sft.epochs", "run.save_every", "run.eval_every", "run.keep_last",
                 "run.log_samples_every", "run.samples_per_log")
# Each role's extra Ray resources, and the keys that hold its CPUs and GPUs instead.
_RESOURCE_DICTS = {"learner.resources": "learner.num_cpus_per_rank, learner.num_gpus_per_rank",
                   "rollout.resources": "rollout.num_cpus_per_engine, rollout.num_gpus_per_engine",
                   "reward.resources": "reward.num_cpus_per_worker"}
# Seeds that default to run.seed.
DERIVED_SEEDS = ("data.world_seed", "learner.seed", "rollout.sampling.seed")
# Keys that moved: old -> new (an old key in a file or override exits 2 naming the new one).
MOVED_KEYS = {
    **{f"learner.{name}": f"algo.{name}" for name in
       ("clip_range", "kl_coef", "beta", "prefix_tokens", "advantage", "ppo_epochs", "mini_batches")},
    "learner.advantage_scale": "algo.scale",
    "rollout.sampling.n_per_mode": "algo.n_per_mode",
    "cluster.learner_cpus": "learner.num_cpus_per_rank",
    "cluster.learner_gpus": "learner.num_gpus_per_rank",
    "cluster.learner_resources": "learner.resources",
    "cluster.rollout_resources": "rollout.resources",
    "cluster.reward_workers": "reward.num_workers",
    "cluster.reward_cpus": "reward.num_cpus_per_worker",
    "cluster.reward_resources": "reward.resources",
}


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix] if prefix else []
    keys = [prefix] if prefix else []
    for name, value in node.items():
        keys += _dotted_keys(value, f"{prefix}.{name}" if prefix else str(name))
    return keys


def _refuse_moved_keys(config: DictConfig, where: str) -> None:
    for key in _dotted_keys(OmegaConf.to_container(config)):
        if key in MOVED_KEYS:
            raise ConfigError(f"{key}: moved to {MOVED_KEYS[key]}{where}")


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
    for key, own_keys in _RESOURCE_DICTS.items():
        for name, amount in OmegaConf.select(cfg, key).items():
            if name in ("CPU", "GPU"):
                raise ConfigError(f"{key}.{name}: CPUs and GPUs have their own keys ({own_keys})")
            if amount <= 0:
                raise ConfigError(f"{key}.{name}: must be > 0, got {amount!r}")
    kinds = cfg.data.world_sft_aligned_kinds
    if kinds is not None and not 0 <= kinds <= len(KINDS):
        raise ConfigError(f"data.world_sft_aligned_kinds: must be null or 0..{len(KINDS)}, got {kinds!r}")
    if cfg.eval.probe_per_setting < 0:
        raise ConfigError(f"eval.probe_per_setting: must be >= 0, got {cfg.eval.probe_per_setting!r}")
    if cfg.eval.probe_every < 1:
        raise ConfigError(f"eval.probe_every: must be >= 1, got {cfg.eval.probe_every!r}")
    if not 0.0 <= cfg.data.world_kind_prior < 1.0:
        raise ConfigError(f"data.world_kind_prior: must be in [0, 1), got {cfg.data.world_kind_prior!r}")
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
    if "is not a ListConfig" in message:  # OmegaConf's words for a scalar given to a list key
        message = f"expected a list, e.g. {key}=[a.jsonl,b.jsonl] on the command line or [a.jsonl] in YAML"
    return f"{key}: {message}" if key else message


def _yaml_error(path: Path, error: Exception) -> str:
    """``file:line:column: problem`` for a YAML syntax error (PyYAML marks are 0-based)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return f"{path}: {problem}"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: {problem}"


def _key_line(path: Path, dotted: str) -> int | None:
    """The 1-based line of ``dotted`` (e.g. ``algo.steps``) in the YAML file, if it is there."""
    import yaml

    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return None
    line = None
    for part in dotted.replace("[", ".").replace("]", "").split("."):
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
            if not match:
                return line
            key_node, node = match[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _merge_error(path: Path, from_file: DictConfig, error: OmegaConfBaseException) -> str:
    """A merge error, located at its line when the bad key came from the YAML file."""
    key = getattr(error, "full_key", None) or ""
    message = _one_line(error)
    if key and OmegaConf.select(from_file, key, default="__absent__") != "__absent__":
        line = _key_line(path, key)
        if line is not None:
            return f"{path}:{line}: {message}"
    return f"config {message}"


def _check_required(from_file: DictConfig, from_argv: DictConfig) -> None:
    """A config file marks what only the user can supply (a model path, data files) as ``???``;
    the first one the overrides leave unset is a one-line error naming the key. Checked on the
    file and overrides alone: merged onto the schema's defaults, ``???`` would silently keep
    the default (``model.path: null`` builds the tiny model)."""
    given = OmegaConf.merge(from_file, from_argv)
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
        raise ConfigError(_yaml_error(path, error)) from None
    if not isinstance(from_file, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(from_file).__name__}")
    try:
        from_argv = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise ConfigError(f"config {_one_line(error)}") from None
    _refuse_moved_keys(from_file, f" (in {path})")
    _refuse_moved_keys(from_argv, "")
    _check_required(from_file, from_argv)
    try:
        cfg = OmegaConf.merge(schema, from_file)
    except OmegaConfBaseException as error:
        raise ConfigError(_merge_error(path, from_file, error)) from None
    try:
        cfg = OmegaConf.merge(cfg, from_argv)
    except OmegaConfBaseException as error:
        raise ConfigError(f"config {_one_line(error)}") from None
    for key in DERIVED_SEEDS:
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, cfg.run.seed)
    _validate(cfg)
    try:
        resolve_schedule(cfg)
    except ScheduleError as error:
        raise ConfigError(str(error)) from None
    try:  # each room's dataclass checks its own values (on construction or validate()), naming the key
        experiment = OmegaConf.to_object(cfg)
        for name in ("algo", "rollout", "learner", "reward"):
            validate = getattr(getattr(experiment, name), "validate", None)
            if callable(validate):
                validate()
    except OmegaConfBaseException as error:
        raise ConfigError(f"config {_one_line(error)}") from None
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None
    OmegaConf.set_readonly(cfg, True)
    return cfg


def describe_sections() -> str:
    """Every config section with its keys and defaults, for ``launch.py --help``."""
    schema = OmegaConf.structured(ExperimentConfig)
    lines = []
    for name in schema:
        flat = _leaves(OmegaConf.to_container(schema[name]))
        lines.append(f"  {name}: " + ", ".join(f"{key}={value}" for key, value in flat.items()))
    return "\n".join(lines)


def _leaves(container: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(container, dict):
        return {prefix: container}
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(_leaves(value, name) if isinstance(value, dict) and value else {name: value})
    return flat


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def section(cfg: DictConfig, name: str) -> Any:
    """A section as its dataclass instance (what each room's code takes)."""
    return OmegaConf.to_object(cfg[name])
