"""A small, bounded arithmetic expression parser. Model output is never passed to eval().

Grammar: expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
unary := '-' unary | atom; atom := INT | '(' expr ')'. Values are exact Fractions. Limits on
length, digits per number, nesting and magnitude keep every parse cheap; a Deadline bounds it.
"""

from __future__ import annotations

import re
from fractions import Fraction

from rlax_tpu.tasks.base import Deadline

MAX_EXPR_CHARS = 200
MAX_NUMBER_DIGITS = 12
MAX_DEPTH = 32
MAX_ABS_VALUE = 10**40

_TOKEN = re.compile(r"\s*(\d+|[-+*/()×÷x])")


class ExprError(ValueError):
    """The text is not a valid expression within the limits."""


def tokenize(text: str) -> list[str]:
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ExprError(f"unexpected character {text[pos:pos + 1]!r} at {pos}")
        tok = {"×": "*", "x": "*", "÷": "/"}.get(m.group(1), m.group(1))
        if tok.isdigit() and len(tok) > MAX_NUMBER_DIGITS:
            raise ExprError(f"number with more than {MAX_NUMBER_DIGITS} digits")
        tokens.append(tok)
        pos = m.end()
    if not tokens:
        raise ExprError("empty expression")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str], deadline: Deadline | None):
        self.toks, self.i, self.deadline = tokens, 0, deadline
        self.numbers: list[int] = []

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ExprError("unexpected end of expression")
        self.i += 1
        return tok

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term(depth)
            value = value + rhs if op == "+" else value - rhs
            self._bound(value)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.unary(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.unary(depth)
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0:
                    raise ExprError("division by zero")
                value = value / rhs
            self._bound(value)
        return value

    def unary(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExprError(f"nesting deeper than {MAX_DEPTH}")
        if self.deadline is not None:
            self.deadline.check()
        if self.peek() == "-":
            self.take()
            return -self.unary(depth + 1)
        return self.atom(depth)

    def atom(self, depth: int) -> Fraction:
        tok = self.take()
        if tok == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise ExprError("missing ')'")
            return value
        if tok.isdigit():
            self.numbers.append(int(tok))
            return Fraction(int(tok))
        raise ExprError(f"unexpected token {tok!r}")

    @staticmethod
    def _bound(value: Fraction) -> None:
        if abs(value.numerator) > MAX_ABS_VALUE or value.denominator > MAX_ABS_VALUE:
            raise ExprError("intermediate value too large")


def evaluate(text: str, deadline: Deadline | None = None) -> tuple[Fraction, list[int]]:
    """Returns (exact value, the integer literals used in order). Raises ExprError."""
    parser = _Parser(tokenize(text), deadline)
    value = parser.expr(0)
    if parser.peek() is not None:
        raise ExprError(f"unexpected token {parser.peek()!r} after the expression")
    return value, parser.numbers
