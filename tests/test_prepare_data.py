"""``python -m personadual.prepare data`` on configs/recipe_tiny.yaml: real-format hub snapshot
folders and JSONL exports become the files a run reads, with a real HTTP OpenAI-protocol
server (tests/judge_server.py) as teacher, persona writer and judge. Its request log proves
what was asked, what the cache saved after a kill, and that the key went nowhere else."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from personadual.data import check_data_files
from personadual.modes import MODE_TOKENS, Mode
from personadual.prepare.teacher import MODE_INSTRUCTIONS
from tests.judge_server import JudgeServer, Reply

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "recipe_tiny.yaml"
KEY_ENV = "PERSONADUAL_TEACHER_KEY"
CANARY = "sk-canary-prepare-77a2c1"
GENERAL_MARK = "from facts and reasoning alone"
PERSONAL_MARK = "where it helps"
PERSONA_MARK = "Write a user persona"
OUTPUTS = ("rl", "eval", "teacher", "sft")
MANY = 10_000


def script_server(server: JudgeServer, *, teacher_delay_s: float = 0.0) -> None:
    """General mode answers A, personalized mode B: right or wrong by each row's gold."""
    assert GENERAL_MARK in MODE_INSTRUCTIONS[Mode.GENERAL]
    assert PERSONAL_MARK in MODE_INSTRUCTIONS[Mode.PERSONALIZED]
    general = replace(Reply.garbage("Recalling the facts. Answer: A"), delay_s=teacher_delay_s)
    personal = replace(Reply.garbage("For this user. Answer: B"), delay_s=teacher_delay_s)
    server.when(GENERAL_MARK, *[general] * MANY)
    server.when(PERSONAL_MARK, *[personal] * MANY)
    server.when(PERSONA_MARK, *[Reply.garbage("A clinician who reads trial reports daily.")] * MANY)


def prepare(out: Path, server: JudgeServer, *extra: str, wait: bool = True):
    flags = [arg for arg in extra if arg.startswith("--")]
    extra = tuple(arg for arg in extra if not arg.startswith("--"))
    command = [sys.executable, "-m", "personadual.prepare", "data", "--recipe", str(RECIPE), "--no-progress", *flags,
               f"out_dir={out}", f"teacher.base_url={server.base_url}",
               f"persona_writer.base_url={server.base_url}", f"reward.judge.base_url={server.base_url}",
               "teacher.concurrency=1", *extra]
    env = {**os.environ, KEY_ENV: CANARY}
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def server():
    with JudgeServer() as running:
        yield running


@pytest.fixture(scope="module")
def prepared(server, tmp_path_factory) -> Path:
    server.reset()
    script_server(server)
    out = tmp_path_factory.mktemp("prepared") / "data"
    result = prepare(out, server)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_every_output_has_a_manifest_whose_counts_and_hash_match_the_file(prepared):
    for name in OUTPUTS:
        manifest = json.loads((prepared / f"{name}.manifest.json").read_text())
        data = rows(prepared / f"{name}.jsonl")
        assert manifest["rows"] == len(data) > 0 and manifest["sha256"] == sha(prepared / f"{name}.jsonl")
        if name in ("rl", "eval", "sft"):
            for key in ("by_source", "by_setting", "by_source_and_setting"):
                assert sum(manifest[key].values()) == len(data), (name, key)


def test_eval_set_holds_the_seven_benchmarks_in_their_settings(prepared):
    manifest = json.loads((prepared / "eval.manifest.json").read_text())
    objective = ("pubmedqa", "triviaqa", "mmlu_pro", "supergpqa", "math500")
    assert set(manifest["by_source"]) == {*objective, "personafeedback", "fspo_roleplay"}
    for name in objective:
        per_setting = [manifest["by_source_and_setting"][f"{name}/{s}"] for s in ("no_persona", "unaligned", "aligned")]
        assert len(set(per_setting)) == 1, (name, per_setting)  # every row in all three settings
    for name in ("personafeedback", "fspo_roleplay"):
        assert set(k for k in manifest["by_source_and_setting"] if k.startswith(name)) == {f"{name}/personalized"}


