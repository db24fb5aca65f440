"""The built-in tool-use world: word problems a tiny model solves with the calculator, and their checker.

A problem is a short story over two-digit numbers whose answer takes two or three operations, e.g.
"Ann has 23 boxes of 17 apples. She gives away 9 apples. How many apples does she have now?" ->
``23*17-9`` = 382. Eight templates, each with one fixed expression shape (``a*b-c``, ``a*b+c``,
``(a+b)*c``, ``a*(b-c)``, ``a*b*c``, ``a*b+c*d``, ``a+b+c``, ``a-b-c``), fill in names, objects, containers
and verbs from short word lists. The numbers appear in the text in the order the expression uses them,
so the model's job is to read the shape off the wording and copy the numbers; the arithmetic itself
(products of two-digit numbers, up to six-digit results) is what a model of a few million parameters
cannot do in its head, and what the calculator does exactly. Everything is ASCII, under ~25 words, and
deterministic from the random generator passed in.

The text protocol (the rollout's defaults) after the prompt, which ends with ``ANSWER_CUE``::

    <prompt>\\nAnswer: <call>calculator 23*17-9</call><result>382</result> The answer is 382.<eos>

The model writes the call; the environment appends ``<result>...</result>`` (masked out of the loss);
the model ends with one sentence and the end-of-text token. Each ``<result>`` here is what the rollout
will insert: ``calculate(argument)``, or for a failed call the runner's ``error_text`` ("error: ...").
With the built-in tokenizer (digits one token each) a prompt is at most 64 tokens, a completion with
its eos at most 128 (about 60 on average; at most ~115 without a mistake) and a whole SFT example at
most 192 (tests/builtin/test_tool_world.py checks these bounds), so configs can set ``max_length: 192``.

Rows:

* ``problem_row``: ``{"prompt", "answer", "expression"}`` for RL (``builtin:tool-arithmetic``).
* ``demonstration``: the same plus ``completion`` (the whole episode after the prompt) and ``mistake``
  for SFT (``builtin:tool-arithmetic-demos``). A quarter (NO_TOOL_RATE) answer straight away, without
  the calculator, as a demonstrator who does the sum in their head: a model of a few million parameters
  cannot, so imitating them is a guess. That is the decision RL with the environment learns to change
  (recipes/tools: the SFT model skips the calculator in ~18% of held-out episodes, GRPO in <1%). Of the
  rest, about 85% make one correct call; the others first make a call that fails (a cut-off expression,
  ``x`` for ``*``, a trailing ``=``, an unbalanced parenthesis), read the calculator's real error, and
  call again correctly. Only failing calls are shown as mistakes: a valid but wrong call gives the model
  nothing to notice, so a demo that "notices" it would teach a second call at random. ``mistake`` names
  the kind ("" for none, "no_tool" for an answer without the calculator) so evaluations can count them.

For chat models (``environment.protocol: chat``) the same problems come as conversations:

* ``chat_problem_row``: ``{"prompt": [{"role": "user", "content": <the story>}], "answer", "expression"}``
  (``builtin:tool-arithmetic-chat``; the story without ``ANSWER_CUE``: the template opens the reply).
* ``chat_demonstration``: ``{"messages", "answer", "expression", "mistake", "tools"}``
  (``builtin:tool-arithmetic-chat-demos``): the user's question, an assistant message whose
  ``tool_calls`` call the calculator (``{"expression": ...}``), the ``tool`` message with the calculator's
  real answer, and the final assistant message ``The answer is 382.``; the same shares of answers
  without the calculator and of recovered failed calls as the text demos; ``tools`` holds the calculator's JSON schema (TRL's convention), so SFT renders
  the prompt with the tool list exactly as the RL prompts are.

``tool_answer_reward`` (``builtin:tool-answer``) is the gold checker: 1.0 when the final answer equals
the row's ``answer``. The final answer is the last number after the last ``</result>`` (or the built-in
chat template's ``</tool_response>``; the whole response when there is none), with any ``<call>``,
``<result>`` or chat ``<tool_call>`` span there removed first: a number the calculator printed, or one
the model only passed to it, is never the answer. A response with no tool call at all is judged the same
way, so the same checker scores the "without tools" baseline. Given the rollout's ``episodes``, it reads
each episode's ``answer`` (what the model wrote after the last tool result; under the chat protocol the
last assistant turn's content) instead of the whole text: the same number for the text protocol, and the
right one for chat episodes under any chat template.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from decimal import Decimal

from rlhf_cli.builtin.arithmetic import NUMBER, score_answers
from rlhf_cli.environments.calculator import calculate
from rlhf_cli.environments.errors import ToolError
from rlhf_cli.environments.tools import Tool, error_text, tool_schema

TOOL_NAME = "calculator"
CALL_OPEN, CALL_CLOSE = "<call>", "</call>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
ANSWER_CUE = "\nAnswer:"
ANSWER_SENTENCE = " The answer is {}."
MISTAKE_RATE = 0.15
NO_TOOL_RATE = 0.25  # demos answered without the calculator (see demonstration)
# A <call>, <result> or (chat) <tool_call> span, closed or running to the end of the text (the model may
# stop mid-call).
TOOL_SPAN = re.compile(r"<call>.*?(?:</call>|\Z)|<result>.*?(?:</result>|\Z)|<tool_call>.*?(?:</tool_call>|\Z)",
                       re.DOTALL)
LAST_RESULT = re.compile(r"</result>|</tool_response>")  # the answer comes after the last of these

Row = dict[str, str]

# ---------------------------------------------------------------- word lists
# Short, common words; most are one to three tokens of the built-in tokenizer.

NAMES = (
    ("Ann", "she"), ("Tom", "he"), ("Sam", "he"), ("Mia", "she"), ("Max", "he"), ("Kim", "she"),
    ("Ben", "he"), ("Ada", "she"), ("Leo", "he"), ("Mary", "she"), ("Mark", "he"), ("Sara", "she"),
    ("Jack", "he"), ("Anna", "she"), ("Dan", "he"), ("Kate", "she"),
)  # fmt: skip
ITEMS = ("apples", "pears", "eggs", "books", "coins", "pens", "cards", "cakes", "marbles", "shells", "toys")
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("crate", "crates"), ("basket", "baskets"),
              ("tray", "trays"), ("pack", "packs"))  # fmt: skip
COLOURS = (("red", "blue"), ("small", "big"), ("old", "new"), ("green", "white"))
LOSES = ("gives away", "sells", "loses", "uses")
GAINS = ("finds", "buys", "gets", "wins")
# (third person, base form) of verbs that take any of the ITEMS
COLLECTS = (("collects", "collect"), ("buys", "buy"), ("sells", "sell"), ("finds", "find"))
TIMES = (("on Monday", "on Tuesday", "on Wednesday"), ("in the morning", "at noon", "at night"),
         ("in May", "in June", "in July"))  # fmt: skip


def _two_digit(rng: random.Random, low: int = 10, high: int = 99) -> int:
    return rng.randint(low, high)


def _words(rng: random.Random) -> dict[str, str]:
    """One draw of every slot a template may use; a template uses the ones it names."""
    (name, he), (other, _), (third, _) = rng.sample(NAMES, 3)
    (container, containers), (_, containers2) = rng.sample(CONTAINERS, 2)
    collects, collect = rng.choice(COLLECTS)
    first, second = rng.choice(COLOURS)
    t1, t2, t3 = rng.choice(TIMES)
    return {
        "name": name, "he": he, "He": he.capitalize(), "other": other, "third": third,
        "items": rng.choice(ITEMS), "container": container, "containers": containers,
        "containers2": containers2, "loses": rng.choice(LOSES), "gains": rng.choice(GAINS),
        "collects": collects, "collect": collect, "first": first, "second": second,
        "t1": t1, "t2": t2, "t3": t3,
    }  # fmt: skip


# ---------------------------------------------------------------- templates
# (expression shape, text, operand sampler). Operands appear in the text in the order of the shape.


def _three(rng: random.Random) -> list[int]:
    return [_two_digit(rng) for _ in range(3)]


def _take_from_each(rng: random.Random) -> list[int]:
    b = _two_digit(rng, 20)
    return [_two_digit(rng), b, _two_digit(rng, 10, b - 1)]  # b > c: each container keeps some


def _four(rng: random.Random) -> list[int]:
    return [_two_digit(rng) for _ in range(4)]


def _give_two_away(rng: random.Random) -> list[int]:
    b, c = _two_digit(rng, 10, 44), _two_digit(rng, 10, 44)
    return [_two_digit(rng, b + c + 1), b, c]  # a > b + c: something is left


TEMPLATES: tuple[tuple[str, str, Callable[[random.Random], list[int]]], ...] = (
    ("{a}*{b}-{c}", "{name} has {a} {containers} of {b} {items}. {He} {loses} {c} {items}. "
     "How many {items} does {he} have now?", _three),
    ("{a}*{b}+{c}", "{name} has {a} {containers} of {b} {items} and {gains} {c} more {items}. "
     "How many {items} does {he} have now?", _three),
    ("({a}+{b})*{c}", "{name} has {a} {first} {containers} and {b} {second} {containers}. "
     "Each {container} holds {c} {items}. How many {items} are there in all?", _three),
    ("{a}*({b}-{c})", "{name} has {a} {containers} of {b} {items}. {He} takes {c} {items} out of each "
     "{container}. How many {items} are left?", _take_from_each),
    ("{a}*{b}*{c}", "{name} stacks {a} rows of {b} {containers}. Each {container} holds {c} {items}. "
     "How many {items} are there in all?", _three),
    ("{a}*{b}+{c}*{d}", "{name} has {a} {containers} of {b} {items} and {c} {containers2} of {d} {items}. "
     "How many {items} does {he} have?", _four),
    ("{a}+{b}+{c}", "{name} {collects} {a} {items} {t1}, {b} {t2} and {c} {t3}. "
     "How many {items} did {he} {collect} in all?", _three),
    ("{a}-{b}-{c}", "{name} has {a} {items}. {He} gives {b} to {other} and {c} to {third}. "
     "How many {items} does {he} have left?", _give_two_away),
)  # fmt: skip


def problem_row(shape: str, text: str, operands: list[int], words: dict[str, str]) -> Row:
    """The RL row of one filled-in template: ``prompt`` (text + ANSWER_CUE), ``answer``, ``expression``."""
    numbers = dict(zip("abcd", map(str, operands), strict=False))
    expression = shape.format(**numbers)
    prompt = text.format(**words, **numbers) + ANSWER_CUE
    return {"prompt": prompt, "answer": calculate(expression), "expression": expression}


def random_problems(rng: random.Random) -> Iterator[Row]:
    """Endless problems, the eight templates with equal odds."""
    while True:
        shape, text, operands = rng.choice(TEMPLATES)
        yield problem_row(shape, text, operands(rng), _words(rng))


# ---------------------------------------------------------------- demonstrations of the protocol


def format_call(argument: str) -> str:
    return f"{CALL_OPEN}{TOOL_NAME} {argument}{CALL_CLOSE}"


def format_result(text: str) -> str:
    return f"{RESULT_OPEN}{text}{RESULT_CLOSE}"


def tool_output(argument: str) -> str:
    """What the environment appends for a calculator call: its answer, or the runner's error text."""
    try:
        return calculate(argument)
    except ToolError as err:
        return error_text(err)


