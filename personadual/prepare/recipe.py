"""The data recipe: which datasets become the SFT, RL and evaluation files, and which
endpoints write personas and teacher trajectories (``configs/recipe_*.yaml``).

Loaded like a run config: schema defaults <- YAML <- dotlist overrides; an unknown or
ill-typed key, or a ``???`` left unset, is a one-line ``DataError`` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from personadual.benchmarks.personas import AlignedPersonaConfig, PersonaHubConfig
from personadual.benchmarks.registry import BenchmarkConfig
from personadual.data import DataError
from personadual.prepare.calls import EndpointConfig


@dataclass
class RecipeConfig:
    out_dir: str = MISSING  # the run's files and their manifests are written here
    cache_dir: Optional[str] = None  # endpoint calls cached here; None: OUT_DIR/cache
    hub_cache_dir: Optional[str] = None  # the datasets library's cache for hub ids
    seed: int = 0
    # Every dataset (and the PersonaHub pool): an invalid row is skipped and counted in the
    # manifest (`dropped`, by dataset and reason) instead of ending the preparation with exit 2
    # naming its file, line (a parquet file: its 0-based row) and field.
    skip_invalid: bool = False
    persona_hub: PersonaHubConfig = field(default_factory=PersonaHubConfig)
    # The aligned-persona writer; its cache file is always CACHE_DIR/aligned_personas.jsonl.
    persona_writer: AlignedPersonaConfig = field(default_factory=AlignedPersonaConfig)
    teacher: EndpointConfig = field(default_factory=EndpointConfig)
    samples_per_mode: int = 1  # teacher trajectories per prompt and mode
    # Scores the teacher's trajectories: the run's `reward` section (rewards/config.py).
    reward: Any = field(default_factory=dict)
    sft: list[BenchmarkConfig] = field(default_factory=list)  # prompts the teacher answers
    rl: list[BenchmarkConfig] = field(default_factory=list)
    eval: list[BenchmarkConfig] = field(default_factory=list)

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.out_dir) / "cache"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--recipe: {path}: recipe file not found")
    try:
        from_file = OmegaConf.load(path)
        given = OmegaConf.merge(from_file, OmegaConf.from_dotlist(list(overrides)))
        unset = sorted(OmegaConf.missing_keys(given))
        if unset:
            raise DataError(f"{path}: {unset[0]}: required, set it in the recipe or as {unset[0]}=...")
        merged = OmegaConf.merge(OmegaConf.structured(RecipeConfig), given)
        recipe: RecipeConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except DataError:
        raise
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{path}: {key + ': ' if key else ''}{first}") from None
    except (ValueError, TypeError) as error:  # YAML syntax
        raise DataError(f"{path}: {(str(error).splitlines() or ['invalid'])[0]}") from None
    if not recipe.teacher.model and recipe.sft:
        raise DataError(f"{path}: teacher.model: required for the SFT set")
    if recipe.samples_per_mode < 1:
        raise DataError(f"{path}: samples_per_mode: must be >= 1, got {recipe.samples_per_mode}")
    if not (recipe.sft or recipe.rl or recipe.eval):
        raise DataError(f"{path}: sft, rl, eval: the recipe lists no dataset")
    return recipe
