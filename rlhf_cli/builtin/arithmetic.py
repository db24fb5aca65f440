"""Short arithmetic with exact answers: the built-in task for GRPO/RLOO, and its gold checker.

The prompt is a sum of single-digit operands joined by ``+`` or ``-`` and ended by ``=``:
``"7 + 5 ="`` or ``"9 - 3 + 4 ="``. The row's ``answer`` is the exact result as a string (``"12"``,
``"-2"``); its ``completion`` is what a model should write after the prompt, a space and the answer
(``" 12"``), for an SFT warm-up with ``dataset_format: prompt-completion`` (which appends the eos,
so the model also learns to stop after the number; configs/quickstart-sft-arithmetic.yaml). Half
the problems have two operands (all 200 of them, results -9..18), half three (4000, results
-18..27), so a tiny model has an easy tier to learn first and a harder one to generalise to.
Every character is one token of the built-in tokenizer (digits, ``+``, ``-``, ``=`` and the space
each encode to a single token and decode back exactly), so no prompt depends on odd merges.

``exact_answer_reward`` (``builtin:exact-answer``) is the verifier: 1.0 when the first number in the
response equals the row's ``answer``, else 0.0. It gives no partial credit on purpose, so that its
mean is the accuracy; a shaping term (for example a reward for answering with a number at all)
belongs in another ``reward.sources`` entry, where it is logged apart from the accuracy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from decimal import Decimal

from rlhf_cli.errors import UserError

OPERATORS = ("+", "-")
# The first number of a response: an optional minus sign, digits, an optional decimal part.
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
ANSWER_COLUMN = "answer"


def problem(operands: list[int], operators: list[str]) -> dict[str, str]:
    """The row of one problem: ``prompt`` ("7 + 5 ="), ``answer`` ("12") and ``completion`` (" 12")."""
    result = operands[0]
    for operator, operand in zip(operators, operands[1:], strict=True):
        result = result + operand if operator == "+" else result - operand
    terms = [str(operands[0])]
    for operator, operand in zip(operators, operands[1:], strict=True):
        terms += [operator, str(operand)]
    return {"prompt": " ".join([*terms, "="]), "answer": str(result), "completion": f" {result}"}


def random_problems(rng: random.Random) -> Iterator[dict[str, str]]:
    """Endless problems: two or three single-digit operands (even odds), each operator + or -."""
    while True:
        count = rng.choice((2, 3))
        operands = [rng.randint(0, 9) for _ in range(count)]
        operators = [rng.choice(OPERATORS) for _ in range(count - 1)]
        yield problem(operands, operators)


def first_number(text: str) -> Decimal | None:
    """The first number written in ``text`` ("= -3, I think" -> -3), or None when there is none."""
    match = NUMBER.search(text)
    return Decimal(match.group()) if match else None


def exact_answer_reward(prompts: list[str], responses: list[str], **columns: list) -> list[float]:
    """Reward function: 1.0 when the first number in a response equals the row's ``answer``, else 0.0.

    Numbers compare by value ("12.0" equals "12", "-0" equals "0"); a response without any number
    scores 0.0, as does one that repeats the question first ("7 + 5 = 12" reads as 7). The
    ``answer`` column (strings or numbers) comes from the dataset, as with every reward function;
    other columns are ignored.
    """
    return score_answers("builtin:exact-answer", "builtin:arithmetic", first_number, prompts, responses, columns)


def score_answers(reward: str, dataset: str, read: Callable[[str], Decimal | None], prompts: list[str],
                  responses: list[str], columns: dict[str, list]) -> list[float]:
    """1.0 for each response whose number, as `read` finds it, equals its row's ``answer`` by value, else
    0.0; the shared body of the exact-answer checkers (`reward` and `dataset` name them in errors)."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if ANSWER_COLUMN not in columns:
        present = ", ".join(sorted(columns)) or "none"
        raise UserError(
            f"{reward} needs the dataset column {ANSWER_COLUMN!r} (the exact answer of each "
            f"prompt, as in {dataset}); the dataset's other columns are: {present}"
        )
    answers = list(columns[ANSWER_COLUMN])
    if len(answers) != len(responses):
        raise ValueError(f"got {len(answers)} answers but {len(responses)} responses")
    scores = []
    for i, (answer, response) in enumerate(zip(answers, responses, strict=True)):
        gold = NUMBER.fullmatch(str(answer).strip())
        if gold is None:
            raise UserError(f"{reward}: column {ANSWER_COLUMN!r} must hold numbers; row {i} of the batch has {answer!r}")
        scores.append(1.0 if read(response) == Decimal(gold.group()) else 0.0)
    return scores
