"""The built-in tool-use world: word problems (builtin:tool-arithmetic), demonstrations of the calculator
protocol (builtin:tool-arithmetic-demos) and the gold checker builtin:tool-answer."""

import random
import re

import pytest

from rlhf_cli.builtin import tool_world
from rlhf_cli.builtin.datasets import DEFAULT_SIZES, is_held_out, load_builtin_dataset
from rlhf_cli.builtin.tokenizer import builtin_tokenizer
from rlhf_cli.builtin.tool_world import (
    MISTAKES,
    TEMPLATES,
    demonstration,
    final_answer,
    problem_row,
    tool_answer_reward,
)
from rlhf_cli.config.schema import SFTDataConfig
from rlhf_cli.data.loading import load_dataset_dict
from rlhf_cli.data.sft_format import IGNORE_INDEX, detect_format, tokenize_example
from rlhf_cli.environments.calculator import calculate
from rlhf_cli.environments.tools import Tool, ToolRunner
from rlhf_cli.errors import UserError
from rlhf_cli.rewards.function import BUILTIN_FUNCTIONS, FunctionReward

# Token bounds with the built-in tokenizer (the default datasets reach 58, 117 and 171; 112 without a
# mistake): configs can set SFT max_length 192, and an RL response budget of 128 covers every demo.
MAX_PROMPT_TOKENS, MAX_COMPLETION_TOKENS, MAX_EPISODE_TOKENS = 64, 128, 192
# One episode after the prompt: one or two " <call>...</call><result>...</result>" turns, then the answer.
TURN = re.compile(r" <call>calculator ([^<]*)</call><result>([^<]*)</result>")
EPISODE = re.compile(rf"(?:{TURN.pattern}){{1,2}} The answer is (-?\d+)\.")
EXPRESSION = re.compile(r"[\d()+*-]+")


@pytest.fixture(scope="module")
def problems():
    return load_builtin_dataset("tool-arithmetic", seed=0)


@pytest.fixture(scope="module")
def demos():
    return load_builtin_dataset("tool-arithmetic-demos", seed=0)


def test_default_sizes_and_columns(problems, demos):
    assert DEFAULT_SIZES["tool-arithmetic"] == DEFAULT_SIZES["tool-arithmetic-demos"] == (4000, 200)
    for data, columns in (
        (problems, ["prompt", "answer", "expression"]),
        (demos, ["prompt", "completion", "answer", "expression", "mistake"]),
    ):
        assert (data["train"].num_rows, data["test"].num_rows) == (4000, 200)
        assert data["train"].column_names == data["test"].column_names == columns


def test_same_seed_same_rows_other_seed_other_rows_test_independent_of_train_size():
    for name in ("tool-arithmetic", "tool-arithmetic-demos"):
        a = load_builtin_dataset(name, seed=3, num_train=50, num_test=20)
        b = load_builtin_dataset(name, seed=3, num_train=50, num_test=20)
        c = load_builtin_dataset(name, seed=4, num_train=50, num_test=20)
        d = load_builtin_dataset(name, seed=3, num_train=300, num_test=20)
        for split in ("train", "test"):
            assert a[split].to_dict() == b[split].to_dict() != c[split].to_dict()
        assert a["test"].to_dict() == d["test"].to_dict()


def test_answers_are_the_calculators_value_of_the_expression(problems):
    for split in ("train", "test"):
        for row in problems[split]:
            assert EXPRESSION.fullmatch(row["expression"]), row
            assert row["answer"] == calculate(row["expression"]) and int(row["answer"]) > 0
            # the story gives the two-digit numbers in the order the expression uses them
            numbers = re.findall(r"\d+", row["expression"])
            assert re.findall(r"\d+", row["prompt"]) == numbers and all(len(n) == 2 for n in numbers)
            assert row["prompt"].endswith(tool_world.ANSWER_CUE) and row["prompt"].isascii()
            assert len(row["prompt"].split()) < 40


def test_every_template_is_used_and_its_expression_has_the_templates_shape(problems):
    shapes = {re.sub(r"\d+", "n", shape.format(a=1, b=1, c=1, d=1)) for shape, _, _ in TEMPLATES}
    used = {re.sub(r"\d+", "n", e) for e in problems["train"]["expression"]}
    assert used == shapes and len(shapes) == len(TEMPLATES) == 8


