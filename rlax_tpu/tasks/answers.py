"""Final-answer extraction from completions and dataset solutions; plain text, no sympy.

extract_answer(): the last \\boxed{...} (nested braces), else the last '#### ...' line, else the
last '... answer is X', as the configured answer format allows. clean_answer(): rewrites the few
plain-text notations that math-verify misreads (it reads '1 234' as 235, '2 1/2' as 3/2, '18.'
as nothing, '18 dollars' as a product of symbols), so that the comparison itself is math-verify's.
Everything here is linear in the input and checks a Deadline in its only loop.
"""

from __future__ import annotations

import re

from rlax_tpu.tasks.base import Deadline

ANSWER_FORMATS = ("any", "boxed", "hash", "last_number")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
MAX_ANSWER_CHARS = 500     # longer extracted answers are rejected (reason 'answer_too_long')

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_HASH = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*([^\n]*)", re.IGNORECASE)
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")
# 1 234 567 / 1\,234 / 1~234: digit groups of three split by a space-like separator.
_SPACED_THOUSANDS = re.compile(r"-?\d{1,3}(?:(?:\\,|\\ |\\;|~|\s)\d{3})+(?:\.\d+)?")
_SPACE_SEPARATOR = re.compile(r"\\,|\\ |\\;|~|\s")
_COMMA_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MIXED = re.compile(r"(-?\d+)\s+(\d+)\s*/\s*(\d+)")
# '18 dollars', '$18 per day': a plain number followed by words (two letters or more). Each
# part can match only one way, so a long digit string cannot make the match quadratic.
_NUMBER_THEN_WORDS = re.compile(r"(\\?\$?\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s+(?!pi\b)"
                                r"[A-Za-z]{2,}(?:[\s/-]+[A-Za-z]+)*")


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


def _last_group(pattern: re.Pattern, text: str) -> str | None:
    """Group 1 of the last match, stripped; None without a match."""
    last = None
    for m in pattern.finditer(text):
        last = m
    return None if last is None else last.group(1).strip()


def extract_hash(text: str) -> str | None:
    """The rest of the line after the last '####', stripped; None if absent or empty."""
    return _last_group(_HASH, text) or None


def extract_answer_is(text: str) -> str | None:
    ans = _last_group(_ANSWER_IS, text)
    if ans is None:
        return None
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
    'answer is'; 'last_number' takes the last number written anywhere (for instruct models asked
    for a short answer, whose wording varies).
    """
    if style not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer style {style!r}")
    if style == "last_number":
        numbers = _NUMBER.findall(text)
        return (numbers[-1].replace(",", ""), "last_number") if numbers else (None, "none")
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


def clean_answer(ans: str) -> str:
    """Rewrites plain-text notation math-verify misreads; leaves LaTeX to math-verify."""
    s = ans.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$").strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    m = _NUMBER_THEN_WORDS.fullmatch(s)
    if m:
        s = m.group(1)
    if _SPACED_THOUSANDS.fullmatch(s):
        s = _SPACE_SEPARATOR.sub("", s)
    m = _MIXED.fullmatch(s)
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    return s


def plain_number(ans: str) -> str:
    """'1,234' -> '1234' for a number with thousands commas; anything else unchanged."""
    s = ans.strip()
    return s.replace(",", "") if _COMMA_THOUSANDS.fullmatch(s) else s


def reference_answer(ref: str) -> str:
    """A dataset answer may be a full solution (GSM8K '#### 72', MATH '\\boxed{..}'): extract it."""
    if "####" in ref or "\\boxed" in ref or "\\fbox" in ref:
        ans, _ = extract_answer(ref, "any")
        if ans is not None:
            return ans
    return ref.strip()


def strip_calculator(text: str) -> str:
    """GSM8K worked answers carry calculator annotations '48/2 = <<48/2=24>>24': drop them."""
    return _CALCULATOR.sub("", text)
