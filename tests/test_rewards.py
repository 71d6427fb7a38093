"""Fast unit tests for the scorers: normalisation, extraction (incl. adversarial outputs),
multiple choice, math equivalence, the format term, verdict parsing, config errors, and the
batch scorer's routing on tasks that need no network."""

from __future__ import annotations

import pickle
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from personadual.modes import Mode
from personadual.prompts import format_response
from rewards.config import JudgeConfig, RewardConfig, RewardConfigError
from rewards.exact_match import ExactMatchScorer
from rewards.judge import ApiKey, JudgeError, VerdictError, build_messages, cache_key, parse_verdict
from rewards.math_equiv import MathScorer
from rewards.multiple_choice import MultipleChoiceScorer, chosen_options
from rewards.normalize import decode_response, extract_answer, normalize_answer
from rewards.scorer import BatchScorer
from tests.judge_server import make_prompt, make_rollout

G = Mode.GENERAL.token
P = Mode.PERSONALIZED.token
CHOICES = ("red", "light blue", "blue", "Vitamin C")
LONG = "word " * 200_000  # ~1 MB of reasoning


# ---- normalisation and extraction -----------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("The Teal!", "teal"),
    ("  an  Apple, a day ", "apple day"),
    ("Rock_and_roll", "rock and roll"),
    ("“Quoted” — dash…", "quoted dash"),
    ("ＦＵＬＬ width", "full width"),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("response, answer, marker, mode", [
    (f"{G} it is teal. Answer: teal", "teal", True, Mode.GENERAL),
    (f"{P} Answer: red, no wait. Answer: blue", "blue", True, Mode.PERSONALIZED),
    ("  teal  ", "teal", False, None),
    (f"{G} just teal", "just teal", False, Mode.GENERAL),
    (f"{G} answer:teal", "teal", True, Mode.GENERAL),
    ("", "", False, None),
    (G, "", False, Mode.GENERAL),  # only a mode token
    (f"{G} Answer:", "", True, Mode.GENERAL),
])
def test_extract_answer(response, answer, marker, mode):
    extraction = extract_answer(response)
    assert (extraction.answer, extraction.has_marker, extraction.mode) == (answer, marker, mode)


def test_non_utf8_bytes_are_replaced_and_scored():
    scorer = ExactMatchScorer(RewardConfig())
    prompt = make_prompt(scorer="exact_match", gold=("teál",))
    text = decode_response(b"[General_mode] \xff\xfe\x80 Answer: te\xc3\xa1l \xed\xa0\x80")
    assert "\ufffd" in text and text.startswith(G)
    # U+FFFD is a symbol: normalisation drops stray replaced bytes around an answer...
    reward, detail = scorer.score(prompt, text)
    assert reward == 1.0 and "\ufffd" in detail["extracted"]
    # ...but bytes broken inside the answer leave it wrong, not crashed.
    reward, detail = scorer.score(prompt, decode_response(b"[General_mode] Answer: te\xc3l"))
    assert reward == 0.0 and detail["correct"] is False


# ---- exact match ------------------------------------------------------------------------------
@pytest.mark.parametrize("response, correct", [
    (f"{G} Answer: Teal.", True),
    (f"{G} Answer: the teal", True),
    (f"{G} Answer: blue-green", True),  # an alias
    (f"{G} Answer: teal blue", False),  # exact match, not containment
    (f"{G} reasoning says teal but Answer: red", False),
    ("", False),
    (G, False),
    (f"{G} Answer: The", False),  # normalises to nothing: never correct, even against gold "The"
])
def test_exact_match(response, correct):
    prompt = make_prompt(scorer="exact_match", gold=("teal", "Blue green", "The"))
    reward, detail = ExactMatchScorer(RewardConfig()).score(prompt, response)
    assert detail["correct"] is correct and reward == float(correct)


def test_exact_match_very_long_response_is_fast_and_clipped():
    prompt = make_prompt(scorer="exact_match")
    start = time.perf_counter()
    reward, detail = ExactMatchScorer(RewardConfig()).score(prompt, f"{G} {LONG} Answer: teal")
    assert reward == 1.0
    reward, detail = ExactMatchScorer(RewardConfig()).score(prompt, f"{G} {LONG}")
    assert reward == 0.0 and len(detail["extracted"]) < 1000
    assert time.perf_counter() - start < 5


