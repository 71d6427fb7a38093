from __future__ import annotations

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
