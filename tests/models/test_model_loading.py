"""The one loading path: built-ins, saved folders, PEFT adapter folders, and the errors a user can cause."""

import importlib.util
import json
import os

import huggingface_hub.constants
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedTokenizerFast

from rlhf_cli.builtin.models import build_builtin
from rlhf_cli.errors import UserError
from rlhf_cli.models.fused import fuse_activations
from rlhf_cli.models.loading import describe_model, load_model, load_tokenizer

TEXTS = ["The film was a delight.", "Dull and far too long."]


@pytest.fixture(scope="module", autouse=True)
def rlhf_cache(tmp_path_factory):
    """Share one trained tokenizer across the session's test modules, outside the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get("RLHF_CACHE"):
            patch.setenv("RLHF_CACHE", str(tmp_path_factory.getbasetemp() / "rlhf-cache"))
        yield


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Fail hub look-ups at once instead of retrying for half a minute."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory):
    """builtin:tiny-gpt2 (seed 4) written with save_pretrained, as a finished SFT run writes it
    (with the fused activation that load_model installs, so logits compare bit for bit)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model, tokenizer = build_builtin("tiny-gpt2", seed=4)
    fuse_activations(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model


def logits(model, tokenizer):
    with torch.no_grad():
        return model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits


def test_builtin_names_load_like_any_other(tmp_path):
    model = load_model("builtin:tiny-gpt2", "causal-lm", seed=4)
    tokenizer = load_tokenizer("builtin:tiny-gpt2", padding_side="left")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == model.config.pad_token_id
    assert load_model("builtin:tiny-gpt2", "causal-lm", dtype="bfloat16").dtype == torch.bfloat16
    scorer = load_model("builtin:tiny-gpt2", "sequence-classification")
    assert scorer(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits.shape == (2, 1)


def test_saved_folder_loads_with_identical_logits(saved_gpt2):
    folder, original = saved_gpt2
    tokenizer = load_tokenizer(str(folder))
    model = load_model(str(folder), "causal-lm")
    assert torch.equal(logits(model, tokenizer), logits(original, tokenizer))
    assert load_tokenizer(str(folder), padding_side="left").padding_side == "left"


def test_folder_with_reward_head_and_fresh_head_is_seeded(saved_gpt2):
    folder, _ = saved_gpt2
    first = load_model(str(folder), "sequence-classification", seed=1)
    again = load_model(str(folder), "sequence-classification", seed=1)
    other = load_model(str(folder), "sequence-classification", seed=2)
    assert first.config.num_labels == 1
    assert torch.equal(first.score.weight, again.score.weight)
    assert not torch.equal(first.score.weight, other.score.weight)


def test_tokenizer_without_pad_token_gets_eos(tmp_path, caplog):
    builtin = load_tokenizer("builtin:tiny-gpt2")
    PreTrainedTokenizerFast(tokenizer_object=builtin.backend_tokenizer, eos_token="<|endoftext|>").save_pretrained(
        tmp_path
    )
    with caplog.at_level("INFO", logger="rlhf_cli.models.loading"):
        tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert "no pad token" in caplog.text


def test_lora_adapter_folder_loads_on_its_builtin_base(tmp_path):
    base, tokenizer = build_builtin("tiny-gpt2", seed=5)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); make it change the output
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path)  # an adapter folder, no tokenizer files
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "builtin:tiny-gpt2?seed=5"
    )

    loaded = load_model(str(tmp_path), "causal-lm")  # default seed 0: the seed in the base name wins
    assert isinstance(loaded, PeftModel)
    assert not any(p.requires_grad for p in loaded.parameters())
    # atol: load_model runs the fused GELU, the hand-built model gelu_new (models/fused.py)
    assert torch.allclose(logits(loaded, tokenizer), logits(peft_model, tokenizer), atol=1e-5)
    with loaded.disable_adapter():
        assert torch.allclose(logits(loaded, tokenizer), logits(build_builtin("tiny-gpt2", seed=5)[0], tokenizer), atol=1e-5)

    trainable = load_model(str(tmp_path), "causal-lm", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in trainable.named_parameters() if p.requires_grad
    )
    assert load_tokenizer(str(tmp_path)).get_vocab() == tokenizer.get_vocab()  # falls back to the base's


def test_hub_name_offline_is_a_user_error():
    with pytest.raises(UserError, match=r"model.model_name_or_path: 'foo/bar' is neither a local folder nor reachable"):
        load_model("foo/bar", "causal-lm")
    with pytest.raises(UserError, match=r"reward.model_name_or_path: 'foo/bar'"):
        load_tokenizer("foo/bar", config_key="reward.model_name_or_path")


