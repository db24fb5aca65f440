"""Dropout off (docs/ppo.md, detail 8): after `disable_dropout`, a train-mode forward is a
deterministic function of the weights, whatever way the architecture applies dropout."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BartConfig, GPT2Config, LlamaConfig, OPTConfig

from rlhf_cli.config.sections import PeftConfig
from rlhf_cli.models.adapters import save_final_model
from rlhf_cli.models.dropout import disable_dropout
from rlhf_cli.models.loading import load_tokenizer

# tiny random models, every dropout at 0.5; each applies it differently
CONFIGS = {
    # functional dropout from float attributes (dropout, attention_dropout, activation_dropout), layerdrop
    "opt": lambda: OPTConfig(vocab_size=99, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                             max_position_embeddings=64, word_embed_proj_dim=16, dropout=0.5, attention_dropout=0.5,
                             activation_dropout=0.5, layerdrop=0.5, bos_token_id=0, eos_token_id=1, pad_token_id=2),
    "bart": lambda: BartConfig(vocab_size=99, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                               max_position_embeddings=64, dropout=0.5, attention_dropout=0.5, activation_dropout=0.5,
                               encoder_layerdrop=0.5, decoder_layerdrop=0.5),
    # attention dropout from a float attribute only
    "llama": lambda: LlamaConfig(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                 attention_dropout=0.5),
    # nn.Dropout modules
    "gpt2": lambda: GPT2Config(vocab_size=99, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.5,
                               embd_pdrop=0.5, attn_pdrop=0.5, bos_token_id=0, eos_token_id=1),
}


def tiny(name: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(CONFIGS[name]())


def two_train_forwards(model) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    ids = torch.arange(16).reshape(2, 8) + 3
    with torch.no_grad():
        return model(input_ids=ids).logits, model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_mode_forwards_are_identical_after_disable_dropout(name):
    model = tiny(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # OPT's layerdrop can skip both layers in both forwards under some RNG states
        a, b = two_train_forwards(model)
    assert not torch.equal(a, b)  # the model really has dropout on
    disable_dropout(model)
    a, b = two_train_forwards(model)
    assert torch.equal(a, b)


def test_config_fields_and_sub_configs_are_zeroed():
    model = tiny("bart")
    model.config.text_config = LlamaConfig(attention_dropout=0.3)  # a sub-config, as multimodal models have
    disable_dropout(model)
    fields = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop")
    assert all(getattr(model.config, f) == 0.0 for f in fields)
    assert model.config.text_config.attention_dropout == 0.0
    floats = {name: v for m in model.modules() for name, v in vars(m).items() if isinstance(v, float)}
    assert all(v == 0.0 for name, v in floats.items() if "dropout" in name or "layerdrop" in name)


def test_saved_model_keeps_the_dropout_it_came_with(tmp_path):
    model = tiny("opt")
    disable_dropout(model)
    save_final_model(model, load_tokenizer("builtin:tiny-gpt2"), tmp_path, PeftConfig())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dropout"] == 0.5 and saved["layerdrop"] == 0.5
    assert model.config.dropout == 0.0  # still off for the run that goes on