# Calls that fail, as people and models get them wrong; each maps the right expression to a wrong one,
# or None where it does not apply.
MISTAKES: dict[str, Callable[[str], str | None]] = {
    "cut": lambda e: re.sub(r"\d+(\)?)$", r"\1", e),  # the last number left out
    "x": lambda e: e.replace("*", "x", 1) if "*" in e else None,  # x for times
    "equals": lambda e: e + "=",  # a trailing equals sign
    "paren": lambda e: e.replace(")", "", 1) if ")" in e else "(" + e,  # an unclosed parenthesis
}


def _episode_calls(rng: random.Random, expression: str) -> tuple[list[str], list[str], str]:
    """(the calls' arguments, the calculator's answers, the mistake's kind): none in NO_TOOL_RATE of the
    episodes (kind "no_tool"), else the right call, after a failing one in MISTAKE_RATE of those."""
    if rng.random() < NO_TOOL_RATE:
        return [], [], "no_tool"
    calls, mistake = [expression], ""
    if rng.random() < MISTAKE_RATE:
        mistake = rng.choice([kind for kind, make in MISTAKES.items() if make(expression) is not None])
        calls.insert(0, MISTAKES[mistake](expression))
    outputs = [tool_output(argument) for argument in calls]
    if mistake and not outputs[0].startswith("error: "):
        raise ValueError(f"mistake {mistake!r} of {expression!r} did not fail")  # a bug in MISTAKES
    return calls, outputs, mistake


