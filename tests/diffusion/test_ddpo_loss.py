"""DDPO's clipped loss and DDPO-SF on hand-worked tensors, their gradients, and one descent step."""

import math

import torch
from diffusers import DDIMScheduler
from torch.testing import assert_close

from rlhf_cli.diffusion.ddim import ddim_step
from rlhf_cli.diffusion.loss import clipped_loss, score_function_loss


def test_ratio_one_gives_minus_mean_advantage():
    adv = torch.tensor([1.0, -2.0, 3.0])
    logp = torch.tensor([-0.3, 0.2, -1.5])
    loss, stats = clipped_loss(adv, logp, logp.clone(), clip_range=1e-4)
    assert_close(loss, torch.tensor(-2 / 3))  # -(1 - 2 + 3) / 3
    assert stats["approx_kl"] == 0 and stats["clipfrac"] == 0


def test_clipping_values_stats_and_gradients():
    # clip_range 0.2 -> ratios clamped to [0.8, 1.2]. Rows (A = advantage, rho = ratio):
    #   A=+1 rho=1.5: max(-1.5, -1.2) = -1.2  clipped, no gradient
    #   A=-1 rho=0.5: max( 0.5,  0.8) =  0.8  clipped, no gradient
    #   A=+1 rho=1.1: max(-1.1, -1.1) = -1.1  inside:  d/dlogp = -A rho / 5 = -0.22
    #   A=-1 rho=1.5: max( 1.5,  1.2) =  1.5  pessimistic side kept: +1.5 / 5 = 0.3
    #   A=+2 rho=0.5: max(-1.0, -1.6) = -1.0  pessimistic side kept: -2 * 0.5 / 5 = -0.2
    # loss = (-1.2 + 0.8 - 1.1 + 1.5 - 1.0) / 5 = -0.2
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    ratios = torch.tensor([1.5, 0.5, 1.1, 1.5, 0.5])
    old = torch.full((5,), -2.0)
    logp = (old + ratios.log()).requires_grad_()
    loss, stats = clipped_loss(adv, logp, old, clip_range=0.2)
    assert_close(loss, torch.tensor(-0.2))
    assert_close(stats["clipfrac"], torch.tensor(0.8))  # |rho - 1| > 0.2 for 4 of 5 rows
    # 0.5 * mean(ln^2 rho) = 0.5 * (2 * 0.1644020 + 2 * 0.4804530 + 0.0090840) / 5
    assert_close(stats["approx_kl"], torch.tensor(0.1298794))
    loss.backward()
    assert_close(logp.grad, torch.tensor([0.0, 0.0, -0.22, 0.3, -0.2]))


def test_score_function_loss_value_and_gradient():
    adv = torch.tensor([1.0, -2.0])
    logp = torch.tensor([-3.0, -1.0], requires_grad=True)
    loss = score_function_loss(adv, logp)
    assert_close(loss, torch.tensor(0.5))  # -((1)(-3) + (-2)(-1)) / 2 = -(-3 + 2) / 2
    loss.backward()
    assert_close(logp.grad, torch.tensor([-0.5, 1.0]))  # -A / B


def test_descent_on_the_clipped_loss_raises_a_positive_advantage_samples_log_prob():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    # a "denoiser" whose output is a free parameter: the policy's only weights
    eps = torch.nn.Parameter(torch.randn(2, 4, 8, 8, generator=g))
    t = torch.tensor([501, 501])
    with torch.no_grad():
        prev, old = ddim_step(scheduler, eps, t, sample, 1.0, generator=g)
    adv = torch.tensor([1.0, -1.0])

    _, logp = ddim_step(scheduler, eps, t, sample, 1.0, prev_sample=prev)
    loss, stats = clipped_loss(adv, logp, old, clip_range=0.2)
    assert_close(loss, -adv.mean())  # unchanged weights: ratio exactly 1
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0
    loss.backward()
    torch.optim.SGD([eps], lr=0.1).step()

    with torch.no_grad():
        _, new = ddim_step(scheduler, eps, t, sample, 1.0, prev_sample=prev)
    assert new[0] > old[0] and new[1] < old[1]
    assert math.isfinite(float(new.sum()))