def test_missing_local_folder_is_a_user_error():
    with pytest.raises(UserError, match=r"local folder './no/such/model' does not exist"):
        load_model("./no/such/model", "causal-lm")


def test_folder_that_is_not_a_model_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match="cannot load a causal-lm model from local folder"):
        load_model(str(tmp_path), "causal-lm")
    with pytest.raises(UserError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_model_folder_without_tokenizer_or_head_for_the_task_is_a_user_error(tmp_path):
    model, _ = build_builtin("tiny-t5", "seq2seq-lm")
    model.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="cannot load a causal-lm model"):
        load_model(str(tmp_path), "causal-lm")
    # transformers alone would return an empty T5 tokenizer here
    with pytest.raises(UserError, match="has no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_bad_dtype_and_unknown_builtin_are_user_errors():
    with pytest.raises(UserError, match="dtype: 'fp8'"):
        load_model("builtin:tiny-gpt2", "causal-lm", dtype="fp8")
    with pytest.raises(UserError, match="valid names"):
        load_model("builtin:nope", "causal-lm")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_reaches_builtin_folder_and_adapter_models(saved_gpt2, tmp_path, attn):
    folder, _ = saved_gpt2
    adapter = get_peft_model(build_builtin("tiny-gpt2")[0], LoraConfig(r=2, target_modules=["c_attn"]))
    adapter.save_pretrained(tmp_path / "adapter")
    for name in ("builtin:tiny-gpt2", str(folder), str(tmp_path / "adapter")):
        model = load_model(name, "causal-lm", attn_implementation=attn)
        assert describe_model(model) == {"class": "GPT2LMHeadModel", "dtype": "float32", "attn_implementation": attn}


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_an_attention_kernel_that_is_not_installed_is_a_user_error(saved_gpt2):
    folder, _ = saved_gpt2
    for name in ("builtin:tiny-gpt2", str(folder)):
        with pytest.raises(UserError, match="model.attn_implementation: 'flash_attention_2'.*not.*installed"):
            load_model(name, "causal-lm", attn_implementation="flash_attention_2")


def test_trust_remote_code_is_announced(saved_gpt2, caplog):
    folder, _ = saved_gpt2
    with caplog.at_level("WARNING", logger="rlhf_cli.models.loading"):
        load_model(str(folder), "causal-lm", trust_remote_code=True)
    assert "trust_remote_code=True" in caplog.text


def test_lora_reward_model_folder_loads_with_its_one_label_head(tmp_path):
    """A LoRA reward model (adapter + fully trained `score` head, as `rlhf reward` writes it) loads as
    a scorer with num_labels=None (keep the saved head): the head's size comes from the adapter folder,
    not from the base model's config (which would give transformers' default of 2 labels)."""
    from rlhf_cli.config.sections import RewardSourceConfig
    from rlhf_cli.rewards.model import ModelReward

    base, tokenizer = build_builtin("tiny-gpt2", "sequence-classification", seed=5, num_labels=1)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                            task_type="SEQ_CLS", modules_to_save=["score"]))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), "sequence-classification", num_labels=None)
    assert loaded.config.num_labels == 1
    assert torch.allclose(logits(loaded, tokenizer), logits(model, tokenizer), atol=1e-5)
    scores = ModelReward(RewardSourceConfig(model=str(tmp_path)), torch.device("cpu"))(["It was"], [" great."])
    assert scores.shape == (1,)


def test_lora_reward_head_on_a_bf16_base_trains_in_float32():
    """peft keeps LoRA weights in float32 over a bf16 base but the fully trained score head
    (`modules_to_save`) in bf16, where AdamW rounds small updates away: it is upcast, input cast."""
    from rlhf_cli.config.sections import PeftConfig
    from rlhf_cli.models.adapters import apply_lora
    from rlhf_cli.models.loading import float32_master_weights

    model = load_model("builtin:tiny-gpt2", task="sequence-classification", num_labels=1, dtype="bfloat16")
    model = float32_master_weights(apply_lora(model, PeftConfig(use_peft=True), "SEQ_CLS", modules_to_save=["score"]))
    head = model.base_model.model.score.modules_to_save["default"]
    assert head.weight.dtype == torch.float32 and model.base_model.model.transformer.wte.weight.dtype == torch.bfloat16
    before = head.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids).logits.float().sum().backward()
    optimizer.step()
    assert (head.weight != before).float().mean() > 0.9  # in bf16 almost no entry moved at lr 1e-6
