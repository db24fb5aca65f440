"""Sampling a text-to-image pipeline as DDPO's rollout: the whole denoising chain of every image,
with the log-probability of each step, and the same log-probabilities recomputed for the update.

A Stable-Diffusion-style diffusers pipeline supplies the parts (tokenizer and text encoder through
`encode_prompt`, UNet, VAE, a DDIM scheduler); the loop is written here because DDPO needs what the
pipeline's `__call__` does not return: every latent x_T .. x_0 and log p(x_{t-1} | x_t) per step
(diffusion/ddim.py). With the same generator the chain is the pipeline's own (tests compare images).

Shapes: B images, S denoising steps, latents (C, h, w) (4 x 8 x 8 for the built-in pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_cli.diffusion.ddim import ddim_step


@dataclass
class Trajectory:
    prompts: list[str]
    prompt_embeds: Tensor  # (B, L, D) the text encoder's output for each prompt
    negative_embeds: Tensor | None  # (B, L, D) for the empty prompt (classifier-free guidance), or None
    timesteps: Tensor  # (S,) long, in sampling order (high noise first)
    latents: Tensor  # (B, S + 1, C, h, w): x_T, then the latent after each step, x_0 last
    log_probs: Tensor  # (B, S) float32: log p(latents[:, s + 1] | latents[:, s]), mean over latent dims
    images: Tensor  # (B, 3, H, W) in [0, 1], the decoded x_0


def guided_noise(unet, latents: Tensor, timesteps: Tensor, prompt_embeds: Tensor, negative_embeds: Tensor | None,
                 guidance_scale: float) -> Tensor:
    """The denoiser's output at x_t (B, C, h, w) for per-row timesteps (B,), with classifier-free
    guidance when `negative_embeds` is given: uncond + scale * (cond - uncond), from ONE UNet call
    over the doubled batch (the same arithmetic in sampling and in the update, so ratios start at 1)."""
    if negative_embeds is None:
        return unet(latents, timesteps, encoder_hidden_states=prompt_embeds).sample
    both = unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds])).sample
    uncond, cond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@torch.no_grad()
def sample_trajectories(pipe, prompts: list[str], num_steps: int, eta: float, guidance_scale: float,
                        generator: torch.Generator | None = None, unet=None) -> Trajectory:
    """Sample one image per prompt with a stochastic DDIM sampler (eta > 0), recording the chain.

    Noise is drawn from `generator` in the pipeline's own order (the initial latents, then one draw
    per step), so `pipe(prompts, eta=eta, generator=...)` with the same seed gives the same images.
    `unet`: the denoiser to call (a peft model around pipe.unet, as it trains); default pipe.unet."""
    unet = unet if unet is not None else pipe.unet
    device = pipe.unet.device
    guided = guidance_scale > 1.0
    prompt_embeds, negative_embeds = pipe.encode_prompt(prompts, device, 1, guided)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_steps, device=device)
    channels, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    noise_device = generator.device if generator is not None else device
    x = torch.randn((len(prompts), channels, size, size), generator=generator, device=noise_device,
                    dtype=prompt_embeds.dtype).to(device) * scheduler.init_noise_sigma
    chain, log_probs = [x], []
    for t in scheduler.timesteps:
        rows = t.expand(len(prompts)).to(device)
        noise = guided_noise(unet, x, rows, prompt_embeds, negative_embeds if guided else None,
                             guidance_scale)  # (DDIM scales no model input: x as it is, here and in the update)
        x, log_prob = ddim_step(scheduler, noise, rows, x, eta, generator=generator)
        chain.append(x)
        log_probs.append(log_prob)
    return Trajectory(prompts, prompt_embeds, negative_embeds if guided else None, scheduler.timesteps.clone(),
                      torch.stack(chain, dim=1), torch.stack(log_probs, dim=1), decode(pipe, x))


def decode(pipe, latents: Tensor) -> Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1] through the pipeline's VAE."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def step_log_probs(pipe, traj: Trajectory, rows: Tensor, steps: Tensor, eta: float, guidance_scale: float,
                   unet=None) -> Tensor:
    """The current denoiser's log p(x_{t-1} | x_t) of recorded steps: row rows[i]'s step steps[i],
    (n,) each -> (n,) float32, with grad through the UNet. With unchanged weights it equals
    traj.log_probs[rows, steps]: the importance ratio of DDPO's first update is 1 (exactly for the same
    batch; CPU kernels that block by batch size can differ in the last bits, ~1e-7, for another).

    `unet`: the denoiser to call (the training wrapper of pipe.unet under data parallelism); default
    pipe.unet. Guidance applies when the trajectory has negative embeddings and guidance_scale > 1;
    a guidance_scale of 1 scores with the conditional output alone (TRL's train_cfg: false)."""
    x_t, x_prev = traj.latents[rows, steps], traj.latents[rows, steps + 1]
    timesteps = traj.timesteps.to(steps.device)[steps].to(x_t.device)  # the UNet embeds them on its own device
    guided = traj.negative_embeds is not None and guidance_scale > 1.0
    negative = traj.negative_embeds[rows] if guided else None
    noise = guided_noise(unet if unet is not None else pipe.unet, x_t, timesteps, traj.prompt_embeds[rows], negative,
                         guidance_scale)
    _, log_prob = ddim_step(pipe.scheduler, noise, timesteps, x_t, eta, prev_sample=x_prev)
    return log_prob


def cat_trajectories(parts: list[Trajectory]) -> Trajectory:
    """Several sampled batches (same steps and guidance) as one trajectory of all their rows."""
    first = parts[0]
    negative = None if first.negative_embeds is None else torch.cat([p.negative_embeds for p in parts])
    return Trajectory(
        [prompt for p in parts for prompt in p.prompts], torch.cat([p.prompt_embeds for p in parts]), negative,
        first.timesteps, torch.cat([p.latents for p in parts]), torch.cat([p.log_probs for p in parts]),
        torch.cat([p.images for p in parts]),
    )
