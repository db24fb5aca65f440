"""The built-in byte-level BPE tokenizer: round trips, special tokens, chat template, cache, determinism."""

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from rlhf_cli.builtin import corpus
from rlhf_cli.builtin import tokenizer as bt

CONVERSATION = [
    {"role": "user", "content": "Review Up."},
    {"role": "assistant", "content": "A great film."},
    {"role": "user", "content": "Shorter?"},
    {"role": "assistant", "content": "Great."},
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """A fresh cache folder for this module, so the first load really trains."""
    root = tmp_path_factory.mktemp("rlhf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tok(cache_root):
    return bt.builtin_tokenizer()


@pytest.mark.parametrize(
    "text",
    ["The film was not great, but the cast was superb!", "  two  spaces\nand\ttabs ", "Amélie, 2001 — 9/10 🎬", ""],
)
def test_decode_inverts_encode_and_adds_no_special_tokens(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert not set(ids) & set(tok.all_special_ids)


def test_special_tokens_are_distinct_and_fixed(tok):
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == (bt.PAD_TOKEN, bt.EOS_TOKEN, bt.BOS_TOKEN)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    ids = [tok.convert_tokens_to_ids(token) for token in bt.SPECIAL_TOKENS]
    assert ids == list(range(len(bt.SPECIAL_TOKENS)))
    assert len(tok) <= bt.VOCAB_SIZE and tok.model_max_length == bt.MODEL_MAX_LENGTH
    assert tok("a film <|endoftext|>")["input_ids"][-1] == tok.eos_token_id  # written in text, still one token


def test_corpus_words_are_single_tokens(tok):
    """The corpus is small enough that BPE learns whole words: short sequences, fast models."""
    for word in ["film", "masterpiece", "disappointment"]:
        assert len(tok(" " + word)["input_ids"]) == 1


def test_chat_template_renders_roles_and_eos(tok):
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|user|>\nReview Up.\n<|assistant|>\nA great film.<|endoftext|>"
        "<|user|>\nShorter?\n<|assistant|>\nGreat.<|endoftext|>"
    )
    prompt = tok.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nReview Up.\n<|assistant|>\n"
    system = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]]
    assert tok.apply_chat_template(system, tokenize=False).startswith("<|system|>\nBe brief.\n<|user|>")


def test_assistant_mask_covers_assistant_content_and_eos_only(tok):
    out = tok.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids)
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(learned) == "A great film.<|endoftext|>Great.<|endoftext|>"
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if not m]) == (
        "<|user|>\nReview Up.\n<|assistant|>\n<|user|>\nShorter?\n<|assistant|>\n"
    )


def test_chat_template_rejects_unknown_role(tok):
    with pytest.raises(Exception, match="Unknown chat role"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_padding_side_and_template_survive_save_and_plain_reload(cache_root, tmp_path):
    left = bt.builtin_tokenizer(padding_side="left")
    left.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.padding_side == "left"
    assert reloaded.pad_token_id == 0 and reloaded.eos_token_id == 1
    assert reloaded.apply_chat_template(CONVERSATION, tokenize=False) == left.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    text = "The plot was dull."
    assert reloaded(text)["input_ids"] == left(text)["input_ids"]
    batch = reloaded(["a", "a much longer review"], padding=True)
    assert batch["input_ids"][0][0] == reloaded.pad_token_id  # padded on the left


def test_cached_files_are_reused_and_identical_to_fresh_training(tok, cache_root, monkeypatch):
    files = list(cache_root.glob("builtin/tokenizer-*/tokenizer.json"))
    assert len(files) == 1 and files[0].parent == bt.cache_dir()
    assert not list(cache_root.glob("builtin/.tokenizer-*"))  # no temporary folder left behind

    bt._load_or_train.cache_clear()  # forget the in-process copy: the next load must come from disk
    monkeypatch.setattr(corpus, "training_text", lambda: pytest.fail("retrained despite the cache"))
    assert bt.builtin_tokenizer().get_vocab() == tok.get_vocab()

    monkeypatch.undo()
    fresh = bt.train_tokenizer(corpus.training_text())  # training is deterministic: same files every time
    assert fresh.to_str() == Tokenizer.from_file(str(files[0])).to_str()


def test_training_is_deterministic():
    texts = ["the film was great", "the plot was dull and slow", "great acting, dull plot"] * 50
    assert bt.train_tokenizer(texts).to_str() == bt.train_tokenizer(texts).to_str()
