"""Clipped PPO policy and value losses, their stats and their gradients."""

import math

import torch
from torch.testing import assert_close

from rlhf_cli.ppo.losses import policy_loss, value_loss

T_, F_ = True, False
MASK = torch.tensor([[T_, T_, T_], [T_, T_, F_]])


def policy_inputs():
    # cliprange 0.2 -> ratios are clamped to [0.8, 1.2]. Tokens (A = advantage, rho = ratio):
    #   a: A=+1, rho=1.1  inside:        max(-1.1, -1.1) = -1.1   not clipped
    #   b: A=+1, rho=1.5  above:         max(-1.5, -1.2) = -1.2   clipped
    #   c: A=-1, rho=0.5  below:         max( 0.5,  0.8) =  0.8   clipped
    #   d: A=-1, rho=1.5  above:         max( 1.5,  1.2) =  1.5   not clipped (pessimistic side)
    #   e: A=+1, rho=0.5  below:         max(-0.5, -0.8) = -0.5   not clipped
    ratios = torch.tensor([[1.1, 1.5, 0.5], [1.5, 0.5, 1.0]])
    old = torch.full((2, 3), -1.0)
    logprobs = (old + ratios.log()).clone()
    logprobs[1, 2] = 40.0  # padding garbage: exp(41) would dominate if it leaked
    advantages = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 1.0, 1e6]])
    return logprobs.requires_grad_(), old, advantages


def test_policy_loss_clipping_and_stats():
    logprobs, old, advantages = policy_inputs()
    loss, stats = policy_loss(logprobs, old, advantages, MASK, cliprange=0.2)
    # (-1.1 - 1.2 + 0.8 + 1.5 - 0.5) / 5 = -0.5 / 5 = -0.1
    assert_close(loss, torch.tensor(-0.1))
    assert_close(stats["clipfrac"], torch.tensor(0.4))  # b and c: 2 / 5
    assert_close(stats["ratio"], torch.tensor(1.02))  # (1.1 + 1.5 + 0.5 + 1.5 + 0.5) / 5 = 5.1 / 5
    # 0.5 * mean(ln^2 rho) = 0.5 * (0.0090840 + 0.1644020 + 0.4804530 + 0.1644020 + 0.4804530) / 5
    assert_close(stats["approxkl"], torch.tensor(0.1298794))
    assert all(not s.requires_grad for s in stats.values())

    loss.backward()
    # d/dlogp of -A*rho is -A*rho where the unclipped term is used, 0 where the clipped one is; / 5
    #   a: -1.1/5 = -0.22   b: 0   c: 0   d: 1.5/5 = 0.3   e: -0.5/5 = -0.1   padding: 0
    assert_close(logprobs.grad, torch.tensor([[-0.22, 0.0, 0.0], [0.3, -0.1, 0.0]]))


def test_policy_loss_num_tokens_divides_the_sum():
    logprobs, old, advantages = policy_inputs()
    loss, _ = policy_loss(logprobs, old, advantages, MASK, cliprange=0.2, num_tokens=10)
    assert_close(loss, torch.tensor(-0.05))  # -0.5 / 10


def value_inputs():
    # cliprange_value 0.2, old value 1 everywhere -> clipped prediction stays in [0.8, 1.2]
    #   a: V=1.1, R=2   (1.1-2)^2 = 0.81, clipped V=1.1 -> 0.81            max 0.81  not clipped
    #   b: V=1.5, R=2   (1.5-2)^2 = 0.25, clipped V=1.2 -> (1.2-2)^2 = 0.64  max 0.64  clipped
    #   c: V=1.5, R=1   (1.5-1)^2 = 0.25, clipped V=1.2 -> 0.04            max 0.25  not clipped
    #   d: V=0.5, R=0   (0.5-0)^2 = 0.25, clipped V=0.8 -> 0.64            max 0.64  clipped
    values = torch.tensor([[1.1, 1.5, 1.5], [0.5, float("nan"), 1e4]])
    old = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, -1e4]])
    returns = torch.tensor([[2.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[T_, T_, T_], [T_, F_, F_]])
    return values.requires_grad_(), old, returns, mask


def test_value_loss_clipping_and_stats():
    values, old, returns, mask = value_inputs()
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # 0.5 * (0.81 + 0.64 + 0.25 + 0.64) / 4 = 0.5 * 2.34 / 4 = 0.2925
    assert_close(loss, torch.tensor(0.2925))
    assert_close(stats["clipfrac"], torch.tensor(0.5))  # b and d: 2 / 4
    assert_close(stats["vpred"], torch.tensor(1.15))  # (1.1 + 1.5 + 1.5 + 0.5) / 4

    loss.backward()
    # d/dV of 0.5 * (V - R)^2 / 4 = (V - R) / 4 where the unclipped term is used; 0 where the clipped
    #   a: -0.9/4 = -0.225   b: 0   c: 0.5/4 = 0.125   d: 0   padding (even NaN there): 0
    assert_close(values.grad, torch.tensor([[-0.225, 0.0, 0.125], [0.0, 0.0, 0.0]]))


def test_loss_gradients_vanish_at_invalid_positions():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, T = 4, 6
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
        junk = torch.where(mask, 0.0, float("nan"))  # NaN wherever the token is padding

        logprobs = (torch.randn(B, T, generator=gen) + junk).requires_grad_()
        old = torch.randn(B, T, generator=gen) + junk
        adv = torch.randn(B, T, generator=gen) + junk
        ploss, _ = policy_loss(logprobs, old, adv, mask, cliprange=0.2)

        values = (torch.randn(B, T, generator=gen) + junk).requires_grad_()
        old_v = torch.randn(B, T, generator=gen) + junk
        returns = torch.randn(B, T, generator=gen) + junk
        vloss, _ = value_loss(values, old_v, returns, mask, cliprange_value=0.2)

        (ploss + vloss).backward()
        assert math.isfinite(ploss.item()) and math.isfinite(vloss.item())
        for grad in (logprobs.grad, values.grad):
            assert torch.isfinite(grad).all()
            assert (grad[~mask] == 0).all()


def test_value_clipfrac_is_zero_when_nothing_is_clipped():
    """Every |V - V_old| well inside the clip range: no token is clipped, whatever the rounding.
    (V_old + (V - V_old) differs from V in the last bit for a few percent of such tokens; the
    clipped prediction must be V itself there, or `>` counts rounding as clipping.)"""
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(64, 50, generator=gen)
    values = (old + 0.19 * (2 * torch.rand(64, 50, generator=gen) - 1)).requires_grad_()  # |delta| < 0.19 < 0.2
    returns = 3 * torch.randn(64, 50, generator=gen)
    mask = torch.ones(64, 50, dtype=torch.bool)
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert stats["clipfrac"].item() == 0.0
    assert_close(loss, 0.5 * ((values - returns) ** 2).mean())
