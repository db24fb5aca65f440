"""Tools: loading `environment.tools` (built-ins, user modules, every mistake as a UserError) and the
ToolRunner (order, concurrency, timeouts that do not wait, errors, truncation, unknown names)."""

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from rlhf_cli.environments.calculator import calculate
from rlhf_cli.environments.errors import ToolError
from rlhf_cli.environments.tools import Tool, ToolResult, ToolRunner, load_tool, load_tools, status_counts
from rlhf_cli.errors import UserError

USER_MODULE = '''
"""Tools a user wrote."""

def shout(text):
    """Upper-case the text.

    More detail that is not part of the description.
    """
    return text.upper()


def word_count(text):
    return len(text.split())


NOT_CALLABLE = 3


class Namespace:
    @staticmethod
    def reverse(text):
        return text[::-1]
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """`env_user_tools`, a module in tmp_path on sys.path, forgotten afterwards so no test sees another's."""
    (tmp_path / "env_user_tools.py").write_text(USER_MODULE)
    (tmp_path / "env_broken_tools.py").write_text("raise RuntimeError('no config found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "env_user_tools"
    for name in ("env_user_tools", "env_broken_tools"):
        sys.modules.pop(name, None)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "facts.txt"
    path.write_text("Paris is the capital of France.\nBerlin is the capital of Germany.\n")
    return path


# ---------------------------------------------------------------- loading


def test_builtin_tools_from_strings_and_mappings(corpus):
    tools = load_tools(["builtin:calculator", {"function": "builtin:lookup", "corpus": str(corpus)}])
    assert list(tools) == ["calculator", "lookup"]
    assert tools["calculator"].fn is calculate
    assert tools["calculator"].fn("6 * 7") == "42"
    assert tools["calculator"].description.startswith("Evaluate an arithmetic expression exactly")
    assert "\n" not in tools["calculator"].description  # the first paragraph, on one line
    assert tools["lookup"].fn("capital of germany") == "Berlin is the capital of Germany."
    assert tools["lookup"].description.startswith("Look up a query in the corpus")


def test_lookup_corpus_as_a_list_and_names_given_in_mappings():
    tools = load_tools([
        {"name": "calc", "function": "builtin:calculator"},
        {"name": "facts", "function": "builtin:lookup", "corpus": ["The sky is blue.", "Grass is green."]},
    ])
    assert list(tools) == ["calc", "facts"]
    assert tools["facts"].fn("what colour is grass") == "Grass is green."


def test_user_callables_by_module_path(user_module):
    tools = load_tools([
        f"{user_module}:shout",
        {"name": "count", "function": f"{user_module}:word_count"},
        f"{user_module}:Namespace.reverse",
    ])
    assert list(tools) == ["shout", "count", "reverse"]  # __name__ unless a name is given
    assert tools["shout"].fn("hi") == "HI"
    assert tools["shout"].description == "Upper-case the text."
    assert tools["count"].description == ""  # no docstring


def test_tool_made_in_python_takes_its_description_from_the_docstring():
    def double(text: str) -> str:
        """Write the text twice.

        Details."""
        return text * 2

    assert Tool("double", double).description == "Write the text twice."
    assert Tool("double", double, "mine").description == "mine"


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ("builtin:calculator", "environment.tools: must be a list of tools"),
        (["builtin:calculator", "builtin:calculator"], "environment.tools[1]: a second tool named 'calculator'"),
        (["builtin:python"], "environment.tools[0]: unknown built-in tool 'builtin:python'; choose one of: "
                             "builtin:calculator, builtin:lookup."),
        (["calculator"], "environment.tools[0]: 'calculator' must be builtin:calculator, builtin:lookup or "
                         "package.module:callable."),
        (["env_no_such_module:tool"], "environment.tools[0]: cannot import module 'env_no_such_module'"),
        (["env_user_tools:missing"], "environment.tools[0]: module 'env_user_tools' has no attribute 'missing'."),
        (["env_user_tools:NOT_CALLABLE"], "environment.tools[0]: 'env_user_tools:NOT_CALLABLE' is not callable."),
        (["env_broken_tools:tool"], "environment.tools[0]: importing 'env_broken_tools:tool' raised "
                                    "RuntimeError: no config found"),
        ([3], "environment.tools[0]: 3 must be a string"),
        ([{"name": "x"}], "environment.tools[0]: {'name': 'x'} has no `function`"),
        ([{"function": "builtin:calculator", "timeout": 3}], "environment.tools[0]: unknown key(s) 'timeout'"),
        ([{"function": 7}], "environment.tools[0]: 7 must be builtin:calculator"),
        (["builtin:lookup"], "environment.tools[0]: builtin:lookup needs a corpus"),
        ([{"function": "builtin:lookup", "corpus": "no/such/file.txt"}],
         "environment.tools[0].corpus: 'no/such/file.txt' is not a file"),
        ([{"function": "builtin:lookup", "corpus": [1, 2]}],
         "environment.tools[0].corpus: must be a path to a text file or a list of passages"),
        ([{"function": "builtin:lookup", "corpus": []}],
         "environment.tools[0].corpus: a lookup corpus needs at least one non-empty passage."),
        ([{"function": "builtin:lookup", "corpus": "empty.txt"}],
         "environment.tools[0].corpus: 'empty.txt': a lookup corpus needs at least one non-empty passage."),
        ([{"function": "builtin:calculator", "corpus": "x.txt"}],
         "environment.tools[0]: `corpus` is only for builtin:lookup"),
        ([{"function": "env_user_tools:shout", "corpus": "x.txt"}],
         "environment.tools[0]: `corpus` is only for builtin:lookup"),
        ([{"name": "two words", "function": "builtin:calculator"}],
         "environment.tools[0]: tool name 'two words' must be letters, digits and _"),
    ],
)
def test_config_mistakes_are_user_errors_naming_the_key_and_spec(user_module, tmp_path, monkeypatch, specs, message):
    monkeypatch.chdir(tmp_path)  # a corpus path is relative to the working directory
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError) as caught:
        load_tools(specs)
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_module_that_fails_to_import_points_at_the_users_code(user_module):
    with pytest.raises(UserError) as caught:
        load_tool("env_broken_tools:tool")
    assert "env_broken_tools.py" in caught.value.detail


# ---------------------------------------------------------------- running


def runner(*tools: Tool, timeout_s: float = 2.0, max_response_chars: int = 100, max_workers: int = 8) -> ToolRunner:
    return ToolRunner({t.name: t for t in tools}, timeout_s, max_response_chars, max_workers)


def sleeper(seconds: float):
    def sleep(argument: str) -> str:
        time.sleep(seconds)
        return f"slept {argument}"

    return sleep


def test_results_come_back_in_call_order():
    calls = [("calculator", "1 + 1"), ("echo", "a"), ("slow", "b"), ("calculator", "2 * 3"), ("echo", "c")]
    results = runner(Tool("calculator", calculate), Tool("echo", str), Tool("slow", sleeper(0.1))).run(calls)
    assert [r.text for r in results] == ["2", "a", "slept b", "6", "c"]
    assert {r.status for r in results} == {"ok"}
    assert results[2].seconds >= 0.1 > results[0].seconds


def test_calls_run_concurrently():
    tools = runner(Tool("slow", sleeper(0.3)))
    start = time.perf_counter()
    results = tools.run([("slow", "1"), ("slow", "2")])
    assert time.perf_counter() - start < 0.55
    assert [r.text for r in results] == ["slept 1", "slept 2"]


def test_at_most_max_workers_calls_run_at_once():
    lock, running, most = threading.Lock(), [0], [0]

    def count(argument: str) -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return argument

    results = runner(Tool("count", count), max_workers=2).run([("count", str(i)) for i in range(5)])
    assert [r.text for r in results] == ["0", "1", "2", "3", "4"]
    assert most[0] == 2


def test_a_hung_tool_times_out_without_being_waited_for():
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def hang(argument: str) -> str:
        started.set()
        release.wait(10)
        finished.set()
        return "too late"

    tools = runner(Tool("hang", hang), Tool("echo", str), timeout_s=0.2)
    start = time.perf_counter()
    results = tools.run([("hang", "x"), ("echo", "quick")])
    elapsed = time.perf_counter() - start
    try:
        assert 0.2 <= elapsed < 1.0
        assert results[0] == ToolResult("error: tool hang timed out after 0.2 s", "timeout", 0.2)
        assert results[1].text == "quick" and results[1].status == "ok"
        assert started.is_set() and not finished.is_set()  # the tool is still running in the background
        worker = next(t for t in threading.enumerate() if t.name == "tool-hang")
        assert worker.daemon  # so it cannot hold up the interpreter's exit
        assert tools.run([("echo", "next batch")])[0].text == "next batch"  # nor the next batch
    finally:
        release.set()
    assert finished.wait(5)


def test_a_hung_tool_does_not_block_interpreter_exit():
    script = textwrap.dedent("""
        import time
        from rlhf_cli.environments.tools import Tool, ToolRunner
        runner = ToolRunner({"hang": Tool("hang", lambda s: time.sleep(60))}, 0.1, 100)
        print(runner.run([("hang", "")])[0].status)
    """)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "timeout"
    assert time.perf_counter() - start < 10


def test_a_raising_tool_is_an_error_answer():
    def fail(argument: str) -> str:
        raise ValueError("bad\n   input")

    def leave(argument: str) -> str:
        raise SystemExit(3)

    def long_failure(argument: str) -> str:
        raise RuntimeError("x" * 1000)

    tools = runner(Tool("fail", fail), Tool("leave", leave), Tool("long", long_failure), Tool("calculator", calculate))
    results = tools.run([("fail", ""), ("leave", ""), ("long", ""), ("calculator", "1 / 0"), ("calculator", "2 +")])
    assert [r.text for r in results[:2]] == ["error: ValueError: bad input", "error: SystemExit: 3"]
    assert results[2].text == "error: RuntimeError: " + "x" * (100 - len("error: RuntimeError: "))
    # a ToolError is written for the model: no exception type
    assert [r.text for r in results[3:]] == ["error: division by zero", "error: unexpected end of expression"]
    assert {r.status for r in results} == {"error"}  # a cut error message stays an error


def test_tool_error_can_be_raised_by_user_tools():
    def picky(argument: str) -> str:
        raise ToolError("argument must be a date like 2024-01-31")

    assert runner(Tool("picky", picky)).run([("picky", "x")])[0].text == "error: argument must be a date like 2024-01-31"


def test_non_string_answers_are_converted_and_long_ones_truncated():
    tools = runner(Tool("number", lambda s: 42), Tool("none", lambda s: None), Tool("echo", str), max_response_chars=10)
    results = tools.run([("number", ""), ("none", ""), ("echo", "x" * 10), ("echo", "y" * 11)])
    assert [(r.text, r.status) for r in results] == [
        ("42", "ok"), ("None", "ok"), ("x" * 10, "ok"), ("y" * 10, "truncated"),
    ]


def test_an_unknown_tool_names_the_known_ones():
    tools = runner(Tool("calculator", calculate), Tool("lookup", str))
    results = tools.run([("foo", "1"), ("calculator", "1")])
    assert results[0] == ToolResult("error: unknown tool 'foo'; known tools: calculator, lookup", "unknown_tool", 0.0)
    assert results[1].text == "1"
    assert runner().run([("foo", "")])[0].text == "error: unknown tool 'foo'; known tools: none"


def test_status_counts_has_every_status():
    results = runner(Tool("echo", str), max_response_chars=3).run([("echo", "a"), ("echo", "abcd"), ("nope", "")])
    assert status_counts(results) == {"ok": 1, "error": 0, "timeout": 0, "truncated": 1, "unknown_tool": 1}
    assert runner().run([]) == []


def test_bad_runner_settings_are_refused():
    for settings in [(0, 10, 1), (1, 0, 1), (1, 10, 0)]:
        with pytest.raises(ValueError):
            ToolRunner({}, *settings)
