"""Datasets for a run: the synthetic world, or prompt and trajectory files (JSONL).

Bad rows fail with a one-line ``DataError`` naming the file, line and field, or, with
``skip_invalid``, are skipped and counted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from personadual.evaluation import setting_of
from personadual.modes import mode_of_text
from personadual.prompts import render_prompt
from personadual.records import Prompt, RecordError
from personadual.sft_data import TokenizedExample, tokenize_trajectory
from personadual.tiny import build_tiny_model
from personadual.world import PersonaWorld, WorldConfig


T = TypeVar("T")


class DataError(ValueError):
    """Unreadable or invalid data; the message names the file, the line and the field."""


@dataclass
class RunData:
    train: list[Prompt]
    eval: list[Prompt]
    sft: list[TokenizedExample]
    skipped: dict[str, int] = field(default_factory=dict)
    world: PersonaWorld | None = None


def resolve_model(path: str | None, tiny_preset: str) -> str:
    """A local folder or hub id as given; None builds (or reuses) the tiny model."""
    if path is None:
        return str(build_tiny_model(tiny_preset))
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise DataError(f"model.path: {local} has no config.json")
        return str(local)
    if path.startswith((".", "/", "~")):
        raise DataError(f"model.path: {path} not found")
    return path  # a hub id, resolved by transformers / vLLM


def _read_jsonl(path: Path, skip_invalid: bool, skipped: dict[str, int]) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("expected a JSON object")
            except (UnicodeDecodeError, ValueError) as error:
                if skip_invalid:
                    skipped[str(path)] = skipped.get(str(path), 0) + 1
                    continue
                if isinstance(error, UnicodeDecodeError):
                    reason = f"not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
                else:
                    reason = f"invalid JSON ({error})"
                raise DataError(f"{path}:{number}: {reason}") from None
            rows.append((number, row))
    return rows


def _parse_rows(path: Path, parse: Callable[[dict[str, Any]], T], what: str, *, skip_invalid: bool,
                skipped: dict[str, int] | None) -> list[T]:
    """Each row of a JSONL file through ``parse``; a bad row fails naming file and line, or
    with ``skip_invalid`` is skipped and counted."""
    skipped = skipped if skipped is not None else {}
    before = skipped.get(str(path), 0)
    parsed = []
    for number, row in _read_jsonl(path, skip_invalid, skipped):
        try:
            parsed.append(parse(row))
        except (RecordError, TypeError, ValueError) as error:
            if skip_invalid:
                skipped[str(path)] = skipped.get(str(path), 0) + 1
                continue
            raise DataError(f"{path}:{number}: {error}") from None
    if not parsed:
        dropped = skipped.get(str(path), 0) - before
        if dropped:
            raise DataError(f"{path}: no valid {what}: all {dropped} row(s) were invalid and skipped "
                            f"(data.skip_invalid=true)")
        raise DataError(f"{path}: no valid {what} (empty dataset)")
    return parsed


def load_prompts(path: Path, *, skip_invalid: bool = False,
                 skipped: dict[str, int] | None = None) -> list[Prompt]:
    return _parse_rows(path, Prompt.from_dict, "prompts", skip_invalid=skip_invalid, skipped=skipped)


def load_trajectories(path: Path, tokenizer: Any, *, skip_invalid: bool = False,
                      skipped: dict[str, int] | None = None) -> list[TokenizedExample]:
    """SFT rows ``{"prompt": {...Prompt...}, "response": "[mode] ..."}``."""

    def parse(row: dict[str, Any]) -> TokenizedExample:
        return tokenize_trajectory(tokenizer, *_trajectory(row))

    return _parse_rows(path, parse, "trajectories", skip_invalid=skip_invalid, skipped=skipped)


def _trajectory(row: dict[str, Any]) -> tuple[Prompt, str]:
    if not isinstance(row.get("response"), str):
        raise RecordError("response: expected a string")
    if mode_of_text(row["response"]) is None:
        raise RecordError(f"response: does not start with a mode token: {row['response'][:40]!r}")
    if not isinstance(row.get("prompt"), dict):
        raise RecordError("prompt: expected an object")
    return Prompt.from_dict(row["prompt"]), row["response"]


def check_data_files(train_files: Sequence[str], eval_files: Sequence[str], sft_files: Sequence[str], *,
                     skip_invalid: bool = False) -> dict[str, int]:
    """Read every row of the run's data files (no tokenizer needed) and raise the first
    ``DataError``: run before anything starts, so bad data costs no cluster start-up and
    leaves no run folder. Returns the rows ``skip_invalid`` would skip, per file."""
    skipped: dict[str, int] = {}
    for files, parse, what in ((train_files, Prompt.from_dict, "prompts"), (eval_files, Prompt.from_dict, "prompts"),
                               (sft_files, _trajectory, "trajectories")):
        for name in files:
            _parse_rows(Path(name), parse, what, skip_invalid=skip_invalid, skipped=skipped)
    return skipped


def load_run_data(source: str, tokenizer: Any, *, world: WorldConfig = WorldConfig(),
                  train_files: Sequence[str] = (), eval_files: Sequence[str] = (),
                  sft_files: Sequence[str] = (), skip_invalid: bool = False,
                  max_eval_prompts: int = 0, max_prompt_tokens: int = 0, max_sft_tokens: int = 0,
                  balance_settings: bool = False) -> RunData:
    """The run's prompts and SFT examples; prompts longer than ``max_prompt_tokens`` and SFT
    examples longer than ``max_sft_tokens`` (0: no limit) are dropped and counted in
    ``skipped``."""
    if source == "world":
        persona_world = PersonaWorld(world)
        sft = [tokenize_trajectory(tokenizer, e.prompt, e.response, mode_given=e.mode_given)
               for e in persona_world.sft_examples()]
        evals = persona_world.eval_prompts()
        data = RunData(persona_world.rl_prompts(), evals, sft, world=persona_world)
    else:
        skipped: dict[str, int] = {}
        train = [p for f in train_files for p in load_prompts(Path(f), skip_invalid=skip_invalid, skipped=skipped)]
        evals = [p for f in eval_files for p in load_prompts(Path(f), skip_invalid=skip_invalid, skipped=skipped)]
        sft = [e for f in sft_files
               for e in load_trajectories(Path(f), tokenizer, skip_invalid=skip_invalid, skipped=skipped)]
        data = RunData(train, evals, sft, skipped)
    if max_prompt_tokens:
        for split in ("train", "eval"):
            prompts = getattr(data, split)
            fitting = [p for p in prompts if len(tokenizer.encode(render_prompt(tokenizer, p),
                                                                  add_special_tokens=False)) <= max_prompt_tokens]
            data.skipped[f"too_long/{split}"] = len(prompts) - len(fitting)
            setattr(data, split, fitting)
    if max_sft_tokens:
        fitting_sft = [e for e in data.sft if len(e.prompt_token_ids) + len(e.response_token_ids) <= max_sft_tokens]
        data.skipped["too_long/sft"] = len(data.sft) - len(fitting_sft)
        data.sft = fitting_sft
    if balance_settings:
        data.train = balanced_by_setting(data.train)
    if max_eval_prompts and max_eval_prompts < len(data.eval):
        # A seeded sample, not a prefix: files and the world list prompts grouped by setting.
        data.eval = random.Random(0).sample(data.eval, max_eval_prompts)
    return data


def balanced_by_setting(prompts: Sequence[Prompt]) -> list[Prompt]:
    """Each setting's prompts (no persona, unaligned, aligned, personalized) cycled up to the
    largest setting's count, so a uniform draw meets every setting equally often."""
    by_setting: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        by_setting.setdefault(setting_of(prompt), []).append(prompt)
    target = max((len(group) for group in by_setting.values()), default=0)
    return [group[i % len(group)] for _, group in sorted(by_setting.items()) for i in range(target)]
