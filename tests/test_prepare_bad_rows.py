"""A bad row in any dataset the recipe reads is named where a person finds it: FILE:LINE:FIELD in
a JSONL file (lines counted from 1, blank lines included), and in a parquet file, which has
no lines, the file and the row's 0-based index, saying so. With skip-invalid the row is left
out and counted by dataset, field and reason instead. One JSONL and one parquet file per
dataset, each the fixture's rows with one field of the second row emptied."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pytest

from personadual.benchmarks.personas import PersonaHubConfig, PersonaPool
from personadual.benchmarks.registry import load_benchmark
from personadual.data import DataError
from tests.test_prepare_data import prepare, rows, server  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
JSONL = FIXTURES / "benchmarks"

# dataset -> (fixture rows, the field emptied in the second row)
CASES = {
    "pubmedqa": ("pubmedqa_pqa_labeled.jsonl", "question"),
    "triviaqa": ("triviaqa_rc_nocontext.jsonl", "question"),
    "mmlu_pro": ("mmlu_pro_test.jsonl", "question"),
    "supergpqa": ("supergpqa.jsonl", "question"),
    "math500": ("math500_test.jsonl", "problem"),
    "ultramedical": ("ultramedical.jsonl", "id"),
    "flan": ("flan/train/snli_10templates_train.jsonl", "targets"),
    "alignx": ("alignx.jsonl", "chosen"),
    "fspo_roleplay": ("fspo_roleplay.jsonl", "yw"),
    "personahub": ("personahub_persona.jsonl", "persona"),
}
EMPTY = "must be a non-empty string"


def broken_rows(name: str) -> tuple[list[dict], str]:
    fixture, field = CASES[name]
    data = rows(JSONL / fixture)
    data[1][field] = ""
    return data, field


def write_jsonl(path: Path, data: list[dict]) -> Path:
    # A blank first line: the bad row (the second) is on line 3, not at "row 1".
    path.write_text("\n" + "".join(json.dumps(row) + "\n" for row in data))
    return path


def write_parquet(path: Path, data: list[dict]) -> Path:
    datasets.Dataset.from_list(data).to_parquet(str(path))
    return path


def load(name: str, path: Path, cache_dir: str, skipped: Counter | None = None) -> int:
    """How many records the file gave."""
    if name == "personahub":
        pool = PersonaPool.load(PersonaHubConfig(source=str(path), subset=None), cache_dir, skipped)
        return len(pool.personas)
    return len(load_benchmark(name, str(path), cache_dir=cache_dir, skipped=skipped))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-cache"))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("layout", ["jsonl", "parquet"])
def test_a_bad_row_is_named_by_file_line_and_field_or_skipped_and_counted(name, layout, cache_dir, tmp_path):
    data, field = broken_rows(name)
    path = (write_jsonl(tmp_path / f"{name}.jsonl", data) if layout == "jsonl"
            else write_parquet(tmp_path / f"{name}.parquet", data))
    with pytest.raises(DataError) as error:
        load(name, path, cache_dir)
    where = f"{path}:3" if layout == "jsonl" else f"{path}: row 1 (0-based; a parquet file has no line numbers)"
    assert str(error.value) == f"{where}: {field}: {EMPTY}"
    skipped: Counter = Counter()
    good = load(name, path, cache_dir, skipped)
    assert skipped == {f"invalid row: {field}: {EMPTY}": 1}
    per_row = load(name, write_jsonl(tmp_path / "good.jsonl", [r for i, r in enumerate(data) if i != 1]), cache_dir)
    assert good == per_row > 0


def test_a_bad_row_in_a_snapshot_folder_names_the_file_it_is_in(cache_dir, tmp_path):
    folder = shutil.copytree(FIXTURES / "hub" / "mandarjoshi--trivia_qa", tmp_path / "trivia_qa")
    parquet = folder / "rc.nocontext" / "validation-00000-of-00001.parquet"
    data = datasets.Dataset.from_parquet(str(parquet), cache_dir=cache_dir).to_list()
    data[2]["answer"]["value"] = None
    write_parquet(parquet, data)
    with pytest.raises(DataError) as error:
        load_benchmark("triviaqa", str(folder), subset="rc.nocontext", cache_dir=cache_dir)
    assert str(error.value) == (f"{parquet}: row 2 (0-based; a parquet file has no line numbers): "
                                f"answer.value: missing")


def test_personafeedback_names_the_file_of_its_six_and_the_line(cache_dir, tmp_path):
    folder = shutil.copytree(JSONL / "personafeedback", tmp_path / "personafeedback")
    hard = folder / "data" / "spedific" / "hard.jsonl"
    data = rows(hard)
    data[0]["user_id"] = "999"
    hard.write_text("".join(json.dumps(row) + "\n" for row in data))
    with pytest.raises(DataError) as error:
        load_benchmark("personafeedback", str(folder), cache_dir=cache_dir)
    assert str(error.value) == f"{hard}:1: user_id: '999' has no persona in persona/all_personas.jsonl"
    skipped: Counter = Counter()
    kept = load_benchmark("personafeedback", str(folder), cache_dir=cache_dir, skipped=skipped)
    assert skipped == {"invalid row: user_id: '999' has no persona in persona/all_personas.jsonl": 1}
    assert len(kept) == len(load_benchmark("personafeedback", str(JSONL / "personafeedback"), cache_dir=cache_dir)) - 1


def test_a_duplicate_row_id_names_both_rows(cache_dir, tmp_path):
    data = rows(JSONL / "supergpqa.jsonl")
    path = write_jsonl(tmp_path / "supergpqa.jsonl", [*data, data[0]])
    with pytest.raises(DataError, match=re.escape(f"{path}:{len(data) + 2}: id: duplicate row id "
                                                  f"{data[0]['uuid']!r} (first at {path}:2)")):
        load_benchmark("supergpqa", str(path), cache_dir=cache_dir)


def test_prepare_data_exits_2_naming_file_line_and_field_and_skip_invalid_counts_every_dataset(
        server, tmp_path):  # noqa: F811
    trivia, _ = broken_rows("triviaqa")
    alignx, _ = broken_rows("alignx")
    personas, _ = broken_rows("personahub")
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", data)
             for name, data in (("triviaqa", trivia), ("alignx", alignx), ("personahub", personas))}
    recipe = [f"eval=[{{name: triviaqa, source: {files['triviaqa']}, persona_settings: [none, unaligned]}}, "
              f"{{name: alignx, source: {files['alignx']}}}]", "sft=[]", "rl=[]",
              f"persona_hub.source={files['personahub']}", "persona_hub.subset=null"]
    failed = prepare(tmp_path / "strict", server, *recipe)
    assert failed.returncode == 2
    assert failed.stderr.strip() == f"error: {files['personahub']}:3: persona: {EMPTY}"
    result = prepare(tmp_path / "skipping", server, "--skip-invalid", *recipe)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "skipping" / "eval.manifest.json").read_text())
    assert manifest["dropped"] == {f"triviaqa: invalid row: question: {EMPTY}": 1,
                                   f"alignx: invalid row: chosen: {EMPTY}": 1,
                                   f"personahub: invalid row: persona: {EMPTY}": 1}
    assert manifest["by_source"] == {"alignx": len(alignx) - 1, "triviaqa": 2 * (len(trivia) - 1)}
