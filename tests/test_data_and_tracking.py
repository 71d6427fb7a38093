from __future__ import annotations

import json

import pytest

from personadual.data import DataError, check_data_files, load_prompts, resolve_model
from personadual.tracking import RunTracker, WandbSettings, read_metrics, scrub

GOOD = {"id": "p1", "question": "What color is X?", "persona": None, "persona_setting": "none",
        "task_type": "objective", "gold": ["red"], "scorer": "exact_match"}


def _write(path, rows: list[bytes]):
    path.write_bytes(b"\n".join(rows) + b"\n")
    return path


def test_bad_rows_name_file_line_and_field(tmp_path):
    good = json.dumps(GOOD).encode()
    bad_field = json.dumps({**GOOD, "id": "p2", "persona_setting": "maybe"}).encode()
    path = _write(tmp_path / "d.jsonl", [good, bad_field])
    with pytest.raises(DataError, match=r"d\.jsonl:2: Prompt\.persona_setting"):
        load_prompts(path)
    with pytest.raises(DataError, match=r"j\.jsonl:2: invalid JSON"):
        load_prompts(_write(tmp_path / "j.jsonl", [good, b"{not json"]))
    with pytest.raises(DataError, match=r"u\.jsonl:1: not UTF-8"):
        load_prompts(_write(tmp_path / "u.jsonl", [b'{"id": "\xff\xfe"}']))
    missing = {k: v for k, v in GOOD.items() if k != "gold"}
    with pytest.raises(DataError, match=r"m\.jsonl:1: .*gold"):
        load_prompts(_write(tmp_path / "m.jsonl", [json.dumps(missing).encode()]))
    with pytest.raises(DataError, match="empty dataset"):
        load_prompts(_write(tmp_path / "e.jsonl", [b""]))
    with pytest.raises(DataError, match="not found"):
        load_prompts(tmp_path / "absent.jsonl")


def test_skip_invalid_counts_what_it_skips(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps(GOOD).encode(), b"{oops", b"\xff\xfe",
                                         json.dumps({**GOOD, "id": "p3", "scorer": "bleu"}).encode()])
    skipped: dict[str, int] = {}
    assert [p.id for p in load_prompts(path, skip_invalid=True, skipped=skipped)] == ["p1"]
    assert skipped == {str(path): 3}
    assert check_data_files([str(path)], [], [], skip_invalid=True) == {str(path): 3}
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        check_data_files([str(path)], [], [])
    bad_only = _write(tmp_path / "b.jsonl", [b"{oops", json.dumps({**GOOD, "gold": []}).encode()])
    with pytest.raises(DataError, match=r"b\.jsonl: no valid prompts: all 2 row\(s\) were invalid and skipped"):
        load_prompts(bad_only, skip_invalid=True)
    with pytest.raises(DataError, match=r"e\.jsonl: no valid prompts \(empty dataset\)"):
        load_prompts(_write(tmp_path / "e.jsonl", [b""]), skip_invalid=True)
    unknown = _write(tmp_path / "x.jsonl", [json.dumps({**GOOD, "colour": "red"}).encode()])
    with pytest.raises(DataError, match=r"x\.jsonl:1: Prompt\.colour: unknown field"):
        load_prompts(unknown)


def test_model_path_errors(tmp_path):
    with pytest.raises(DataError, match="model.path"):
        resolve_model(str(tmp_path / "nope"), "tiny")
    with pytest.raises(DataError, match="config.json"):
        resolve_model(str(tmp_path), "tiny")
    assert resolve_model("Qwen/Qwen3-8B", "tiny") == "Qwen/Qwen3-8B"


def test_tracker_scrubs_secrets_everywhere(tmp_path, monkeypatch):
    canary = "sk-canary-0123456789"
    monkeypatch.setenv("JUDGE_KEY", canary)
    tracker = RunTracker(tmp_path / "run", config={"judge": {"api_key_env": "JUDGE_KEY", "oops": canary}},
                         secret_env=["JUDGE_KEY"], wandb=WandbSettings(mode="offline"))
    tracker.log(1, {"note": f"error from server with key {canary}", "loss": 0.5, "nested": {"x": float("nan")}})
    tracker.log_samples(1, "eval/samples", [{"response": canary}])
    tracker.write_summary({"eval": {"detail": canary}})
    tracker.finish()
    assert read_metrics(tmp_path / "run")[0]["loss"] == 0.5
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert canary.encode() not in path.read_bytes(), path
    assert scrub({"a": [canary]}, [canary]) == {"a": ["***"]}


