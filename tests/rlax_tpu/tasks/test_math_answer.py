"""The math reward: answer extraction, math-verify verdicts on hand-picked pairs, and the reward
pool's time bounds (soft interrupt, hard kill, crash, error), alone and through a task."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from rlax_tpu.tasks import Problem, math_answer
from rlax_tpu.tasks.answers import clean_answer, extract_answer
from rlax_tpu.tasks.math_answer import check_answers
from rlax_tpu.tasks.reward_pool import RewardPool
from tests.helpers.tasks import make_task

# (gold, prediction, verdict). Written by hand; each is checked in a \boxed{} completion and
# after '####'.
PAIRS = [
    # radicals written two ways
    (r"\sqrt{8}", r"2\sqrt{2}", True), (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True), (r"\sqrt{12}", r"2\sqrt{3}", True),
    (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}", True), (r"\sqrt{8}", r"3\sqrt{2}", False),
    (r"\sqrt{2}", "1.414", False), ("4", r"\sqrt{16}", True),
    # pi
    (r"2\pi", r"\pi \cdot 2", True), (r"2\pi", "6.2832", False), (r"\frac{\pi}{2}", r"\frac{1}{2}\pi", True),
    (r"2\pi", "2", False),
    # polynomials
    ("(x+1)^2", "x^2+2x+1", True), ("x^2+2x+1", "(x+1)^2", True), ("(x+1)^2", "x^2+1", False),
    ("x^2-1", "(x-1)(x+1)", True),
    # sets and intervals
    (r"\{1,2\}", r"\{2,1\}", True), (r"\{1,2\}", r"\{1,3\}", False), ("[0,1)", "[0,1]", False),
    ("[0,1)", "[0,1)", True), (r"(-\infty, 2]", r"(-\infty,2]", True), ("(1,2)", "(1,3)", False),
    # units in \text{}
    ("5", r"5\text{ cm}", True), (r"5\text{ cm}", "5", True), ("12", r"12 \text{ inches}", True),
    ("5", r"6\text{ cm}", False),
    # powers of ten
    ("1000", "10^3", True), ("0.001", r"1\times10^{-3}", True), ("1000", "10^4", False),
    ("10^{-3}", "0.01", False), ("2^{10}", "1024", True),
    # mixed numbers
    (r"\frac{5}{2}", r"2\frac{1}{2}", True), ("5/2", r"2\frac{1}{2}", True), (r"2\frac{1}{2}", "2.5", True),
    (r"\frac{5}{2}", r"2\frac{1}{3}", False),
    # matrices
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&5\end{pmatrix}", False),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix}1 \\ 2\end{pmatrix}", True),
    (r"\begin{pmatrix}\frac{1}{2}&0\\0&1\end{pmatrix}", r"\begin{pmatrix}0.5&0\\0&1\end{pmatrix}", True),
    # percentages
    (r"50\%", "50", True), (r"50\%", "0.5", True), (r"25\%", r"30\%", False), (r"12.5\%", "0.125", True),
    # thousands separators
    ("1234", "1,234", True), ("1234567", "1,234,567", True), ("1234", r"1\,234", True),
    ("1234", "1 234", True), ("1234", "1,243", False), ("1,234", "1234", True),
    # negative numbers
    ("-3", "-3", True), ("-3", "3", False), (r"-\frac{1}{2}", "-0.5", True), ("-7", "\u22127", True),
    # plain answers, right and wrong
    ("72", "71", False), (r"\frac{1}{3}", "0.333", False), ("18", "18.00", True), ("18", r"\$18", True),
    ("5", "x = 5", True), (r"\frac{3}{4}", "0.75", True), ("1", "0", False), (r"\infty", r"\infty", True),
]

# Plain-text final answers after '####' as models write them (GSM8K style).
HASH_ANSWERS = [
    ("1234", "1,234", True), ("18", "$18", True), ("18", "18 dollars", True), ("18", "18.", True),
    ("18", "$18 per day.", True), ("1234", "1 234", True), ("5/2", "2 1/2", True), ("-5", "-5 degrees", True),
    ("18", "19 dollars", False), ("2125", "2,125", True), ("2125", "2,152", False), ("0.5", "50%", True),
]


_task = make_task


@pytest.fixture(scope="module")
def pool():
    """The process-wide math pool, started once for this module (about 1-2 s)."""
    shared = math_answer.math_pool(2)
    assert check_answers([r"\boxed{1}"], ["1"], timeout_s=30)[0]["correct"]
    return shared


@pytest.fixture(scope="module")
def light_pool():
    """A pool without the math warm-up: restarts after kills take ~0.5 s instead of ~2 s."""
    light = RewardPool(2)
    yield light
    light.close()


def test_pairs_cover_enough():
    assert len(PAIRS) >= 50
    assert sum(ok for *_, ok in PAIRS) >= 25 and sum(not ok for *_, ok in PAIRS) >= 15


def test_pairs_boxed_and_hash(pool):
    golds = [g for g, _, _ in PAIRS]
    boxed = check_answers([f"Working... so \\boxed{{{p}}}." for _, p, _ in PAIRS], golds,
                          style="boxed", timeout_s=5)
    hashed = check_answers([f"Working...\n#### {p}" for _, p, _ in PAIRS], golds, style="hash", timeout_s=5)
    anyway = check_answers([f"The answer is \\boxed{{{p}}}" for _, p, _ in PAIRS], golds, timeout_s=5)
    for (gold, pred, ok), b, h, a in zip(PAIRS, boxed, hashed, anyway, strict=True):
        for d, method in ((b, "boxed"), (h, "hash"), (a, "boxed")):
            assert d["correct"] is ok and d["format_ok"] and d["method"] == method, (gold, pred, d)
            assert d["reason"] == ("correct" if ok else "wrong"), (gold, pred, d)


def test_plain_text_hash_answers(pool):
    out = check_answers([f"steps\n#### {p}" for _, p, _ in HASH_ANSWERS], [g for g, _, _ in HASH_ANSWERS],
                        style="hash", timeout_s=5)
    assert [d["correct"] for d in out] == [ok for *_, ok in HASH_ANSWERS], out


def test_gsm8k_reference_with_commas(pool):
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,234"   # a full solution as reference
    d = math_answer.verify("so...\n#### 1,234", gold, style="hash")
    assert d["correct"] and d["reference"] == "1,234" and d["extracted"] == "1,234"
    assert math_answer.verify(r"\boxed{1234}", gold)["correct"]
    assert not math_answer.verify("#### 1,243", gold)["correct"]
    assert math_answer.is_equivalent(r"\frac{6}{8}", "0.75")
    assert not math_answer.is_equivalent("0.7", "0.75")


@pytest.mark.parametrize("text, style, expected, method", [
    ("#### 5", "boxed", None, "none"),
    (r"\boxed{5}", "hash", None, "none"),
    ("I think 72", "any", None, "none"),
    (r"\boxed{1} then \boxed{\frac{1}{2}}", "boxed", r"\frac{1}{2}", "boxed"),
])
def test_extraction_per_format(text, style, expected, method):
    assert extract_answer(text, style) == (expected, method)


@pytest.mark.parametrize("raw, cleaned", [
    ("$18$", "18"), ("18.", "18"), ("18 dollars", "18"), ("$18 per day", "$18"), ("1 234 567", "1234567"),
    (r"1\,234", "1234"), ("2 1/2", r"2\frac{1}{2}"), ("-2 1/2", r"-2\frac{1}{2}"), ("3 pi", "3 pi"),
    ("2 x", "2 x"), ("1, 2", "1, 2"), (r"\frac{1}{2}", r"\frac{1}{2}"), ("1.5", "1.5"),
])
def test_clean_answer(raw, cleaned):
    assert clean_answer(raw) == cleaned


def test_details_without_an_answer_skip_the_pool():
    d = math_answer.verify("I think 72", "72")
    assert not d["correct"] and not d["format_ok"] and d["reason"] == "no_answer"
    d = math_answer.verify("#### " + "9" * 10_000, "1")
    assert d["reason"] == "answer_too_long" and not d["format_ok"]
    d = math_answer.verify("#### The  Answer", "the answer", mode="exact")
    assert d["correct"] and d["reason"] == "correct"
    assert math_answer.verify("#### 1,234", "1234", mode="exact")["reason"] == "wrong"


# --- time bounds ------------------------------------------------------------------------------
# Pool calls run in child processes, which import these by name from this module.

def slow_equal(gold: str, pred: str) -> str:
    time.sleep(60)  # interruptible: the child's own timer stops it
    return "correct"


def stuck_equal(gold: str, pred: str) -> str:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # like a call stuck in C
    time.sleep(60)
    return "correct"


def raising_equal(gold: str, pred: str) -> str:
    raise RuntimeError(f"checker bug on {pred!r}")


def crashing_equal(gold: str, pred: str) -> str:
    os._exit(3)


def echo(gold: str, pred: str) -> str:
    return pred


def test_pool_bounds_each_call(light_pool):
    pool = light_pool
    budget = 0.6
    for fn, status, error in [(slow_equal, "timeout", "interrupted"),
                              (stuck_equal, "timeout", "process killed"),
                              (raising_equal, "error", "RuntimeError: checker bug on 'x'"),
                              (crashing_equal, "error", "died (exit code 3)")]:
        t0 = time.monotonic()
        [out] = pool.map(fn, [("1", "x")], budget)
        # cut at the budget, counted from the call's start in the child (a fresh child first
        # imports this module, which is not the call's time)
        assert out.elapsed_s < budget + 0.25 and time.monotonic() - t0 < budget + 5, (fn, out)
        assert out.status == status and error in out.error, (fn, out)
        assert pool.map(echo, [("1", "next")], 30)[0].value == "next"      # the next call works
    assert pool.stats["kills"] == 1 and pool.stats["starts"] == 4          # 2, a kill, a crash


def stuck_on_x(gold: str, pred: str) -> str:
    return stuck_equal(gold, pred) if pred == "x" else pred


def test_timeouts_in_a_batch_do_not_stall_the_rest(light_pool):
    preds = ["x", "2", "x"] + [str(i) for i in range(20)]
    out = light_pool.map(stuck_on_x, [("2", p) for p in preds], 0.5)
    assert [o.status for o in out] == ["timeout", "ok", "timeout"] + ["ok"] * 20
    assert [o.value for o in out[3:]] == [str(i) for i in range(20)]
    assert all(o.elapsed_s < 0.75 for o in out)


def test_pathological_answer_is_cut(pool):
    t0 = time.monotonic()
    out = check_answers([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{5}"], ["5", "5"], timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    assert out[0]["reason"] == "timeout" and out[0]["error"] and not out[0]["correct"]
    assert out[1]["correct"]


def test_pool_that_cannot_start_reports_errors():
    broken = RewardPool(1, warmup="no_such_module_anywhere:f")
    try:
        out = broken.map(math_answer.math_equal, [("1", "1")], 1.0)
    finally:
        broken.close()
    assert out[0].status == "error" and "failed to start" in out[0].error


def test_children_die_with_a_killed_parent(tmp_path):
    code = ("import sys, threading, time\n"
            "from rlax_tpu.tasks.reward_pool import RewardPool\n"
            "import tests.rlax_tpu.tasks.test_math_answer as t\n"
            "pool = RewardPool(1)\n"
            "assert pool.map(t.raising_equal, [('1', '1')], 30)[0].status == 'error'\n"
            "print(pool._children[0].proc.pid, flush=True)\n"
            "pool.map(t.stuck_equal, [('1', '1')], 600)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        child_pid = int(parent.stdout.readline())
        time.sleep(0.5)                                  # the child is now in the stuck call
        assert _alive(child_pid)
    finally:
        parent.kill()
        parent.wait()
    for _ in range(50):
        if not _alive(child_pid):
            return
        time.sleep(0.1)
    pytest.fail(f"reward child {child_pid} outlived its killed parent")


def test_children_outlive_the_thread_that_asked():
    fresh = RewardPool(1)
    try:
        worker = threading.Thread(target=fresh.map, args=(raising_equal, [("1", "1")], 30))
        worker.start()
        worker.join()
        time.sleep(0.3)
        assert _alive(fresh._children[0].proc.pid)        # not killed with the short-lived thread
        assert fresh.map(raising_equal, [("1", "2")], 30)[0].status == "error"
        assert fresh.stats["starts"] == 1
    finally:
        fresh.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"   # a zombie has exited
    except FileNotFoundError:
        return False


# --- through a task ---------------------------------------------------------------------------

def _jsonl(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_task_rewards_batch_and_failures(pool, tmp_path, monkeypatch):
    path = _jsonl(tmp_path, [{"prompt": f"What is 2*{i}?", "answer": str(2 * i)} for i in range(40)])
    task = _task("jsonl", path=path, format_weight=0.1, reward_timeout_s=0.5)
    p = task.train_problems(1, 0)[0]
    group = [f"\\boxed{{{p.answer}}}", f"#### {p.answer}", "#### 99999", "no answer", None]
    rs = task.rewards([p] * 4 + [p.to_dict()], group)
    assert [r.score for r in rs] == [pytest.approx(1.1), pytest.approx(1.1), pytest.approx(0.1), 0.0, 0.0]
    assert [r.details["reason"] for r in rs] == ["correct", "correct", "wrong", "no_answer", "error"]
    assert task.reward(p.to_dict(), f"\\boxed{{{p.answer}}}").correct
    monkeypatch.setattr(task, "equal_fn", stuck_equal)
    t0 = time.monotonic()
    r = task.reward(p, f"\\boxed{{{p.answer}}}")
    assert r.score == 0.0 and r.details["reason"] == "timeout" and "killed" in r.details["error"]
    assert r.details["elapsed_s"] < 0.75 and time.monotonic() - t0 < 6
    monkeypatch.setattr(task, "equal_fn", raising_equal)
    r = task.reward(p, f"\\boxed{{{p.answer}}}")
    assert r.score == 0.0 and r.details["reason"] == "error" and "checker bug" in r.details["error"]
    monkeypatch.undo()
    assert task.reward(p, f"\\boxed{{{p.answer}}}").score == pytest.approx(1.1)


def test_synthetic_tasks_do_not_start_a_pool(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("synthetic rewards must not use the process pool")

    monkeypatch.setattr(RewardPool, "map", refuse)
    task = _task("arith")
    probs = task.train_problems(20, 0)
    rs = task.rewards(probs, [task.solution_text(p) for p in probs])
    assert all(r.correct for r in rs)
    assert _task("countdown").reward(Problem("x", "Make 3 from 1 2", "1+2", {"numbers": [1, 2], "target": 3}),
                                     "#### 1+2").correct
