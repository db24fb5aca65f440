"""The reward of a run: one source, or a weighted sum of several."""

from collections.abc import Sequence

import torch

from rlhf_cli.config.sections import RewardSourceConfig
from rlhf_cli.rewards.function import FunctionReward
from rlhf_cli.rewards.model import ModelReward


def build_source(source: RewardSourceConfig, device: torch.device, key: str):
    if source.function is not None:
        return FunctionReward(source.function, key=f"{key}.function")
    return ModelReward(source, device, key=key)


def source_name(source: RewardSourceConfig) -> str:
    """A short name for metrics: the function spec, or the model folder's last part."""
    return source.function or source.model.rstrip("/").split("/")[-1]


class CombinedReward:
    """scores (B,) = sum_i weight_i * source_i(prompts, responses, columns); each source is also reported."""

    def __init__(self, reward_config, device: torch.device):
        sources = reward_config.sources or [reward_config]
        keys = [f"reward.sources[{i}]" for i in range(len(sources))] if reward_config.sources else ["reward"]
        names = [source_name(s) for s in sources]
        self.names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        self.weights = [s.weight for s in sources]
        self.sources = [build_source(s, device, k) for s, k in zip(sources, keys, strict=True)]

    def score(self, prompts: Sequence[str], responses: Sequence[str], columns: dict) -> tuple[torch.Tensor, dict]:
        """(combined scores (B,), {source name: scores (B,)})."""
        parts = {}
        total = torch.zeros(len(responses))
        for name, weight, source in zip(self.names, self.weights, self.sources, strict=True):
            parts[name] = source(prompts, responses, columns)
            total = total + weight * parts[name]
        return total, parts
