"""Dropout off during RL (DESIGN.md, detail 8): sampled log-probs, values and rewards must be
deterministic functions of the weights, or the PPO ratio is noise at the first step.

`nn.Dropout` modules are only part of it: OPT, BART, Llama and many others apply dropout
functionally from a float they copied from the config (`self.dropout = config.dropout`,
`self.attention_dropout`, `activation_dropout`), skip whole layers with `layerdrop`, or read a
config field at forward time. So all three are set to zero: `nn.Dropout` modules, float attributes
named like dropout on every module, and the dropout/layerdrop fields of the config and its
sub-configs (the original config values are remembered, and `original_dropout_config` puts them
back while the model is saved, so a saved model keeps the dropout it was trained with).
"""

import contextlib
from collections.abc import Iterator

from torch import nn
from transformers import PretrainedConfig

# Substrings of attribute and config-field names that hold a dropout probability: `dropout`,
# `attention_dropout`, `hidden_dropout_prob`, `dropout_rate`; GPT-2's `resid_pdrop`; OPT/BART's
# `layerdrop`, `encoder_layerdrop`.
DROPOUT_NAMES = ("dropout", "pdrop", "layerdrop")
ORIGINALS = "_rlhf_dropout_originals"  # module attribute: [(config, field, original value)]


def is_dropout_name(name: str) -> bool:
    name = name.lower()
    return any(part in name for part in DROPOUT_NAMES)


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout probability of `model`: modules, module attributes and config fields."""
    originals = model.__dict__.get(ORIGINALS, [])
    for config in _configs(model):
        for field, value in vars(config).items():
            if isinstance(value, float) and is_dropout_name(field) and value != 0:
                originals.append((config, field, value))
                setattr(config, field, 0.0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if isinstance(value, float) and is_dropout_name(name):
                setattr(module, name, 0.0)
    model.__dict__[ORIGINALS] = originals  # a plain attribute: not a submodule, not in the state dict


@contextlib.contextmanager
def original_dropout_config(model: nn.Module) -> Iterator[None]:
    """While inside, the config fields `disable_dropout` zeroed hold their original values again
    (for saving: the written config.json is the one the model came with)."""
    originals = model.__dict__.get(ORIGINALS, [])
    for config, field, value in originals:
        setattr(config, field, value)
    try:
        yield
    finally:
        for config, field, _ in originals:
            setattr(config, field, 0.0)


def _configs(model: nn.Module) -> list[PretrainedConfig]:
    """Every distinct config reachable from the model's modules, with their sub-configs (e.g. the
    `text_config` of a multimodal model)."""
    found: dict[int, PretrainedConfig] = {}

    def visit(config) -> None:
        if not isinstance(config, PretrainedConfig) or id(config) in found:
            return
        found[id(config)] = config
        for value in vars(config).values():
            visit(value)

    for module in model.modules():
        visit(getattr(module, "config", None))
    return list(found.values())