def demonstration(rng: random.Random, row: Row) -> Row:
    """The SFT row of ``row``: ``completion`` is the whole episode after the prompt, and ``mistake``
    the kind of failed first call ("" when the first call is right; "no_tool" for an answer given without
    the calculator)."""
    calls, outputs, mistake = _episode_calls(rng, row["expression"])
    turns = [
        " " + format_call(argument) + format_result(output)
        for argument, output in zip(calls, outputs, strict=True)
    ]
    completion = "".join(turns) + ANSWER_SENTENCE.format(row["answer"])
    return {**row, "completion": completion, "mistake": mistake}


# ---------------------------------------------------------------- the chat versions


def calculator_schema() -> dict:
    """The calculator's JSON schema, as `environment.protocol: chat` gives it to the chat template."""
    return tool_schema(Tool(TOOL_NAME, calculate))


def question(row: Row) -> str:
    """The story of a problem row, without the text protocol's answer cue."""
    return row["prompt"].removesuffix(ANSWER_CUE)


def chat_problem_row(row: Row) -> dict:
    """The RL row of a problem for chat models: ``prompt`` is one user message asking the question."""
    return {"prompt": [{"role": "user", "content": question(row)}], "answer": row["answer"],
            "expression": row["expression"]}


def tool_call_message(argument: str) -> dict:
    """An assistant message that calls the calculator (OpenAI / TRL shape, arguments as a mapping)."""
    call = {"type": "function", "function": {"name": TOOL_NAME, "arguments": {"expression": argument}}}
    return {"role": "assistant", "content": "", "tool_calls": [call]}


