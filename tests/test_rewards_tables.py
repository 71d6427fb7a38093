"""Table-driven checks of the three local scorer families on real-looking answers.

Each table holds equivalent forms that must score 1 and near misses that must score 0 (sign
flips, truncated radicals, wrong radicands, other interval brackets, similar option texts,
extra options named). Every math row is also decided by math-verify called directly here,
the way its documentation uses it (gold and answer parsed as LaTeX, then ``verify``), so the
table cannot drift from the library's own judgement.
"""

from __future__ import annotations

import pytest
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from personadual.modes import Mode
from rewards.config import RewardConfig
from rewards.exact_match import ExactMatchScorer
from rewards.math_equiv import MathScorer, parse_math
from rewards.multiple_choice import MultipleChoiceScorer
from rewards.scorer import BatchScorer
from tests.judge_server import make_prompt, make_rollout

G = Mode.GENERAL.token
EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]

# (gold as MATH-500 stores it, the answer after "Answer:", expected reward)
MATH_ROWS = [
    # equivalent forms: must score 1
    (r"6\sqrt{2}", r"\sqrt{72}", 1),
    (r"6\sqrt{2}", r"6 \sqrt{2}", 1),
    (r"6\sqrt{2}", r"\boxed{6\sqrt{2}}", 1),
    (r"12,\!600", "12600", 1),
    (r"12,\!600", "12,600", 1),
    (r"\left( 2, \frac{\pi}{3} \right)", r"(2, \frac{\pi}{3})", 1),
    (r"\frac{1}{2}", r"\dfrac{1}{2}", 1),
    (r"\frac{1}{2}", "0.5", 1),
    (r"\frac{1}{2}", "1/2", 1),
    (r"-\frac{1}{3}", r"\frac{-1}{3}", 1),
    (r"-\frac{1}{3}", r"$-\dfrac{1}{3}$", 1),
    ("-5", r"\boxed{-5}", 1),
    ("5", r"5\text{ cm}", 1),
    (r"90^\circ", "90", 1),
    ("[1,2)", r"\left[1, 2\right)", 1),
    (r"(-\infty, 3]", r"(-\infty,3]", 1),
    (r"\begin{pmatrix} 1 & -2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix}1&-2\\3&4\end{pmatrix}", 1),
    ("x^2+2x", "x(x+2)", 1),
    (r"\{1,2\}", r"\{2,1\}", 1),
    ("y = 2x+1", "y=2x+1", 1),
    (r"\sqrt{2}/2", r"\frac{1}{\sqrt{2}}", 1),
    ("3", "3.0", 1),
    (r"2\pi", r"\boxed{2 \pi}", 1),
    (r"\text{(C)}", "C", 1),
    # near misses: must score 0
    ("-5", "5", 0),
    ("5", "-5", 0),
    (r"-\frac{1}{3}", "1/3", 0),
    (r"-\frac{1}{3}", r"\frac{1}{3}", 0),
    (r"6\sqrt{2}", "6", 0),
    (r"6\sqrt{2}", r"6\sqrt{3}", 0),
    (r"6\sqrt{2}", r"\sqrt{62}", 0),
    ("6", r"6\sqrt{2}", 0),
    (r"2\pi", "2", 0),
    ("[1,2)", "(1,2)", 0),
    ("[1,2)", "[1,2]", 0),
    (r"(-\infty, 3]", r"(-\infty, 3)", 0),
    (r"\begin{pmatrix} 1 & -2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} -1 & 2 \\ -3 & -4 \end{pmatrix}", 0),
    (r"\left( 2, \frac{\pi}{3} \right)", r"(\frac{\pi}{3}, 2)", 0),
    (r"12,\!600", "1260", 0),
    (r"\frac{1}{3}", "0.33", 0),
    ("x^2+2x", "x^2+2", 0),
    ("y=2x+1", "y=2x-1", 0),
    (r"\infty", r"-\infty", 0),
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{2}}{2}", 0),
    ("-2", r"\sqrt{4}", 0),
    ("x^2", "x^3", 0),
    ("(1,2)", "(2,1)", 0),
    (r"\text{(C)}", "B", 0),
]


def _delimited(text: str) -> str:
    """How the math-verify documentation feeds a bare LaTeX answer: inside ``$...$``."""
    return text if text.startswith("$") or text.startswith("\\boxed") else f"${text}$"


def test_math_table_is_large_and_balanced():
    assert len(MATH_ROWS) >= 40 and sum(expected for *_, expected in MATH_ROWS) * 2 == len(MATH_ROWS)