def test_balanced_by_setting_meets_every_setting_equally_often():
    from collections import Counter

    from personadual.data import balanced_by_setting
    from personadual.evaluation import setting_of
    from personadual.world import PersonaWorld

    prompts = PersonaWorld().train_prompts()
    balanced = balanced_by_setting(prompts)
    counts = Counter(setting_of(p) for p in balanced)
    assert set(counts) == {"no_persona", "unaligned", "aligned", "personalized"}
    assert len(set(counts.values())) == 1 and counts["aligned"] == max(Counter(map(setting_of, prompts)).values())
    assert {p.id for p in balanced} == {p.id for p in prompts}  # nothing dropped, only repeated


def test_wandb_history_keeps_sft_rl_and_eval_rows_at_one_monotonic_step(tmp_path):
    """Read back from the offline .wandb file: a stage whose own step restarts at 1 is still
    kept (W&B drops rows logged below its last step), and sample tables land too."""
    from tests.wandb_records import history, wandb_file

    tracker = RunTracker(tmp_path / "run", config={}, secret_env=[], wandb=WandbSettings(mode="offline"))
    for step in (1, 2, 3):
        tracker.log(step, {"stage": "sft", "step": step, "sft": {"loss": 1.0 / step}, "timing_s": {"step": 0.1}})
    tracker.log(3, {"stage": "eval", "tag": "sft", "step": 0, "eval": {"aligned": {"accuracy": 0.5}}})
    tracker.log_samples(3, "eval/samples", [{"question": "q", "gold": "red", "reward": 1.0}])
    for step in (1, 2):
        tracker.log(3 + step, {"stage": "rl", "step": step, "rl_step": step, "learner": {"kl": 0.1 * step},
                               "timing_s": {"step": 2.0}, "flag": True})
    tracker.log_samples(5, "rollout/samples", [{"question": "q", "gold": "red", "reward": 0.0}])
    tracker.finish()
    rows = history(wandb_file(tmp_path / "run"))  # complete once finish() returns
    assert [row.step for row in rows] == [1, 2, 3, 4, 5]
    assert [row.values.get("sft/loss") for row in rows[:3]] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert rows[2].values["eval/aligned/accuracy"] == 0.5
    assert [row.values["rl_step"] for row in rows[3:]] == [1, 2]
    assert [row.values["learner/kl"] for row in rows[3:]] == [0.1, 0.2]
    assert rows[2].values["eval/samples/_type"] == rows[4].values["rollout/samples/_type"] == "table-file"
    assert not any(key in row.values for row in rows for key in ("timestamp", "step", "flag", "global_step"))
    records = read_metrics(tmp_path / "run")
    assert [r["global_step"] for r in records] == [1, 2, 3, 3, 4, 5]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(s["table"], s["gold"]) for s in samples] == [("eval/samples", "red"), ("rollout/samples", "red")]


def test_wandb_project_group_tags_and_name_come_from_the_config(tmp_path):
    from actors.config import load_config
    from tests.wandb_records import records, wandb_file

    cfg = load_config(None, ["wandb.project=pd-tests", "wandb.group=ablations", "wandb.tags=[grpo,seed0]",
                             "wandb.name=grpo-seed0"])
    tracker = RunTracker(tmp_path / "run", config={}, secret_env=[], wandb=WandbSettings(**cfg.wandb))
    assert tracker.sync_hint().startswith("wandb sync ") and str(tmp_path / "run" / "wandb") in tracker.sync_hint()
    tracker.finish()
    run = next(r.run for r in records(wandb_file(tmp_path / "run")) if r.WhichOneof("record_type") == "run")
    assert (run.project, run.run_group, list(run.tags), run.display_name) == (
        "pd-tests", "ablations", ["grpo", "seed0"], "grpo-seed0")


def test_last_eval_finds_the_newest_result_of_a_tag():
    from personadual.tracking import last_eval

    records = [{"stage": "sft", "step": 1}, {"stage": "eval", "tag": "sft", "step": 0, "eval": {"mean_accuracy": 0.5}},
               {"stage": "eval", "tag": "final", "step": 2, "eval": {"mean_accuracy": 0.6}},
               {"stage": "eval", "tag": "final", "step": 4, "eval": {"mean_accuracy": 0.7}}]
    assert last_eval(records, "sft") == {"mean_accuracy": 0.5}
    assert last_eval(records, "final") == {"mean_accuracy": 0.7}
    assert last_eval(records[:1], "sft") is None
