"""Dropout off during RL (DESIGN.md, detail 8): sampled log-probs, values and rewards must be
deterministic functions of the weights, or the PPO ratio is noise at the first step."""

from torch import nn


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
