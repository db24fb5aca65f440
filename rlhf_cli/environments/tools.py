"""Tools a model calls mid-episode: loading them from `environment.tools`, and running a turn's calls.

A tool is a callable from one string (the argument the model wrote) to one string (what it reads back).
Under the chat protocol (`environment.protocol: chat`) a call carries a JSON object of arguments instead,
and the tool is called with them as keywords; the model learns the tool from a JSON schema made from the
callable's type hints and Google-style docstring (`Args:`) by transformers' `get_json_schema`, so a tool
used with protocol chat needs both (`calculate(expression: str) -> str` is one). `environment.tools`
lists them, each as a string or a mapping:

    tools:
      - builtin:calculator                      # exact arithmetic (calculator.py)
      - {function: builtin:lookup, corpus: data/facts.txt}   # BM25 over one passage per line (lookup.py)
      - my_package.tools:word_count             # any importable `package.module:callable`
      - {name: count, function: my_package.tools:word_count}

A tool's name defaults to `calculator`, `lookup` or the callable's `__name__`; its description is the
first paragraph of its docstring. Mistakes in this list (a tool for protocol chat without type hints or
an `Args:` docstring among them) are the user's to fix (UserError, exit 2).

Mistakes of a tool at run time are not: they are part of the episode. ToolRunner calls every tool of a
turn concurrently, each under a timeout, and turns an exception (a TypeError from arguments the tool
does not take among them), a hang, an overlong answer or an unknown name into a ToolResult with an error text for the model and a status for the metrics; it
never raises for a tool's misbehaviour.
"""

from __future__ import annotations

import inspect
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_cli.environments.calculator import calculate
from rlhf_cli.environments.errors import ToolError
from rlhf_cli.environments.lookup import lookup_tool
from rlhf_cli.errors import UserError, user_frames

KEY = "environment.tools"
BUILTIN_TOOLS = ("calculator", "lookup")
SPEC_KEYS = ("name", "function", "corpus")
# a name the text markers and chat templates can both carry: a Python identifier
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
STATUSES = ("ok", "error", "timeout", "truncated", "unknown_tool")
MAX_ERROR_CHARS = 200  # an exception's message is cut here before max_response_chars applies


@dataclass
class Tool:
    """A callable the model can call by `name`; `description` (the docstring's first paragraph unless
    given) is what a prompt or chat template tells the model about it; `schema` (protocol chat: see
    `tool_schema`) the JSON schema a chat template lists."""

    name: str
    fn: Callable[..., Any]
    description: str = ""
    schema: dict | None = None

    def __post_init__(self):
        if not self.description:
            self.description = first_paragraph(inspect.getdoc(self.fn) or "")


def first_paragraph(doc: str) -> str:
    return " ".join(doc.split("\n\n")[0].split())


# ---------------------------------------------------------------- loading `environment.tools`


def load_tools(specs: list[str | Mapping] | tuple[str | Mapping, ...], schemas: bool = False) -> dict[str, Tool]:
    """The tools of `environment.tools`, by name, in the order listed; with `schemas` (protocol chat),
    each with its JSON schema (`tool_schema`)."""
    if not isinstance(specs, list | tuple):
        raise UserError(f"{KEY}: must be a list of tools, e.g. [builtin:calculator]; got {specs!r}.")
    tools: dict[str, Tool] = {}
    for i, spec in enumerate(specs):
        tool = load_tool(spec, f"{KEY}[{i}]")
        if schemas:
            tool.schema = tool_schema(tool, f"{KEY}[{i}]")
        if tool.name in tools:
            raise UserError(
                f"{KEY}[{i}]: a second tool named {tool.name!r} ({spec!r}); give each tool its own "
                "name, e.g. {name: other_name, function: ...}."
            )
        tools[tool.name] = tool
    return tools


def load_tool(spec: str | Mapping, key: str = KEY) -> Tool:
    """One tool from a spec string ("builtin:calculator", "package.module:callable") or mapping."""
    name, function, corpus = _parse_spec(spec, key)
    if function.startswith("builtin:"):
        fn = _builtin(function.removeprefix("builtin:"), corpus, key)
        default_name = function.removeprefix("builtin:")
    else:
        if corpus is not None:
            raise UserError(f"{key}: `corpus` is only for builtin:lookup, not {function!r}.")
        fn = _import(function, key)
        default_name = getattr(fn, "__name__", function.rpartition(":")[2].rpartition(".")[2])
    name = name if name is not None else default_name
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(
            f"{key}: tool name {name!r} must be letters, digits and _ (not starting with a digit)."
        )
    return Tool(name, fn)