def test_a_run_reads_every_prepared_file_and_sft_rows_start_with_a_mode_token(prepared):
    assert check_data_files([str(prepared / "rl.jsonl")], [str(prepared / "eval.jsonl")],
                            [str(prepared / "sft.jsonl")]) == {}
    for row in rows(prepared / "sft.jsonl"):
        assert row["response"].startswith(MODE_TOKENS)


def test_sft_keeps_the_mode_the_papers_rule_picks_and_drops_prompts_never_answered_right(prepared):
    outcomes: dict[str, dict[str, bool]] = {}  # prompt id -> {mode: teacher correct}
    for row in rows(prepared / "teacher.jsonl"):
        outcomes.setdefault(row["id"], {})[row["mode"]] = row["correct"]
    sft = {row["prompt"]["id"]: row["response"] for row in rows(prepared / "sft.jsonl")}
    for prompt_id, outcome in outcomes.items():
        # Asked in general mode only without a persona, in personalized mode only for a
        # personalized task, in both modes for an objective question with a persona.
        expected_modes = {"general"} if prompt_id.endswith("-none") else (
            {"personalized"} if prompt_id.startswith("alignx") else {"general", "personalized"})
        assert set(outcome) == expected_modes, prompt_id
        if outcome.get("personalized"):  # the persona yields the right answer: personalized mode
            assert sft[prompt_id].startswith(MODE_TOKENS[1]), prompt_id
        elif outcome.get("general"):
            assert sft[prompt_id].startswith(MODE_TOKENS[0]), prompt_id
        else:
            assert prompt_id not in sft, prompt_id
    manifest = json.loads((prepared / "sft.manifest.json").read_text())
    dropped = sum(1 for outcome in outcomes.values() if not any(outcome.values()))
    assert manifest["dropped"]["no_correct_teacher_trajectory"] == dropped > 0
    by_mode = {"general": sum(r.startswith(MODE_TOKENS[0]) for r in sft.values()),
               "personalized": sum(r.startswith(MODE_TOKENS[1]) for r in sft.values())}
    assert manifest["by_mode"] == by_mode and min(by_mode.values()) > 0


def test_the_servers_log_matches_the_manifests_and_the_key_reaches_only_the_server(prepared, server):
    teacher_manifest = json.loads((prepared / "teacher.manifest.json").read_text())
    teacher_requests = len(server.requests_for(GENERAL_MARK)) + len(server.requests_for(PERSONAL_MARK))
    assert teacher_manifest["endpoint"]["teacher"]["requests"] == teacher_requests == teacher_manifest["rows"]
    aligned = sum(v for k, v in json.loads((prepared / "eval.manifest.json").read_text())["by_setting"].items()
                  if k == "aligned")
    assert teacher_manifest["endpoint"]["persona_writer"]["requests"] == len(server.requests_for(PERSONA_MARK)) > 0
    assert aligned > 0
    assert all(r.authorization == f"Bearer {CANARY}" for r in server.requests)
    for path in prepared.rglob("*"):
        if path.is_file():
            assert CANARY not in path.read_text(errors="replace"), path


