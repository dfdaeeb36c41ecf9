"""Hand-written cases for every verifier: correct, wrong, malformed, adversarial."""

import time

import pytest

from rlax_tpu.tasks import Problem, expr
from rlax_tpu.tasks.answers import extract_answer
from rlax_tpu.tasks.math_answer import verify
from tests.helpers.tasks import make_task

_task = make_task


# --- math answer verifier -------------------------------------------------------------------

@pytest.mark.parametrize("text, style, expected, method", [
    (r"so \boxed{\frac{1}{2}} done", "any", r"\frac{1}{2}", "boxed"),
    (r"\boxed{1} then \boxed{{a}+\{b\}}", "any", r"{a}+\{b\}", "boxed"),   # last box, nested
    (r"\boxed{unbalanced and \boxed{7}", "any", "7", "boxed"),
    (r"\boxed 5$", "boxed", "5", "boxed"),
    ("work\n#### 1,234\n", "any", "1,234", "hash"),
    ("#### 3\nmore\n#### 4", "hash", "4", "hash"),
    ("The final answer is $42$.", "any", "42", "answer_is"),
    (r"So the answer is: \boxed{7}", "any", "7", "boxed"),
    ("#### 5", "boxed", None, "none"),
    (r"\boxed{5}", "hash", None, "none"),
    ("no answer here", "any", None, "none"),
    ("####   \n", "any", None, "none"),
])
def test_extract_answer(text, style, expected, method):
    assert extract_answer(text, style) == (expected, method)


def test_verify_details():
    d = verify("steps... #### 72", "Natalia sold 48/2 = 24 clips.\n#### 72")   # GSM8K-style reference
    assert d["correct"] and d["format_ok"] and d["reference"] == "72" and d["reason"] == "correct"
    d = verify("I think 72", "72")
    assert not d["correct"] and not d["format_ok"] and d["reason"] == "no_answer"
    d = verify(r"\boxed{71}", "72")
    assert not d["correct"] and d["format_ok"] and d["extracted"] == "71" and d["reason"] == "wrong"
    d = verify("#### The Answer", "the answr", mode="exact")
    assert not d["correct"]
    d = verify("#### the  answer", "the answer", mode="exact")
    assert d["correct"]


def test_verify_adversarial_inputs_are_bounded():
    huge = "9" * 100_000
    t0 = time.monotonic()
    d = verify(f"#### {huge}", huge)
    assert not d["correct"] and d["reason"] == "answer_too_long"
    d = verify(r"\boxed{" + "{" * 50_000, "1")          # unbalanced braces
    assert d["reason"] == "no_answer"
    d = verify("#### 1e999999999", "1")                 # no exponent parsing
    assert not d["correct"]
    d = verify("#### " + "1" * 70, "1" * 70)            # long numerals compare exactly
    assert d["correct"]
    assert not verify("#### " + "1" * 69 + "2", "1" * 70)["correct"]
    d = verify(r"\boxed{" + r"\frac{" * 40 + "1" + "}{2}" * 40 + "}", "1", timeout_s=1.0)   # deep nesting
    assert d["format_ok"] and not d["correct"] and d["reason"] in ("wrong", "timeout")
    assert time.monotonic() - t0 < 15.0


# --- the bounded expression parser ----------------------------------------------------------

def test_expr_parser():
    assert expr.evaluate("6*(8-5*1)")[0] == 18
    assert expr.evaluate("7/2")[0] == pytest.approx(3.5)
    assert expr.evaluate("-(3-5)")[1] == [3, 5]
    for bad in ["", "3+", "(3", "3)", "2**3", "__import__('os')", "1/0", "3 4", "9" * 13,
                "(" * 40 + "1" + ")" * 40, "1" + "*99999999999" * 16]:
        with pytest.raises(expr.ExprError):
            expr.evaluate(bad)


# --- synthetic tasks ------------------------------------------------------------------------

def test_arith_reward():
    task = _task("arith")
    p = Problem("x", "Compute: 3+4*2-5", "6", {"nums": [3, 4, 2, 5], "ops": "+*-"})
    assert task.solution_text(p) == "3+4*2-5=3+8-5=11-5=6\n#### 6"
    assert task.reward(p, task.solution_text(p)).score == 1.0
    assert task.reward(p, "3+4*2-5=7*2-5\n#### 9").details["reason"] == "wrong_answer"
    assert task.reward(p, "#### six").details["reason"] == "bad_format"
    assert task.reward(p, "6").details["reason"] == "no_answer"
    assert task.reward(p, "#### 5\n#### 6").correct        # the last answer line counts
    assert task.reward(p, "#### " + "6" * 40).details["reason"] == "bad_format"


def test_arith_negative_and_format_weight():
    task = _task("arith", format_weight=0.25, correct_weight=1.0)
    p = Problem("x", "Compute: 3-8", "-5", {"nums": [3, 8], "ops": "-"})
    assert task.reward(p, "#### -5").score == 1.25
    assert task.reward(p, "#### 5").score == 0.25           # formatted but wrong: partial credit
    assert task.reward(p, "the answer: -5").score == 0.0


def test_countdown_reward():
    task = _task("countdown", format_weight=0.1)
    p = Problem("x", "Make 13 from 2 3 5", "5*2+3", {"numbers": [2, 3, 5], "target": 13})
    assert task.reward(p, "#### 5*2+3").score == pytest.approx(1.1)
    assert task.reward(p, "#### (3 + 5*2) = 13").correct
    assert task.reward(p, "#### 2*5+3").correct
    r = task.reward(p, "#### 5*3+2")
    assert not r.correct and r.details["reason"] == "wrong_value" and r.score == pytest.approx(0.1)
    assert task.reward(p, "#### 5*5-3*4").details["reason"] == "bad_numbers"   # 5 twice, 4 absent
    assert task.reward(p, "#### 10+3").details["reason"] == "bad_numbers"
    r = task.reward(p, "#### __import__('os').system('true')")
    assert r.score == 0.0 and r.details["reason"].startswith("parse_error")
    assert task.reward(p, "#### 5*2+3/0").details["reason"].startswith("parse_error")
    p2 = Problem("y", "Make 4 from 2 4 8", "8/4*2", {"numbers": [2, 4, 8], "target": 4})
    assert task.reward(p2, "#### 8/(4/2)").correct           # exact rational arithmetic
    assert not task.reward(p2, "#### 8/4/2").correct


def test_countdown_every_generated_solution_verifies():
    task = _task("countdown", difficulty=4)
    for p in task.train_problems(100, seed=7):
        r = task.reward(p, task.solution_text(p))
        assert r.correct, (p, task.solution_text(p), r)
        assert 1 <= p.meta["target"] <= 999


def test_compose_reward():
    task = _task("compose")
    p = Problem("x", "Apply sort, add1, reverse to 3 1 2", "4 3 2",
                {"input": [3, 1, 2], "ops": ["sort", "add1", "reverse"]})
    assert task.solution_text(p) == "sort: 1 2 3\nadd1: 2 3 4\nreverse: 4 3 2\n#### 4 3 2"
    assert task.reward(p, "#### 4 3 2").correct
    assert task.reward(p, "#### [4, 3, 2]").correct
    assert task.reward(p, "#### 2 3 4").details["reason"] == "wrong_answer"
    assert task.reward(p, "#### 43 2").details["reason"] == "bad_format"


def test_synthetic_solutions_all_verify():
    for name in ("arith", "compose"):
        task = _task(name, difficulty=5)
        for p in task.train_problems(100, seed=1) + task.eval_problems(30, seed=1):
            assert task.reward(p, task.solution_text(p)).correct, (name, p)
