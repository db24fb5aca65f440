"""builtin:calculator — exact arithmetic on what a model writes, by a parser that can only do arithmetic.

The grammar, loosest binding first (Python's precedence, so ``-2 ** 2`` is -4 and ``2 ** 3 ** 2`` is
512)::

    expression := term (("+" | "-") term)*
    term       := unary (("*" | "/" | "%") unary)*
    unary      := ("-" | "+") unary | power
    power      := atom (("**" | "^") unary)?          # right-associative
    atom       := number | "(" expression ")"

Numbers are integers or decimals (``12``, ``0.5``, ``.5``); ``^`` means ``**``, since models write both.
Nothing is ever handed to ``eval`` or compiled: the tokenizer accepts digits, operators, parentheses
and spaces only, so ``__import__('os')`` fails at its first character.

Arithmetic is exact (``fractions.Fraction``): ``0.1 + 0.2`` is ``0.3``. An integer result prints as
``"42"``; any other as a decimal rounded to 6 places (``"2.333333"``), or to 6 significant digits
below 1 (``"0.0333333"``), trailing zeros stripped (``"2.5"``). Hostile input is bounded before any work:
at most MAX_CHARS characters, MAX_DEPTH nested parentheses or signs, whole exponents up to
MAX_EXPONENT, and no number (input, intermediate or result) over MAX_DIGITS digits, so ``9**9**9``
fails at once instead of filling memory. Every failure is a ToolError with a short message.

``calculate(expression: str) -> str`` has a type hint and an ``Args:`` section, so the chat protocol
describes it to a model as a JSON schema (``transformers.utils.get_json_schema``).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction

from rlhf_cli.environments.errors import ToolError

MAX_CHARS = 200
MAX_DEPTH = 32
MAX_EXPONENT = 1000
MAX_DIGITS = 100
TOO_LARGE = 10**MAX_DIGITS  # the smallest numerator or denominator with more than MAX_DIGITS digits
MAX_BITS = TOO_LARGE.bit_length()
DECIMALS = 6

# one token: a number, a two-character operator, or any single character (judged by the parser)
TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\*\*|[-+*/%^()])|(\S))", re.ASCII)
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "%": operator.mod}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / % ** and parentheses
    """
    return format_number(evaluate(expression))


def evaluate(expression: str) -> Fraction:
    """The exact value of ``expression``; ToolError when it is not arithmetic or is too big."""
    if len(expression) > MAX_CHARS:
        raise ToolError(f"expression too long ({len(expression)} characters; at most {MAX_CHARS})")
    if not expression.strip():
        raise ToolError("empty expression")
    return _Parser(tokenize(expression)).parse()


def tokenize(expression: str) -> list[tuple[str, int]]:
    """[(text, position)] of the numbers and operators, ``^`` spelled ``**``; ToolError on anything else."""
    tokens = []
    for match in TOKEN.finditer(expression):
        number, op, other = match.groups()
        position = match.start(match.lastindex)
        if other is not None:
            raise ToolError(f"unexpected character {other!r} at position {position}")
        tokens.append((number or ("**" if op == "^" else op), position))
    return tokens


def _parse_number(text: str) -> Fraction:
    # Built from integers rather than Fraction(text), whose grammar also takes "1e5", "nan" and "1_0".
    whole, _, decimals = text.partition(".")
    return Fraction(int(whole or "0") * 10 ** len(decimals) + int(decimals or "0"), 10 ** len(decimals))


def _checked(value: Fraction, what: str = "result") -> Fraction:
    """`value`, unless its numerator or denominator has more than MAX_DIGITS digits."""
    if abs(value.numerator) >= TOO_LARGE or value.denominator >= TOO_LARGE:
        raise ToolError(f"{what} too large (more than {MAX_DIGITS} digits)")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise ToolError("exponent must be a whole number")
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"exponent too large (at most {MAX_EXPONENT})")
    if base == 0 and exponent < 0:
        raise ToolError("division by zero")
    # A power of a b-bit number is at least 2 ** ((b - 1) * e): refuse before computing, so that
    # 99 ** 999 costs nothing. What passes has at most b * e bits (< MAX_BITS + MAX_EXPONENT): cheap.
    bits = max(base.numerator.bit_length(), base.denominator.bit_length())
    if (bits - 1) * abs(exponent) >= MAX_BITS:
        raise ToolError(f"result too large (more than {MAX_DIGITS} digits)")
    return _checked(base ** int(exponent))


def _apply(op: str, left: Fraction, right: Fraction) -> Fraction:
    if op == "**":
        return _power(left, right)
    if op in "/%" and right == 0:
        raise ToolError("division by zero")
    return _checked(OPERATIONS[op](left, right))


class _Parser:
    """Recursive descent over the token list, one method per grammar rule; `depth` bounds recursion."""

    def __init__(self, tokens: list[tuple[str, int]]):
        self.tokens, self.index, self.depth = tokens, 0, 0

    def parse(self) -> Fraction:
        value = self.expression()
        if self.index < len(self.tokens):
            text, position = self.tokens[self.index]
            raise ToolError(f"unexpected {text!r} at position {position}")
        return value

    def peek(self) -> str | None:
        return self.tokens[self.index][0] if self.index < len(self.tokens) else None

    def expression(self) -> Fraction:
        value = self.term()
        while (op := self.peek()) in ("+", "-"):
            self.index += 1
            value = _apply(op, value, self.term())
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while (op := self.peek()) in ("*", "/", "%"):
            self.index += 1
            value = _apply(op, value, self.unary())
        return value

    def unary(self) -> Fraction:
        if (op := self.peek()) in ("-", "+"):
            self.index += 1
            with self.nested():
                value = self.unary()
            return -value if op == "-" else value
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() == "**":
            self.index += 1
            with self.nested():
                return _apply("**", base, self.unary())
        return base

    def atom(self) -> Fraction:
        if self.index >= len(self.tokens):
            raise ToolError("unexpected end of expression")
        text, position = self.tokens[self.index]
        self.index += 1
        if text[0].isdigit() or text[0] == ".":
            return _checked(_parse_number(text), "number")
        if text != "(":
            raise ToolError(f"unexpected {text!r} at position {position}")
        with self.nested():
            inner = self.expression()
        if self.peek() != ")":
            raise ToolError(f"missing ')' for the '(' at position {position}")
        self.index += 1
        return inner

    @contextmanager
    def nested(self) -> Iterator[None]:
        """One more level of parentheses, signs or powers: too deep is a ToolError, not a RecursionError."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ToolError(f"expression nested too deeply (at most {MAX_DEPTH} levels)")
        yield
        self.depth -= 1


def format_number(value: Fraction) -> str:
    """"42" for an integer; otherwise a decimal rounded to DECIMALS places, or to DECIMALS significant
    digits below 1 (1/7000000 -> "0.000000142857"), trailing zeros stripped."""
    if value.denominator == 1:
        return str(value.numerator)
    # den // |num| has d digits when |value| lies in (10**-d, 10**(1-d)]: then d - 1 zeros lead
    leading_zeros = len(str(value.denominator // abs(value.numerator))) - 1
    places = DECIMALS + leading_zeros
    scaled = math.floor(abs(value) * 10**places + Fraction(1, 2))  # exact; a half rounds up, as people do
    digits = str(abs(scaled)).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0").rstrip(".")
    return f"-{text}" if value < 0 else text
