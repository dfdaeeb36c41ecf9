"""Final-answer extraction and math answer equivalence for user datasets (and '####' answers).

extract_answer(): the last \\boxed{...} (nested braces), else the last '#### ...' line, else the
last '... answer is X'. is_equivalent(): exact numeric comparison (ints, decimals, thousands
commas, fractions a/b and \\frac/\\dfrac/\\tfrac, optional percent), else normalized string
comparison. Nothing here evaluates model text as code; all inputs are length-bounded.
"""

from __future__ import annotations

import re
from fractions import Fraction

from rlax_tpu.tasks.base import Deadline

MAX_ANSWER_CHARS = 200     # longer extracted answers are rejected (reason 'answer_too_long')
MAX_NUMBER_DIGITS = 60     # longer numerals are not parsed as numbers (no giant ints)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*([^\n]*)", re.IGNORECASE)
_NUM = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_FRAC = re.compile(r"\\frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")


def extract_boxed(text: str, deadline: Deadline | None = None) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox), matching nested braces; None if absent."""
    matches = list(_BOXED.finditer(text))
    for m in reversed(matches):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if deadline is not None and (j - i) % 4096 == 0:
                    deadline.check()
                c = text[j]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
            continue  # unbalanced: try an earlier one
        # "\boxed 5" form: up to whitespace or '$'
        tail = re.match(r"([^\s$]+)", text[i:])
        if tail:
            return tail.group(1)
    return None


def extract_hash(text: str) -> str | None:
    """The rest of the line after the last '####', stripped; None if absent or empty."""
    last = None
    for m in _HASH.finditer(text):
        last = m
    if last is None:
        return None
    ans = last.group(1).strip()
    return ans or None


def extract_answer_is(text: str) -> str | None:
    last = None
    for m in _ANSWER_IS.finditer(text):
        last = m
    if last is None:
        return None
    ans = last.group(1).strip()
    boxed = extract_boxed(ans)
    if boxed is not None:
        return boxed
    ans = ans.strip().rstrip(".").strip()
    if ans.startswith("$") and ans.count("$") >= 2:
        ans = ans[1:ans.index("$", 1)]
    return ans or None


def extract_answer(text: str, style: str = "any", deadline: Deadline | None = None
                   ) -> tuple[str | None, str]:
    """Returns (answer or None, method) with method in 'boxed', 'hash', 'answer_is', 'none'.

    style: 'boxed' or 'hash' accept only that form; 'any' tries boxed, then '####', then
    'answer is'.
    """
    if style not in ("any", "boxed", "hash"):
        raise ValueError(f"unknown answer style {style!r}")
    if style in ("any", "boxed"):
        ans = extract_boxed(text, deadline)
        if ans is not None:
            return ans, "boxed"
    if style in ("any", "hash"):
        ans = extract_hash(text)
        if ans is not None:
            return ans, "hash"
    if style == "any":
        ans = extract_answer_is(text)
        if ans is not None:
            return ans, "answer_is"
    return None, "none"


def normalize(ans: str) -> str:
    """LaTeX cleanup to a canonical string: no $, spaces, \\left/\\right, \\text{}, \\dfrac..."""
    s = ans.strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _TEXT_CMD.sub(r"\1", s)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "$",
                  "^\\circ", "^{\\circ}", "\\displaystyle"):
        s = s.replace(token, "")
    s = s.replace("\\{", "{").replace("\\}", "}")
    s = s.replace("\\%", "%").replace("\\cdot", "*").replace("\\times", "*")
    for _ in range(4):  # nested \frac, bounded
        new = _FRAC.sub(lambda m: f"({m.group(1) or m.group(2)})/({m.group(3) or m.group(4)})", s)
        if new == s:
            break
        s = new
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    # "x=5" -> "5" (a single leading variable assignment)
    m = re.fullmatch(r"[a-zA-Z]\w{0,10}=(.+)", s)
    if m:
        s = m.group(1)
    # strip one layer of redundant outer braces
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        s = s[1:-1]
    return s


def _parse_plain(s: str) -> Fraction | None:
    s = s.strip()
    while len(s) >= 2 and s[0] == "(" and s[-1] == ")":
        s = s[1:-1]
    if not _NUM.fullmatch(s) or sum(ch.isdigit() for ch in s) > MAX_NUMBER_DIGITS:
        return None
    return Fraction(s.replace(",", ""))


def parse_number(ans: str) -> tuple[Fraction, bool] | None:
    """Parses a normalized answer to (exact value, had a percent sign), or None."""
    s = ans
    if len(s) > MAX_ANSWER_CHARS:
        return None
    percent = s.endswith("%")
    if percent:
        s = s[:-1]
    sign = 1
    if s.startswith("-(") and s.count("/") == 1:
        sign, s = -1, s[1:]
    if s.count("/") == 1:
        num, den = s.split("/")
        a, b = _parse_plain(num), _parse_plain(den)
        if a is None or b is None or b == 0:
            return None
        return sign * a / b, percent
    v = _parse_plain(s)
    if v is None:
        return None
    return sign * v, percent


def is_equivalent(pred: str, ref: str, allow_percent: bool = True) -> tuple[bool, str]:
    """Whether two final answers match; returns (equal, reason)."""
    p, r = normalize(pred), normalize(ref)
    pn, rn = parse_number(p), parse_number(r)
    if pn is not None and rn is not None:
        (pv, pp), (rv, rp) = pn, rn
        if pv == rv:
            return True, "numeric_equal"
        if allow_percent and ((pp and pv / 100 == rv) or (rp and rv / 100 == pv)):
            return True, "numeric_equal_percent"
        return False, "numeric_mismatch"
    if pn is not None or rn is not None:
        # one side is a number, the other is not: compare strings anyway (e.g. "\pi" vs "3")
        pass
    if p == r:
        return True, "string_equal"
    if p.lower() == r.lower():
        return True, "string_equal_case"
    return False, "string_mismatch"


def reference_answer(ref: str) -> str:
    """A dataset answer may be a full solution (GSM8K '#### 72', MATH '\\boxed{..}'): extract it."""
    if "####" in ref or "\\boxed" in ref or "\\fbox" in ref:
        ans, _ = extract_answer(ref, "any")
        if ans is not None:
            return ans
    return ref.strip()


def verify(completion: str, reference: str, style: str = "any", mode: str = "math",
           deadline: Deadline | None = None) -> dict:
    """Checks a completion against a reference answer.

    Returns details: correct (bool), format_ok (an answer in the required style was found),
    extracted, reference, method, reason. mode 'math' uses is_equivalent, 'exact' compares
    whitespace-normalized strings.
    """
    ref = reference_answer(reference)
    ans, method = extract_answer(completion, style, deadline)
    details = {"extracted": ans, "reference": ref, "method": method, "format_ok": False,
               "correct": False}
    if ans is None:
        details["reason"] = "no_answer"
        return details
    if len(ans) > MAX_ANSWER_CHARS:
        details["extracted"] = ans[:MAX_ANSWER_CHARS] + "..."
        details["reason"] = "answer_too_long"
        return details
    details["format_ok"] = True
    if mode == "exact":
        ok = " ".join(ans.split()) == " ".join(ref.split())
        details.update(correct=ok, reason="exact_equal" if ok else "exact_mismatch")
    elif mode == "math":
        ok, reason = is_equivalent(ans, ref)
        details.update(correct=ok, reason=reason)
    else:
        raise ValueError(f"unknown verifier mode {mode!r}")
    return details
