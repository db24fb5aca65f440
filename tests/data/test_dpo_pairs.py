"""DPO pairs: the prompt/response boundary from the data in every format `rlhf reward` reads,
truncation, and the collator's layout."""

import pytest
from datasets import Dataset

from rlhf_cli.config.schema import DPODataConfig
from rlhf_cli.data.dpo_pairs import DPOCollator, common_text_prefix, tokenize_dpo_pairs
from rlhf_cli.errors import UserError
from rlhf_cli.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:tiny-gpt2")


def ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def test_explicit_prompt_text(tok):
    data = Dataset.from_list([{"prompt": "The film was", "chosen": " great fun.", "rejected": " a bore."}])
    out, stats = tokenize_dpo_pairs(data, tok, DPODataConfig())
    row = out[0]
    assert row["prompt_input_ids"] == ids(tok, "The film was")
    assert row["chosen_input_ids"] == ids(tok, " great fun.") + [tok.eos_token_id]  # eos: the model learns to stop
    assert row["rejected_input_ids"] == ids(tok, " a bore.") + [tok.eos_token_id]
    assert stats == {"pairs": 1, "kept": 1, "truncated": 0, "dropped_identical": 0}


def test_implicit_prompt_is_the_common_beginning_at_a_word_boundary(tok):
    assert common_text_prefix("Film was good", "Film was bad") == "Film was"
    assert common_text_prefix("good", "bad") == ""
    # one batch: the texts of all rows are encoded together, and each row gets its own back
    data = Dataset.from_list([{"chosen": "The film was great fun.", "rejected": "The film was a bore."},
                              {"chosen": "Great.", "rejected": "Dull."},
                              {"chosen": "A quiet gem.", "rejected": "A quiet mess."}])
    out, _ = tokenize_dpo_pairs(data, tok, DPODataConfig(prompt_column=None))
    assert out[0]["prompt_input_ids"] == ids(tok, "The film was")
    assert out[0]["chosen_input_ids"] == ids(tok, " great fun.") + [tok.eos_token_id]
    assert out[0]["rejected_input_ids"] == ids(tok, " a bore.") + [tok.eos_token_id]
    # no shared beginning: the response is predicted from the start-of-text token
    assert out[1]["prompt_input_ids"] == [tok.bos_token_id]
    assert out[1]["chosen_input_ids"] == ids(tok, "Great.") + [tok.eos_token_id]
    assert out[1]["rejected_input_ids"] == ids(tok, "Dull.") + [tok.eos_token_id]
    assert out[2]["prompt_input_ids"] == ids(tok, "A quiet")
    assert out[2]["rejected_input_ids"] == ids(tok, " mess.") + [tok.eos_token_id]


def test_messages_explicit_and_implicit(tok):
    user = [{"role": "user", "content": "Review the film."}]
    good, bad = [{"role": "assistant", "content": "A joy."}], [{"role": "assistant", "content": "A bore."}]
    prompt_ids = list(tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False))
    full = list(tok.apply_chat_template(user + good, tokenize=True, return_dict=False))
    explicit, _ = tokenize_dpo_pairs(Dataset.from_list([{"prompt": user, "chosen": good, "rejected": bad}]), tok, DPODataConfig())
    implicit, _ = tokenize_dpo_pairs(Dataset.from_list([{"chosen": user + good, "rejected": user + bad}]), tok,
                                     DPODataConfig(prompt_column=None))
    for out in (explicit, implicit):
        assert out[0]["prompt_input_ids"] == prompt_ids
        assert out[0]["chosen_input_ids"] == full[len(prompt_ids):]
        assert out[0]["chosen_input_ids"] != out[0]["rejected_input_ids"]