def test_problem_row_fills_a_template():
    shape, text, _ = TEMPLATES[0]
    words = tool_world._words(random.Random(0)) | {"name": "Ann", "he": "she", "He": "She"}
    words |= {"items": "apples", "containers": "boxes", "loses": "gives away"}
    assert problem_row(shape, text, [23, 17, 9], words) == {
        "prompt": "Ann has 23 boxes of 17 apples. She gives away 9 apples. "
        "How many apples does she have now?\nAnswer:",
        "answer": "382",
        "expression": "23*17-9",
    }


def test_held_out_problems_are_never_in_train(problems, demos):
    test = set(problems["test"]["expression"])
    for data in (problems, demos):
        train = set(data["train"]["expression"])
        assert not train & test and not train & set(data["test"]["expression"])
        assert not set(data["train"]["prompt"]) & set(data["test"]["prompt"])
        for row in data["test"]:
            assert is_held_out(row["expression"]) and is_held_out(row["prompt"])
        for row in data["train"]:
            assert not is_held_out(row["expression"]) and not is_held_out(row["prompt"])
    assert len(test) == problems["test"].num_rows  # each held-out problem once


def test_demos_follow_the_protocol_with_the_calculators_real_results(demos):
    for split in ("train", "test"):
        for row in demos[split]:
            if row["mistake"] == "no_tool":  # the answer straight away, right, without a call
                assert row["completion"] == f" The answer is {row['answer']}."
                continue
            assert EPISODE.fullmatch(row["completion"]), row["completion"]
            turns = TURN.findall(row["completion"])
            assert turns[-1] == (row["expression"], row["answer"])  # the last call is right
            assert row["completion"].endswith(f" The answer is {row['answer']}.")
            assert len(turns) == (2 if row["mistake"] else 1)
            if row["mistake"]:
                argument, result = turns[0]
                assert argument == MISTAKES[row["mistake"]](row["expression"])
                assert result.startswith("error: ") and result == tool_world.tool_output(argument)


def test_demo_results_are_exactly_what_the_tool_runner_returns(demos):
    """The environment's own runner, given each call of the first demos, answers with the same text."""
    calls = [
        call for completion in demos["train"]["completion"][:300] for call, _ in TURN.findall(completion)
    ]
    expected = [
        result for completion in demos["train"]["completion"][:300] for _, result in TURN.findall(completion)
    ]
    runner = ToolRunner({"calculator": Tool("calculator", calculate)}, timeout_s=10, max_response_chars=200)
    results = runner.run([("calculator", call) for call in calls])
    assert [result.text for result in results] == expected
    assert any(result.status == "error" for result in results)


def shares(kinds: list[str]) -> tuple[float, float]:
    """(share of demos answered without the calculator, share of the others that recover from a failed call)."""
    called = [kind for kind in kinds if kind != "no_tool"]
    return 1 - len(called) / len(kinds), sum(bool(kind) for kind in called) / len(called)


def test_a_quarter_answer_without_the_calculator_and_fifteen_percent_of_the_rest_recover(demos):
    kinds = demos["train"]["mistake"]
    no_tool, recovered = shares(kinds)
    assert 0.22 < no_tool < 0.28 and 0.11 < recovered < 0.19  # NO_TOOL_RATE 0.25, MISTAKE_RATE 0.15 of 4,000
    assert set(kinds) == {"", "no_tool", *MISTAKES}


def test_a_recovered_mistake_reads_the_calculators_error():
    row = {"prompt": "p", "answer": "382", "expression": "23*17-9"}
    rng = random.Random(0)
    episodes = {}
    while len(episodes) < len(MISTAKES) + 2:  # every kind, no mistake and no call
        demo = demonstration(rng, row)
        episodes[demo["mistake"]] = demo["completion"]
    assert episodes["cut"] == (
        " <call>calculator 23*17-</call><result>error: unexpected end of expression</result>"
        " <call>calculator 23*17-9</call><result>382</result> The answer is 382."
    )
    assert "<result>error: unexpected character 'x' at position 2</result>" in episodes["x"]
    assert "<result>error: unexpected character '=' at position 7</result>" in episodes["equals"]
    assert "<result>error: missing ')' for the '(' at position 0</result>" in episodes["paren"]
    assert episodes[""] == " <call>calculator 23*17-9</call><result>382</result> The answer is 382."
    assert episodes["no_tool"] == " The answer is 382."


