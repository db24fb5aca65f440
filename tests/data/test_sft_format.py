"""SFT formatting: labels checked token by token against ids worked out by hand.

The tokenizer here is a byte-level BPE whose ids are the byte values (b"h" -> 104), with one merge
("a" + "b" -> 256) to show the prompt/completion boundary, and eos=257, pad=258, bos=259. So the
expected ids of any ASCII text are `list(b"text")`, checkable by eye.
"""

import pytest
from datasets import Dataset
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlhf_cli.config.schema import SFTDataConfig
from rlhf_cli.data.sft_format import detect_format, tokenize_dataset, tokenize_example, tokenize_examples
from rlhf_cli.errors import UserError

EOS, AB = 257, 256
X = -100  # ignored label
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenization emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    char = _byte_to_unicode()
    vocab = {char[b]: b for b in range(256)} | {char[97] + char[98]: AB}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(char[97], char[98])]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|pad|>", "<|startoftext|>")])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|startoftext|>",
        chat_template=chat_template, padding_side="right",
    )
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (257, 258, 259)
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def cfg(**kw) -> SFTDataConfig:
    return SFTDataConfig(**{"max_length": 64, **kw})


def b(text: str) -> list[int]:
    return list(text.encode())


# --- format detection ----------------------------------------------------------------------------


def test_detect_format_prefers_messages_then_prompt_completion_then_text():
    assert detect_format(["messages", "prompt", "completion", "text"], cfg()) == "messages"
    assert detect_format(["prompt", "completion", "text"], cfg()) == "prompt-completion"
    assert detect_format(["text", "prompt"], cfg()) == "text"
    assert detect_format(["body"], cfg(text_column="body")) == "text"


def test_detect_format_names_expected_and_present_columns():
    with pytest.raises(UserError) as err:
        detect_format(["question", "answer"], cfg())
    message = str(err.value)
    assert "'question', 'answer'" in message
    assert all(name in message for name in ("'messages'", "'prompt'", "'completion'", "'text'"))


def test_explicit_format_checks_its_columns():
    assert detect_format(["prompt", "completion"], cfg(dataset_format="prompt-completion")) == "prompt-completion"
    with pytest.raises(UserError, match=r"no column 'completion'.*data.completion_column"):
        detect_format(["prompt", "text"], cfg(dataset_format="prompt-completion"))


# --- one example per format ----------------------------------------------------------------------


def test_text_trains_every_token_and_eos(tok):
    out = tokenize_example({"text": "hi yo"}, tok, "text", cfg())
    assert out["input_ids"] == [104, 105, 32, 121, 111, EOS]
    assert out["labels"] == [104, 105, 32, 121, 111, EOS]


def test_text_already_ending_with_eos_gets_no_second_one(tok):
    out = tokenize_example({"text": "hi<|endoftext|>"}, tok, "text", cfg())
    assert out["input_ids"] == [104, 105, EOS]


def test_prompt_completion_masks_prompt_and_trains_completion_and_eos(tok):
    row = {"prompt": "Q: hi", "completion": " yo"}
    out = tokenize_example(row, tok, "prompt-completion", cfg())
    assert out["input_ids"] == [81, 58, 32, 104, 105, 32, 121, 111, EOS]
    assert out["labels"] == [X, X, X, X, X, 32, 121, 111, EOS]

    full = tokenize_example(row, tok, "prompt-completion", cfg(completion_only_loss=False))
    assert full["labels"] == full["input_ids"] == [81, 58, 32, 104, 105, 32, 121, 111, EOS]


def test_prompt_and_completion_are_tokenized_apart(tok):
    # Together "xab" would merge a+b across the boundary; apart, the boundary is exact.
    assert tok("xab", add_special_tokens=False)["input_ids"] == [120, AB]
    out = tokenize_example({"prompt": "xa", "completion": "b"}, tok, "prompt-completion", cfg())
    assert out["input_ids"] == [120, 97, 98, EOS]
    assert out["labels"] == [X, X, 98, EOS]


