import math
import time

import pytest

from reward import (RewardConfig, coat_grammar_ok, extract_answer, grade, is_equiv, parse_number,
                    satori_reward, split_steps)

# -----------------------------------------------------------------------------
# extraction

@pytest.mark.parametrize("text,want", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{ {a}{b} }", "{a}{b}"),
    ("\\boxed {7}", "7"),
    ("\\fbox{8}", "8"),
    ("\\boxed{1} and a truncated \\boxed{2", "1"),       # last *complete* box
    ("\\boxed{\\boxed{3}}", "3"),
    ("\\boxed{x} } stray brace", "x"),
    ("no box here", None),
    ("\\boxed{unclosed", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want

# -----------------------------------------------------------------------------
# equivalence: (pred, gold, expected)

GRADER_CASES = [
    # integers and signs
    ("42", "42", True),
    ("42", "43", False),
    ("-7", "-7", True),
    ("-7", "7", False),
    ("+7", "7", True),
    ("\u22127", "-7", True),             # unicode minus
    ("- 7", "-7", True),
    ("007", "7", True),
    ("0", "-0", True),
    # decimals
    ("0.5", ".5", True),
    ("2.50", "2.5", True),
    ("2.0", "2", True),
    ("5.", "5", True),
    ("0.333", "\\frac{1}{3}", False),     # exact, no tolerance
    ("3.14", "3.141", False),
    # fractions
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "1/2", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("1/2", "2", False),
    ("\\frac{1}{0}", "1", False),
    ("\\frac{6}{3}", "2", True),
    # thousands separators
    ("1,000", "1000", True),
    ("1,000,000", "10^6", True),
    ("12,345.5", "12345.5", True),
    ("1,00", "100", False),               # not groups of 3: a list, not a number
    ("1, 000", "1000", False),            # with a space: a list
    # percent: the bare number, or the number / 100
    ("50\\%", "50", True),
    ("50%", "0.5", True),
    ("50 percent", "50", True),
    ("50\\%", "0.5\\%", False),
    ("50\\%", "5", False),
    # \text, units, dollars, degrees
    ("\\text{5}", "5", True),
    ("5\\text{ cm}", "5", True),
    ("5 \\mbox{cm}^2", "5", True),
    ("18 dollars", "18", True),
    ("\\$18", "18", True),
    ("\\$1,250.", "1250", True),
    ("5cm", "5", True),
    ("3 hours", "4", False),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "\\frac{\\pi}{2}", False),
    ("2x", "2", False),                    # a single letter is not a unit
    # LaTeX spacing and delimiters
    ("\\left( 3 \\right)", "3", True),
    ("1\\,000", "1000", True),
    ("\\!12", "12", True),
    ("$12$", "12", True),
    ("\\displaystyle 12", "12", True),
    ("{12}", "12", True),
    # x = 5
    ("x = 5", "5", True),
    ("k_1=3", "3", True),
    ("x = 5", "6", False),
    # expressions as exact rationals
    ("2^{10}", "1024", True),
    ("2^3^2", "512", True),                # right associative
    ("-2^2", "-4", True),
    ("(-2)^2", "4", True),
    ("2^{-1}", "0.5", True),
    ("3 \\times 4", "12", True),
    ("3 \\cdot 4 + 1", "13", True),
    ("12 \\div 4", "3", True),
    ("\\frac{1}{2}+\\frac{1}{3}", "\\frac{5}{6}", True),
    ("(1+2)*3", "9", True),
    ("1+2*3", "9", False),
    ("4^{1/2}", "2", False),               # roots are not rationals here
    ("9^9^9^9", "1", False),
    # tuples and intervals
    ("(1, 2)", "(1,2)", True),
    ("(1, 2)", "(2, 1)", False),
    ("(0.5, 2)", "(\\frac12, 2)", True),
    ("[0, 1)", "[0,1)", True),
    ("[0, 1)", "(0, 1)", False),
    ("1, 2, 3", "1,2,3", True),
    # symbolic / string fallback
    ("\\sqrt{2}", "\\sqrt2", True),
    ("\\sqrt{2}", "\\sqrt{3}", False),
    ("\\pi", "\\pi", True),
    ("2\\pi", "2 \\pi", True),
    ("x+1", "1+x", False),                 # no algebra
    ("A", "a", False),
    ("\\text{(B)}", "(B)", True),
    ("yes", "no", False),
    # nothing
    (None, "5", False),
    ("", "5", False),
    ("5", "", False),
    ("  ", "  ", False),
]

@pytest.mark.parametrize("pred,gold,want", GRADER_CASES)
def test_is_equiv(pred, gold, want):
    assert is_equiv(pred, gold) is want
    if pred is not None:                   # equivalence is symmetric
        assert is_equiv(gold, pred) is want

def test_grader_table_size():
    assert len(GRADER_CASES) >= 60
    assert sum(w for *_, w in GRADER_CASES) >= 25 and sum(not w for *_, w in GRADER_CASES) >= 25

def test_parse_number_values():
    from fractions import Fraction
    assert parse_number("\\frac{1}{2}+\\frac{1}{3}") == Fraction(5, 6)
    assert parse_number("2^{3}") == 8
    assert parse_number("((((1))))") == 1
    assert parse_number("x") is None
    assert parse_number("2(3)") is None    # no implicit multiplication
    assert parse_number("(" * 100 + "1" + ")" * 100) is None   # nesting cap

def test_grade():
    assert grade("Step 1: ... The answer is \\boxed{196}.", {"answer": "196"}) is True
    assert grade("The answer is \\boxed{195}.", {"answer": "196"}) is False
    assert grade("The answer is 196.", {"answer": "196"}) is None

# -----------------------------------------------------------------------------
# adversarial input is bounded

def _fast(fn, limit=0.5):
    t = time.perf_counter()
    out = fn()
    assert time.perf_counter() - t < limit
    return out

def test_adversarial_inputs_are_fast():
    mb = 1_000_000
    assert _fast(lambda: extract_answer("\\boxed{" + "{" * mb)) is None
    # 140k unclosed \\boxed{ : a Python-level step each (~0.15 s), so a looser bound
    assert _fast(lambda: extract_answer("\\boxed{" * (mb // 7)), 1.0) is None
    assert _fast(lambda: extract_answer("\\boxed{1}" + "\\boxed{" * (mb // 7)), 1.0) == "1"
    assert _fast(lambda: extract_answer("{" * mb + "\\boxed{5}")) == "5"
    assert _fast(lambda: extract_answer("\\boxed{" + "{}" * (mb // 2) + "}")) == "{}" * (mb // 2)
    assert _fast(lambda: is_equiv("{" * mb, "5")) is False
    assert _fast(lambda: is_equiv("9" * mb, "9" * (mb - 1) + "8")) is False
    assert _fast(lambda: is_equiv("9" * 999, "9" * 998 + "8")) is False
    assert _fast(lambda: is_equiv("9" * 990, "9" * 990 + ".0")) is True
    assert _fast(lambda: is_equiv("9^9^9^9", "1")) is False
    assert _fast(lambda: is_equiv("9^{9^{9^{9}}}", "0")) is False
    assert _fast(lambda: is_equiv("10^{99999999999}", "1")) is False
    assert _fast(lambda: is_equiv("2^" * 300 + "2", "4")) is False
    assert _fast(lambda: is_equiv("-" * 900 + "1", "1")) is False
    assert _fast(lambda: is_equiv("5 " + "ab" * 450 + "1", "5")) is False   # unit regex: no blow-up
    assert _fast(lambda: is_equiv("(" * 499 + ")" * 499, "1")) is False

# -----------------------------------------------------------------------------
# Satori's reward

@pytest.mark.parametrize("correct,status,orm,want", [
    (True, 0, None, 0.0),
    (False, 0, None, -1.0),
    (None, 0, None, -1.0),                 # no \boxed: wrong
    (True, -1, None, 0.5),                 # fixed an incorrect trajectory: bonus
    (False, -1, None, -1.0),
    (None, -1, None, -1.0),
    (True, 1, None, 0.0),
    (False, 1, None, -1.5),                # broke a correct trajectory: penalty
    (None, 1, None, -1.5),
    (True, 0, 0.0, 0.5),                   # sigmoid(0) = 0.5
    (False, 0, 0.0, -0.5),
    (True, -1, 0.0, 1.0),
    (False, 1, 0.0, -1.0),
    (True, 0, 2.0, 1 / (1 + math.exp(-2.0))),
    (False, 1, -3.0, -1.5 + 1 / (1 + math.exp(3.0))),
    (True, 0, 1000.0, 1.0),                # no overflow
    (False, 0, -1000.0, -1.0),
])
def test_satori_reward(correct, status, orm, want):
    assert satori_reward(correct, orm, status, RewardConfig()) == pytest.approx(want)

def test_satori_reward_config():
    assert satori_reward(True, 5.0, 0, RewardConfig(use_orm=False)) == 0.0
    assert satori_reward(True, 0.0, 0, RewardConfig(orm_coef=2.0)) == pytest.approx(1.0)
    assert satori_reward(False, None, 1, RewardConfig(reflect_bonus=0.0)) == -1.0
    assert satori_reward(True, None, -1, RewardConfig(right=1.0, reflect_bonus=0.25)) == 1.25
    assert satori_reward(False, None, 1, RewardConfig(wrong=-20.0)) == -10.0       # clipped
    assert satori_reward(True, None, 0, RewardConfig(right=3.0, clip=2.0)) == 2.0
    assert satori_reward(True) == 0.0                                                # defaults
    with pytest.raises(ValueError):
        satori_reward(True, None, 2)

# -----------------------------------------------------------------------------
# COAT grammar

C, R, E = "<|continue|>", "<|reflect|>", "<|explore|>"

def test_split_steps():
    t = f"a{C}b{R}c{E}d"
    assert split_steps(t) == [(None, "a"), (C, "b"), (R, "c"), (E, "d")]
    assert split_steps("only") == [(None, "only")]
    assert split_steps(f"{R}x") == [(None, ""), (R, "x")]
    for text in (t, "only", f"{R}x", f"a{C}{C}b"):
        assert "".join((m or "") + s for m, s in split_steps(text)) == text

@pytest.mark.parametrize("text,ok", [
    ("Step 1: 1 + 1 = 2.\nThe answer is \\boxed{2}.", True),
    (f"Step 1: 1 + 1 = 2.{C}Step 2: 2 * 3 = 6.{C}The answer is \\boxed{{6}}.", True),
    (f"Step 1: 1 + 1 = 3.{R}Step 1 is wrong.{E}Step 1: 1 + 1 = 2.{C}So \\boxed{{2}}", True),
    (f"x = 2, \\boxed{{2}}.{R}Check: 1 + 1 = 2, right.{C}The answer is \\boxed{{2}}.", True),
    ("The answer is \\boxed{2}.<|im_end|>", True),
    ("The answer is \\boxed{2}$.", True),
    (f"{C}Step 1.{C}\\boxed{{2}}", False),                 # first step empty
    (f"Step 1.{C}  {C}\\boxed{{2}}", False),               # empty step
    (f"Step 1.{E}\\boxed{{2}}", False),                    # explore without reflect
    (f"Step 1.{C}x{E}\\boxed{{2}}", False),                # explore after continue
    (f"Step 1.{R}x{E}y{E}\\boxed{{2}}", False),            # explore after explore
    (f"Step 1 \\boxed{{2}}.{C}no answer in the last step", False),
    ("\\boxed{2} and \\boxed{3}", False),                   # two answers in the last step
    ("The answer is \\boxed{2", False),                     # unclosed
    ("The answer is \\boxed{2} because of reasons", False), # text after the answer
    ("no answer at all", False),
    ("\\boxed{2}<|im_start|>", False),                      # a foreign special token
    ("", False),
])
def test_coat_grammar(text, ok):
    assert coat_grammar_ok(text) is ok