def test_token_lengths_with_the_builtin_tokenizer(demos):
    tokenizer = builtin_tokenizer()
    for split in ("train", "test"):
        rows = demos[split].to_dict()
        prompts = tokenizer(rows["prompt"])["input_ids"]
        completions = tokenizer(rows["completion"])["input_ids"]
        for prompt, completion, text in zip(prompts, completions, rows["completion"], strict=True):
            assert len(prompt) <= MAX_PROMPT_TOKENS
            assert len(completion) + 1 <= MAX_COMPLETION_TOKENS  # + the eos
            assert len(prompt) + len(completion) + 1 <= MAX_EPISODE_TOKENS
            assert tokenizer.decode(completion) == text


def test_demos_are_sft_prompt_completion_data_that_the_checker_scores_right(demos):
    tokenizer = builtin_tokenizer()
    rows = demos["train"].select(range(50))
    cfg = SFTDataConfig(dataset_name="builtin:tool-arithmetic-demos")
    assert detect_format(rows.column_names, cfg) == "prompt-completion"
    for row in rows:
        out = tokenize_example(row, tokenizer, "prompt-completion", cfg)
        trained = [
            i for i, label in zip(out["input_ids"], out["labels"], strict=True) if label != IGNORE_INDEX
        ]
        assert trained[-1] == tokenizer.eos_token_id
        response = tokenizer.decode(trained, skip_special_tokens=True)
        assert response == row["completion"]
        assert tool_answer_reward([row["prompt"]], [response], answer=[row["answer"]]) == [1.0]


def test_loads_through_the_dataset_loader_by_builtin_name():
    data = load_dataset_dict("builtin:tool-arithmetic", world_seed=3)
    assert data["train"].to_dict() == load_builtin_dataset("tool-arithmetic", seed=3)["train"].to_dict()
    demos = load_dataset_dict("builtin:tool-arithmetic-demos", world_seed=0)
    assert demos["test"].num_rows == 200


@pytest.mark.parametrize(
    ("response", "answer", "score"),
    [
        (" <call>calculator 23*17-9</call><result>382</result> The answer is 382.", "382", 1.0),
        (" <call>calculator 23*17-9</call><result>382</result>", "382", 0.0),  # only in the result
        (" <call>calculator 382</call>", "382", 0.0),  # only in a call
        (" <call>calculator 382", "382", 0.0),  # in a call cut off by the length budget
        (" The answer is 382.", "382", 1.0),  # no tool call: the "without tools" baseline
        (" 382", "382", 1.0),
        (" The answer is 383.", "382", 0.0),  # wrong
        (" The answer is 38.", "382", 0.0),
        (" The answer is 382, no, 383.", "382", 0.0),  # the last number counts
        (" 23*17-9 is 382", "382", 1.0),
        (" The answer is 382.0", "382", 1.0),  # the same value
        (
            " The answer is 382. <call>calculator 1+1</call><result>2</result>",
            "382",
            0.0,
        ),  # after the last result
        (" The answer is 382.<call>calculator 5", "382", 1.0),  # an unclosed call at the end is no answer
        (" 38<call>calculator 2</call>2", "382", 0.0),  # a call between digits splits them
        (" <call>calculator 1-383</call><result>-382</result> The answer is -382.", "-382", 1.0),  # negative
        (" The answer is 382.", "-382", 0.0),  # sign matters
        (" The answer is -382.", "382", 0.0),
        (
            " <call>calculator 2-</call><result>error: unexpected end of expression</result> It is 7.",
            "7",
            1.0,
        ),
        ("", "382", 0.0),
        (" I do not know.", "382", 0.0),
    ],
)
def test_checker_judges_the_final_answer(response, answer, score):
    assert tool_answer_reward(["p"], [response], answer=[answer]) == [score]


def test_final_answer():
    assert final_answer("<result>5</result> so 12 then -3.") == -3
    assert final_answer("<call>calculator 4</call><result>4</result>") is None


def test_checker_ignores_episodes_and_other_columns_and_takes_numeric_answers():
    scores = tool_answer_reward(
        ["a", "b"], [" 4", " 5"], answer=[4, "6"], expression=["x", "y"], episodes=[{}, {}]
    )
    assert scores == [1.0, 0.0]


def test_checker_errors_name_the_problem():
    with pytest.raises(UserError, match="'answer'.*other columns are: expression"):
        tool_answer_reward(["p"], [" 1"], expression=["1"])
    with pytest.raises(UserError, match="must hold numbers; row 1 of the batch has 'two'"):
        tool_answer_reward(["p", "q"], [" 1", " 2"], answer=["1", "two"])
    with pytest.raises(ValueError):
        tool_answer_reward(["p"], [], answer=[])
    with pytest.raises(ValueError):
        tool_answer_reward(["p"], [" 1"], answer=["1", "2"])


