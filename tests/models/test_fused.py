"""The fused tanh-GELU computes what GPT-2's `gelu_new` computes, and checkpoints do not change."""

import json

import torch
from transformers.activations import GELUTanh, NewGELUActivation

from rlhf_cli.builtin.models import build_builtin
from rlhf_cli.models.fused import fuse_activations
from rlhf_cli.models.loading import load_model


def test_fused_gelu_matches_gelu_new_values_and_gradients():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64).requires_grad_()
    y = x.detach().clone().requires_grad_()
    NewGELUActivation()(x).sum().backward()
    GELUTanh()(y).sum().backward()
    assert torch.allclose(NewGELUActivation()(x), GELUTanh()(y), atol=1e-12)
    assert torch.allclose(x.grad, y.grad, atol=1e-12)


def test_a_fused_model_gives_the_logits_and_gradients_of_the_original():
    original, _ = build_builtin("builtin:tiny-gpt2", "causal-lm", seed=3)
    fused, _ = build_builtin("builtin:tiny-gpt2", "causal-lm", seed=3)
    fuse_activations(fused)
    assert any(isinstance(m, NewGELUActivation) for m in original.modules())
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    ids = torch.randint(0, original.config.vocab_size, (2, 24))
    a, b = original(ids).logits, fused(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    a.logsumexp(-1).sum().backward()
    b.logsumexp(-1).sum().backward()
    for (name, p), q in zip(original.named_parameters(), fused.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name


def test_loaded_models_are_fused_and_saved_configs_keep_gelu_new(tmp_path):
    model = load_model("builtin:tiny-gpt2", "causal-lm")
    assert any(isinstance(m, GELUTanh) for m in model.modules())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu_new"
    assert any(isinstance(m, GELUTanh) for m in load_model(str(tmp_path), "causal-lm").modules())