@pytest.mark.parametrize("gold, answer, expected", MATH_ROWS)
def test_math_rows_score_as_math_verify_decides(gold, answer, expected):
    direct = verify(parse(f"${gold}$", extraction_config=EXTRACTION),
                    parse(_delimited(answer), extraction_config=EXTRACTION))
    assert direct is bool(expected), "the table disagrees with math-verify itself"
    reward, detail = MathScorer(RewardConfig()).score(make_prompt(scorer="math", gold=(gold,)),
                                                     f"{G} Some work. Answer: {answer}")
    assert (reward, detail["correct"]) == (float(expected), bool(expected)), detail


@pytest.mark.parametrize("text, value", [
    (r"6\sqrt{2}", "6*sqrt(2)"),  # not the leading 6
    (r"12,\!600", "12600"),
    (r"\left( 2, \frac{\pi}{3} \right)", "(2, pi/3)"),
    ("it is 7", "7"),  # prose: math-verify's own extraction from the bare text
    ("The answer is 5", "5"),
    (r"so it is \boxed{-3} in the end", "-3"),  # a delimiter: parsed as written
])
def test_bare_latex_parses_whole_and_prose_answers_still_read(text, value):
    parsed, error = parse_math(text)
    assert error is None and str(parsed[0]) == value


def test_unparseable_gold_does_not_credit_anything():
    prompt = make_prompt(scorer="math", gold=(r"\text{Evelyn}",))
    scorer = MathScorer(RewardConfig())
    assert scorer.score(prompt, r"Answer: \text{Evelyn}")[0] == 1.0  # identical text
    assert scorer.score(prompt, "Answer: Evelyn")[0] == 1.0
    assert scorer.score(prompt, "Answer: Evelyn Smith")[0] == 0.0


# (options, gold letter, the answer after "Answer:", expected reward)
SIGNED = ("2", "-2", "1/2", "-1/2")
COLORS = ("red", "light blue", "blue", "Vitamin C")
UNITS = ("3 J", "6 J", "9 J", "12 J", "1.5 J")
SNLI = ("yes", "it is not possible to tell", "no")
MC_ROWS = [
    # one option named, the right one: must score 1
    (SIGNED, "B", "-2", 1),
    (SIGNED, "B", "\u22122", 1),  # a Unicode minus sign
    (SIGNED, "A", "2", 1),
    (SIGNED, "A", "2.", 1),
    (SIGNED, "D", "-1/2", 1),
    (SIGNED, "C", "1/2", 1),
    (SIGNED, "B", "(B)", 1),
    (SIGNED, "B", "b", 1),
    (SIGNED, "B", "B. -2", 1),
    (SIGNED, "B", "The answer is -2", 1),
    (COLORS, "B", "light blue", 1),
    (COLORS, "B", "Light-Blue!", 1),
    (COLORS, "C", "blue", 1),
    (COLORS, "C", "the blue one", 1),
    (COLORS, "D", "vitamin c", 1),
    (COLORS, "D", "D) Vitamin C", 1),
    (COLORS, "A", "A is right", 1),
    (UNITS, "C", "9 J", 1),
    (UNITS, "C", "9J", 1),
    (UNITS, "E", "1.5 J", 1),
    (SNLI, "B", "it is not possible to tell", 1),
    (SNLI, "C", "No.", 1),
    # near misses: the wrong option, a similar text, or two options named: must score 0
    (SIGNED, "B", "2", 0),
    (SIGNED, "A", "-2", 0),
    (SIGNED, "C", "-1/2", 0),
    (SIGNED, "D", "1/2", 0),
    (SIGNED, "A", "22", 0),
    (SIGNED, "A", "2.5", 0),
    (SIGNED, "A", "12", 0),
    (SIGNED, "B", "2 or -2", 0),
    (SIGNED, "A", "A and B", 0),
    (COLORS, "C", "light blue", 0),
    (COLORS, "B", "blue", 0),
    (COLORS, "B", "dark blue", 0),
    (COLORS, "C", "red, blue", 0),
    (COLORS, "D", "Vitamin E", 0),
    (COLORS, "A", "reddish", 0),
    (UNITS, "E", "5 J", 0),
    (UNITS, "A", "3 kJ", 0),
    (UNITS, "C", "9 J or 12 J", 0),
    (SNLI, "A", "it is not possible to tell", 0),
    (SNLI, "C", "yes, no", 0),
    (SNLI, "A", "E", 0),
]


