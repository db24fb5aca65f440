"""Encoder-decoder SFT rows: encoder inputs and decoder targets checked token by token (the byte-level
tokenizer of test_sft_format: the ids of ASCII text are its bytes, eos=257, pad=258), and the collator's
teacher-forcing shift worked out by hand."""

import pytest
import torch
from datasets import Dataset
from test_sft_format import EOS, b, cfg, make_tokenizer

from rlhf_cli.data.collators import Seq2SeqCollator, shift_right
from rlhf_cli.data.seq2seq_format import tokenize_seq2seq_dataset
from rlhf_cli.errors import UserError

X, PAD, START = -100, 258, 0


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def examples(rows: list[dict], tok, **kw) -> tuple[list[dict], dict]:
    data, stats = tokenize_seq2seq_dataset(Dataset.from_list(rows), tok, cfg(**kw))
    return data.to_list(), stats


def test_prompt_completion_puts_the_prompt_in_the_encoder_and_the_completion_plus_eos_in_the_decoder(tok):
    # one batch: the inputs and the targets of all rows are encoded together, each row gets its own back
    out, stats = examples([{"prompt": "2+2=", "completion": " 4"}, {"prompt": "x", "completion": "yz"}], tok)
    assert out == [{"input_ids": b("2+2="), "labels": b(" 4") + [EOS]}, {"input_ids": b("x"), "labels": b("yz") + [EOS]}]
    assert stats == {"examples": 2, "kept": 2, "dropped_no_trainable_tokens": 0, "truncated": 0}


def test_each_assistant_turn_of_a_conversation_is_one_example_read_from_the_turns_before_it(tok):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok?"},
                {"role": "assistant", "content": "ok"}]
    out, stats = examples([{"messages": messages}], tok)
    assert out == [
        {"input_ids": b("system: s\nuser: hi\nassistant: "), "labels": b("yo") + [EOS]},
        {"input_ids": b("system: s\nuser: hi\nassistant: ") + b("yo") + [EOS] + b("user: ok?\nassistant: "),
         "labels": b("ok") + [EOS]},
    ]
    assert stats["examples"] == stats["kept"] == 2


def test_conversational_prompt_completion_renders_the_prompt_with_the_generation_prompt(tok):
    out, _ = examples([{"prompt": [{"role": "user", "content": "hi"}],
                        "completion": [{"role": "assistant", "content": "yo"}]}], tok)
    assert out == [{"input_ids": b("user: hi\nassistant: "), "labels": b("yo") + [EOS]}]


def test_long_inputs_keep_their_end_and_long_targets_their_start(tok):
    out, stats = examples([{"prompt": "abcdefgh", "completion": "12345678"}], tok, max_length=4)
    assert out == [{"input_ids": b("efgh"), "labels": b("1234")}]
    assert stats["truncated"] == 1


def test_plain_text_and_bad_completions_are_refused_with_a_way_out(tok):
    with pytest.raises(UserError, match="plain text .* encoder-decoder .* prompt-completion"):
        examples([{"text": "a review"}], tok)
    two = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(UserError, match="one assistant message"):
        examples([{"prompt": [{"role": "user", "content": "q"}], "completion": two}], tok)
    with pytest.raises(UserError, match="no rows"):
        examples([], tok)


def test_shift_right_starts_with_the_decoder_start_token_and_pads_ignored_labels():
    labels = torch.tensor([[7, 8, 9, 1], [5, 1, X, X]])
    assert shift_right(labels, START, PAD).tolist() == [[START, 7, 8, 9], [START, 5, 1, PAD]]


def test_collator_pads_inputs_and_targets_apart():
    rows = [{"input_ids": [5, 6, 7], "labels": [8, 1]}, {"input_ids": [9], "labels": [10, 11, 1]}]
    batch = Seq2SeqCollator(pad_token_id=PAD, decoder_start_token_id=START)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[8, 1, X], [10, 11, 1]]
    assert batch["decoder_input_ids"].tolist() == [[START, 8, 1], [START, 10, 11]]


def test_the_loss_of_a_collated_batch_equals_the_models_own_loss_per_example():
    """sft.token_losses on a Seq2SeqCollator batch == T5's built-in loss (labels -> shifted decoder
    inputs inside the model), each example alone and unpadded."""
    from rlhf_cli.models.loading import load_model
    from rlhf_cli.stages.sft import token_losses

    model = load_model("builtin:tiny-t5", task="seq2seq-lm", seed=0).eval()
    rows = [{"input_ids": [5, 6, 7], "labels": [8, 1]}, {"input_ids": [9], "labels": [10, 11, 12, 1]}]
    batch = Seq2SeqCollator(model.config.pad_token_id, model.config.decoder_start_token_id)(rows)
    with torch.no_grad():
        loss, _, mask = token_losses(model, batch)
        alone = [model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss for r in rows]
    per_example = loss.sum(-1) / mask.sum(-1)
    torch.testing.assert_close(per_example, torch.stack(alone), atol=1e-5, rtol=1e-5)