@pytest.mark.parametrize("style", ["llama3", "chatml", "mistral", "gemma", "phi3"])
def test_chat_pairs_under_released_template_styles(style):
    """Templates as real checkpoints ship them (a date line, a default system prompt, a closing eos):
    the prompt is what PPO/GRPO sample from (the generation prompt), each response is the assistant's
    reply and what closes its turn, and nothing of the prompt leaks into it."""
    from chat_templates import CHATML, GEMMA, LLAMA3, MISTRAL, PHI3, with_chat_tokens

    from rlhf_cli.lm.generation import encode_prompts

    chat_tok = with_chat_tokens(load_tokenizer("builtin:tiny-gpt2"))
    chat_tok.chat_template = {"llama3": LLAMA3, "chatml": CHATML, "mistral": MISTRAL, "gemma": GEMMA, "phi3": PHI3}[style]
    user = [{"role": "user", "content": "Review the film."}]
    good, bad = [{"role": "assistant", "content": "A joy."}], [{"role": "assistant", "content": "A bore."}]
    out, _ = tokenize_dpo_pairs(Dataset.from_list([{"prompt": user, "chosen": good, "rejected": bad}]), chat_tok,
                                DPODataConfig())
    assert out[0]["prompt_input_ids"] == encode_prompts([user], chat_tok, 512, "reject")[0][0]
    for side, reply in (("chosen", "A joy."), ("rejected", "A bore.")):
        response = chat_tok.decode(out[0][f"{side}_input_ids"])
        assert response.strip().startswith(reply) and "Review the film" not in response, response


def test_truncation_keeps_the_prompt_end_and_the_response_start(tok):
    prompt = "one two three four five six seven eight"
    data = Dataset.from_list([{"prompt": prompt, "chosen": " good good good good", "rejected": " bad"}])
    p = ids(tok, prompt)
    cfg = DPODataConfig(max_prompt_length=3, max_length=5)
    out, stats = tokenize_dpo_pairs(data, tok, cfg)
    assert out[0]["prompt_input_ids"] == p[-3:]
    assert out[0]["chosen_input_ids"] == ids(tok, " good good good good")[:2]
    assert stats["truncated"] == 1
    cfg.truncation_mode = "keep_start"
    assert tokenize_dpo_pairs(data, tok, cfg)[0][0]["prompt_input_ids"] == p[:3]


def test_pairs_identical_once_cut_are_dropped_and_identical_text_is_an_error(tok):
    data = Dataset.from_list([
        {"prompt": "A", "chosen": " same start then good", "rejected": " same start then bad"},
        {"prompt": "A", "chosen": " fine", "rejected": " poor"},
    ])
    out, stats = tokenize_dpo_pairs(data, tok, DPODataConfig(max_prompt_length=1, max_length=3))
    assert len(out) == 1 and stats["dropped_identical"] == 1
    same = Dataset.from_list([{"prompt": "A", "chosen": " x", "rejected": " x"}])
    with pytest.raises(UserError, match="data row 0"):
        tokenize_dpo_pairs(same, tok, DPODataConfig())


def test_missing_column_names_the_key(tok):
    data = Dataset.from_list([{"prompt": "A", "good": " x", "rejected": " y"}])
    with pytest.raises(UserError, match="data.chosen_column: column 'chosen' not found"):
        tokenize_dpo_pairs(data, tok, DPODataConfig())


def test_collator_layouts():
    rows = [{"prompt_input_ids": [5, 6], "chosen_input_ids": [7], "rejected_input_ids": [8, 9]},
            {"prompt_input_ids": [4], "chosen_input_ids": [3, 2], "rejected_input_ids": [1], "x": 0}]
    padded = DPOCollator(pad_token_id=0)(rows)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 0], [4, 3, 2, 0], [5, 6, 8, 9], [4, 1, 0, 0]]
    assert padded["response_mask"].int().tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    flat = DPOCollator(pad_token_id=0, padding_free=True)(rows)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 4, 3, 2, 5, 6, 8, 9, 4, 1]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert flat["sequence_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert "attention_mask" not in flat