def chat_demonstration(rng: random.Random, row: Row, schema: dict | None = None) -> dict:
    """The chat SFT row of a problem row: ``messages`` (question, calls with the calculator's real
    answers as ``tool`` messages, the answer), ``answer``, ``expression``, ``mistake`` and ``tools`` (the
    calculator's schema; ``schema`` saves making it again)."""
    calls, outputs, mistake = _episode_calls(rng, row["expression"])
    messages = [{"role": "user", "content": question(row)}]
    for argument, output in zip(calls, outputs, strict=True):
        messages += [tool_call_message(argument), {"role": "tool", "name": TOOL_NAME, "content": output}]
    messages.append({"role": "assistant", "content": ANSWER_SENTENCE.format(row["answer"]).strip()})
    return {"messages": messages, "answer": row["answer"], "expression": row["expression"], "mistake": mistake,
            "tools": [schema or calculator_schema()]}


# ---------------------------------------------------------------- the checker


def final_answer(response: str) -> Decimal | None:
    """The last number after the last ``</result>`` or chat ``</tool_response>`` (in the whole response when
    there is none), not counting numbers inside a ``<call>``, ``<result>`` or ``<tool_call>`` there; None
    when there is no such number."""
    tail = LAST_RESULT.split(response)[-1]
    numbers = NUMBER.findall(TOOL_SPAN.sub(" ", tail))  # a space, so "12<call>..</call>3" is not "123"
    return Decimal(numbers[-1]) if numbers else None


def tool_answer_reward(
    prompts: list[str], responses: list[str], episodes: list | None = None, **columns: list
) -> list[float]:
    """Reward function: 1.0 when a response's final answer (``final_answer``) equals the row's
    ``answer``, else 0.0. Numbers compare by value ("382.0" equals "382"). With ``episodes`` (the
    rollout's, one per response) each episode's ``answer`` is read instead of its whole text: the same
    number under the text protocol, and the last assistant turn under the chat protocol. Anything else
    passed as ``episodes`` (objects without an ``answer``) is ignored. Columns other than ``answer`` are
    ignored."""
    if episodes is not None and len(episodes) == len(responses) and all(hasattr(e, "answer") for e in episodes):
        responses = [episode.answer for episode in episodes]
    return score_answers("builtin:tool-answer", "builtin:tool-arithmetic", final_answer, prompts, responses, columns)