# ---- multiple choice -------------------------------------------------------------------------
@pytest.mark.parametrize("answer, chosen", [
    ("B", {"B"}), ("Answer is (B)", {"B"}), ("B.", {"B"}), ("b", {"B"}), ("(c)", {"C"}),
    ("Option C", {"C"}), ("B. light blue", {"B"}), ("light blue", {"B"}), ("Blue!", {"C"}),
    ("A and B", {"A", "B"}), ("A or C", {"A", "C"}), ("red, blue", {"A", "C"}),
    ("Vitamin C", {"D"}), ("D) Vitamin C", {"D"}),
    ("A is right", {"A"}), ("A cat would say red", {"A"}),  # article "A" is not option A
    ("I think B", {"B"}), ("E", set()), ("", set()), ("none of these", set()),
])
def test_chosen_options(answer, chosen):
    assert chosen_options(answer, CHOICES) == chosen


@pytest.mark.parametrize("response, correct", [
    (f"{G} Answer: B", True),
    (f"{G} Answer: (B)", True),
    (f"{G} I pick light blue. Answer: light blue", True),
    (f"{G} Answer: A and B", False),  # two options named: wrong
    (f"{G} Answer: B or maybe red", False),
    (f"{G} Answer: C", False),
    ("", False),
    (G, False),
    (f"{G} {LONG} Answer: B", True),
])
def test_multiple_choice_scorer(response, correct):
    prompt = make_prompt(scorer="multiple_choice", gold=("B",), choices=CHOICES)
    reward, detail = MultipleChoiceScorer(RewardConfig()).score(prompt, response)
    assert detail["correct"] is correct and reward == float(correct)


def test_multiple_choice_long_text_with_many_options_is_linear():
    start = time.perf_counter()
    assert chosen_options("light blue " * 100_000, CHOICES) == {"B"}
    assert time.perf_counter() - start < 5


# ---- math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("gold, response, correct", [
    ("0.5", r"Answer: \boxed{1/2}", True),
    (r"\frac{1}{2}", "Answer: 0.5", True),
    (r"\frac{1}{2}", r"Answer: $\dfrac{1}{2}$", True),
    (r"\sqrt{2}", r"Answer: \boxed{2^{1/2}}", True),
    ("x^2+2x", r"so \boxed{x(x+2)}", True),
    ("10", r"Answer: \boxed{10\%}", True),
    (r"\frac{1}{2}", r"Answer: \boxed{\frac{1}{3}}", False),
    ("3", "Answer: three apples", False),
    ("3", "", False),
])
def test_math_equivalence(gold, response, correct):
    prompt = make_prompt(scorer="math", gold=(gold,))
    reward, detail = MathScorer(RewardConfig()).score(prompt, f"{G} {response}")
    assert detail["correct"] is correct and reward == float(correct)


def test_math_scorer_works_off_the_main_thread():
    # math-verify's signal-based timeout would raise ValueError in a thread.
    prompt = make_prompt(scorer="math", gold=("0.5",))
    results = []
    thread = threading.Thread(target=lambda: results.append(MathScorer(RewardConfig()).score(prompt, r"\boxed{1/2}")))
    thread.start()
    thread.join(30)
    assert results and results[0][0] == 1.0


def test_math_very_long_response():
    prompt = make_prompt(scorer="math", gold=("0.5",))
    start = time.perf_counter()
    assert MathScorer(RewardConfig()).score(prompt, f"{G} {LONG} Answer: $\\frac{{1}}{{2}}$")[0] == 1.0
    assert time.perf_counter() - start < 10


# ---- format term and the reward mix -------------------------------------------------------------
def test_format_weight_zero_by_default():
    prompt = make_prompt(scorer="exact_match")
    assert ExactMatchScorer(RewardConfig()).score(prompt, "teal")[0] == 1.0  # no mode token, still 1.0


