"""Scores -> per-token rewards: EOS penalty, clipping, where the score lands, whitening."""

import torch
from torch.testing import assert_close

from rlhf_cli.ppo.rewards import apply_missing_eos_penalty, clip_scores, per_token_rewards, whiten_rewards

T_, F_ = True, False


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0])
    stopped = torch.tensor([True, False])
    # only the second never stopped: 2 - 1.5 = 0.5
    assert_close(apply_missing_eos_penalty(scores, stopped, 1.5), torch.tensor([1.0, 0.5]))
    assert_close(apply_missing_eos_penalty(scores, stopped, None), scores)


def test_clip_scores():
    scores = torch.tensor([-5.0, 0.5, 3.0])
    assert_close(clip_scores(scores, 2.0), torch.tensor([-2.0, 0.5, 2.0]))
    assert_close(clip_scores(scores, None), scores)


def test_score_lands_on_last_valid_token():
    scores = torch.tensor([1.0, 2.0, 3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.2, 7.0, 7.0], [0.2, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[T_, T_, T_, T_], [T_, T_, F_, F_], [T_, F_, F_, F_]])  # lengths 4, 2, 1
    rewards, non_score = per_token_rewards(scores, kl, mask, kl_coef=0.5)
    # non-score: -0.5 * kl on valid tokens
    assert_close(
        non_score,
        torch.tensor([[-0.05, -0.1, -0.15, -0.2], [-0.25, 0.1, 0.0, 0.0], [-0.1, 0.0, 0.0, 0.0]]),
    )
    # + score at index length-1: row 0 -> -0.2 + 1 = 0.8 ; row 1 -> 0.1 + 2 = 2.1 ; row 2 -> -0.1 + 3 = 2.9
    assert_close(
        rewards,
        torch.tensor([[-0.05, -0.1, -0.15, 0.8], [-0.25, 2.1, 0.0, 0.0], [2.9, 0.0, 0.0, 0.0]]),
    )


def test_row_without_valid_tokens_gets_nothing():
    rewards, non_score = per_token_rewards(
        torch.tensor([5.0]), torch.tensor([[1.0, 1.0]]), torch.tensor([[F_, F_]]), kl_coef=0.1
    )
    assert_close(rewards, torch.zeros(1, 2))
    assert_close(non_score, torch.zeros(1, 2))


def test_whiten_rewards_keeps_the_mean():
    rewards = torch.tensor([[1.0, 3.0, 99.0], [5.0, 99.0, 99.0]])
    mask = torch.tensor([[T_, T_, F_], [T_, F_, F_]])
    # valid 1, 3, 5: mean 3, unbiased std 2 -> (x - 3) / 2 + 3 = 2, 3, 4 ; padding 0
    assert_close(whiten_rewards(rewards, mask), torch.tensor([[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]]))
