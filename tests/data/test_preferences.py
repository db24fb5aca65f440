"""Preference pairs: formats, tokenization as the scorer tokenizes, long pairs, the pair collator."""

import pytest
import torch
from datasets import Dataset

from rlhf_cli.config.schema import RewardDataConfig
from rlhf_cli.data.preferences import PairCollator, tokenize_pairs
from rlhf_cli.errors import UserError
from rlhf_cli.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-gpt2")


def ids(tokenizer, text, special=True):
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def cfg(**kwargs) -> RewardDataConfig:
    return RewardDataConfig(**{"max_length": 512, **kwargs})


PAIRS = {
    "prompt": ["The film", "I watched it"],
    "chosen": [" is a joy.", " and loved every scene."],
    "rejected": [" is dull.", " and it bored me."],
}


def test_explicit_prompt_is_scored_as_prompt_plus_response(tok):
    out, stats = tokenize_pairs(Dataset.from_dict(PAIRS), tok, cfg())
    assert out.column_names == ["chosen_input_ids", "rejected_input_ids"]
    assert out[0]["chosen_input_ids"] == ids(tok, "The film is a joy.")
    assert out[1]["rejected_input_ids"] == ids(tok, "I watched it and it bored me.")
    assert stats == {"pairs": 2, "kept": 2, "truncated": 0, "dropped_too_long": 0, "dropped_identical": 0}


def test_implicit_prompt_with_or_without_prompt_column_setting(tok):
    whole = {"chosen": ["The film is a joy."], "rejected": ["The film is dull."]}
    for config in (cfg(), cfg(prompt_column=None)):  # the default `prompt` may be absent
        out, _ = tokenize_pairs(Dataset.from_dict(whole), tok, config)
        assert out[0]["chosen_input_ids"] == ids(tok, "The film is a joy.")
    with pytest.raises(UserError, match="data.prompt_column: column 'question' not found"):
        tokenize_pairs(Dataset.from_dict(whole), tok, cfg(prompt_column="question"))


def test_conversational_pairs_use_the_chat_template(tok):
    user = [{"role": "user", "content": "Review a film."}]
    good = [{"role": "assistant", "content": "A joy."}]
    bad = [{"role": "assistant", "content": "Dull."}]
    expected = tok.apply_chat_template(user + good, tokenize=False)
    assert expected.endswith(tok.eos_token)  # the built-in template closes assistant turns with eos
    explicit = Dataset.from_dict({"prompt": [user], "chosen": [good], "rejected": [bad]})
    implicit = Dataset.from_dict({"chosen": [user + good], "rejected": [user + bad]})
    for data in (explicit, implicit):
        out, _ = tokenize_pairs(data, tok, cfg())
        assert out[0]["chosen_input_ids"] == ids(tok, expected, special=False)
        assert out[0]["rejected_input_ids"] == ids(tok, tok.apply_chat_template(user + bad, tokenize=False), special=False)


def test_margin_column_is_carried_and_checked(tok):
    out, _ = tokenize_pairs(Dataset.from_dict({**PAIRS, "gap": [0.5, 2]}), tok, cfg(margin_column="gap"))
    assert out["margin"] == [0.5, 2.0]
    with pytest.raises(UserError, match="data row 1: column 'gap'"):
        tokenize_pairs(Dataset.from_dict({**PAIRS, "gap": [0.5, None]}), tok, cfg(margin_column="gap"))


def test_missing_column_and_bad_rows_are_user_errors(tok):
    with pytest.raises(UserError, match="data.rejected_column: column 'rejected' not found"):
        tokenize_pairs(Dataset.from_dict({"prompt": ["a"], "chosen": ["b"]}), tok, cfg())
    with pytest.raises(UserError, match="data row 0: column 'chosen' is empty"):
        tokenize_pairs(Dataset.from_dict({"prompt": ["a"], "chosen": [""], "rejected": ["c"]}), tok, cfg())
    with pytest.raises(UserError, match="data row 1: 'chosen' and 'rejected' are the same text"):
        tokenize_pairs(Dataset.from_dict({"prompt": ["a", "a"], "chosen": ["b", "c"], "rejected": ["d", "c"]}), tok, cfg())


def test_long_pairs_truncated_or_dropped_and_counted(tok):
    long = " and the film goes on" * 20
    data = Dataset.from_dict({"prompt": ["A", "A", "A"], "chosen": [" good.", " good." + long, long + " great."],
                              "rejected": [" bad.", " bad.", long + " awful."]})
    out, stats = tokenize_pairs(data, tok, cfg(max_length=12))
    # pair 2 differs only after the cut: no preference left, dropped
    assert stats == {"pairs": 3, "kept": 2, "truncated": 1, "dropped_too_long": 0, "dropped_identical": 1}
    assert out[1]["chosen_input_ids"] == ids(tok, "A good." + long)[:12]
    out, stats = tokenize_pairs(data, tok, cfg(max_length=12, long_pairs="drop"))
    assert stats == {"pairs": 3, "kept": 1, "truncated": 0, "dropped_too_long": 2, "dropped_identical": 0}
    assert len(out) == 1
    with pytest.raises(UserError, match="none of the 3 pairs"):
        tokenize_pairs(data, tok, cfg(max_length=2, long_pairs="drop"))


def test_encoder_truncation_keeps_its_closing_special_token():
    bert = load_tokenizer("builtin:minilm")
    data = Dataset.from_dict({"prompt": ["a"], "chosen": [" good film" * 30], "rejected": [" bad"]})
    out, stats = tokenize_pairs(data, bert, cfg(max_length=16))
    chosen = out[0]["chosen_input_ids"]
    assert len(chosen) == 16 and chosen[0] == bert.cls_token_id and chosen[-1] == bert.sep_token_id
    assert out[0]["rejected_input_ids"] == ids(bert, "a bad")
    assert stats["truncated"] == 1


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_stacks_chosen_then_rejected(side):
    rows = [
        {"chosen_input_ids": [5, 6, 7], "rejected_input_ids": [5, 8], "margin": 1.0},
        {"chosen_input_ids": [9], "rejected_input_ids": [9, 10, 11, 12], "margin": 0.0},
    ]
    batch = PairCollator(pad_token_id=0, padding_side=side)(rows)
    assert batch["input_ids"].shape == (4, 4)  # 2B rows: chosen 0..B-1, rejected B..2B-1
    real = [r[k] for k in ("chosen_input_ids", "rejected_input_ids") for r in rows]
    for i, seq in enumerate(real):
        mask = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][mask].tolist() == seq
        assert mask.sum() == len(seq) and (batch["input_ids"][i][~mask] == 0).all()
        assert mask[0 if side == "right" else -1]  # real tokens first (right padding) or last (left)
    assert torch.equal(batch["margin"], torch.tensor([1.0, 0.0]))
    if side == "left":  # positions restart at the first real token
        assert batch["position_ids"][0].tolist() == [0, 0, 1, 2]
    else:
        assert "position_ids" not in batch
