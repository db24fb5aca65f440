"""builtin:arithmetic (short sums with exact answers) and its gold checker builtin:exact-answer."""

import re

import pytest

from rlhf_cli.builtin.arithmetic import exact_answer_reward, first_number, problem
from rlhf_cli.builtin.datasets import DEFAULT_SIZES, is_held_out, load_builtin_dataset
from rlhf_cli.builtin.tokenizer import builtin_tokenizer
from rlhf_cli.config.schema import SFTDataConfig
from rlhf_cli.data.sft_format import IGNORE_INDEX, detect_format, tokenize_example
from rlhf_cli.errors import UserError
from rlhf_cli.rewards.function import BUILTIN_FUNCTIONS, FunctionReward

PROMPT = re.compile(r"\d( [+-] \d){1,2} =")


@pytest.fixture(scope="module")
def data():
    return load_builtin_dataset("arithmetic", seed=0)


def test_prompts_are_sums_of_single_digits_and_answers_are_exact(data):
    for split in ("train", "test"):
        rows = data[split]
        assert rows.column_names == ["prompt", "answer", "completion"]
        for prompt, answer, completion in zip(rows["prompt"], rows["answer"], rows["completion"], strict=True):
            assert PROMPT.fullmatch(prompt), prompt
            assert answer == str(eval(prompt.removesuffix(" =")))  # the expression is digits and +/- only
            assert completion == " " + answer  # what the model writes after "=": a space, then the number
        assert len(set(rows["prompt"])) == len(rows["prompt"])


def test_both_tiers_and_negative_answers_appear(data):
    prompts, answers = data["train"]["prompt"], [int(a) for a in data["train"]["answer"]]
    operands = {len(p.split(" ")) // 2 for p in prompts}
    assert operands == {2, 3}
    assert min(answers) < 0 < max(answers)
    # all 178 two-operand train problems come out within the default 2000 rows
    assert sum(len(p.split(" ")) == 4 for p in prompts) == 178


def test_default_sizes_and_test_split_disjoint_and_held_out(data):
    assert (data["train"].num_rows, data["test"].num_rows) == DEFAULT_SIZES["arithmetic"]
    train, test = set(data["train"]["prompt"]), set(data["test"]["prompt"])
    assert not train & test
    assert all(is_held_out(p) for p in test) and not any(is_held_out(p) for p in train)


def test_deterministic_for_a_seed_and_test_rows_independent_of_train_size():
    a = load_builtin_dataset("arithmetic", seed=3, num_train=50, num_test=20)
    b = load_builtin_dataset("arithmetic", seed=3, num_train=50, num_test=20)
    c = load_builtin_dataset("arithmetic", seed=4, num_train=50, num_test=20)
    d = load_builtin_dataset("arithmetic", seed=3, num_train=500, num_test=20)
    for split in ("train", "test"):
        assert a[split].to_dict() == b[split].to_dict() != c[split].to_dict()
    assert a["test"].to_dict() == d["test"].to_dict()


def test_too_many_test_rows_is_a_user_error():
    with pytest.raises(UserError, match="could not make 1000 distinct test rows"):
        load_builtin_dataset("arithmetic", num_train=0, num_test=1000)


def test_prompts_and_answers_round_trip_through_the_builtin_tokenizer_one_token_per_character():
    tokenizer = builtin_tokenizer()
    rows = load_builtin_dataset("arithmetic", num_train=200, num_test=50)
    texts = [p + " " + a for split in rows.values() for p, a in zip(split["prompt"], split["answer"], strict=True)]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) == len(text)  # digits, '+', '-', '=' and the space are single tokens
        assert tokenizer.unk_token_id not in ids


def test_problem_builds_prompt_and_answer():
    assert problem([7, 5], ["+"]) == {"prompt": "7 + 5 =", "answer": "12", "completion": " 12"}
    assert problem([2, 9, 4], ["-", "+"]) == {"prompt": "2 - 9 + 4 =", "answer": "-3", "completion": " -3"}


