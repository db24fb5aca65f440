"""DDPO's rollout (diffusion/sampling.py) on an untrained built-in pipeline: the chain is the
pipeline's own, and re-scoring recorded steps with unchanged weights gives the recorded log-probs."""

import pytest
import torch
from image_pipelines import untrained_pipeline

from rlhf_cli.diffusion.sampling import sample_trajectories, step_log_probs

PROMPTS = ["a red circle on a white background", "a blue square on a black background", "a green triangle"]


@pytest.fixture(scope="module")
def pipe():
    return untrained_pipeline()


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_the_chain_is_the_pipelines_own(pipe, guidance):
    traj = sample_trajectories(pipe, PROMPTS, num_steps=5, eta=1.0, guidance_scale=guidance,
                               generator=torch.Generator().manual_seed(3))
    assert traj.latents.shape == (3, 6, 4, 8, 8) and traj.log_probs.shape == (3, 5)
    assert traj.images.shape == (3, 3, 32, 32) and traj.images.min() >= 0 and traj.images.max() <= 1
    assert torch.isfinite(traj.log_probs).all()
    with torch.no_grad():
        theirs = pipe(PROMPTS, num_inference_steps=5, eta=1.0, guidance_scale=guidance, output_type="pt",
                      generator=torch.Generator().manual_seed(3)).images
    torch.testing.assert_close(traj.images, theirs, atol=1e-5, rtol=0)


def test_guidance_and_prompts_change_the_chain(pipe):
    def images(prompts, guidance):
        return sample_trajectories(pipe, prompts, 4, 1.0, guidance, torch.Generator().manual_seed(0)).images

    assert not torch.allclose(images(PROMPTS, 1.0), images(PROMPTS, 4.0), atol=1e-4)
    assert not torch.allclose(images(PROMPTS, 4.0), images(PROMPTS[::-1], 4.0), atol=1e-4)


def test_same_seed_same_chain_other_seed_other_chain(pipe):
    def run(seed):
        return sample_trajectories(pipe, PROMPTS, 4, 1.0, 3.0, torch.Generator().manual_seed(seed)).latents

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_rescoring_recorded_steps_gives_the_recorded_log_probs(pipe):
    traj = sample_trajectories(pipe, PROMPTS, 4, 1.0, 4.0, torch.Generator().manual_seed(0))
    # rows at different steps in one call, as the update's shuffled batches are
    rows, steps = torch.tensor([0, 1, 2, 0, 2, 1]), torch.tensor([0, 3, 1, 2, 3, 0])
    with torch.no_grad():
        again = step_log_probs(pipe, traj, rows, steps, eta=1.0, guidance_scale=4.0)
    torch.testing.assert_close(again, traj.log_probs[rows, steps], atol=1e-5, rtol=0)
    # and the gradient reaches the UNet
    pipe.unet.requires_grad_(True)
    try:
        logp = step_log_probs(pipe, traj, rows[:2], steps[:2], eta=1.0, guidance_scale=4.0)
        logp.sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.unet.parameters())
    finally:
        pipe.unet.requires_grad_(False).zero_grad(set_to_none=True)


def test_a_deterministic_sampler_is_refused(pipe):
    with pytest.raises(ValueError, match="eta"):
        sample_trajectories(pipe, PROMPTS, 4, 0.0, 1.0)
