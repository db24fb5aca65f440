"""builtin:calculator: exact answers checked by hand, the printed form, and bounded failure on hostile input."""

import time
from fractions import Fraction

import pytest

from rlhf_cli.environments.calculator import MAX_CHARS, calculate, evaluate, format_number
from rlhf_cli.environments.errors import ToolError


@pytest.mark.parametrize(
    ("expression", "answer"),
    [
        ("42", "42"),
        ("1 + 2 * 3", "7"),  # * before +
        ("(1 + 2) * 3", "9"),
        ("10 - 4 - 3", "3"),  # left to right
        ("64 / 4 / 2", "8"),
        ("2 * (3 + 4) - 5 / (1 + 4)", "13"),
        ("-3 + 5", "2"),  # unary minus
        ("2 * -3", "-6"),
        ("8 / -2", "-4"),
        ("--3", "3"),
        ("-(2 + 3)", "-5"),
        ("+7", "7"),
        ("-2 ** 2", "-4"),  # ** binds tighter than unary minus, as in Python
        ("2 ** 3 ** 2", "512"),  # right-associative: 2 ** 9
        ("2 ^ 10", "1024"),
        ("2 ** -1", "0.5"),
        ("(-2) ** 3", "-8"),
        ("0 ** 0", "1"),
        ("0.1 + 0.2", "0.3"),  # exact, not 0.30000000000000004
        ("1.5 * 4", "6"),
        (".5 + 1.", "1.5"),
        ("10 / 4", "2.5"),
        ("1 / 3", "0.333333"),
        ("2 / 3", "0.666667"),  # rounded, not cut
        ("-2 / 3", "-0.666667"),
        ("7 / 3", "2.333333"),
        ("1 / 30", "0.0333333"),  # six significant digits below 1
        ("1 / 8", "0.125"),  # trailing zeros stripped
        ("1 / 3 * 3", "1"),  # exact fractions: no 0.999999
        ("7 % 3", "1"),
        ("-7 % 3", "2"),  # Python's sign rule: the divisor's
        ("7.5 % 2", "1.5"),
        ("  12\t*\n2 ", "24"),  # any whitespace between tokens
        ("10 ** 99", "1" + "0" * 99),  # 100 digits: the largest size allowed
    ],
)
def test_hand_checked_answers(expression, answer):
    assert calculate(expression) == answer


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Fraction(-5), "-5"),
        (Fraction(1, 7_000_000), "0.000000142857"),
        (Fraction(-1, 7_000_000), "-0.000000142857"),
        (Fraction(1, 512), "0.00195313"),  # 0.001953125: a half rounds up, as people do
        (Fraction(5, 10**7), "0.0000005"),
        (Fraction(123456789, 1000), "123456.789"),
    ],
)
def test_format_number(value, text):
    assert format_number(value) == text


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1 / 0", "division by zero"),
        ("5 % (2 - 2)", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("1 +", "unexpected end of expression"),
        ("(1 + 2", "missing ')' for the '(' at position 0"),
        ("1 + 2)", "unexpected ')' at position 5"),
        ("3 4", "unexpected '4' at position 2"),
        ("* 3", "unexpected '*' at position 0"),
        ("2 ** 0.5", "exponent must be a whole number"),
        ("2 x 3", "unexpected character 'x' at position 2"),
        ("1,000", "unexpected character ',' at position 1"),
        ("1e5", "unexpected character 'e' at position 1"),  # Fraction("1e5") would take it; we do not
        ("\u0663 + 1", "unexpected character '\u0663' at position 0"),  # an Arabic-Indic digit: ASCII only
    ],
)
def test_errors_are_short_messages(expression, message):
    with pytest.raises(ToolError) as caught:
        calculate(expression)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('echo hi')", "unexpected character '_' at position 0"),
        ("open('/etc/passwd')", "unexpected character 'o' at position 0"),
        ("(1).__class__", "unexpected character '.' at position 3"),
        ("9 ** 9 ** 9", "exponent too large (at most 1000)"),
        ("2 ** 2 ** 2 ** 2 ** 2", "exponent too large (at most 1000)"),
        ("99 ** 999", "result too large (more than 100 digits)"),
        ("(1 / 2) ** 999", "result too large (more than 100 digits)"),  # the denominator counts too
        ("10 ** 100", "result too large (more than 100 digits)"),
        ("10 ** 50 * 10 ** 50", "result too large (more than 100 digits)"),
        ("9" * 101, "number too large (more than 100 digits)"),
        ("(" * 40 + "1" + ")" * 40, "expression nested too deeply (at most 32 levels)"),
        ("-" * 100 + "1", "expression nested too deeply (at most 32 levels)"),
        ("1+" * 5000 + "1", f"expression too long (10001 characters; at most {MAX_CHARS})"),
    ],
)
def test_hostile_input_fails_fast_with_a_bounded_message(expression, message):
    start = time.perf_counter()
    with pytest.raises(ToolError) as caught:
        calculate(expression)
    assert str(caught.value) == message
    assert time.perf_counter() - start < 0.5


def test_the_largest_allowed_expression_is_cheap():
    """The worst case that passes every bound: the longest input, full of multiplications."""
    expression = "*".join(["99999"] * 33)[:MAX_CHARS].rstrip("*")
    start = time.perf_counter()
    with pytest.raises(ToolError, match="result too large"):
        calculate(expression)
    assert evaluate("(" * 32 + "2" + ")" * 32 + " ** 332") == 2**332
    assert time.perf_counter() - start < 0.5
