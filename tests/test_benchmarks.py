"""Real-data loaders: each dataset's real column layout (fixtures) -> Prompt records.

The fixtures under tests/fixtures/benchmarks hold a few rows in each dataset's published
column names and types. Aligned personas are generated against a real HTTP server on
127.0.0.1 speaking the OpenAI chat-completions protocol.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import datasets
import huggingface_hub.constants
import pytest

from personadual.benchmarks import (SPECS, AlignedPersonaConfig, AlignedPersonaError,
                                    AlignedPersonaGenerator, BenchmarkConfig, PersonaHubConfig,
                                    PersonaPool, load_benchmark, load_benchmarks,
                                    select_sft_trajectories)
from personadual.benchmarks.personas import clean_persona
from personadual.benchmarks.preference import PairwiseItem, pairwise_prompt
from personadual.data import DataError
from personadual.modes import Mode
from personadual.prompts import format_question
from personadual.records import Prompt
from tests.judge_server import JudgeServer, Reply

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
API_KEY = "sk-test-never-logged-4242"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.fixture(scope="module")
def pool(cache_dir: str) -> PersonaPool:
    return PersonaPool.load(PersonaHubConfig(source=str(FIXTURES / "personahub_persona.jsonl")), cache_dir)


def load(name: str, source: str, cache_dir: str, **kwargs: Any) -> list[Prompt]:
    return load_benchmark(name, str(FIXTURES / source), cache_dir=cache_dir, **kwargs)


# ---------------------------------------------------------------- objective benchmarks


def test_pubmedqa_defaults_to_the_judge_and_can_be_multiple_choice(cache_dir: str) -> None:
    judged = load("pubmedqa", "pubmedqa_pqa_labeled.jsonl", cache_dir)
    assert [p.id for p in judged] == ["pubmedqa-21645374-none", "pubmedqa-16418930-none",
                                      "pubmedqa-9488747-none"]
    assert [p.gold for p in judged] == [("yes",), ("no",), ("maybe",)]
    first = judged[0]
    assert first.scorer == "judge" and first.choices is None and first.task_type == "objective"
    assert "The lace plant produces perforations" in first.question  # the abstract is the context
    assert first.question.endswith("Answer yes, no or maybe.")
    assert first.persona is None and first.persona_setting == "none" and first.benchmark == "pubmedqa"

    lettered = load("pubmedqa", "pubmedqa_pqa_labeled.jsonl", cache_dir, scorer="multiple_choice")
    assert [p.gold for p in lettered] == [("A",), ("B",), ("C",)]
    assert all(p.choices == ("yes", "no", "maybe") and p.scorer == "multiple_choice" for p in lettered)


def test_triviaqa_accepts_every_alias(cache_dir: str) -> None:
    prompts = load("triviaqa", "triviaqa_rc_nocontext.jsonl", cache_dir)
    assert [p.id for p in prompts] == ["triviaqa-tc_33-none", "triviaqa-tc_40-none", "triviaqa-tc_49-none"]
    assert prompts[0].gold == ("Sunset Boulevard", "Sunset Blvd", "West Sunset Boulevard", "Sunset Bulevard")
    assert prompts[1].gold == ("David Seville", "Ross Bagdasarian")
    assert all(p.scorer == "exact_match" for p in prompts)


@pytest.mark.parametrize("name, source, ids, golds, counts", [
    ("mmlu_pro", "mmlu_pro_test.jsonl", ["mmlu_pro-70-none", "mmlu_pro-71-none", "mmlu_pro-72-none",
                                         "mmlu_pro-73-none"],
     [("D",), ("B",), ("C",), ("B",)], [4, 3, 10, 5]),  # row 73's five "N/A" options are dropped
    ("supergpqa", "supergpqa.jsonl", ["supergpqa-df22a8a2f4e24d45a3e5a5b0b1b8b0d2-none",
                                      "supergpqa-0b1c9f0e8c5b4a7d9e6f3a2b1c0d9e8f-none"],
     [("C",), ("C",)], [5, 6]),
])
def test_lettered_benchmarks_keep_their_options(cache_dir: str, name: str, source: str, ids: list[str],
                                                golds: list[tuple[str, ...]], counts: list[int]) -> None:
    prompts = load(name, source, cache_dir)
    assert [p.id for p in prompts] == ids
    assert [p.gold for p in prompts] == golds
    assert [len(p.choices or ()) for p in prompts] == counts
    assert all(p.scorer == "multiple_choice" for p in prompts)
    if name == "supergpqa":
        assert prompts[1].choices[2] == "9 J"  # answer_letter C names the answer text


def test_math500_judge_by_default_math_on_request(cache_dir: str) -> None:
    prompts = load("math500", "math500_test.jsonl", cache_dir)
    assert prompts[0].id == "math500-test/precalculus/807.json-none"
    assert prompts[0].gold == ("\\left( 3, \\frac{\\pi}{2} \\right)",)
    assert prompts[1].gold == ("26000",) and all(p.scorer == "judge" for p in prompts)
    assert {p.scorer for p in load("math500", "math500_test.jsonl", cache_dir, scorer="math")} == {"math"}


def test_ultramedical_exam_rows_become_lettered_choices(cache_dir: str) -> None:
    prompts = load("ultramedical", "ultramedical.jsonl", cache_dir)
    diaphragm, uti, anemia = prompts
    assert diaphragm.id == "ultramedical-TextBookQA,Anatomy_Gray_28-none"
    assert diaphragm.question == "Which nerve innervates the diaphragm?"
    assert diaphragm.choices == ("Vagus nerve", "Phrenic nerve", "Intercostal nerves", "Accessory nerve")
    assert diaphragm.gold == ("B",) and diaphragm.scorer == "multiple_choice"
    assert uti.gold == ("A",)  # "A. Escherichia coli" resolves to its letter
    # An open question with no 'answer' is judged against the reference response.
    assert anemia.scorer == "judge" and anemia.choices is None
    assert anemia.gold == ("Fatigue, pallor, shortness of breath on exertion and brittle nails.",)


def test_flan_options_block_becomes_multiple_choice_and_tasks_select_files(cache_dir: str) -> None:
    snli = load("flan", "flan", cache_dir, subset="snli_10templates")
    assert [p.id for p in snli] == ["flan-snli_10templates.0-none", "flan-snli_10templates.1-none"]
    assert snli[0].choices == ("yes", "it is not possible to tell", "no") and snli[0].gold == ("A",)
    assert snli[1].gold == ("C",)
    assert "OPTIONS" not in snli[1].question and snli[1].question.endswith("I think the answer is")
    nq = load("flan", "flan/train/natural_questions_10templates_train.jsonl", cache_dir)
    assert nq[0].scorer == "exact_match" and nq[0].gold == ("Dolly Parton",)


# ---------------------------------------------------------------- personalized benchmarks


@pytest.mark.parametrize("name, source, persona_start, chosen_start", [
    ("alignx", "alignx.jsonl", "The user is a 34-year-old librarian", "Curl up with a long fantasy novel"),
    ("fspo_roleplay", "fspo_roleplay.jsonl", "A 67-year-old retired teacher from Kenya",
     "Begin with simple stews"),
    ("personafeedback", "personafeedback", "Name: Mei Chen. Demographics: Age: 29",
     "A quiet hike followed by"),
])
def test_pairwise_sets_ask_which_response_suits_the_user(cache_dir: str, name: str, source: str,
                                                          persona_start: str, chosen_start: str) -> None:
    prompts = load(name, source, cache_dir)
    first = prompts[0]
    assert first.task_type == "personalized" and first.persona_setting == "aligned"
    assert first.id.startswith(f"{name}-") and first.id.endswith("-aligned")
    assert first.persona.startswith(persona_start)
    assert first.scorer == "multiple_choice" and len(first.choices) == 2
    letter_index = "AB".index(first.gold[0])
    assert first.choices[letter_index].startswith(chosen_start)  # the gold letter is the preferred one
    assert [p.id for p in load(name, source, cache_dir)] == [p.id for p in prompts]
    assert [p.choices for p in load(name, source, cache_dir)] == [p.choices for p in prompts]

    opened = load(name, source, cache_dir, scorer="judge")
    assert opened[0].scorer == "judge" and opened[0].choices is None
    assert opened[0].gold[0].startswith(chosen_start)


def test_pairwise_order_is_seeded_not_always_first() -> None:
    item = PairwiseItem("7", "Which tea?", "A tea lover.", "Oolong, brewed twice.", "Any bag will do.")
    prompts = [pairwise_prompt("alignx", item, "choice", seed) for seed in range(16)]
    assert {p.gold for p in prompts} == {("A",), ("B",)}
    assert all(p.choices["AB".index(p.gold[0])] == item.chosen for p in prompts)
    assert pairwise_prompt("alignx", item, "choice", 3) == prompts[3]


def test_personafeedback_subset_and_limit(cache_dir: str) -> None:
    hard = load("personafeedback", "personafeedback", cache_dir, subset="spedific/hard")
    assert [p.id for p in hard] == ["personafeedback-spedific.hard.0-aligned"]
    assert hard[0].persona.startswith("Name: Mei Chen")  # user_id 1 = the first persona line
    medium = load("personafeedback", "personafeedback", cache_dir, subset="general/medium")
    assert medium[0].persona.startswith("Name: Tom Baker")
    assert len(load("personafeedback", "personafeedback", cache_dir, limit=4)) == 4


# ---------------------------------------------------------------- personas and ids


def test_unaligned_personas_are_seeded_per_row(cache_dir: str, pool: PersonaPool) -> None:
    full = load("triviaqa", "triviaqa_rc_nocontext.jsonl", cache_dir,
                persona_settings=("none", "unaligned"), personas=pool)
    assert [p.id for p in full] == ["triviaqa-tc_33-none", "triviaqa-tc_33-unaligned",
                                    "triviaqa-tc_40-none", "triviaqa-tc_40-unaligned",
                                    "triviaqa-tc_49-none", "triviaqa-tc_49-unaligned"]
    unaligned = [p for p in full if p.persona_setting == "unaligned"]
    assert all(p.persona in pool.personas for p in unaligned)
    # The same row gets the same persona whatever the limit; another seed draws anew.
    limited = load("triviaqa", "triviaqa_rc_nocontext.jsonl", cache_dir, limit=1,
                   persona_settings=("unaligned",), personas=pool)
    assert limited[0].persona == unaligned[0].persona
    reseeded = [load("triviaqa", "triviaqa_rc_nocontext.jsonl", cache_dir, persona_settings=("unaligned",),
                     personas=pool, seed=seed) for seed in range(1, 6)]
    assert len({tuple(p.persona for p in run) for run in reseeded}) > 1


def test_one_setting_per_row_for_training_mixes(cache_dir: str, pool: PersonaPool) -> None:
    prompts = load("mmlu_pro", "mmlu_pro_test.jsonl", cache_dir, persona_settings=("none", "unaligned"),
                   persona_assignment="one", personas=pool)
    assert len(prompts) == 4
    assert [p.id.rsplit("-", 1)[0] for p in prompts] == ["mmlu_pro-70", "mmlu_pro-71", "mmlu_pro-72", "mmlu_pro-73"]
    again = load("mmlu_pro", "mmlu_pro_test.jsonl", cache_dir, persona_settings=("none", "unaligned"),
                 persona_assignment="one", personas=pool)
    assert [p.id for p in again] == [p.id for p in prompts]


def test_parquet_and_local_json_give_the_same_prompts(cache_dir: str, tmp_path: Path) -> None:
    rows = datasets.load_dataset("json", data_files=str(FIXTURES / "mmlu_pro_test.jsonl"), split="train",
                                 cache_dir=cache_dir)
    parquet = tmp_path / "test-00000-of-00001.parquet"
    rows.to_parquet(str(parquet))
    from_json = load("mmlu_pro", "mmlu_pro_test.jsonl", cache_dir)
    assert load_benchmark("mmlu_pro", str(parquet), cache_dir=cache_dir) == from_json


def test_load_benchmarks_builds_the_persona_pool_from_config(cache_dir: str) -> None:
    prompts = load_benchmarks(
        [BenchmarkConfig(name="math500", source=str(FIXTURES / "math500_test.jsonl"),
                         persona_settings=["none", "unaligned"], scorer="math"),
         BenchmarkConfig(name="fspo_roleplay", source=str(FIXTURES / "fspo_roleplay.jsonl"))],
        persona_hub=PersonaHubConfig(source=str(FIXTURES / "personahub_persona.jsonl")), cache_dir=cache_dir)
    assert [p.benchmark for p in prompts] == ["math500"] * 4 + ["fspo_roleplay"] * 2
    assert len({p.id for p in prompts}) == len(prompts)


# ---------------------------------------------------------------- errors


def test_missing_column_is_one_line_naming_file_and_column(cache_dir: str, tmp_path: Path) -> None:
    bad = tmp_path / "pubmedqa.jsonl"
    rows = [json.loads(line) for line in (FIXTURES / "pubmedqa_pqa_labeled.jsonl").read_text().splitlines()]
    bad.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "final_decision"}) + "\n"
                           for row in rows))
    with pytest.raises(DataError) as error:
        load_benchmark("pubmedqa", str(bad), cache_dir=cache_dir)
    message = str(error.value)
    assert "\n" not in message and str(bad) in message and "'final_decision'" in message


def test_bad_values_and_arguments_fail_naming_the_field(cache_dir: str, tmp_path: Path) -> None:
    bad = tmp_path / "mmlu.jsonl"
    row = json.loads((FIXTURES / "mmlu_pro_test.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps({**row, "answer": "A"}) + "\n")
    with pytest.raises(DataError, match=r"mmlu.jsonl:1: answer: 'A' disagrees with answer_index 3"):
        load_benchmark("mmlu_pro", str(bad), cache_dir=cache_dir)
    with pytest.raises(DataError, match="unknown benchmark 'gsm8k'"):
        load_benchmark("gsm8k", str(bad))
    with pytest.raises(DataError, match=r"mmlu_pro.scorer: 'judge' is not one of \['multiple_choice'\]"):
        load_benchmark("mmlu_pro", str(bad), scorer="judge")
    with pytest.raises(DataError, match="'unaligned' needs a PersonaHub pool"):
        load("triviaqa", "triviaqa_rc_nocontext.jsonl", cache_dir, persona_settings=("unaligned",))
    with pytest.raises(DataError, match="'sometimes' is not one of"):
        load("triviaqa", "triviaqa_rc_nocontext.jsonl", cache_dir, persona_settings=("sometimes",))
    with pytest.raises(DataError, match="data file not found"):
        load_benchmark("triviaqa", str(tmp_path / "absent.jsonl"))
    with pytest.raises(DataError, match="subset: 'general/impossible' matches none"):
        load("personafeedback", "personafeedback", cache_dir, subset="general/impossible")


def test_unreachable_hub_id_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, cache_dir: str) -> None:
    # Offline mode makes the hub lookup fail at once instead of retrying the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as error:
        load_benchmark("pubmedqa", "no-such-org/no-such-dataset", cache_dir=cache_dir)
    assert "\n" not in str(error.value) and str(error.value).startswith("no-such-org/no-such-dataset:")


def test_every_spec_has_a_loader_and_a_default_scorer() -> None:
    assert set(SPECS) == {"pubmedqa", "triviaqa", "mmlu_pro", "supergpqa", "math500", "ultramedical",
                          "flan", "alignx", "personafeedback", "fspo_roleplay"}
    assert SPECS["pubmedqa"].scorers[0] == "judge" and SPECS["math500"].scorers[0] == "judge"


# ---------------------------------------------------------------- aligned personas over HTTP


# The persona writer's reply: free text (no verdict), the same for every question.
PERSONA_REPLY = Reply.garbage('"Persona: A quiz-league veteran who knows the answer."')


@pytest.fixture(scope="module")
def chat_server() -> Iterator[JudgeServer]:
    with JudgeServer(PERSONA_REPLY) as server:
        yield server


def aligned_config(server: JudgeServer, cache: Path, **overrides: Any) -> AlignedPersonaConfig:
    return AlignedPersonaConfig(**{"base_url": server.base_url, "model": "persona-writer-1",
                                   "api_key_env": "PD_TEST_ALIGNED_KEY", "cache_path": str(cache),
                                   "max_retries": 0, "timeout_s": 10.0, "concurrency": 2, **overrides})


@pytest.mark.timeout(120)
def test_aligned_personas_come_from_the_model_once_then_from_the_cache(
        chat_server: JudgeServer, cache_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PD_TEST_ALIGNED_KEY", API_KEY)
    caplog.set_level(logging.DEBUG)
    chat_server.reset()
    cache = tmp_path / "aligned.jsonl"
    generator = AlignedPersonaGenerator(aligned_config(chat_server, cache))
    prompts = load("mmlu_pro", "mmlu_pro_test.jsonl", cache_dir, persona_settings=("none", "aligned"),
                   aligned=generator)
    aligned = [p for p in prompts if p.persona_setting == "aligned"]
    assert [p.id for p in aligned] == ["mmlu_pro-70-aligned", "mmlu_pro-71-aligned", "mmlu_pro-72-aligned",
                                       "mmlu_pro-73-aligned"]
    assert generator.calls == 4 and len(chat_server.requests) == 4
    assert {r.authorization for r in chat_server.requests} == {f"Bearer {API_KEY}"}
    sent = {r.body["messages"][-1]["content"] for r in chat_server.requests}
    first = prompts[0]
    # The model sees the question with its options and the right answer in words.
    expected = (f"Question:\n{format_question(first.question, first.choices)}\n\n"
                "Correct answer: Unsafe practices, Distress, Fear, Serious")
    assert expected in sent
    assert all(r.body["model"] == "persona-writer-1" for r in chat_server.requests)
    assert aligned[0].persona == "A quiz-league veteran who knows the answer."  # quotes, "Persona:" cut

    entries = [json.loads(line) for line in cache.read_text().splitlines()]
    assert sorted(e["question_id"] for e in entries) == ["mmlu_pro-70", "mmlu_pro-71", "mmlu_pro-72", "mmlu_pro-73"]
    assert {e["model"] for e in entries} == {"persona-writer-1"}
    assert API_KEY not in cache.read_text() and API_KEY not in caplog.text

    # A rerun reads the cache: the same personas and not one request more.
    again = AlignedPersonaGenerator(aligned_config(chat_server, cache))
    reloaded = load("mmlu_pro", "mmlu_pro_test.jsonl", cache_dir, persona_settings=("aligned",), aligned=again)
    assert again.calls == 0 and len(chat_server.requests) == 4
    assert [p.persona for p in reloaded] == [p.persona for p in aligned]

    # The cache is keyed by model too: another model writes its own personas.
    other = AlignedPersonaGenerator(aligned_config(chat_server, cache, model="persona-writer-2"))
    load("mmlu_pro", "mmlu_pro_test.jsonl", cache_dir, persona_settings=("aligned",), aligned=other, limit=1)
    assert other.calls == 1 and len(chat_server.requests) == 5


@pytest.mark.timeout(120)
def test_aligned_persona_failures_are_one_line_and_keyless(
        chat_server: JudgeServer, cache_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "aligned.jsonl"
    monkeypatch.delenv("PD_TEST_ALIGNED_KEY", raising=False)
    with pytest.raises(DataError, match="environment variable PD_TEST_ALIGNED_KEY is not set"):
        load("math500", "math500_test.jsonl", cache_dir, persona_settings=("aligned",),
             aligned=AlignedPersonaGenerator(aligned_config(chat_server, cache)))
    monkeypatch.setenv("PD_TEST_ALIGNED_KEY", API_KEY)
    chat_server.reset(Reply.error(500))
    try:
        with pytest.raises(AlignedPersonaError) as error:
            load("math500", "math500_test.jsonl", cache_dir, persona_settings=("aligned",),
                 aligned=AlignedPersonaGenerator(aligned_config(chat_server, cache)))
    finally:
        chat_server.reset(PERSONA_REPLY)
    message = str(error.value)
    assert "\n" not in message and "persona-writer-1" in message and "math500-test/" in message
    assert "(and 1 more)" in message and API_KEY not in message
    assert not cache.exists()  # nothing was paid for, nothing cached


def test_clean_persona_strips_lead_ins() -> None:
    assert clean_persona('  "Persona: a nurse who works nights."  ') == "A nurse who works nights."
    assert clean_persona("I am a retired pilot.") == "A retired pilot."


# ---------------------------------------------------------------- SFT selection (appendix B.1)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_sft_selection_uses_the_persona_only_where_it_yields_the_right_answer(
        cache_dir: str, pool: PersonaPool, tmp_path: Path) -> None:
    objective = load("triviaqa", "triviaqa_rc_nocontext.jsonl", cache_dir,
                     persona_settings=("none", "unaligned"), personas=pool)
    personalized = load("fspo_roleplay", "fspo_roleplay.jsonl", cache_dir)
    by_id = {p.id: p for p in objective + personalized}

    def row(prompt_id: str, mode: str, correct: bool, response: str) -> dict[str, Any]:
        prompt = by_id[prompt_id]
        return {"question": prompt.question, "persona": prompt.persona, "mode": mode,
                "response": response, "correct": correct}

    teacher = write_jsonl(tmp_path / "teacher.jsonl", [
        # tc_33 with a persona: the persona gets it right -> personalized-mode trajectory.
        row("triviaqa-tc_33-unaligned", "general", True, "Answer: Sunset Boulevard"),
        row("triviaqa-tc_33-unaligned", "personalized", True, "[Personalized_mode] Answer: Sunset Boulevard"),
        # tc_40 with a persona: the persona misleads -> the correct general-mode one.
        row("triviaqa-tc_40-unaligned", "personalized", False, "Answer: Alvin"),
        row("triviaqa-tc_40-unaligned", "[General_mode]", True, "Answer: David Seville"),
        # tc_49 with a persona: never right -> dropped.
        row("triviaqa-tc_49-unaligned", "general", False, "Answer: Leo"),
        # No persona: only general mode can be chosen.
        row("triviaqa-tc_33-none", "personalized", True, "Answer: Sunset Boulevard"),
        row("triviaqa-tc_33-none", "general", True, "Answer: Sunset Boulevard"),
        # Personalized tasks take their correct personalized-mode trajectory.
        row("fspo_roleplay-0-aligned", "general", True, "Answer: stew"),
        row("fspo_roleplay-0-aligned", "personalized", True, "Answer: garden stews"),
        {"question": "a question nobody asked", "persona": None, "mode": "general",
         "response": "Answer: 42", "correct": True},
    ])
    stats: dict[str, int] = {}
    selected = dict((p.id, r) for p, r in select_sft_trajectories(objective + personalized, teacher,
                                                                  stats=stats, cache_dir=cache_dir))
    assert selected == {
        "triviaqa-tc_33-none": f"{Mode.GENERAL.token} Answer: Sunset Boulevard",
        "triviaqa-tc_33-unaligned": f"{Mode.PERSONALIZED.token} Answer: Sunset Boulevard",
        "triviaqa-tc_40-unaligned": f"{Mode.GENERAL.token} Answer: David Seville",
        "fspo_roleplay-0-aligned": f"{Mode.PERSONALIZED.token} Answer: garden stews",
    }
    assert stats == {"personalized": 2, "general": 2, "dropped": 4, "unmatched_rows": 1}


def test_sft_selection_matches_ids_and_rejects_bad_rows(cache_dir: str, tmp_path: Path) -> None:
    prompts = load("math500", "math500_test.jsonl", cache_dir)
    teacher = write_jsonl(tmp_path / "by_id.jsonl", [
        {"id": prompts[1].id, "question": "(paraphrased)", "persona": None, "mode": "general",
         "response": "Answer: 26000", "correct": True}])
    assert select_sft_trajectories(prompts, teacher, cache_dir=cache_dir) == [
        (prompts[1], f"{Mode.GENERAL.token} Answer: 26000")]
    clash = write_jsonl(tmp_path / "clash.jsonl", [
        {"question": "q", "persona": None, "mode": "general", "response": "[Personalized_mode] x",
         "correct": True}])
    with pytest.raises(DataError, match=r"clash.jsonl:1: response: starts with \[Personalized_mode\] but mode is"):
        select_sft_trajectories(prompts, clash, cache_dir=cache_dir)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"question": "q", "mode": "general", "response": "x"}])
    with pytest.raises(DataError, match="missing column 'persona'"):
        select_sft_trajectories(prompts, missing, cache_dir=cache_dir)
