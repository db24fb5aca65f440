"""Means and standard errors of rewards, for the reward-hacking alarms (online/alarms.py): one
iteration's, over every process's responses, and a window of iterations', with the change between
two windows in standard errors."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

NOISE_FLOOR = 1e-6  # a reward constant over every response still gets a finite z


class Estimate(NamedTuple):
    """One iteration's mean of a reward over its responses."""

    mean: float
    se: float  # standard error of the mean: the responses' std / sqrt(their number)


class Span(NamedTuple):
    """A window of iterations of one reward: the mean of its iteration means, and of their squared standard errors."""

    mean: float
    se2: float


def batch_estimates(values: list[torch.Tensor], accelerator) -> list[Estimate]:
    """Mean and standard error of each (B,) tensor over every process's rows, in one all-reduce
    (every process holds B rows, so the mean of the processes' means is the mean of all rows)."""
    rows = [torch.stack([v.float().mean(), v.float().square().mean()]) for v in values]
    moments = accelerator.reduce(torch.stack(rows).to(accelerator.device), "mean").tolist()  # (S, 2)
    n = len(values[0]) * accelerator.num_processes
    out = []
    for mean, square in moments:
        variance = max(square - mean * mean, 0.0) * n / max(n - 1, 1)  # unbiased
        out.append(Estimate(mean, math.sqrt(variance / n)))
    return out


def change(a: Span, b: Span, window: int) -> float:
    """z(a -> b): the change of the mean in standard errors of the difference of two `window`-iteration
    means (each iteration's noise independent of the others')."""
    return (b.mean - a.mean) / max(math.sqrt((a.se2 + b.se2) / window), NOISE_FLOOR)
