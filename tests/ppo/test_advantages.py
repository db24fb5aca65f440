"""GAE over valid tokens and advantage whitening."""

import torch
from torch.testing import assert_close

from rlhf_cli.ppo.advantages import gae, whiten_advantages

T_, F_ = True, False
MASK = torch.tensor([[T_, T_, T_], [T_, T_, F_]])  # lengths 3 and 2
JUNK = 50.0


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, JUNK]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, 3.0, JUNK]])
    advantages, returns = gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    # row 0: reward-to-go [1+2+3, 2+3, 3] = [6, 5, 3]; minus values -> [5.5, 4, 1.5]
    # row 1: reward-to-go [4+5, 5] = [9, 5]; minus values -> [7, 2]; padding 0
    assert_close(advantages, torch.tensor([[5.5, 4.0, 1.5], [7.0, 2.0, 0.0]]))
    assert_close(returns, torch.tensor([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]))


def test_gae_gamma_half_lambda_half_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, JUNK]])
    values = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, JUNK]])
    advantages, returns = gae(rewards, values, MASK, gamma=0.5, lam=0.5)
    # gamma * lam = 0.25
    # row 0: delta_2 = 2 + 0.5*0 - 0.5 = 1.5            A_2 = 1.5
    #        delta_1 = 0 + 0.5*0.5 - 2 = -1.75          A_1 = -1.75 + 0.25*1.5 = -1.375
    #        delta_0 = 1 + 0.5*2 - 1 = 1                A_0 = 1 + 0.25*(-1.375) = 0.65625
    # row 1 ends at t=1, nothing bootstrapped from the padding:
    #        delta_1 = 0 + 0.5*0 - 2 = -2               A_1 = -2
    #        delta_0 = 1 + 0.5*2 - 1 = 1                A_0 = 1 + 0.25*(-2) = 0.5
    assert_close(advantages, torch.tensor([[0.65625, -1.375, 1.5], [0.5, -2.0, 0.0]]))
    # returns = A + V: [1.65625, 0.625, 2.0] ; [1.5, 0.0]
    assert_close(returns, torch.tensor([[1.65625, 0.625, 2.0], [1.5, 0.0, 0.0]]))


def test_gae_padding_neither_contributes_nor_receives():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 0.5], [1.0, 2.0, 0.0]])
    base = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    changed = gae(
        rewards.masked_fill(~MASK, -123.0), values.masked_fill(~MASK, 77.0), MASK, gamma=0.9, lam=0.8
    )
    for a, b in zip(base, changed, strict=True):
        assert_close(a, b)
        assert (a[~MASK] == 0).all()


def test_gae_skips_tokens_the_policy_did_not_write():
    """A tool's output inserted at t=1..2 (mask holes): those columns are the environment's
    transition, so GAE over [t0, t3] equals GAE over the two-step episode with the hole removed,
    and the hole gets no advantage, whatever its rewards and values hold."""
    mask = torch.tensor([[T_, F_, F_, T_]])
    rewards = torch.tensor([[1.0, JUNK, JUNK, 2.0]])
    values = torch.tensor([[1.0, JUNK, JUNK, 0.5]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # as the two-step episode r = [1, 2], V = [1, 0.5]:
    #   delta_3 = 2 + 0 - 0.5 = 1.5                        A_3 = 1.5
    #   delta_0 = 1 + 0.5*0.5 - 1 = 0.25                   A_0 = 0.25 + 0.25*1.5 = 0.625
    assert_close(advantages, torch.tensor([[0.625, 0.0, 0.0, 1.5]]))
    assert_close(returns, torch.tensor([[1.625, 0.0, 0.0, 2.0]]))
    squeezed, _ = gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.5]]), torch.tensor([[T_, T_]]), 0.5, 0.5)
    assert_close(advantages[:, [0, 3]], squeezed)


def test_whiten_advantages_over_valid_tokens_only():
    advantages = torch.tensor([[1.0, 3.0, 100.0], [5.0, -100.0, 7.0]])
    mask = torch.tensor([[T_, T_, F_], [T_, F_, F_]])
    # valid 1, 3, 5: mean 3, unbiased std 2 -> -1, 0, 1 ; the 100s and 7 are ignored and zeroed
    assert_close(whiten_advantages(advantages, mask), torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
