"""Advantages for DDPO: rewards normalised per prompt (a running tracker) or over the batch, then clipped.

A reward of 0.8 is good for a hard prompt and poor for an easy one. DDPO (Black et al. 2023) therefore
normalises each image's reward with the mean and std of recent rewards for the *same prompt*, kept in a
bounded buffer so old policies' rewards age out. A prompt seen too few times has no useful std yet and
falls back to the statistics of the current batch.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

EPS = 1e-6  # keeps a prompt whose rewards are all equal (std 0) at advantage 0 instead of 0/0


def _as_numpy(rewards) -> np.ndarray:
    if isinstance(rewards, torch.Tensor):
        return rewards.detach().to("cpu", torch.float64).numpy().reshape(-1)
    return np.asarray(rewards, dtype=np.float64).reshape(-1)


def _like(values: np.ndarray, rewards):
    """Return in the caller's kind: a float32 tensor on the rewards' device, else a float64 array."""
    if isinstance(rewards, torch.Tensor):
        return torch.as_tensor(values, dtype=torch.float32, device=rewards.device)
    return values


def batch_advantages(rewards):
    """(B,) rewards -> (B,) (r - mean) / (std + 1e-6) over the batch (population std)."""
    r = _as_numpy(rewards)
    return _like((r - r.mean()) / (r.std() + EPS), rewards)


def clip_advantages(advantages, adv_clip_max: float):
    """Clamp (B,) advantages to [-adv_clip_max, adv_clip_max]: one outlier image cannot dominate a step."""
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    if isinstance(advantages, torch.Tensor):
        return advantages.clamp(-adv_clip_max, adv_clip_max)
    return np.clip(advantages, -adv_clip_max, adv_clip_max)


class PerPromptStatTracker:
    """The last `buffer_size` rewards of every prompt, and advantages normalised with them.

    A prompt's own mean/std is used once its buffer holds at least `min_count` rewards (counting the
    ones just added); before that, the batch's mean/std.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size} and {min_count}")
        if min_count > buffer_size:
            raise ValueError(
                f"min_count ({min_count}) > buffer_size ({buffer_size}): a prompt's buffer could never "
                "reach min_count, so per-prompt statistics would never be used"
            )
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards):
        """Add the batch's (B,) rewards to their prompts' buffers; return (B,) advantages."""
        r = _as_numpy(rewards)
        if len(prompts) != len(r):
            raise ValueError(f"{len(prompts)} prompts for {len(r)} rewards")
        prompts_arr = np.asarray(prompts, dtype=object)
        batch_mean, batch_std = r.mean(), r.std()
        advantages = np.empty_like(r)
        for prompt in dict.fromkeys(prompts):  # unique prompts, in first-seen order
            rows = prompts_arr == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(r[rows].tolist())
            if len(buffer) >= self.min_count:
                mean, std = np.mean(buffer), np.std(buffer)
            else:
                mean, std = batch_mean, batch_std
            advantages[rows] = (r[rows] - mean) / (std + EPS)
        return _like(advantages, rewards)

    def stats(self) -> dict[str, float]:
        """How many prompts are tracked and the mean number of rewards buffered per prompt."""
        counts = [len(b) for b in self.buffers.values()]
        return {"num_prompts": len(counts), "mean_count": float(np.mean(counts)) if counts else 0.0}

    def state_dict(self) -> dict:
        """A JSON-serialisable snapshot for checkpoints (resume continues the same statistics)."""
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the buffers; this tracker's own buffer_size/min_count stay (they come from the config),
        so a buffer longer than buffer_size keeps its newest rewards."""
        self.buffers = {p: deque((float(x) for x in b), maxlen=self.buffer_size)
                        for p, b in state["buffers"].items()}

    def clear(self) -> None:
        self.buffers = {}
