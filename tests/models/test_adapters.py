"""apply_lora: an adapter on an output layer tied to the input embeddings gets a weight of its own."""

import warnings

import torch

from rlhf_cli.config.sections import PeftConfig
from rlhf_cli.models.adapters import apply_lora
from rlhf_cli.models.loading import load_model


def adapted_gpt2(targets: list[str]):
    model = load_model("builtin:tiny-gpt2", task="causal-lm", is_trainable=True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = model(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_lora(model, PeftConfig(use_peft=True, lora_dropout=0.0, lora_target_modules=targets), "CAUSAL_LM")
    model.eval()
    return model, ids, before, [str(w.message) for w in caught]


def test_lora_on_a_tied_lm_head_unties_it_and_merges_to_the_same_model(tmp_path):
    model, ids, before, caught = adapted_gpt2(["c_attn", "lm_head"])
    base = model.get_base_model()
    assert base.lm_head.base_layer.weight is not base.transformer.wte.weight
    assert torch.equal(base.lm_head.base_layer.weight, base.transformer.wte.weight)  # a copy: same values
    assert base.config.tie_word_embeddings is False
    assert not any("tie_word_embeddings" in m for m in caught)  # peft's warning about merging tied layers
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # B = 0: the model computes what it did
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        adapted = model(ids).logits
        embeddings = base.transformer.wte.weight.clone()
        merged = model.merge_and_unload()
        # the adapter's change lands in the output layer only: the input embeddings stay as they were
        assert torch.equal(merged.transformer.wte.weight, embeddings)
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path), task="causal-lm")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, adapted, atol=1e-5)


def test_lora_without_the_output_layer_keeps_the_embeddings_tied():
    model, _, _, _ = adapted_gpt2(["c_attn"])
    base = model.get_base_model()
    assert base.lm_head.weight is base.transformer.wte.weight
    assert base.config.tie_word_embeddings is True
