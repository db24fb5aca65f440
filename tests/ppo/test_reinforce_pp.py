"""REINFORCE++ (`ppo.advantage_estimator: reinforce++`, ppo/algorithm.py): no critic; advantages are
the discounted sums of the per-token rewards, whitened over the batch. Answers worked out by hand."""

import math

import pytest
import torch

from rlhf_cli.config.options import PPOOptions
from rlhf_cli.online.experience import Experience
from rlhf_cli.ppo.algorithm import PPO


def test_advantages_are_whitened_reward_to_go_without_values(one_process):
    mask = torch.tensor([[True, True, True], [True, True, False]])
    exp = Experience(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                     torch.ones(2, 3, dtype=torch.long), mask, torch.tensor([True, True]), ["", ""], ["", ""])
    exp.scores = torch.tensor([1.0, -1.0])
    exp.old_logprobs = exp.ref_logprobs = torch.zeros(2, 3)  # KL 0: the rewards are the scores alone
    algorithm = PPO(PPOOptions(advantage_estimator="reinforce++", kl_coef=0.1))
    assert not algorithm.uses_critic
    algorithm.prepare(exp, one_process)
    # per-token rewards: [0, 0, 1] and [0, -1, -]; reward-to-go (gamma 1): [1, 1, 1] and [-1, -1, -]
    # over the 5 valid tokens: mean 0.2, unbiased variance 4.8 / 4 = 1.2
    s = math.sqrt(1.2)
    expected = torch.tensor([[0.8 / s, 0.8 / s, 0.8 / s], [-1.2 / s, -1.2 / s, 0.0]])
    torch.testing.assert_close(exp.advantages, expected, rtol=1e-5, atol=1e-6)
    assert exp.returns is None


def test_kl_penalty_on_every_token_discounted(one_process):
    mask = torch.ones(1, 2, dtype=torch.bool)
    exp = Experience(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long),
                     torch.ones(1, 2, dtype=torch.long), mask, torch.tensor([True]), [""], [""])
    exp.scores = torch.tensor([1.0])
    exp.old_logprobs, exp.ref_logprobs = torch.tensor([[0.5, 0.5]]), torch.zeros(1, 2)  # k1 = 0.5 per token
    algorithm = PPO(PPOOptions(advantage_estimator="reinforce++", kl_coef=0.2, gamma=0.5))
    stats = algorithm.prepare(exp, one_process)
    # rewards [-0.1, 1 - 0.1]; reward-to-go with gamma 0.5: [-0.1 + 0.5 x 0.9, 0.9] = [0.35, 0.9]
    # whitened over 2 tokens: mean 0.625, std sqrt(2 x 0.275^2) = 0.3889 -> [-0.7071, 0.7071]
    torch.testing.assert_close(exp.advantages, torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2)]]),
                               rtol=1e-4, atol=1e-5)
    assert stats["objective/kl"] == pytest.approx(1.0)