@pytest.mark.parametrize("response, fmt", [
    (format_response(Mode.GENERAL, "thinking", "teal"), 1.0),
    (f"{P} Answer: red", 1.0),  # format is about shape, not correctness
    ("Answer: teal", 0.0),  # no mode token
    (f"{G} teal", 0.0),  # no answer line
    (f"{G} Answer:", 0.0),  # empty answer
    (f"{G} Answer: teal\nand more", 0.0),  # the answer is not one line
])
def test_format_term_mode_and_answer(response, fmt):
    config = RewardConfig(accuracy_weight=1.0, format_weight=0.5)
    reward, detail = ExactMatchScorer(config).score(make_prompt(scorer="exact_match"), response)
    assert detail["format"] == fmt
    assert reward == pytest.approx(float(detail["correct"]) + 0.5 * fmt)


def test_released_mix_and_mode_only_check():
    config = RewardConfig(accuracy_weight=0.9, format_weight=0.1, format_check="mode")
    scorer = ExactMatchScorer(config)
    prompt = make_prompt(scorer="exact_match")
    assert scorer.score(prompt, f"{G} Answer: teal")[0] == pytest.approx(1.0)
    assert scorer.score(prompt, f"{G} teal")[0] == pytest.approx(1.0)  # mode tag alone earns format
    assert scorer.score(prompt, f"{G} Answer: red")[0] == pytest.approx(0.1)
    assert scorer.score(prompt, "Answer: teal")[0] == pytest.approx(0.9)


def test_multiple_choice_format_needs_one_option():
    config = RewardConfig(format_weight=1.0)
    prompt = make_prompt(scorer="multiple_choice", gold=("B",), choices=CHOICES)
    assert MultipleChoiceScorer(config).score(prompt, f"{G} Answer: A")[1]["format"] == 1.0
    assert MultipleChoiceScorer(config).score(prompt, f"{G} Answer: A and B")[1]["format"] == 0.0


# ---- verdict parsing, judge messages, secrets ----------------------------------------------------
@pytest.mark.parametrize("content, correct, extracted", [
    ('{"extracted_answer": "teal", "correct": true}', True, "teal"),
    ('Sure!\n```json\n{"extracted_answer": "red", "correct": false}\n```\nDone.', False, "red"),
    ('verdict: {"note": {"x": 1}, "correct": "True", "extracted_answer": 3}', True, "3"),
    ('{"correct": false}', False, ""),
    ('{"a": 1} then {"correct": true, "extracted_answer": null}', True, ""),
])
def test_parse_verdict(content, correct, extracted):
    verdict = parse_verdict(content)
    assert (verdict.correct, verdict.extracted) == (correct, extracted)


@pytest.mark.parametrize("content", [
    None, "", "   ", "The answer is correct.", '{"correct": "maybe"}', '{"extracted_answer": "x"}',
    "{" * 100_000, '["correct", true]',
])
def test_parse_verdict_rejects_garbage(content):
    start = time.perf_counter()
    with pytest.raises(VerdictError):
        parse_verdict(content)
    assert time.perf_counter() - start < 2


def test_judge_messages_keep_the_tail_of_long_responses():
    prompt = make_prompt(scorer="judge", gold=("teal", "blue green"))
    messages = build_messages(prompt, f"{G} {LONG} Answer: teal", max_response_chars=500)
    user = messages[-1]["content"]
    assert len(user) < 1000 and user.rstrip().endswith("Answer: teal\n</response>")
    assert "<gold_answer>\nteal | blue green\n</gold_answer>" in user and G not in user


def test_cache_key_depends_on_model_prompt_gold_response():
    prompt = make_prompt(scorer="judge")
    base = cache_key("m", prompt, "Answer: teal")
    assert base == cache_key("m", make_prompt(scorer="judge"), "Answer: teal")
    assert base != cache_key("m2", prompt, "Answer: teal")
    assert base != cache_key("m", make_prompt(scorer="judge", gold=("red",)), "Answer: teal")
    assert base != cache_key("m", make_prompt(scorer="judge", question="Other?"), "Answer: teal")
    assert base != cache_key("m", prompt, "Answer: red")
    cache_key("m", prompt, "lone surrogate \udc80")  # must not raise


def test_api_key_hides_itself_and_pickles():
    key = ApiKey("sk-canary-123")
    assert "sk-canary-123" not in repr(key) and "sk-canary-123" not in str(key)
    assert pickle.loads(pickle.dumps(key)).reveal() == "sk-canary-123"
    assert key.scrub("Bearer sk-canary-123") == "Bearer ***"


