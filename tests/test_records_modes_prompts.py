from __future__ import annotations

import pytest

from personadual.modes import Mode, mode_of_text, strip_mode
from personadual.prompts import build_messages, format_response, forced_prompt
from personadual.records import Prompt, RecordError, Rollout, Scored


def _prompt(**overrides):
    fields = dict(id="q1", question="What color is the flower Zor?", persona=None, persona_setting="none",
                  task_type="objective", gold=["red"], scorer="exact_match")
    fields.update(overrides)
    return Prompt(**fields)


@pytest.mark.parametrize("field,value,match", [
    ("id", "", "Prompt.id"),
    ("persona_setting", "sometimes", "Prompt.persona_setting"),
    ("scorer", "bleu", "Prompt.scorer"),
    ("gold", [], "Prompt.gold"),
    ("persona", "I am a gardener.", "Prompt.persona"),
    ("question", 3, "Prompt.question"),
])
def test_prompt_validation_names_the_field(field, value, match):
    with pytest.raises(RecordError, match=match):
        _prompt(**{field: value})


def test_multiple_choice_gold_must_be_an_option_letter():
    with pytest.raises(RecordError, match="Prompt.gold"):
        _prompt(scorer="multiple_choice", choices=["a", "b"], gold=["C"])
    assert _prompt(scorer="multiple_choice", choices=["a", "b"], gold=["B"]).gold == ("B",)


def test_prompt_round_trips_through_dict():
    prompt = _prompt(persona="I am a gardener.", persona_setting="aligned")
    assert Prompt.from_dict(prompt.to_dict()) == prompt


def test_rollout_and_scored_validation():
    prompt = _prompt()
    with pytest.raises(RecordError, match="Rollout.response_logprobs"):
        Rollout(prompt, [1], [2, 3], [0.0], "x", Mode.GENERAL, True, "stop", 0)
    with pytest.raises(RecordError, match="Rollout.mode"):
        Rollout(prompt, [1], [2], [0.0], "x", None, True, "stop", 0)
    rollout = Rollout(prompt, [1], [2], [0.0], "x", None, False, "stop", 0)
    with pytest.raises(RecordError, match="Scored.reward"):
        Scored(rollout, None, False)
    with pytest.raises(RecordError, match="Scored.reward"):
        Scored(rollout, float("nan"), False)
    assert Scored(rollout, None, False, status="dropped").reward is None


def test_mode_parsing_from_text():
    assert mode_of_text("[Personalized_mode] You love tea.") is Mode.PERSONALIZED
    assert mode_of_text("  [General_mode]x") is Mode.GENERAL
    assert mode_of_text("The answer [General_mode]") is None
    assert mode_of_text("") is None
    assert strip_mode("[General_mode] Answer: red") == "Answer: red"


def test_prompt_building():
    prompt = _prompt(persona="I am a gardener.", persona_setting="aligned", scorer="multiple_choice",
                     choices=["red", "blue"], gold=["A"])
    messages = build_messages(prompt)
    assert messages[0] == {"role": "system", "content": "User persona: I am a gardener."}
    assert messages[1]["content"].endswith("A. red\nB. blue")
    assert build_messages(_prompt())[0]["role"] == "user"
    assert forced_prompt("<p>", Mode.GENERAL) == "<p>[General_mode]"
    assert format_response(Mode.GENERAL, "It is red.", "red") == "[General_mode] It is red. Answer: red"