def test_tool_results_in_a_demonstration_are_tokenized_apart_and_not_trained(tok):
    """A text-environment demo: the model's call and answer are trained, the result (markers included)
    is context, tokenized on its own as the environment appends it -- here "a" + "b" would merge
    across the call/result boundary if the completion were tokenized whole."""
    row = {"prompt": "Q", "completion": "ca<r>b</r>!"}
    out = tokenize_example(row, tok, "prompt-completion", cfg(tool_result_markers=["<r>", "</r>"]))
    assert out["input_ids"] == [81, *b("ca"), *b("<r>b</r>"), *b("!"), EOS]
    assert out["labels"] == [X, *b("ca"), *[X] * 8, *b("!"), EOS]
    whole = tokenize_example(row, tok, "prompt-completion", cfg(tool_result_markers=["<r>", "</r>"],
                                                                  completion_only_loss=False))
    assert whole["labels"] == [81, *b("ca"), *[X] * 8, *b("!"), EOS]  # results stay untrained
    unclosed = tokenize_example({"prompt": "Q", "completion": "c<r>b"}, tok, "prompt-completion",
                                cfg(tool_result_markers=["<r>", "</r>"]))
    assert unclosed["labels"] == [X, *b("c"), X, X, X, X, EOS]


def test_messages_train_only_assistant_tokens(tok):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "ok?"},
        {"role": "assistant", "content": "ok"},
    ]
    out = tokenize_example({"messages": messages}, tok, "messages", cfg())
    expected_ids = (
        b("user: hi\nassistant: ") + b("yo") + [EOS] + b("user: ok?\nassistant: ") + b("ok") + [EOS]
    )
    assert out["input_ids"] == expected_ids
    assert out["labels"] == (
        [X] * len(b("user: hi\nassistant: ")) + b("yo") + [EOS]
        + [X] * len(b("user: ok?\nassistant: ")) + b("ok") + [EOS]
    )

    full = tokenize_example({"messages": messages}, tok, "messages", cfg(completion_only_loss=False))
    assert full["labels"] == expected_ids


def test_conversational_prompt_completion_trains_what_follows_the_prompt(tok):
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    out = tokenize_example(row, tok, "prompt-completion", cfg())
    assert out["input_ids"] == b("user: hi\nassistant: yo") + [EOS]
    assert out["labels"] == [X] * len(b("user: hi\nassistant: ")) + b("yo") + [EOS]


def test_messages_without_chat_template_is_a_user_error():
    row = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(UserError, match="no chat template"):
        tokenize_example(row, make_tokenizer(chat_template=None), "messages", cfg())


def test_template_without_generation_markers_trains_the_assistant_turn_found_by_prefixes():
    """No {% generation %} markers: the assistant's tokens are found by rendering the conversation's
    prefixes (data/chat_spans.py; its own tests cover real templates). This template ignores
    add_generation_prompt, so its "assistant: " header is part of the turn and trained too."""
    plain = make_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    out = tokenize_example(row, plain, "messages", cfg())
    assert out["input_ids"] == b("user: hi\nassistant: yo\n")
    assert out["labels"] == [X] * len("user: hi\n") + b("assistant: yo\n")
    out = tokenize_example(row, plain, "messages", cfg(completion_only_loss=False))
    assert out["labels"] == out["input_ids"] == b("user: hi\nassistant: yo\n")


def test_truncation_keeps_the_first_max_length_tokens(tok):
    out = tokenize_example({"text": "hello"}, tok, "text", cfg(max_length=4))
    assert out["input_ids"] == out["labels"] == [104, 101, 108, 108]
    assert out["num_tokens"] == 6


# --- whole datasets ------------------------------------------------------------------------------


def test_tokenize_dataset_truncates_and_drops_rows_without_trainable_tokens(tok):
    data = Dataset.from_dict(
        {
            "prompt": ["wxyz", "Q", "wxy"],  # row 0: the prompt fills max_length, nothing left to train
            "completion": ["k", "A", "kk"],
            "extra": [1, 2, 3],
        }
    )
    tokenized, stats = tokenize_dataset(data, tok, cfg(max_length=4))
    assert stats == {"examples": 3, "kept": 2, "dropped_no_trainable_tokens": 1, "truncated": 2}
    assert tokenized.column_names == ["input_ids", "labels"]
    assert tokenized[0] == {"input_ids": [81, 65, EOS], "labels": [X, 65, EOS]}
    assert tokenized[1] == {"input_ids": [119, 120, 121, 107], "labels": [X, X, X, 107]}