def test_completion_is_sft_prompt_completion_data_that_the_checker_scores_right():
    """`rlhf sft` with dataset_format prompt-completion trains on " 12" + eos after "7 + 5 =": one token
    per character, the prompt masked, and the decoded completion (eos dropped) scores 1.0."""
    tokenizer = builtin_tokenizer()
    rows = load_builtin_dataset("arithmetic", num_train=20, num_test=0)["train"]
    cfg = SFTDataConfig(dataset_name="builtin:arithmetic", dataset_format="prompt-completion")
    assert detect_format(rows.column_names, cfg) == "prompt-completion"
    assert detect_format(rows.column_names, SFTDataConfig()) == "prompt-completion"  # auto finds it too
    for row in rows:
        out = tokenize_example(row, tokenizer, "prompt-completion", cfg)
        ids, labels = out["input_ids"], out["labels"]
        assert len(ids) == len(row["prompt"]) + len(row["completion"]) + 1  # + the eos
        assert ids[-1] == tokenizer.eos_token_id
        trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
        assert trained == ids[len(row["prompt"]) :]  # the completion and the eos, nothing of the prompt
        response = tokenizer.decode(trained, skip_special_tokens=True)
        assert response == row["completion"]
        assert exact_answer_reward([row["prompt"]], [response], answer=[row["answer"]]) == [1.0]


@pytest.mark.parametrize(
    ("response", "answer", "score"),
    [
        (" 12", "12", 1.0),  # right
        ("12", "12", 1.0),  # no leading space
        ("    12 and then some words", "12", 1.0),  # leading spaces, text after the number
        (" 12.0", "12", 1.0),  # the same value
        (" 13", "12", 0.0),  # wrong
        (" 1", "12", 0.0),  # a prefix of the answer is wrong
        (" 120", "12", 0.0),
        (" twelve", "12", 0.0),  # no number
        ("", "12", 0.0),  # empty
        (" -3", "-3", 1.0),  # negative
        (" 3", "-3", 0.0),  # sign matters
        (" - 3", "-3", 0.0),  # a detached minus is not a sign
        (" -0", "0", 1.0),
        (" 5 + 7 = 12", "12", 0.0),  # the first number counts, not the last
        (" the answer is 12, not 13", "12", 1.0),
    ],
)
def test_checker_scores_the_first_number(response, answer, score):
    assert exact_answer_reward(["7 + 5 ="], [response], answer=[answer]) == [score]


def test_checker_accepts_numeric_answers_and_ignores_other_columns():
    assert exact_answer_reward(["a", "b"], [" 4", " 5"], answer=[4, "6"], label=["x", "y"]) == [1.0, 0.0]


def test_first_number():
    assert first_number("= -3, I think") == -3
    assert first_number("no digits") is None


def test_missing_answer_column_names_the_column():
    with pytest.raises(UserError, match="'answer'.*other columns are: label"):
        exact_answer_reward(["7 + 5 ="], [" 12"], label=["x"])
    with pytest.raises(UserError, match="'answer'.*other columns are: none"):
        exact_answer_reward(["7 + 5 ="], [" 12"])


def test_non_numeric_answer_is_a_user_error():
    with pytest.raises(UserError, match="'answer' must hold numbers; row 1 of the batch has 'twelve'"):
        exact_answer_reward(["a", "b"], [" 1", " 2"], answer=["1", "twelve"])


def test_mismatched_lengths_are_errors():
    with pytest.raises(ValueError):
        exact_answer_reward(["a"], [], answer=[])
    with pytest.raises(ValueError):
        exact_answer_reward(["a"], [" 1"], answer=["1", "2"])


def test_registered_as_a_builtin_reward_function_and_called_with_the_dataset_columns():
    assert "exact-answer" in BUILTIN_FUNCTIONS
    rows = load_builtin_dataset("arithmetic", num_train=4, num_test=0)["train"]
    responses = [" " + rows["answer"][0], " 99", " nothing", " " + rows["answer"][3]]
    scores = FunctionReward("builtin:exact-answer")(rows["prompt"], responses, {"answer": rows["answer"]})
    assert scores.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_missing_column_through_the_reward_source_names_key_and_column():
    reward = FunctionReward("builtin:exact-answer", key="reward.sources[0].function")
    with pytest.raises(UserError, match=r"reward.sources\[0\].function: builtin:exact-answer raised .*'answer'"):
        reward(["7 + 5 ="], [" 12"], {"label": ["x"]})