def test_judge_error_names_prompt_and_kind_and_pickles():
    error = pickle.loads(pickle.dumps(JudgeError("p7", "timeout", 5, failures=3)))
    assert isinstance(error, JudgeError) and (error.prompt_id, error.kind, error.attempts) == ("p7", "timeout", 5)
    assert "'p7'" in str(error) and "timeout" in str(error) and "3 judgement(s)" in str(error)


# ---- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, key", [
    (lambda: JudgeConfig(max_concurrency=0), "reward.judge.max_concurrency"),
    (lambda: JudgeConfig(failure_policy="ignore"), "reward.judge.failure_policy"),
    (lambda: JudgeConfig(timeout_s=-1), "reward.judge.timeout_s"),
    (lambda: JudgeConfig(model=""), "reward.judge.model"),
    (lambda: RewardConfig(format_weight=-0.1), "reward.format_weight"),
    (lambda: RewardConfig(format_check="json"), "reward.format_check"),
    (lambda: RewardConfig(judge={"nope": 1}), "reward.judge.nope"),
])
def test_config_errors_name_the_key(build, key):
    with pytest.raises(RewardConfigError) as info:
        build()
    assert str(info.value).startswith(f"{key}:") and "\n" not in str(info.value)


def test_config_from_omegaconf_schema():
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(RewardConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["judge.max_concurrency=3", "format_weight=0.1"]))
    config = OmegaConf.to_object(merged)
    assert config.judge.max_concurrency == 3 and config.format_weight == 0.1
    with pytest.raises(RewardConfigError, match="reward.judge.failure_policy"):
        OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.from_dotlist(["judge.failure_policy=x"])))


# ---- the batch scorer on local tasks ---------------------------------------------------------------
def test_batch_scorer_routes_a_mixed_batch_in_order():
    rollouts = [
        make_rollout(make_prompt(0, scorer="exact_match"), f"{G} Answer: teal"),
        make_rollout(make_prompt(1, scorer="multiple_choice", gold=("B",), choices=CHOICES), f"{P} Answer: (B)"),
        make_rollout(make_prompt(2, scorer="math", gold=("0.5",)), f"{G} Answer: \\boxed{{1/3}}"),
        make_rollout(make_prompt(3, scorer="exact_match"), ""),
        make_rollout(make_prompt(4, scorer="math", gold=("0.5",)), f"{G} Answer: \\frac{{1}}{{2}}"),
    ]
    scored, counts = BatchScorer(RewardConfig()).score_many(rollouts)
    assert [s.rollout for s in scored] == rollouts
    assert [s.reward for s in scored] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert [s.detail["scorer"] for s in scored] == ["exact_match", "multiple_choice", "math", "exact_match", "math"]
    assert all(s.status == "ok" for s in scored)
    assert counts["total"] == 5 and counts["ok"] == 5 and counts["fallback"] == counts["dropped"] == 0
    assert counts["scorer/exact_match"] == 2 and counts["scorer/math"] == 2
    assert counts["judge/requests"] == 0
    empty, empty_counts = BatchScorer(RewardConfig()).score_many([])
    assert empty == [] and empty_counts["total"] == 0 and set(counts) >= set(empty_counts)


def test_batch_scorer_needs_no_key_without_judge_prompts(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    scored, counts = BatchScorer(RewardConfig()).score_many([make_rollout(make_prompt(scorer="exact_match"), "teal")])
    assert scored[0].reward == 1.0 and counts["judge/requests"] == 0


# ---- properties ----------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(st.text())
def test_normalize_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(list("AB ab().:\n\ufffd") + ["Answer:", G, "light blue", "red"])).map("".join))
def test_scorers_never_raise_on_arbitrary_text(text):
    prompt = make_prompt(scorer="multiple_choice", gold=("B",), choices=CHOICES)
    for scorer in (MultipleChoiceScorer(RewardConfig(format_weight=0.1)), ExactMatchScorer(RewardConfig())):
        reward, detail = scorer.score(prompt, text)
        assert 0.0 <= reward <= 1.1 and isinstance(detail["correct"], bool) and "extracted" in detail