def tool_schema(tool: Tool, key: str = KEY) -> dict:
    """The JSON schema a chat template lists for `tool` (`{"type": "function", "function": {"name",
    "description", "parameters"}}`), made by transformers' `get_json_schema` from the callable's type hints
    and Google-style docstring, under the tool's own name. A callable it cannot describe is a UserError
    naming `key` and what is missing."""
    # imported here: loading the text protocol's tools needs no transformers
    from transformers.utils import get_json_schema

    fn = tool.fn
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        fn = type(fn).__call__.__get__(fn)  # a callable object: its __call__ carries the hints and the docstring
    try:
        schema = get_json_schema(fn)
    except Exception as err:  # TypeHintParsingException, DocstringParsingException, or a callable it cannot read
        raise UserError(
            f"{key}: environment.protocol chat describes each tool to the model as a JSON schema made from its "
            f"type hints and docstring, and {tool.name!r} has none that works: {err}. Give every argument a type "
            "hint and a line in the `Args:` section of a Google-style docstring (docs/environments.md, Chat models)."
        ) from None
    schema["function"]["name"] = tool.name
    schema["function"].pop("return", None)  # the return type: chat templates ignore it, prompts are shorter without
    return schema


def _parse_spec(spec: str | Mapping, key: str) -> tuple[str | None, str, Any]:
    """(name or None, function string, corpus or None), with every shape error named."""
    if isinstance(spec, str):
        name, function, corpus = None, spec, None
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(SPEC_KEYS), key=str)
        if unknown:
            raise UserError(
                f"{key}: unknown key(s) {', '.join(map(repr, unknown))}; a tool takes {', '.join(SPEC_KEYS)}."
            )
        if "function" not in spec:
            raise UserError(
                f"{key}: {dict(spec)!r} has no `function` "
                "(builtin:calculator, builtin:lookup or package.module:callable)."
            )
        name, function, corpus = spec.get("name"), spec["function"], spec.get("corpus")
    else:
        raise UserError(
            f"{key}: {spec!r} must be a string (builtin:calculator, package.module:callable) or a mapping."
        )
    module, _, attr = function.partition(":") if isinstance(function, str) else ("", "", "")
    if not (module and attr):
        raise UserError(
            f"{key}: {function!r} must be builtin:calculator, builtin:lookup or package.module:callable."
        )
    return name, function, corpus


def _builtin(name: str, corpus: Any, key: str) -> Callable[[str], str]:
    if name not in BUILTIN_TOOLS:
        choices = ", ".join("builtin:" + n for n in BUILTIN_TOOLS)
        raise UserError(f"{key}: unknown built-in tool 'builtin:{name}'; choose one of: {choices}.")
    if name == "calculator":
        if corpus is not None:
            raise UserError(f"{key}: `corpus` is only for builtin:lookup, not builtin:calculator.")
        return calculate
    if corpus is None:
        raise UserError(
            f"{key}: builtin:lookup needs a corpus: {{function: builtin:lookup, corpus: path/to/passages.txt}}."
        )
    if isinstance(corpus, str | Path):
        if not Path(corpus).is_file():
            raise UserError(
                f"{key}.corpus: {str(corpus)!r} is not a file; give a text file with one passage per line."
            )
    elif not (isinstance(corpus, list) and all(isinstance(p, str) for p in corpus)):
        raise UserError(
            f"{key}.corpus: must be a path to a text file or a list of passages, got {corpus!r:.100}."
        )
    try:
        return lookup_tool(corpus)
    except (ValueError, UnicodeDecodeError) as err:  # no passages, or not UTF-8 text
        where = f" {str(corpus)!r}:" if isinstance(corpus, str | Path) else ""
        raise UserError(f"{key}.corpus:{where} {err}.") from None


def _import(function: str, key: str) -> Callable:
    # the rewards' loader imports exactly the named module; imported here so that loading the calculator
    # alone does not import torch (rewards/function.py does)
    from rlhf_cli.rewards.function import import_callable

    try:
        return import_callable(function, key)
    except UserError:
        raise
    except Exception as err:  # the module imports but fails on the way (SyntaxError, a raise at top level)
        message = f"{key}: importing {function!r} raised {type(err).__name__}: {err}"
        raise UserError(message, user_frames(err)) from None


# ---------------------------------------------------------------- running a turn's calls


@dataclass
class ToolResult:
    text: str  # what the model reads next
    status: str  # one of STATUSES
    seconds: float  # wall time of the call; the timeout for a call that hung


def status_counts(results: Sequence[ToolResult]) -> dict[str, int]:
    """How many results have each status, every status present (a metric's keys never come and go)."""
    counts = dict.fromkeys(STATUSES, 0)
    for result in results:
        counts[result.status] += 1
    return counts