def test_registered_as_builtin_tool_answer_and_scores_the_demos(demos):
    assert "tool-answer" in BUILTIN_FUNCTIONS
    rows = demos["test"].to_dict()
    reward = FunctionReward("builtin:tool-answer")
    columns = {"answer": rows["answer"], "expression": rows["expression"]}
    assert reward(rows["prompt"], rows["completion"], columns).tolist() == [1.0] * len(rows["prompt"])
    wrong = [completion.replace("The answer is ", "The answer is 1") for completion in rows["completion"]]
    assert reward(rows["prompt"], wrong, columns).sum() == 0


# ---------------------------------------------------------------- the chat versions

# Token bounds of the chat demos with the built-in tokenizer and template, the calculator's schema in the
# system turn (the default datasets reach 284, 231 (112 without a mistake), 508 and 69): prompts fit
# data.max_prompt_length 288, an episode environment.max_length 232, a turn generation.response_length 72,
# and a whole SFT example the built-in models' 512 positions.
MAX_CHAT_PROMPT_TOKENS, MAX_CHAT_EPISODE_TOKENS, MAX_CHAT_EXAMPLE_TOKENS, MAX_CHAT_TURN_TOKENS = 288, 232, 512, 72


@pytest.fixture(scope="module")
def chat_problems():
    return load_builtin_dataset("tool-arithmetic-chat", seed=0)


@pytest.fixture(scope="module")
def chat_demos():
    return load_builtin_dataset("tool-arithmetic-chat-demos", seed=0)


def test_chat_versions_sizes_columns_and_determinism(chat_problems, chat_demos):
    assert DEFAULT_SIZES["tool-arithmetic-chat"] == DEFAULT_SIZES["tool-arithmetic-chat-demos"] == (4000, 200)
    for data, columns in ((chat_problems, ["prompt", "answer", "expression"]),
                          (chat_demos, ["messages", "answer", "expression", "mistake", "tools"])):
        assert (data["train"].num_rows, data["test"].num_rows) == (4000, 200)
        assert data["train"].column_names == data["test"].column_names == columns
    for name in ("tool-arithmetic-chat", "tool-arithmetic-chat-demos"):
        a = load_builtin_dataset(name, seed=3, num_train=50, num_test=20)
        c = load_builtin_dataset(name, seed=4, num_train=50, num_test=20)
        d = load_builtin_dataset(name, seed=3, num_train=300, num_test=20)
        assert a["train"].to_dict() == load_builtin_dataset(name, seed=3, num_train=50, num_test=20)["train"].to_dict()
        assert a["train"].to_dict() != c["train"].to_dict() and a["test"].to_dict() == d["test"].to_dict()


def test_chat_problems_are_one_user_message_with_the_answer(chat_problems):
    for row in chat_problems["train"].select(range(300)):
        (message,) = row["prompt"]
        assert message["role"] == "user" and not message["content"].endswith(tool_world.ANSWER_CUE)
        assert message["content"].endswith("?") and row["answer"] == calculate(row["expression"])
        assert re.findall(r"\d+", message["content"]) == re.findall(r"\d+", row["expression"])


def test_chat_held_out_problems_are_never_in_any_train_split(problems, demos, chat_problems, chat_demos):
    """The expression's side splits all four datasets alike: no test problem of one is a train problem
    of another, in any wording; the user's question is on its split's side too."""
    trains = [set(data["train"]["expression"]) for data in (problems, demos, chat_problems, chat_demos)]
    for data in (problems, demos, chat_problems, chat_demos):
        assert not set().union(*trains) & set(data["test"]["expression"])
    for data, question in ((chat_problems, lambda row: row["prompt"][0]["content"]),
                           (chat_demos, lambda row: row["messages"][0]["content"])):
        for row in data["test"]:
            assert is_held_out(row["expression"]) and is_held_out(question(row))
        for row in data["train"].select(range(500)):
            assert not is_held_out(row["expression"]) and not is_held_out(question(row))


