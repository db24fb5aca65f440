"""Helpers of the diffusion tests: the built-in pipeline built once, an untrained one, and a UNet's output on
fixed inputs."""

from pathlib import Path

import torch

from rlhf_cli.builtin.image_pipeline import assemble, build_components


def built_tiny_sd() -> Path:
    """The built-in pipeline's cached folder, built first if missing (about 2 minutes of one core). Under xdist
    the workers take turns, so only one builds; a run launched afterwards loads it."""
    from filelock import FileLock

    from rlhf_cli.builtin.cache import cache_root
    from rlhf_cli.builtin.image_pipeline import tiny_pipeline_folder

    cache_root().mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_root() / "tiny-sd.lock")):
        return tiny_pipeline_folder(seed=0)


def untrained_pipeline():
    """The built-in pipeline's architecture, untrained (the maths needs no good model), with the residual
    branches it starts at zero given small random weights: the prompt, LoRA and updates then change the
    UNet's output."""
    components = build_components(seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in components["unet"].parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return assemble(components)


def unet_output(unet) -> torch.Tensor:
    """The UNet's output on fixed inputs (two rows at different timesteps): compares two UNets' weights by
    what they compute."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 12, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([500, 20]), encoder_hidden_states=text).sample