@pytest.mark.timeout(300)
def test_killed_mid_way_and_rerun_reuses_finished_calls_and_writes_the_same_files(prepared, server, tmp_path):
    server.reset()
    script_server(server, teacher_delay_s=0.3)
    out = tmp_path / "data"
    process = prepare(out, server, wait=False)
    cache = out / "cache" / "teacher_calls.jsonl"
    deadline = time.monotonic() + 120
    while not (cache.is_file() and len(cache.read_text().splitlines()) >= 4):
        assert process.poll() is None and time.monotonic() < deadline, "preparation ended before the kill"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not (out / "sft.jsonl").exists()
    cached = {json.loads(line)["key"] for line in cache.read_text().splitlines() if line.strip()}
    server.reset()
    script_server(server)
    result = prepare(out, server)
    assert result.returncode == 0, result.stderr[-3000:]
    teacher = json.loads((out / "teacher.manifest.json").read_text())
    asked_again = len(server.requests_for(GENERAL_MARK)) + len(server.requests_for(PERSONAL_MARK))
    assert teacher["endpoint"]["teacher"]["cache_hits"] == len(cached) >= 4
    assert asked_again == teacher["rows"] - len(cached)
    assert len(server.requests_for(PERSONA_MARK)) == 0  # every persona was written before the kill
    for name in OUTPUTS:
        assert sha(out / f"{name}.jsonl") == sha(prepared / f"{name}.jsonl"), name


def test_bad_rows_and_missing_settings_exit_2_with_one_line(server, tmp_path):
    broken = tmp_path / "triviaqa.jsonl"
    source = rows(ROOT / "tests/fixtures/benchmarks/triviaqa_rc_nocontext.jsonl")
    source[1]["question"] = ""
    broken.write_text("".join(json.dumps(r) + "\n" for r in source))
    cases = {
        "bad row": ([f"eval=[{{name: triviaqa, source: {broken}}}]", "sft=[]", "rl=[]"],
                    [f"{broken}:2: question: must be a non-empty string"]),
        "unknown key": (["teacher.modle=x"], ["teacher.modle"]),
        "missing key variable": ([f"teacher.api_key_env=PERSONADUAL_UNSET_{os.getpid()}"], ["api_key_env"]),
    }
    for name, (overrides, needles) in cases.items():
        result = prepare(tmp_path / name.replace(" ", "_"), server, *overrides)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1 and all(n in line for n in needles), (name, line)


def test_a_teacher_failing_for_good_exits_3_and_the_rerun_continues_from_the_cache(server, tmp_path):
    server.reset()
    script_server(server)
    server.reset()  # rules in order: personalized mode fails with 500s, the rest answers
    server.when(PERSONAL_MARK, *[Reply.error(500)] * MANY)
    server.when(GENERAL_MARK, *[Reply.garbage("Recalling the facts. Answer: A")] * MANY)
    server.when(PERSONA_MARK, *[Reply.garbage("A clinician who reads trial reports daily.")] * MANY)
    failed = prepare(tmp_path / "data", server, "teacher.max_retries=0")
    assert failed.returncode == 3, failed.stderr[-2000:]
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("error: teacher:") and "run the command again" in line
    cached = len((tmp_path / "data" / "cache" / "teacher_calls.jsonl").read_text().splitlines())
    server.reset()
    script_server(server)
    result = prepare(tmp_path / "data", server)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "data" / "teacher.manifest.json").read_text())
    assert manifest["endpoint"]["teacher"]["cache_hits"] == cached > 0
    assert len(server.requests_for(GENERAL_MARK)) + len(server.requests_for(PERSONAL_MARK)) == manifest["rows"] - cached


def test_with_skip_invalid_a_bad_row_is_skipped_and_counted_in_the_manifest(server, tmp_path):
    broken = tmp_path / "triviaqa.jsonl"
    source = rows(ROOT / "tests/fixtures/benchmarks/triviaqa_rc_nocontext.jsonl")
    source[1]["question"] = ""
    broken.write_text("".join(json.dumps(r) + "\n" for r in source))
    result = prepare(tmp_path / "data", server, "--skip-invalid", f"eval=[{{name: triviaqa, source: {broken}}}]",
                     "sft=[]", "rl=[]")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "data" / "eval.manifest.json").read_text())
    assert manifest["rows"] == len(source) - 1
    assert manifest["dropped"] == {"triviaqa: invalid row: question: must be a non-empty string": 1}
