"""Swap slow activation modules for fused kernels that compute the same function.

GPT-2-family models use `gelu_new`: the tanh approximation of GELU written as six element-wise
PyTorch ops, each a pass over the (B, L, 4H) MLP activations forward and again backward. On a CPU
that is ~20% of a small GPT-2's training step. `torch.nn.functional.gelu(x, approximate="tanh")`
is the same formula in one kernel (transformers' `gelu_pytorch_tanh`); outputs agree to float
rounding (tests/models/test_fused.py). The swap is in memory only: the model's config, and so every
checkpoint it writes, still says `gelu_new`.
"""

import logging

from torch import nn
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

log = logging.getLogger(__name__)

TANH_GELU_IN_PYTHON = (NewGELUActivation, FastGELUActivation)


def fuse_activations(model: nn.Module) -> nn.Module:
    """Replace every tanh-approximation GELU written in Python ops with the fused kernel, in place."""
    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, TANH_GELU_IN_PYTHON):
                setattr(parent, name, GELUTanh())
                swapped += 1
    if swapped:
        log.debug("%d tanh-GELU activation(s) now run as one fused kernel", swapped)
    return model