def test_multiple_choice_table_is_large_and_balanced():
    ones = sum(expected for *_, expected in MC_ROWS)
    assert len(MC_ROWS) >= 40 and abs(2 * ones - len(MC_ROWS)) <= 2


@pytest.mark.parametrize("choices, gold, answer, expected", MC_ROWS)
def test_multiple_choice_rows(choices, gold, answer, expected):
    prompt = make_prompt(scorer="multiple_choice", gold=(gold,), choices=choices)
    reward, detail = MultipleChoiceScorer(RewardConfig()).score(prompt, f"{G} Thinking. Answer: {answer}")
    assert (reward, detail["correct"]) == (float(expected), bool(expected)), detail


def test_ambiguous_answers_score_zero_and_are_counted():
    prompt = make_prompt(scorer="multiple_choice", gold=("B",), choices=SIGNED)
    rollouts = [make_rollout(prompt, f"{G} Answer: {text}") for text in ("-2", "2 or -2", "A and B", "-1/2")]
    scored, counts = BatchScorer(RewardConfig()).score_many(rollouts)
    assert [s.reward for s in scored] == [1.0, 0.0, 0.0, 0.0]
    assert [s.detail["ambiguous"] for s in scored] == [False, True, True, False]
    assert counts["multiple_choice/ambiguous"] == 2


# (gold aliases, the answer after "Answer:", expected reward)
EM_ROWS = [
    # equivalent forms: must score 1
    (("Sunset Boulevard", "Sunset Blvd"), "Sunset Boulevard", 1),
    (("Sunset Boulevard", "Sunset Blvd"), "sunset blvd.", 1),
    (("Sunset Boulevard",), "  SUNSET   BOULEVARD ", 1),
    (("The Beatles",), "Beatles", 1),
    (("Beatles",), "the Beatles!", 1),
    (("Rock and roll",), "Rock_and_roll", 1),
    (("blue-green",), "blue green", 1),
    (("O'Brien",), "O Brien", 1),
    (("Scorpio",), "\u201cScorpio\u201d", 1),
    (("Scorpio",), "\uff33\uff43\uff4f\uff52\uff50\uff49\uff4f", 1),  # full-width letters
    (("1000",), "1,000", 1),
    (("12,600",), "12600", 1),
    (("-5",), "\u22125", 1),  # Unicode minus
    (("-5",), "-5.", 1),
    (("2.5",), "2.5", 1),
    (("Paris",), "paris.", 1),
    (("Henry VIII",), "Henry VIII", 1),
    (("Dolly Parton",), "Dolly Parton", 1),
    (("an apple",), "Apple", 1),
    (("yes",), "Yes.", 1),
    (("1984",), "1984!", 1),
    (("Washington, D.C.",), "washington d.c.", 1),
    # near misses: must score 0
    (("-5",), "5", 0),
    (("5",), "-5", 0),
    (("2.5",), "25", 0),
    (("25",), "2.5", 0),
    (("1,2",), "12", 0),
    (("1000",), "100", 0),
    (("Paris",), "Paris, Texas", 0),
    (("Paris, Texas",), "Paris", 0),
    (("York",), "New York", 0),
    (("Henry VIII",), "Henry VII", 0),
    (("1984",), "1948", 0),
    (("Sunset Boulevard",), "Sunset", 0),
    (("Sunset Boulevard",), "West Sunset Boulevard", 0),
    (("teal",), "teal blue", 0),
    (("Scorpio",), "Sagittarius", 0),
    (("The",), "The", 0),  # normalises to nothing: never correct
    (("yes",), "no", 0),
    (("yes",), "yes and no", 0),
    (("David Seville",), "David", 0),
    (("Dolly Parton",), "Dolly Parton and Kenny Rogers", 0),
    (("-0.5",), "0.5", 0),
]


def test_exact_match_table_is_large_and_balanced():
    ones = sum(expected for *_, expected in EM_ROWS)
    assert len(EM_ROWS) >= 40 and abs(2 * ones - len(EM_ROWS)) <= 2


@pytest.mark.parametrize("gold, answer, expected", EM_ROWS)
def test_exact_match_rows(gold, answer, expected):
    reward, detail = ExactMatchScorer(RewardConfig()).score(make_prompt(scorer="exact_match", gold=gold),
                                                            f"{G} Thinking. Answer: {answer}")
    assert (reward, detail["correct"]) == (float(expected), bool(expected)), detail