class ToolRunner:
    """Runs a turn's tool calls concurrently, each in a daemon thread under `timeout_s`.

    At most `max_workers` calls run at once. A call that outlives its timeout is reported as "timeout"
    and abandoned: Python cannot kill a thread, so it keeps running in the background until the tool
    returns (its answer is then dropped). Being a daemon thread, it never blocks the next batch or the
    interpreter's exit, but it does hold whatever the tool holds; a tool that can hang forever should
    bound itself.
    """

    def __init__(
        self, tools: Mapping[str, Tool], timeout_s: float, max_response_chars: int, max_workers: int = 8
    ):
        if timeout_s <= 0 or max_response_chars <= 0 or max_workers < 1:
            raise ValueError("timeout_s and max_response_chars must be positive and max_workers at least 1")
        self.tools, self.timeout_s = dict(tools), timeout_s
        self.max_response_chars, self.max_workers = max_response_chars, max_workers

    def run(self, calls: Sequence[tuple[str, str | Mapping[str, Any]]]) -> list[ToolResult]:
        """The result of each (tool name, argument) call, in the order of `calls`. An argument is the
        string the model wrote (text protocol: `fn(argument)`) or a mapping of arguments (chat protocol:
        `fn(**arguments)`; arguments the tool does not take are a TypeError, answered as an error)."""
        results: list[ToolResult | None] = [None] * len(calls)
        waiting = []
        for index, (name, argument) in enumerate(calls):
            if name in self.tools:
                waiting.append((index, self.tools[name], argument))
            else:
                known = ", ".join(self.tools) or "none"
                text = f"error: unknown tool {name!r}; known tools: {known}"
                results[index] = ToolResult(text, "unknown_tool", 0.0)
        done: queue.Queue = queue.Queue()  # (index, result) from the workers; one queue per run
        running: dict[int, tuple[str, float]] = {}  # index -> (tool name, deadline)
        waiting.reverse()  # pop() from the end takes calls in order
        while waiting or running:
            while waiting and len(running) < self.max_workers:
                index, tool, argument = waiting.pop()
                running[index] = (tool.name, time.monotonic() + self.timeout_s)
                worker = threading.Thread(
                    target=self._call, args=(tool, argument, index, done), name=f"tool-{tool.name}", daemon=True
                )
                worker.start()
            wait = min(deadline for _, deadline in running.values()) - time.monotonic()
            for index, result in _answers(done, wait):
                if running.pop(index, None) is not None:
                    results[index] = result
            now = time.monotonic()
            for index, (name, deadline) in list(running.items()):
                if now >= deadline:  # abandoned: its thread may finish later, into a queue nobody reads
                    del running[index]
                    text = f"error: tool {name} timed out after {self.timeout_s:g} s"
                    results[index] = ToolResult(text, "timeout", self.timeout_s)
        return results  # every slot is filled: unknown at once, the others on answer or deadline

    def _call(self, tool: Tool, argument: str | Mapping[str, Any], index: int, done: queue.Queue) -> None:
        """In a worker thread: call the tool and post its ToolResult. Catches everything, SystemExit
        included, since an exception in a thread would only be printed and the call never answered."""
        start = time.perf_counter()
        try:
            value = tool.fn(**argument) if isinstance(argument, Mapping) else tool.fn(argument)
            text = value if isinstance(value, str) else str(value)
            status = "ok"
        except BaseException as err:  # a tool's failure is an answer to the model, whatever it is
            text, status = error_text(err), "error"
        if len(text) > self.max_response_chars:
            text = text[: self.max_response_chars]
            status = "truncated" if status == "ok" else status
        done.put((index, ToolResult(text, status, time.perf_counter() - start)))


def _answers(done: queue.Queue, wait: float) -> list[tuple[int, ToolResult]]:
    """What the workers posted within `wait` seconds: the first answer, then all that are already
    there, so that an answer posted just before a deadline is never counted as a timeout."""
    answers = []
    try:
        answers.append(done.get(timeout=max(0.0, wait)))
        while True:
            answers.append(done.get_nowait())
    except queue.Empty:
        return answers


def error_text(err: BaseException) -> str:
    """One short line: "error: <message>" for a ToolError (written for the model), else
    "error: <ExceptionType>: <message>"."""
    try:
        message = " ".join(str(err).split())
    except Exception:  # an exception whose __str__ fails must still yield an answer
        message = "(message unprintable)"
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 3] + "..."
    if isinstance(err, ToolError):
        return f"error: {message}"
    return f"error: {type(err).__name__}: {message}" if message else f"error: {type(err).__name__}"