def test_chat_demos_call_the_calculator_and_read_its_real_answers(chat_demos):
    runner = ToolRunner({"calculator": Tool("calculator", calculate)}, timeout_s=10, max_response_chars=200)
    schema = tool_world.calculator_schema()
    for split in ("train", "test"):
        for row in chat_demos[split].select(range(min(300, chat_demos[split].num_rows))):
            messages = row["messages"]
            assert row["tools"] == [schema]
            roles = [m["role"] for m in messages]
            if row["mistake"] == "no_tool":
                assert roles == ["user", "assistant"] and messages[-1]["content"] == f"The answer is {row['answer']}."
                continue
            calls = 2 if row["mistake"] else 1
            assert roles == ["user"] + ["assistant", "tool"] * calls + ["assistant"]
            arguments = [m["tool_calls"][0]["function"]["arguments"] for m in messages if m["tool_calls"]]
            assert arguments[-1] == {"expression": row["expression"]}  # the last call is right
            results = [r.text for r in runner.run([("calculator", a) for a in arguments])]  # as the environment calls it
            assert [m["content"] for m in messages if m["role"] == "tool"] == results
            if row["mistake"]:
                assert arguments[0]["expression"] == MISTAKES[row["mistake"]](row["expression"])
                assert results[0].startswith("error: ")
            assert messages[-1]["content"] == f"The answer is {row['answer']}."
    no_tool, recovered = shares(chat_demos["train"]["mistake"])
    assert 0.22 < no_tool < 0.28 and 0.11 < recovered < 0.19
    assert set(chat_demos["train"]["mistake"]) == {"", "no_tool", *MISTAKES}


def test_chat_demos_are_sft_messages_whose_calls_and_answer_are_trained(chat_demos):
    tokenizer = builtin_tokenizer()
    cfg = SFTDataConfig(dataset_name="builtin:tool-arithmetic-chat-demos", max_length=512)
    rows = chat_demos["train"].select(range(40))
    assert detect_format(rows.column_names, cfg) == "messages"
    for row in rows:
        out = tokenize_example(row, tokenizer, "messages", cfg)
        assert out["num_tokens"] <= MAX_CHAT_EXAMPLE_TOKENS
        text = tokenizer.decode(out["input_ids"])
        assert text.startswith("<|system|>\nYou can call these tools:\n{\"name\": \"calculator\"")  # the tools column
        trained = tokenizer.decode([i for i, label in zip(out["input_ids"], out["labels"], strict=True)
                                    if label != IGNORE_INDEX])
        calls = "".join(
            f'<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{a}"}}}}\n</tool_call><|endoftext|>'
            for a in [m["tool_calls"][0]["function"]["arguments"]["expression"] for m in row["messages"] if m["tool_calls"]])
        assert trained == calls + f"The answer is {row['answer']}.<|endoftext|>"  # never the tool responses


def test_chat_token_lengths_with_the_builtin_tokenizer(chat_demos):
    tokenizer = builtin_tokenizer()
    for split in ("train", "test"):
        for row in chat_demos[split]:
            messages, tools = row["messages"], row["tools"]
            prompt = tokenizer.apply_chat_template(messages[:1], tools=tools, add_generation_prompt=True, tokenize=False)
            whole = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
            prompt_ids, whole_ids = tokenizer(prompt)["input_ids"], tokenizer(whole)["input_ids"]
            assert whole.startswith(prompt) and len(prompt_ids) <= MAX_CHAT_PROMPT_TOKENS
            assert len(whole_ids) - len(prompt_ids) <= MAX_CHAT_EPISODE_TOKENS
            assert len(whole_ids) <= MAX_CHAT_EXAMPLE_TOKENS
            for message in messages:
                if message["role"] == "assistant":
                    turn = tokenizer.apply_chat_template([message], tokenize=False).removeprefix("<|assistant|>\n")
                    assert len(tokenizer(turn)["input_ids"]) <= MAX_CHAT_TURN_TOKENS


def test_the_checker_reads_chat_episodes_by_their_answer():
    from rlhf_cli.environments.rollout import Episode

    text = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "23*17-9"}}\n</tool_call>'
    responses = [text + "\n<tool_response>\n382\n</tool_response>\n\nThe answer is 382.",
                 text + "\n<tool_response>\n382\n</tool_response>\n\nI do not know.",
                 text]  # cut off mid-call: its numbers are no answer
    episodes = [Episode("p", r, answer=a) for r, a in zip(responses, ["The answer is 382.", "I do not know.", text],
                                                           strict=True)]
    assert tool_answer_reward(["p"] * 3, responses, episodes=episodes, answer=["382"] * 3) == [1.0, 0.0, 0.0]
    # without episodes the text decides, from what follows the last tool response of the built-in template
    assert tool_answer_reward(["p"] * 3, responses, answer=["382"] * 3) == [1.0, 0.0, 0.0]
    assert final_answer(text) is None  # a <tool_call> span holds no answer
