"""``python -m personadual.prepare data --recipe R``: the files a run reads, from hub ids or
local folders and files.

- ``rl.jsonl``: the RL prompts (Prompt rows) in the recipe's persona settings;
- ``eval.jsonl``: the evaluation prompts;
- ``teacher.jsonl``: every scored teacher trajectory (the format
  ``personadual.benchmarks.sft_selection`` reads), and ``sft.jsonl``: the selected ones as
  ``{"prompt": {...}, "response": "[mode] ..."}`` rows (``data.sft_files``);
- ``NAME.manifest.json`` beside each: rows per source, setting and mode, rows dropped with
  their reasons, the file's sha256, and what the endpoints cost.

Outputs are written sorted and with sorted keys, so the same inputs and replies give the
same bytes whether or not the calls came from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from personadual.benchmarks.personas import AlignedPersonaGenerator, PersonaPool
from personadual.benchmarks.registry import SPECS, BenchmarkConfig, load_benchmark
from personadual.benchmarks.sft_selection import TeacherRow, select_sft_trajectories
from personadual.evaluation import setting_of
from personadual.prepare.calls import CachedChat
from personadual.prepare.recipe import RecipeConfig
from personadual.prepare.teacher import Score, teacher_rows
from personadual.records import Prompt

OUTPUTS = ("rl", "eval", "teacher", "sft")


class Preparation:
    """One recipe's datasets, with the persona pool and writer built only if a setting needs them."""

    def __init__(self, recipe: RecipeConfig, *, progress: bool = True) -> None:
        self.recipe, self.progress = recipe, progress
        settings = {s for c in (*recipe.sft, *recipe.rl, *recipe.eval)
                    if c.name in SPECS and SPECS[c.name].task_type == "objective" for s in c.persona_settings}
        # Empty PersonaHub rows skipped (with --skip-invalid) are counted in every manifest.
        self.pool_skipped: Counter[str] = Counter()
        self.pool = (PersonaPool.load(recipe.persona_hub, recipe.hub_cache_dir,
                                      self.pool_skipped if recipe.skip_invalid else None)
                     if "unaligned" in settings else None)
        writer = replace(recipe.persona_writer, cache_path=str(recipe.cache / "aligned_personas.jsonl"))
        self.writer = AlignedPersonaGenerator(writer) if "aligned" in settings else None

    def prompts(self, configs: Sequence[BenchmarkConfig], skipped: Counter[str]) -> list[Prompt]:
        """The configs' prompts; rows skipped as invalid are counted in ``skipped`` as
        ``"NAME: invalid row: FIELD: reason"`` (with the recipe's ``skip_invalid``)."""
        prompts: list[Prompt] = []
        for config in configs:
            own: Counter[str] = Counter()
            prompts.extend(load_benchmark(
                config.name, config.source, split=config.split, subset=config.subset, limit=config.limit,
                persona_settings=config.persona_settings, persona_assignment=config.persona_assignment,
                scorer=config.scorer, personas=self.pool, aligned=self.writer, seed=config.seed,
                cache_dir=self.recipe.hub_cache_dir, skipped=own if self.recipe.skip_invalid else None))
            skipped.update({f"{config.name}: {reason}": count for reason, count in own.items()})
        if self.pool_skipped:
            skipped.update({f"personahub: {reason}": count for reason, count in self.pool_skipped.items()})
        return prompts


def prepare_data(recipe: RecipeConfig, score: Score | None, *, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Write the recipe's files under ``recipe.out_dir``; returns each output's manifest."""
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prep = Preparation(recipe, progress=progress)
    manifests: dict[str, dict[str, Any]] = {}
    for name, configs in (("rl", recipe.rl), ("eval", recipe.eval)):
        if configs:
            skipped: Counter[str] = Counter()
            prompts = prep.prompts(configs, skipped)
            manifests[name] = _write(out, name, [p.to_dict() for p in prompts], _counts(prompts), dict(skipped),
                                     configs)
    if recipe.sft:
        if score is None:
            raise ValueError("prepare_data: the SFT set needs a scorer for the teacher's trajectories")
        skipped = Counter()
        prompts = prep.prompts(recipe.sft, skipped)
        chat = CachedChat(recipe.teacher, recipe.cache / "teacher_calls.jsonl", name="teacher")
        rows, scoring = teacher_rows(prompts, chat, score, samples_per_mode=recipe.samples_per_mode,
                                     progress=progress)
        teacher_counts = {"by_mode": dict(Counter(r.mode.name.lower() for r in rows)),
                          "correct_by_mode": dict(Counter(r.mode.name.lower() for r in rows if r.correct)),
                          "scoring": {k: v for k, v in sorted(scoring.items()) if v}}
        manifests["teacher"] = _write(out, "teacher", [_teacher_dict(r) for r in rows], teacher_counts, {},
                                      recipe.sft, endpoint={"teacher": chat.stats.as_dict()})
        stats: dict[str, int] = {}
        selected = select_sft_trajectories(prompts, rows, stats=stats)
        counts = _counts([p for p, _ in selected])
        counts["by_mode"] = {"personalized": stats["personalized"], "general": stats["general"]}
        manifests["sft"] = _write(out, "sft", [{"prompt": p.to_dict(), "response": r} for p, r in selected],
                                  counts, {"no_correct_teacher_trajectory": stats["dropped"], **skipped}, recipe.sft,
                                  endpoint={"teacher": chat.stats.as_dict()})
    if prep.writer is not None:
        for manifest in manifests.values():
            manifest.setdefault("endpoint", {})["persona_writer"] = {"requests": prep.writer.calls}
            _write_manifest(out, manifest)
    return manifests


def _teacher_dict(row: TeacherRow) -> dict[str, Any]:
    return {"id": row.prompt_id, "question": row.question, "persona": row.persona,
            "mode": row.mode.name.lower(), "response": row.response, "correct": row.correct}


def _counts(prompts: Iterable[Prompt]) -> dict[str, Any]:
    prompts = list(prompts)
    return {"by_source": dict(sorted(Counter(p.benchmark for p in prompts).items())),
            "by_setting": dict(sorted(Counter(setting_of(p) for p in prompts).items())),
            "by_source_and_setting": dict(sorted(Counter(f"{p.benchmark}/{setting_of(p)}"
                                                         for p in prompts).items()))}


def _write(out: Path, name: str, rows: list[dict[str, Any]], counts: dict[str, Any], dropped: dict[str, int],
           configs: Sequence[BenchmarkConfig], *, endpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    path = out / f"{name}.jsonl"
    payload = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode()
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(payload)
    os.replace(staging, path)  # a crash never leaves a half-written output under its name
    manifest = {"file": path.name, "sha256": hashlib.sha256(payload).hexdigest(), "rows": len(rows),
                **counts, "dropped": dropped, "sources": [asdict(c) for c in configs],
                "endpoint": endpoint or {}}
    _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    name = manifest["file"].removesuffix(".jsonl")
    (out / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
