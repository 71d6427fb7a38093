"""The paper's datasets as users hold them, loaded and scored end to end.

Every dataset the loaders know comes in two layouts: a hub snapshot folder
(tests/fixtures/hub, written by tests/fixtures/build_hub_snapshots.py: the repository's own
paths and file formats, and a dataset card listing its ``configs:`` as the real one does) and
a JSONL export (tests/fixtures/benchmarks). Each is loaded through ``load_benchmark`` with
the hub's subset named and without it, and the prompts are scored with a response known to
be right and one known to be wrong, both taken from the dataset's own row (its answer text,
its published solution, its preferred response), never from the loader's gold letters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import datasets
import pytest

from personadual.benchmarks import PersonaHubConfig, PersonaPool, load_benchmark
from personadual.data import DataError
from personadual.modes import Mode
from personadual.records import Prompt
from rewards.config import RewardConfig
from rewards.scorer import BatchScorer
from tests.judge_server import make_rollout

FIXTURES = Path(__file__).parent / "fixtures"
JSONL = FIXTURES / "benchmarks"
HUB = FIXTURES / "hub"
G = Mode.GENERAL.token

# A response's answer text, right and wrong, from one raw row of the dataset.
Answers = Callable[[dict[str, Any]], tuple[str, str]]


def _other(options: list[str], right: str) -> str:
    return next(option for option in options if option not in (right, "N/A"))


def _mmlu_pro(row: dict[str, Any]) -> tuple[str, str]:
    right = row["options"][row["answer_index"]]
    # Row 73 offers both 2 and -2: the wrong answer is the sign flip.
    return right, ("2" if right == "-2" else _other(row["options"], right))


_PUBMEDQA_WRONG = {"yes": "no", "no": "maybe", "maybe": "yes"}
_MATH500_WRONG = {"test/precalculus/807.json": r"\left( 3, -\frac{\pi}{2} \right)", "test/algebra/2059.json": "2600"}


def _ultramedical(row: dict[str, Any]) -> tuple[str, str]:
    right = row["answer"]  # "B" or "A. Escherichia coli", as published
    return right, "D" if not right.startswith("D") else "A"


# name, JSONL export, hub snapshot folder, the hub's subset, scorer, answers, rows in the file
CASES: list[tuple[str, str, str, str, str, Answers]] = [
    ("pubmedqa", "pubmedqa_pqa_labeled.jsonl", "qiaojin--PubMedQA", "pqa_labeled", "multiple_choice",
     lambda row: (row["final_decision"], _PUBMEDQA_WRONG[row["final_decision"]])),
    ("triviaqa", "triviaqa_rc_nocontext.jsonl", "mandarjoshi--trivia_qa", "rc.nocontext", "exact_match",
     lambda row: (row["answer"]["aliases"][-1], "Andrew Lloyd Webber")),
    ("mmlu_pro", "mmlu_pro_test.jsonl", "TIGER-Lab--MMLU-Pro", "default", "multiple_choice", _mmlu_pro),
    ("supergpqa", "supergpqa.jsonl", "m-a-p--SuperGPQA", "default", "multiple_choice",
     lambda row: (row["answer"], _other(row["options"], row["answer"]))),
    ("math500", "math500_test.jsonl", "HuggingFaceH4--MATH-500", "default", "math",
     lambda row: (row["solution"], _MATH500_WRONG[row["unique_id"]])),
    ("ultramedical", "ultramedical.jsonl", "TsinghuaC3I--UltraMedical", "default", "auto", _ultramedical),
    ("alignx", "alignx.jsonl", "JinaLeejnl--AlignX", "default", "multiple_choice",
     lambda row: (row["chosen"], row["rejected"])),
    ("fspo_roleplay", "fspo_roleplay.jsonl", "sher222--persona-iterative-responses", "default",
     "multiple_choice", lambda row: (row["yw"], row["yl"])),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


def raw_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score_right_and_wrong(prompts: list[Prompt], answers: list[tuple[str, str]]) -> list[float | None]:
    """Rewards of [right, wrong] per prompt, in order, for prompts scored without the judge."""
    rollouts = [make_rollout(prompt, f"{G} Let me think. Answer: {text}")
                for prompt, pair in zip(prompts, answers) for text in pair]
    scored, counts = BatchScorer(RewardConfig()).score_many(rollouts)
    assert counts["judge/requests"] == 0
    return [s.reward for s in scored]


@pytest.mark.parametrize("name, export, snapshot, subset, scorer, answers", CASES, ids=[c[0] for c in CASES])
def test_both_layouts_load_with_and_without_the_subset_and_score_right_and_wrong(
        cache_dir: str, name: str, export: str, snapshot: str, subset: str, scorer: str, answers: Answers) -> None:
    loads = {(layout, named): load_benchmark(name, str(source), subset=subset if named else None,
                                             scorer=scorer, cache_dir=cache_dir)
             for layout, source in (("jsonl", JSONL / export), ("snapshot", HUB / snapshot))
             for named in (True, False)}
    reference = loads[("jsonl", True)]
    assert all(prompts == reference for prompts in loads.values()), name
    rows = raw_rows(JSONL / export)
    assert len(reference) == len(rows)
    local = [(prompt, answers(row)) for prompt, row in zip(reference, rows) if prompt.scorer != "judge"]
    assert local, "every dataset has rows a local scorer decides"
    rewards = score_right_and_wrong([p for p, _ in local], [a for _, a in local])
    assert rewards == [1.0, 0.0] * len(local), list(zip([p.id for p, _ in local], rewards))


def test_a_multi_config_snapshot_reads_what_datasets_reads_and_names_its_subsets(cache_dir: str) -> None:
    folder = HUB / "qiaojin--PubMedQA"
    # datasets itself needs the config name for this folder, exactly as for the hub id.
    with pytest.raises(ValueError, match="Config name is missing"):
        datasets.load_dataset(str(folder), split="train", cache_dir=cache_dir)
    theirs = datasets.load_dataset(str(folder), "pqa_labeled", split="train", cache_dir=cache_dir)
    ours = load_benchmark("pubmedqa", str(folder), subset="pqa_labeled", scorer="multiple_choice",
                          cache_dir=cache_dir)
    assert [p.id for p in ours] == [f"pubmedqa-{row['pubid']}-none" for row in theirs]
    other = load_benchmark("pubmedqa", str(folder), subset="pqa_artificial", cache_dir=cache_dir)
    assert len(other) == 1  # the other config of the same folder
    with pytest.raises(DataError) as error:
        load_benchmark("pubmedqa", str(folder), subset="pqa_nope", cache_dir=cache_dir)
    assert str(error.value) == (f"{folder}: no subset 'pqa_nope' (its dataset card lists: "
                                f"pqa_artificial, pqa_labeled)")


def test_mmlu_pro_padding_options_are_not_shown_and_letters_follow_the_options_kept(cache_dir: str) -> None:
    prompts = load_benchmark("mmlu_pro", str(HUB / "TIGER-Lab--MMLU-Pro"), cache_dir=cache_dir)
    padded = next(p for p in prompts if p.id == "mmlu_pro-73-none")
    assert padded.choices == ("2", "-2", "1/2", "-1/2", "0") and padded.gold == ("B",)
    assert all("N/A" not in (p.choices or ()) for p in prompts)
    # Padding between real options (not in the published data, but nothing forbids it) moves the letter.
    from personadual.benchmarks.mcq import mmlu_pro_item
    row = {"question_id": 1, "question": "Pick the prime.", "options": ["4", "N/A", "6", "7"],
           "answer": "D", "answer_index": 3}
    item = mmlu_pro_item(row, 0, "multiple_choice")
    assert item.choices == ("4", "6", "7") and item.gold == ("C",) and item.answer_text == "7"
    with pytest.raises(DataError, match=r"^answer_index: 1 points at an 'N/A' padding option"):
        mmlu_pro_item({**row, "answer": "B", "answer_index": 1}, 0, "multiple_choice")


def test_flan_snapshot_tasks_are_subsets_and_both_kinds_score(cache_dir: str) -> None:
    folder = JSONL / "flan"
    snli_rows = raw_rows(folder / "train" / "snli_10templates_train.jsonl")
    snli = load_benchmark("flan", str(folder), subset="snli_10templates", cache_dir=cache_dir)
    assert snli == load_benchmark("flan", str(folder / "train" / "snli_10templates_train.jsonl"),
                                  subset="snli_10templates", cache_dir=cache_dir)
    everything = load_benchmark("flan", str(folder), cache_dir=cache_dir)
    assert {p.id for p in snli} < {p.id for p in everything} and len(everything) == 3
    wrong = {"yes": "no", "no": "yes"}
    assert score_right_and_wrong(snli, [(r["targets"], wrong[r["targets"]]) for r in snli_rows]) == [1.0, 0.0] * 2
    nq = [p for p in everything if p.id.startswith("flan-natural_questions")]
    assert score_right_and_wrong(nq, [("Dolly Parton", "Kenny Rogers")]) == [1.0, 0.0]


def test_personafeedback_snapshot_with_and_without_a_subset(cache_dir: str) -> None:
    folder = JSONL / "personafeedback"
    easy = load_benchmark("personafeedback", str(folder), subset="general/easy", cache_dir=cache_dir)
    everything = load_benchmark("personafeedback", str(folder), cache_dir=cache_dir)
    assert len(easy) == 1 and len(everything) == 6 and easy[0] in everything
    rows = [row for name in ("general", "spedific") for level in ("easy", "medium", "hard")
            for row in raw_rows(folder / "data" / name / f"{level}.jsonl")]
    assert score_right_and_wrong(everything, [(r["chosen"], r["reject"]) for r in rows]) == [1.0, 0.0] * 6


def test_personahub_pool_from_its_snapshot_and_its_jsonl(cache_dir: str) -> None:
    from_snapshot = PersonaPool.load(PersonaHubConfig(source=str(HUB / "proj-persona--PersonaHub")), cache_dir)
    from_file = PersonaPool.load(PersonaHubConfig(source=str(JSONL / "personahub_persona.jsonl")), cache_dir)
    assert from_snapshot.personas == from_file.personas
    assert from_snapshot.personas == tuple(r["persona"] for r in raw_rows(JSONL / "personahub_persona.jsonl"))
    prompts = load_benchmark("triviaqa", str(HUB / "mandarjoshi--trivia_qa"), subset="rc.nocontext",
                             persona_settings=("unaligned",), personas=from_snapshot, cache_dir=cache_dir)
    assert all(p.persona in from_snapshot.personas for p in prompts)
