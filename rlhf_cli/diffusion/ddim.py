"""One stochastic DDIM step and the log-probability of its outcome: the policy DDPO trains.

DDPO (Black et al. 2023) treats each denoising step x_t -> x_{t-1} as an action drawn from a Gaussian
policy. With a DDIM sampler at eta > 0 (Song et al. 2020, eq. 12) that Gaussian is

    x0_hat     = the model's prediction of x_0 (from epsilon, v or x_0 itself), clipped if configured
    eps_hat    = the noise that prediction implies
    sigma_t    = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))          (eq. 16)
    mean       = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps_hat
    x_{t-1}    ~ N(mean, sigma_t^2 I)

where a_t = alphas_cumprod[t] and a_prev = alphas_cumprod[t - T // n] (T training timesteps, n inference
steps), or the scheduler's final_alpha_cumprod when t - T // n < 0. The step is written here from those
equations, per row, so one batch may hold rows at different timesteps (the update shuffles them).
"""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so that it broadcasts against a (B, C, H, W) latent."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def _check_config(scheduler, eta: float) -> None:
    config = scheduler.config
    if not eta > 0:
        raise ValueError(
            f"DDPO needs a stochastic sampler: eta must be > 0 (got {eta}); at eta = 0 DDIM is "
            "deterministic and a step has no log-probability"
        )
    if eta > 1:
        # sigma_t^2 would exceed 1 - a_prev and the square root of the direction term turns negative
        raise ValueError(f"eta must be in (0, 1] (got {eta}); eta = 1 is DDPM's variance")
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_inference_steps) before ddim_step")
    if config.get("thresholding", False):
        raise ValueError("scheduler.config.thresholding=True (dynamic thresholding) is not supported by ddim_step")
    if config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"scheduler.config.prediction_type={config.prediction_type!r} is not supported; "
            "use 'epsilon', 'v_prediction' or 'sample'"
        )


def _predict_x0_eps(prediction_type: str, model_output, sample, alpha_t):
    """(x0_hat, eps_hat) from the model output, using x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
    sqrt_a, sqrt_b = alpha_t.sqrt(), (1 - alpha_t).sqrt()
    if prediction_type == "epsilon":
        return (sample - sqrt_b * model_output) / sqrt_a, model_output
    if prediction_type == "v_prediction":
        # v = sqrt(a_t) eps - sqrt(1 - a_t) x_0  (Salimans & Ho 2022)
        return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample
    return model_output, (sample - sqrt_a * model_output) / sqrt_b


def ddim_step(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take (or score) one DDIM step: returns (prev_sample (B, C, H, W), log_prob (B,)).

    scheduler: a diffusers DDIMScheduler (or one with the same config and alphas_cumprod) on which
        set_timesteps has been called. Only its schedule is read; its state is not changed.
    model_output: (B, C, H, W) the denoiser's output at x_t (epsilon, v or x_0, per prediction_type).
    timestep: an int, or (B,) integer timesteps, one per row.
    sample: (B, C, H, W) x_t.
    prev_sample: (B, C, H, W) x_{t-1} to score (the update re-scores the sampled latents); None samples
        it from N(mean, sigma_t^2 I) with `generator`. A sampled x_{t-1} is detached: it is an action,
        a constant to the policy, so its log-probability has a gradient through the mean only.

    The previous timestep is t - T // n, as DDIMScheduler.step defines it whatever timestep_spacing
    and steps_offset set_timesteps used.

    log_prob is the Gaussian log-density of x_{t-1}, averaged (not summed) over the C*H*W latent
    dimensions, as DDPO does. The choice matters: the importance ratio exp(logp - old_logp) is
    clipped to [1 - c, 1 + c], and a sum over D dimensions makes a log-ratio D times larger, so the
    clip range tuned for the mean (DDPO's 1e-4) would clip nearly every step after a sum. The mean
    keeps the ratio's scale independent of the latent size. It is computed in float32 (late in the
    chain sigma_t is small and the log-densities are large, while the ratio needs their difference to
    ~1e-4; half precision rounds that away), and from prev_sample after it is cast to the sample's
    dtype, so that re-scoring the stored latent with unchanged weights gives the same number (ratio 1;
    to the last bit when the model output is computed in the same batch shape).
    """
    _check_config(scheduler, eta)
    config = scheduler.config
    batch, device = sample.shape[0], sample.device

    t = torch.as_tensor(timestep, dtype=torch.long).flatten().to("cpu")
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timestep has {t.numel()} entries for a batch of {batch}")
    if (t < 0).any() or (t >= config.num_train_timesteps).any():
        raise ValueError(f"timesteps must be in [0, {config.num_train_timesteps}), got {t.tolist()}")
    prev_t = t - config.num_train_timesteps // scheduler.num_inference_steps

    alphas = scheduler.alphas_cumprod.to("cpu", torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    alpha_t = alphas[t]
    # the last step lands on "timestep -1": a_prev is final_alpha_cumprod (1 or alphas_cumprod[0])
    alpha_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    if (std <= 0).any():
        raise ValueError(
            f"the DDIM step from timestep(s) {t[std <= 0].tolist()} is deterministic (sigma_t = 0), so it "
            "has no log-probability for DDPO; the last step is when the scheduler has set_alpha_to_one=True "
            "or the last timestep is 0 (timestep_spacing 'linspace', or 'leading' with steps_offset=0): "
            "use set_alpha_to_one=False with steps_offset=1 (Stable Diffusion's schedule) or "
            "timestep_spacing='trailing'"
        )

    alpha_t, alpha_prev, std = (_per_row(v.to(device), sample) for v in (alpha_t, alpha_prev, std))
    x_t, out = sample.float(), model_output.float()
    x0, eps = _predict_x0_eps(config.prediction_type, out, x_t, alpha_t)
    if config.get("clip_sample", False):
        limit = config.get("clip_sample_range", 1.0)
        x0 = x0.clamp(-limit, limit)
    # eps is the model's own noise estimate even when x0 was clipped (DDIMScheduler's default,
    # use_clipped_model_output=False)
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps

    if prev_sample is None:
        noise_device = generator.device if generator is not None else device
        noise = torch.randn(sample.shape, generator=generator, device=noise_device, dtype=torch.float32)
        prev_sample = (mean + std * noise.to(device)).detach().to(sample.dtype)

    # log N(x; mean, std^2) per element, then the mean over all latent dims
    diff = prev_sample.float() - mean
    log_density = -(diff**2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
    return prev_sample, log_density.mean(dim=tuple(range(1, log_density.dim())))
