"""The stochastic DDIM step against diffusers' DDIMScheduler, and its log-probability against a direct
Gaussian density."""

import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch.testing import assert_close

from rlhf_cli.diffusion.ddim import ddim_step

SHAPE = (3, 4, 8, 8)


def make_scheduler(steps=10, **overrides):
    # Stable Diffusion's schedule: scaled-linear betas, leading spacing with steps_offset 1 and
    # set_alpha_to_one=False, so that the last step (t=1 -> "t=-99") still has sigma_t > 0
    config = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    scheduler = DDIMScheduler(**{**config, **overrides})
    scheduler.set_timesteps(steps)
    return scheduler


def inputs(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"timestep_spacing": "trailing", "steps_offset": 0},
        {"timestep_spacing": "linspace", "steps_offset": 0},
    ],
)
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_step_matches_diffusers(overrides, eta):
    scheduler = make_scheduler(**overrides)
    timesteps = scheduler.timesteps
    for index in (0, len(timesteps) // 2, len(timesteps) - 1):  # first, middle, last
        t = int(timesteps[index])
        model_output, sample = inputs(seed=index)
        if t == 0:  # linspace ends at t=0, where a_prev = a_t and sigma_t = 0: no density
            with pytest.raises(ValueError, match="deterministic"):
                ddim_step(scheduler, model_output, t, sample, eta)
            continue
        ours, log_prob = ddim_step(
            scheduler, model_output, t, sample, eta, generator=torch.Generator().manual_seed(7)
        )
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
        ref = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        assert log_prob.shape == (SHAPE[0],) and torch.isfinite(log_prob).all()
        # re-scoring the sampled latent gives the same log-probability: ratio exactly 1
        _, again = ddim_step(scheduler, model_output, t, sample, eta, prev_sample=ours)
        assert torch.equal(again, log_prob)


def test_log_prob_is_a_direct_gaussian_density():
    scheduler = make_scheduler()
    t, eta = 501, 0.8  # leading spacing, 10 steps: 501 -> 401
    eps, x_t = inputs(seed=3, shape=(2, 1, 2, 2))
    x_prev = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(4))

    # the mean and sigma by hand from the DDIM equations, in float64 Python scalars
    a_t, a_prev = float(scheduler.alphas_cumprod[501]), float(scheduler.alphas_cumprod[401])
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0 = (x_t.double() - math.sqrt(1 - a_t) * eps.double()) / math.sqrt(a_t)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps.double()
    expected = torch.distributions.Normal(mean, sigma).log_prob(x_prev.double()).mean(dim=(1, 2, 3))

    returned, log_prob = ddim_step(scheduler, eps, t, x_t, eta, prev_sample=x_prev)
    assert returned is x_prev
    assert log_prob.dtype == torch.float32
    assert_close(log_prob.double(), expected, atol=1e-5, rtol=1e-6)
    # the log-probability is differentiable in the model output (through the mean)
    eps = eps.clone().requires_grad_()
    ddim_step(scheduler, eps, t, x_t, eta, prev_sample=x_prev)[1].sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0


def test_half_precision_inputs_give_float32_log_prob():
    scheduler = make_scheduler()
    model_output, sample = inputs()
    prev, log_prob = ddim_step(scheduler, model_output.half(), 301, sample.half(), 1.0,
                               generator=torch.Generator().manual_seed(0))
    assert prev.dtype == torch.float16 and log_prob.dtype == torch.float32
    assert torch.equal(ddim_step(scheduler, model_output.half(), 301, sample.half(), 1.0, prev_sample=prev)[1],
                       log_prob)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_per_row_timesteps_equal_row_by_row(prediction_type):
    scheduler = make_scheduler(prediction_type=prediction_type)
    model_output, sample = inputs()
    prev = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([901, 401, 1])  # first, middle and last step in one batch
    _, batched = ddim_step(scheduler, model_output, t, sample, 1.0, prev_sample=prev)
    rows = [ddim_step(scheduler, model_output[i:i + 1], int(t[i]), sample[i:i + 1], 1.0,
                      prev_sample=prev[i:i + 1])[1] for i in range(3)]
    assert_close(batched, torch.cat(rows), atol=0, rtol=0)
    # sampling per row follows each row's own step (same noise -> diffusers' result row by row)
    sampled, _ = ddim_step(scheduler, model_output, t, sample, 1.0, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    for i in range(3):
        ref = scheduler.step(model_output[i:i + 1], int(t[i]), sample[i:i + 1], eta=1.0,
                             variance_noise=noise[i:i + 1]).prev_sample
        assert_close(sampled[i:i + 1], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, -0.5, 1.5])
def test_eta_outside_zero_one_is_refused(eta):
    model_output, sample = inputs()
    with pytest.raises(ValueError, match="eta"):
        ddim_step(make_scheduler(), model_output, 501, sample, eta)


def test_unsupported_configs_are_refused():
    model_output, sample = inputs()
    with pytest.raises(ValueError, match="thresholding"):
        ddim_step(make_scheduler(thresholding=True), model_output, 501, sample, 1.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step(DDIMScheduler(), model_output, 501, sample, 1.0)
    with pytest.raises(ValueError, match="timesteps must be in"):
        ddim_step(make_scheduler(), model_output, 1000, sample, 1.0)
    # set_alpha_to_one=True: the last step is deterministic and has no density; other steps work
    scheduler = make_scheduler(set_alpha_to_one=True)
    ddim_step(scheduler, model_output, 101, sample, 1.0)
    with pytest.raises(ValueError, match="deterministic"):
        ddim_step(scheduler, model_output, 1, sample, 1.0)
    # so are diffusers' defaults, whose last step is t=0 -> a_prev = alphas_cumprod[0] = a_t
    with pytest.raises(ValueError, match="deterministic"):
        ddim_step(make_scheduler(steps_offset=0), model_output, 0, sample, 1.0)