def test_a_batch_encodes_its_plain_pieces_together_and_gives_each_row_its_own(tok):
    """tokenize_examples sends every plain piece of a batch to the tokenizer in one call, and renders
    conversations row by row: each row must get back exactly its own pieces, in order."""
    markers = cfg(tool_result_markers=["<r>", "</r>"])
    rows = [{"prompt": "ab", "completion": "c<r>d</r>e"},
            {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}]},
            {"prompt": "x", "completion": "ab"}]
    out = tokenize_examples(rows, tok, "prompt-completion", markers, [0, 1, 2])
    assert out[0]["input_ids"] == [AB, *b("c"), *b("<r>d</r>"), *b("e"), EOS]
    assert out[0]["labels"] == [X, *b("c"), *[X] * 8, *b("e"), EOS]
    assert out[1]["input_ids"] == b("user: Q\nassistant: A") + [EOS]
    assert out[1]["labels"] == [X] * len(b("user: Q\nassistant: ")) + b("A") + [EOS]
    assert out[2]["input_ids"] == [*b("x"), AB, EOS] and out[2]["labels"] == [X, AB, EOS]
    texts = tokenize_examples([{"text": "ab ab"}, {"text": "b a"}], tok, "text", cfg(), [0, 1])
    assert [t["input_ids"] for t in texts] == [[AB, *b(" "), AB, EOS], [*b("b a"), EOS]]


def test_several_processes_tokenize_what_one_does_and_name_the_same_bad_row(tok, monkeypatch):
    """data.dataset_num_proc: the rows are split between processes (datasets' map); the result and the row
    an error names (its index in the whole dataset) are those of one process."""
    asked = []
    map_rows = Dataset.map
    monkeypatch.setattr(Dataset, "map", lambda self, *args, **kw: asked.append(kw["num_proc"]) or map_rows(self, *args, **kw))
    rows = {"prompt": [f"q{i}" for i in range(40)], "completion": [f"a{i}" for i in range(40)]}
    one, stats = tokenize_dataset(Dataset.from_dict(rows), tok, cfg())
    two, two_stats = tokenize_dataset(Dataset.from_dict(rows), tok, cfg(dataset_num_proc=2))
    assert asked == [None, 2]
    assert two.to_list() == one.to_list() and two_stats == stats
    rows["completion"][33] = ""
    with pytest.raises(UserError, match=r"data row 33: column 'completion' is empty"):
        tokenize_dataset(Dataset.from_dict(rows), tok, cfg(dataset_num_proc=2))


def test_empty_value_names_row_and_column(tok):
    data = Dataset.from_dict({"text": ["fine", "also fine", ""]})
    with pytest.raises(UserError, match=r"data row 2: column 'text' is empty"):
        tokenize_dataset(data, tok, cfg())


def test_non_string_value_names_row_and_column(tok):
    data = Dataset.from_dict({"prompt": ["a", None], "completion": ["b", "c"]})
    with pytest.raises(UserError, match=r"data row 1: column 'prompt' holds NoneType"):
        tokenize_dataset(data, tok, cfg())


def test_empty_dataset_is_a_user_error(tok):
    with pytest.raises(UserError, match="no rows"):
        tokenize_dataset(Dataset.from_dict({"text": []}), tok, cfg())


def test_builtin_tokenizer_messages_train_assistant_content_and_eos():
    builtin = pytest.importorskip("rlhf_cli.builtin.tokenizer")
    tok = builtin.builtin_tokenizer()
    user, assistant, eos = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|endoftext|>"])

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    messages = [{"role": "user", "content": "a fine film"}, {"role": "assistant", "content": "yes it was"}]
    out = tokenize_example({"messages": messages}, tok, "messages", cfg())
    # "<|user|>\na fine film\n<|assistant|>\nyes it was<|endoftext|>"; newlines never merge with words.
    prompt = [user, *enc("\n"), *enc("a fine film"), *enc("\n"), assistant, *enc("\n")]
    assert out["input_ids"] == prompt + enc("yes it was") + [eos]
    assert out["labels"] == [X] * len(prompt) + enc("yes it was") + [eos]
