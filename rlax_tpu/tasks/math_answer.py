"""Math answers checked by Hugging Face's math-verify, in the reward pool's child processes.

The final answer is extracted here in the configured format (answers.py), and the comparison
with the reference is math-verify's `verify(parse(gold), parse(pred))`, run off the caller's
thread with a wall-clock budget per call (reward_pool.py). Each answer is parsed as the content
of a \\boxed{} so that math-verify reads all of it, not whichever fragment it would pick.
math-verify's own alarms are off (they need the main thread); the pool bounds the time.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

from rlax_tpu.tasks.answers import MAX_ANSWER_CHARS, clean_answer, extract_answer, reference_answer
from rlax_tpu.tasks.base import Deadline, RewardTimeout
from rlax_tpu.tasks.reward_pool import RewardPool, shared_pool

VERIFIER_MODES = ("math", "exact")
WARMUP = "rlax_tpu.tasks.math_answer:warm_up"


def _parse(answer: str) -> list:
    from math_verify import parse

    return parse("\\boxed{" + answer + "}", parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    return _parse(gold)  # a group's completions share one reference: parse it once per child


def _plain(text: str) -> str:
    return " ".join(text.split()).lower()


def math_equal(gold: str, pred: str) -> str:
    """'correct', 'wrong' or 'unparsed' (math-verify finds no math in pred). Runs in the pool.

    A reference math-verify cannot parse either (a word, a name) is compared as plain text.
    """
    from math_verify import verify

    gold_parsed, pred_parsed = _parse_gold(gold), _parse(pred)
    if not gold_parsed:
        return "correct" if _plain(gold) == _plain(pred) else "wrong"
    if not pred_parsed:
        return "unparsed"
    return "correct" if verify(gold_parsed, pred_parsed, timeout_seconds=None) else "wrong"


# One check per kind of answer: the first of each pays sympy's lazy imports and caches (up to
# ~0.5 s, half a default budget), so a child does them before it takes calls.
_WARMUP_PAIRS = (("\\frac{1}{2}", "0.5"), ("\\sqrt{8}", "2\\sqrt{2}"), ("2\\pi", "6.28"),
                 ("(x+1)^2", "x^2+2x+1"), ("[0,1)", "(0,1]"), ("\\{1,2\\}", "\\{2,1\\}"),
                 ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}"),
                 ("50\\%", "0.5"), ("x=5", "5"))


def warm_up() -> None:
    """Runs in each new pool child before it is ready."""
    for gold, pred in _WARMUP_PAIRS:
        math_equal(gold, pred)
    _parse_gold.cache_clear()


def math_pool(workers: int) -> RewardPool:
    """The process-wide pool for math answers (started on first use)."""
    return shared_pool(workers, WARMUP)


def _extract(completion: str, reference: str, style: str, timeout_s: float) -> dict:
    """Extraction and format check, in the caller's thread (linear time, under a Deadline)."""
    ref = clean_answer(reference_answer(reference)[:MAX_ANSWER_CHARS])
    ans, method = extract_answer(completion, style, Deadline(timeout_s))
    details = {"extracted": ans, "reference": ref, "method": method, "format_ok": False,
               "correct": False}
    if ans is None:
        details["reason"] = "no_answer"
    elif len(ans) > MAX_ANSWER_CHARS:
        details.update(extracted=ans[:MAX_ANSWER_CHARS] + "...", reason="answer_too_long")
    else:
        details.update(format_ok=True, extracted=clean_answer(ans))
    return details


def check_answers(completions: Sequence[str], references: Sequence[str], *, style: str = "any",
                  mode: str = "math", timeout_s: float = 1.0, workers: int = 2,
                  equal_fn: Callable[[str, str], str] = math_equal) -> list[dict]:
    """Checks completions against reference answers, all of them in one pool round.

    Returns one details dict each: correct, format_ok (an answer in the required format was
    found), extracted, reference, method ('boxed', 'hash', 'answer_is', 'none'), reason
    ('correct', 'wrong', 'unparsed', 'no_answer', 'answer_too_long', 'timeout', 'error'),
    and for 'timeout' / 'error' the error text and elapsed_s. Never raises per item.
    """
    if mode not in VERIFIER_MODES:
        raise ValueError(f"unknown verifier mode {mode!r}")
    out, jobs = [], []
    for i, (completion, reference) in enumerate(zip(completions, references, strict=True)):
        t0 = time.monotonic()
        try:
            details = _extract(completion, reference, style, timeout_s)
        except RewardTimeout as e:
            details = {"correct": False, "format_ok": False, "reason": "timeout", "error": str(e),
                       "elapsed_s": time.monotonic() - t0}
        except Exception as e:  # noqa: BLE001 - one bad item must not fail the batch
            details = {"correct": False, "format_ok": False, "reason": "error",
                       "error": f"{type(e).__name__}: {e}"[:500]}
        out.append(details)
        if not details["format_ok"]:
            continue
        if mode == "exact":
            ok = _plain(details["extracted"]) == _plain(details["reference"])
            details.update(correct=ok, reason="correct" if ok else "wrong")
        else:
            jobs.append(i)
    if jobs:
        args = [(out[i]["reference"], out[i]["extracted"]) for i in jobs]
        for i, outcome in zip(jobs, math_pool(workers).map(equal_fn, args, timeout_s), strict=True):
            details = out[i]
            if outcome.status == "ok":
                details.update(correct=outcome.value == "correct", reason=str(outcome.value))
            else:
                details.update(reason=outcome.status, error=outcome.error,
                               elapsed_s=round(outcome.elapsed_s, 3))
    return out


def verify(completion: str, reference: str, style: str = "any", mode: str = "math",
           timeout_s: float = 1.0, workers: int = 2) -> dict:
    """check_answers() for one completion."""
    return check_answers([completion], [reference], style=style, mode=mode, timeout_s=timeout_s,
                         workers=workers)[0]


def is_equivalent(pred: str, ref: str, timeout_s: float = 1.0) -> bool:
    """Whether two bare answers are equal by math-verify (False on timeout or error)."""
    return verify("\\boxed{" + pred + "}", ref, style="boxed", timeout_s=timeout_s)["correct"]
