from __future__ import annotations

import pytest

from personadual.evaluation import forced_mode_summary, mode_alignment, setting_of, summarize
from personadual.modes import Mode
from personadual.records import Prompt
from tests.helpers import make_scored


def _prompt(pid, setting="none", task="objective"):
    persona = None if setting == "none" else "I am a gardener."
    return Prompt(id=pid, question="q?", persona=persona, persona_setting=setting, task_type=task,
                  gold=("red",), scorer="exact_match")


def _scored(prompt, mode, correct, status="ok", forced=False):
    return make_scored(prompt, mode, None if status == "dropped" else float(correct), correct=correct, forced=forced)


def test_settings_and_summary():
    assert setting_of(_prompt("a", "aligned", "personalized")) == "personalized"
    assert setting_of(_prompt("a", "unaligned")) == "unaligned"
    items = [_scored(_prompt("a"), Mode.GENERAL, True), _scored(_prompt("b"), Mode.PERSONALIZED, False),
             _scored(_prompt("c", "aligned"), None, False), _scored(_prompt("d", "aligned"), Mode.PERSONALIZED, True),
             _scored(_prompt("e", "aligned"), Mode.PERSONALIZED, False, status="dropped")]
    result = summarize(items)
    assert result["no_persona"] == {"accuracy": 0.5, "personalized_mode_rate": 0.5, "no_mode_rate": 0.0,
                                    "count": 2, "dropped": 0}
    assert result["aligned"]["accuracy"] == 0.5 and result["aligned"]["no_mode_rate"] == 0.5
    assert result["aligned"]["dropped"] == 1
    assert result["mean_accuracy"] == 0.5


def test_forced_baselines_and_upper_bound():
    a, b = _prompt("a", "aligned"), _prompt("b", "aligned")
    items = [_scored(a, Mode.GENERAL, False, forced=True), _scored(a, Mode.PERSONALIZED, True, forced=True),
             _scored(b, Mode.GENERAL, False, forced=True), _scored(b, Mode.PERSONALIZED, False, forced=True)]
    result = forced_mode_summary(items)
    assert result["force_general"]["aligned"] == 0.0
    assert result["force_personalized"]["aligned"] == 0.5
    assert result["upper_bound"]["aligned"] == 0.5


def test_mode_alignment_rates():
    p = _prompt("a", "aligned", "personalized")
    turns = [("g_then_p", _scored(p, Mode.PERSONALIZED, True), Mode.PERSONALIZED),
             ("g_then_p", _scored(p, Mode.GENERAL, True), Mode.PERSONALIZED),
             ("p_then_g", _scored(p, None, True), Mode.GENERAL)]
    assert mode_alignment(turns) == {"g_then_p": 0.5, "p_then_g": 0.0, "overall": 1 / 3}


def test_item_rows_name_each_item_its_setting_mode_outcome_and_probe(tmp_path):
    import math

    from personadual.evaluation import free_outcomes, item_rows, read_eval_items, write_eval_items

    a, b, c = _prompt("a", "aligned"), _prompt("b"), _prompt("c", "aligned", "personalized")
    free = [_scored(a, Mode.PERSONALIZED, True), _scored(b, Mode.GENERAL, False), _scored(c, None, False),
            _scored(_prompt("d"), Mode.GENERAL, True, status="dropped")]
    forced = [_scored(a, Mode.GENERAL, False, forced=True), _scored(a, Mode.PERSONALIZED, True, forced=True)]
    probe = {"a": (math.log(0.25), math.log(0.75)), "b": (math.log(0.9), math.log(0.1))}
    rows = item_rows(free + forced, probe=probe)
    assert [(r["id"], r["setting"], r["kind"], r["forced"], r["mode"], r["correct"]) for r in rows] == [
        ("a", "aligned", "synthetic", None, "personalized", True), ("b", "no_persona", "synthetic", None, "general", False),
        ("c", "personalized", "synthetic", None, None, False), ("d", "no_persona", "synthetic", None, "general", None),
        ("a", "aligned", "synthetic", "general", "general", False),
        ("a", "aligned", "synthetic", "personalized", "personalized", True)]
    assert rows[0]["p_personalized"] == pytest.approx(0.75) and rows[0]["logit_gap"] == pytest.approx(math.log(3))
    assert rows[1]["logit_gap"] == pytest.approx(-math.log(9)) and "logit_gap" not in rows[2]
    path = write_eval_items(tmp_path, "final", 40, rows)
    assert path == tmp_path / "evals" / "final_step_40.jsonl" and read_eval_items(path) == rows
    assert write_eval_items(tmp_path, "step_10", 10, rows).name == "rl_step_10.jsonl"
    # Only the model's own choices, dropped scores left out: what runs are paired on.
    assert free_outcomes(rows) == {"a": 1.0, "b": 0.0, "c": 0.0}


def test_item_kinds_come_from_the_world():
    from personadual.evaluation import item_rows
    from personadual.world import PersonaWorld

    world = PersonaWorld()
    prompts = world.eval_prompts()
    objective = next(p for p in prompts if p.task_type == "objective")
    preference = next(p for p in prompts if p.task_type == "personalized")
    rows = item_rows([_scored(objective, Mode.GENERAL, True), _scored(preference, Mode.PERSONALIZED, True)], kinds=world)
    assert [r["kind"] for r in rows] == [world.facts(objective).entity.kind, "preference"]
    assert [r["pool"] for r in rows] == [world.facts(objective).entity.pool, "preference"]


def test_probe_set_is_a_fixed_sample_of_each_setting_and_its_summary_averages_per_setting():
    import math

    from personadual.evaluation import probe_prompts, probe_summary
    from personadual.world import PersonaWorld

    evals = PersonaWorld().eval_prompts()
    chosen = probe_prompts(evals, 50)
    assert chosen == probe_prompts(list(evals), 50) and len(set(chosen)) == 200
    assert {setting_of(p) for p in chosen} == {"no_persona", "unaligned", "aligned", "personalized"}
    # Not a prefix: the no-persona sample reaches past the 48 known entities listed first.
    assert any(p not in evals[:150] for p in chosen if setting_of(p) == "no_persona")
    summary = probe_summary([_prompt("a", "aligned"), _prompt("b", "aligned"), _prompt("c")],
                            [(math.log(0.5), math.log(0.5)), (math.log(0.9), math.log(0.1)), (0.0, -30.0)])
    assert summary["aligned"]["p_personalized"] == pytest.approx(0.3)
    assert summary["aligned"]["logit_gap"] == pytest.approx(-math.log(9) / 2)
    assert summary["no_persona"]["logit_gap"] == pytest.approx(-30.0) and "unaligned" not in summary
