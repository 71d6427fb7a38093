"""One entry point for every dataset of the paper: ``load_benchmark(name, source, ...)``.

Objective datasets become one Prompt per (row, persona setting); personalized ones carry the
user's own persona (setting "aligned"). Prompt ids are ``{benchmark}-{row id}-{setting}``,
built from the dataset's own row id where it has one, so they are stable across runs and limits.

Scorers: each benchmark accepts a few (the first is its default). The paper scores PubMedQA
and MATH-500 with a GPT-4o-mini judge, hence those defaults; ``scorer="multiple_choice"``
(PubMedQA, yes/no/maybe as options) and ``scorer="math"`` (MATH-500) avoid the judge. For the
pairwise personalized sets, "multiple_choice" asks which response suits the user and "judge"
asks the query itself with the preferred response as the judge's reference.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from personadual.benchmarks import mcq, medical, preference, qa
from personadual.benchmarks.items import ObjectiveItem
from personadual.benchmarks.math500 import MATH500_COLUMNS, math500_item
from personadual.benchmarks.personas import (AlignedPersonaConfig, AlignedPersonaGenerator,
                                             PersonaHubConfig, PersonaPool, PersonaRequest)
from personadual.benchmarks.source import RowError, load_rows, map_rows
from personadual.data import DataError
from personadual.prompts import format_question
from personadual.records import PERSONA_SETTINGS, Prompt

PERSONA_ASSIGNMENTS = ("all", "one")  # every setting per row, or one seeded setting per row

Mapper = Callable[[dict, int, str], ObjectiveItem]  # (row, row number, scorer)


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    task_type: str  # objective | personalized
    hub_id: str
    subset: str | None  # the hub config name
    split: str
    columns: tuple[str, ...]  # required columns: a file without one fails naming it
    scorers: tuple[str, ...]  # accepted scorers; the first is the default
    role: str  # "training set" or "benchmark" in the paper


SPECS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    BenchmarkSpec("pubmedqa", "objective", "qiaojin/PubMedQA", "pqa_labeled", "train",
                  medical.PUBMEDQA_COLUMNS, ("judge", "multiple_choice"), "benchmark"),
    BenchmarkSpec("triviaqa", "objective", "mandarjoshi/trivia_qa", "rc.nocontext", "validation",
                  qa.TRIVIAQA_COLUMNS, ("exact_match", "judge"), "benchmark"),
    BenchmarkSpec("mmlu_pro", "objective", "TIGER-Lab/MMLU-Pro", None, "test",
                  mcq.MMLU_PRO_COLUMNS, ("multiple_choice",), "benchmark"),
    BenchmarkSpec("supergpqa", "objective", "m-a-p/SuperGPQA", None, "train",
                  mcq.SUPERGPQA_COLUMNS, ("multiple_choice",), "benchmark"),
    BenchmarkSpec("math500", "objective", "HuggingFaceH4/MATH-500", None, "test",
                  MATH500_COLUMNS, ("judge", "math"), "benchmark"),
    BenchmarkSpec("ultramedical", "objective", "TsinghuaC3I/UltraMedical", None, "train",
                  medical.ULTRAMEDICAL_COLUMNS, ("auto", "judge"), "training set"),
    BenchmarkSpec("flan", "objective", "Muennighoff/flan", None, "train",
                  qa.FLAN_COLUMNS, ("auto", "exact_match", "multiple_choice", "judge"), "training set"),
    BenchmarkSpec("alignx", "personalized", "JinaLeejnl/AlignX", None, "train",
                  preference.ALIGNX_COLUMNS, ("multiple_choice", "judge"), "training set"),
    BenchmarkSpec("personafeedback", "personalized", "PersonalAILab/PersonaFeedback", None, "train",
                  preference.PERSONAFEEDBACK_COLUMNS, ("multiple_choice", "judge"), "benchmark"),
    BenchmarkSpec("fspo_roleplay", "personalized", "sher222/persona-iterative-responses", None, "test",
                  preference.FSPO_COLUMNS, ("multiple_choice", "judge"), "benchmark"),
)}

# "auto" scorers (UltraMedical, FLAN) decide per row: lettered options -> multiple choice.
OBJECTIVE_MAPPERS: dict[str, Mapper] = {
    "pubmedqa": medical.pubmedqa_item,
    "triviaqa": qa.triviaqa_item,
    "mmlu_pro": mcq.mmlu_pro_item,
    "supergpqa": mcq.supergpqa_item,
    "math500": math500_item,
    "ultramedical": medical.ultramedical_item,
    "flan": qa.flan_item,
}


@dataclass
class BenchmarkConfig:
    """One dataset of a run; ``load_benchmarks`` turns a list of these into Prompts."""

    name: str = "triviaqa"
    source: str | None = None  # hub id or local file/folder; None: the spec's hub id
    split: str | None = None  # None: the spec's split
    subset: str | None = None  # hub config (FLAN: a task name; PersonaFeedback: "general/easy")
    limit: int | None = None
    persona_settings: list[str] = field(default_factory=lambda: ["none"])  # objective sets only
    persona_assignment: str = "all"
    scorer: str | None = None  # None: the spec's default
    seed: int = 0


def load_benchmark(name: str, source: str | None = None, *, split: str | None = None,
                   subset: str | None = None, limit: int | None = None,
                   persona_settings: Sequence[str] = ("none",), persona_assignment: str = "all",
                   scorer: str | None = None, personas: PersonaPool | None = None,
                   aligned: AlignedPersonaGenerator | None = None, seed: int = 0,
                   cache_dir: str | None = None, skipped: Counter[str] | None = None) -> list[Prompt]:
    """Prompts for one dataset, read by hub id or local path (``source``; None: the hub id).

    ``persona_settings`` (objective datasets) lists none/unaligned/aligned; with
    ``persona_assignment="all"`` each row yields one Prompt per setting, with "one" a seeded
    choice of one setting per row (how the paper mixes its training data). "unaligned" needs
    ``personas`` (a PersonaHub pool), "aligned" needs ``aligned`` (the persona generator).
    An invalid row ends the load naming its file, line (or row) and field; with ``skipped``
    it is left out and counted there by reason instead.
    """
    spec = SPECS.get(name)
    if spec is None:
        raise DataError(f"benchmark.name: unknown benchmark {name!r} (known: {', '.join(SPECS)})")
    scorer = spec.scorers[0] if scorer is None else scorer
    if scorer not in spec.scorers:
        raise DataError(f"{name}.scorer: {scorer!r} is not one of {list(spec.scorers)}")
    source = spec.hub_id if source is None else source
    if spec.task_type == "personalized":
        return _personalized(spec, source, split=split, subset=subset, limit=limit, scorer=scorer,
                             seed=seed, cache_dir=cache_dir, skipped=skipped)
    settings = _check_settings(name, persona_settings, persona_assignment, personas, aligned)
    data_files = None
    if name == "flan" and subset is not None and not Path(source).expanduser().is_file():
        # Muennighoff/flan has no configs: one JSONL per task and split (hub repo or local copy).
        data_files, subset = f"{split or spec.split}/{subset}_{split or spec.split}.jsonl", None
    rows = load_rows(source, split=split or spec.split,
                     subset=subset or spec.subset, data_files=data_files, limit=limit, required=spec.columns, cache_dir=cache_dir,
                     benchmark=name)
    mapper, numbers = OBJECTIVE_MAPPERS[name], _row_numbers(name, rows.data)
    seen: dict[str, int] = {}

    def make(row: dict, index: int) -> ObjectiveItem:
        item = mapper(row, numbers[index], scorer)
        if item.row_id in seen:
            raise RowError("id", f"duplicate row id {item.row_id!r} (first at {rows.where(seen[item.row_id])})")
        seen[item.row_id] = index
        return item

    items = map_rows(rows, make, skipped)
    return _with_personas(name, items, settings, persona_assignment, personas, aligned, seed)


def load_benchmarks(configs: Sequence[BenchmarkConfig], *, persona_hub: PersonaHubConfig | None = None,
                    aligned: AlignedPersonaConfig | None = None,
                    cache_dir: str | None = None) -> list[Prompt]:
    """Several datasets; the PersonaHub pool and the generator are built only if a setting needs them."""
    wanted = {s for c in configs if SPECS.get(c.name) and SPECS[c.name].task_type == "objective"
              for s in c.persona_settings}
    pool = PersonaPool.load(persona_hub or PersonaHubConfig(), cache_dir) if "unaligned" in wanted else None
    generator = AlignedPersonaGenerator(aligned or AlignedPersonaConfig()) if "aligned" in wanted else None
    prompts: list[Prompt] = []
    for config in configs:
        prompts.extend(load_benchmark(
            config.name, config.source, split=config.split, subset=config.subset, limit=config.limit,
            persona_settings=config.persona_settings, persona_assignment=config.persona_assignment,
            scorer=config.scorer, personas=pool, aligned=generator, seed=config.seed,
            cache_dir=cache_dir))
    _check_unique([p.id for p in prompts], "benchmarks", "prompt id")
    return prompts


def _check_settings(name: str, settings: Sequence[str], assignment: str, personas: PersonaPool | None,
                    aligned: AlignedPersonaGenerator | None) -> tuple[str, ...]:
    settings = tuple(dict.fromkeys(settings))
    if not settings:
        raise DataError(f"{name}.persona_settings: empty")
    for setting in settings:
        if setting not in PERSONA_SETTINGS:
            raise DataError(f"{name}.persona_settings: {setting!r} is not one of {list(PERSONA_SETTINGS)}")
    if assignment not in PERSONA_ASSIGNMENTS:
        raise DataError(f"{name}.persona_assignment: {assignment!r} is not one of {list(PERSONA_ASSIGNMENTS)}")
    if "unaligned" in settings and personas is None:
        raise DataError(f"{name}.persona_settings: 'unaligned' needs a PersonaHub pool (personas=)")
    if "aligned" in settings and aligned is None:
        raise DataError(f"{name}.persona_settings: 'aligned' needs an aligned-persona generator (aligned=)")
    return settings


def _with_personas(name: str, items: list[ObjectiveItem], settings: tuple[str, ...], assignment: str,
                   personas: PersonaPool | None, aligned: AlignedPersonaGenerator | None,
                   seed: int) -> list[Prompt]:
    if assignment == "all":
        plan = [(item, setting) for item in items for setting in settings]
    else:
        plan = [(item, random.Random(f"{seed}|assign|{name}-{item.row_id}").choice(settings))
                for item in items]
    requests = [PersonaRequest(f"{name}-{item.row_id}", format_question(item.question, item.choices),
                               item.answer_text or ", ".join(item.gold))
                for item, setting in plan if setting == "aligned"]
    written = aligned.personas(requests) if requests and aligned is not None else {}
    prompts = []
    for item, setting in plan:
        key = f"{name}-{item.row_id}"
        if setting == "none":
            persona = None
        elif setting == "unaligned":
            assert personas is not None  # checked in _check_settings
            persona = personas.pick(key, seed)
        else:
            persona = written[key]
        prompts.append(Prompt(f"{key}-{setting}", item.question, persona, setting, "objective",
                              item.gold, item.scorer, item.choices, name))
    return prompts


def _personalized(spec: BenchmarkSpec, source: str, *, split: str | None, subset: str | None,
                  limit: int | None, scorer: str, seed: int, cache_dir: str | None,
                  skipped: Counter[str] | None) -> list[Prompt]:
    if spec.name == "personafeedback":
        items = preference.personafeedback_items(source, subset=subset, limit=limit, cache_dir=cache_dir,
                                                 skipped=skipped)
    else:
        rows = load_rows(source, split=split or spec.split,
                         subset=subset or spec.subset, limit=limit,
                         required=spec.columns, cache_dir=cache_dir, benchmark=spec.name)
        make = preference.alignx_item if spec.name == "alignx" else preference.fspo_item
        items = map_rows(rows, make, skipped)
    fmt = "choice" if scorer == "multiple_choice" else "open"
    prompts = [preference.pairwise_prompt(spec.name, item, fmt, seed) for item in items]
    _check_unique([p.id for p in prompts], spec.name, "prompt id")
    return prompts


def _row_numbers(name: str, rows: Iterable[dict]) -> list[int]:
    """Each row's number in its own file. FLAN rows have no id of their own: numbered per task
    file, one task's prompt ids stay the same whether it is loaded alone or with others."""
    if name != "flan":
        return list(range(len(rows)))  # type: ignore[arg-type]
    seen: Counter[str] = Counter()
    numbers = []
    for row in rows:
        task = str(row.get("task"))
        numbers.append(seen[task])
        seen[task] += 1
    return numbers


def _check_unique(ids: list[str], origin: str, what: str) -> None:
    seen: set[str] = set()
    for value in ids:
        if value in seen:
            raise DataError(f"{origin}: duplicate {what} {value!r}")
        seen.add(value)
