"""DDPO's epoch (diffusion/trainer.py) on an untrained built-in pipeline: the first update's ratio is 1,
fused timesteps give the per-step gradient, the update moves log-probs the way the advantages say,
advantages are normalised over the whole batch, runs repeat, and NaN stops before the weights change."""

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from image_pipelines import untrained_pipeline

from rlhf_cli.config.diffusion import DDPOOptions, UNetPeftConfig
from rlhf_cli.config.sections import TrainingConfig
from rlhf_cli.diffusion.policy import trainable_unet
from rlhf_cli.diffusion.sampling import step_log_probs
from rlhf_cli.diffusion.trainer import DDPOTrainer, NonFiniteUpdate

PROMPTS = ["a red circle on a white background", "a blue square on a black background", "a green triangle",
           "a yellow square on a grey background"]
OPTIONS = DDPOOptions(sample_num_steps=4, sample_guidance_scale=3.0, sample_batch_size=4, sample_num_batches_per_epoch=2,
                      train_batch_size=2, train_gradient_accumulation_steps=4)
TRAINING = TrainingConfig(learning_rate=1e-3, lr_scheduler_type="constant", seed=0)


def make_trainer(options=OPTIONS, training=TRAINING, lora=False) -> DDPOTrainer:
    pipe = untrained_pipeline()
    torch.manual_seed(0)  # LoRA's gaussian init draws from the global RNG (the stage seeds it)
    unet = trainable_unet(pipe, UNetPeftConfig(use_peft=lora, lora_r=2, lora_alpha=2))
    return DDPOTrainer(pipe, unet, options, training, Accelerator(cpu=True))


def all_log_probs(trainer, traj):
    """(N, S) the current UNet's log-probs of every recorded step."""
    n, s = traj.log_probs.shape
    rows, steps = torch.arange(n).repeat_interleave(s), torch.arange(s).repeat(n)
    with torch.no_grad():
        out = step_log_probs(trainer.pipe, traj, rows, steps, trainer.options.sample_eta, trainer.update_guidance)
    return out.reshape(n, s)


def trainable_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.unwrapped.named_parameters() if v.requires_grad}


def test_an_epoch_samples_its_batches_with_the_whole_chain():
    trainer = make_trainer()
    traj, rows = trainer.sample_epoch(PROMPTS, epoch=0)
    assert traj.latents.shape == (8, 5, 4, 8, 8) and traj.log_probs.shape == (8, 4) and traj.images.shape == (8, 3, 32, 32)
    assert rows.shape == (8,) and traj.prompts == [PROMPTS[i] for i in rows.tolist()]
    again, rows_again = make_trainer().sample_epoch(PROMPTS, epoch=0)  # a fresh run: the same epoch 0
    assert torch.equal(rows, rows_again) and torch.equal(traj.latents, again.latents)
    other, _ = trainer.sample_epoch(PROMPTS, epoch=1)
    assert not torch.allclose(traj.latents[:, -1], other.latents[:, -1])


def test_one_optimizer_step_per_epoch_sees_ratio_one_everywhere():
    """Every micro-step runs before the epoch's only optimizer step: the ratio is 1 throughout, up to the
    float rounding of other batch shapes (CPU kernels block by batch size: <= 6e-7 in a log-prob on one
    thread, 0 on two here; the clip range is 1e-4)."""
    trainer = make_trainer()
    traj, rows = trainer.sample_epoch(PROMPTS, epoch=0)
    torch.testing.assert_close(all_log_probs(trainer, traj), traj.log_probs, atol=1e-5, rtol=0)
    stats = trainer.update(traj, torch.linspace(-1, 1, 8), epoch=1)
    assert stats["approx_kl"] < 1e-10 and stats["clipfrac"] == 0.0
    assert trainer.global_step == 1 and stats["grad_norm"] > 0


def test_later_optimizer_steps_of_an_epoch_see_moved_ratios():
    trainer = make_trainer(dataclasses.replace(OPTIONS, train_gradient_accumulation_steps=1))
    traj, _ = trainer.sample_epoch(PROMPTS, epoch=0)
    stats = trainer.update(traj, torch.linspace(-1, 1, 8), epoch=1)
    assert trainer.global_step == 4 and stats["approx_kl"] > 0 and stats["clipfrac"] > 0


@pytest.mark.parametrize("lora", [False, True])
def test_timesteps_in_one_call_give_the_gradient_of_one_call_per_step(lora):
    options = dataclasses.replace(OPTIONS, train_timestep_fraction=0.75)  # 3 of 4 steps per image
    states = []
    for per_call in (1, 2, None):
        trainer = make_trainer(dataclasses.replace(options, train_timesteps_per_call=per_call), lora=lora)
        traj, _ = trainer.sample_epoch(PROMPTS, epoch=0)
        stats = trainer.update(traj, torch.linspace(-1, 1, 8), epoch=1)
        states.append((trainable_state(trainer), stats))
    (first, first_stats), *others = states
    for state, stats in others:
        assert state.keys() == first.keys()
        for name in first:
            # Adam's first step is lr x g / |g| per weight: a weight whose gradient is ~0 amplifies float
            # rounding of the summation order, so the bound is 1% of the step (lr 1e-3), not exact equality
            torch.testing.assert_close(state[name], first[name], rtol=0, atol=1e-5)
        assert stats["loss"] == pytest.approx(first_stats["loss"], rel=1e-4, abs=1e-7)


def test_the_update_raises_the_log_probs_of_images_with_positive_advantages():
    trainer = make_trainer(training=dataclasses.replace(TRAINING, learning_rate=1e-4))
    traj, _ = trainer.sample_epoch(PROMPTS, epoch=0)
    advantages = torch.tensor([1.0, -1.0] * 4)
    before = all_log_probs(trainer, traj)
    trainer.update(traj, advantages, epoch=1)
    change = (all_log_probs(trainer, traj) - before).mean(dim=1)  # (N,)
    assert change[advantages > 0].mean() > change[advantages < 0].mean()


def test_only_lora_weights_train_and_the_base_stays():
    trainer = make_trainer(lora=True)
    base = {k: v.clone() for k, v in trainer.unwrapped.named_parameters() if not v.requires_grad}
    lora = trainable_state(trainer)
    assert lora and all("lora_" in k for k in lora)
    traj, _ = trainer.sample_epoch(PROMPTS, epoch=0)
    trainer.update(traj, torch.linspace(-1, 1, 8), epoch=1)
    assert all(torch.equal(v, dict(trainer.unwrapped.named_parameters())[k]) for k, v in base.items())
    assert any(not torch.equal(v, trainable_state(trainer)[k]) for k, v in lora.items())


def test_advantages_normalise_over_the_batch_or_per_prompt_and_clip():
    trainer = make_trainer(dataclasses.replace(OPTIONS, train_adv_clip_max=1.0))
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = trainer.advantages(rewards, torch.tensor([0, 1, 2, 3]), PROMPTS)
    expected = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(out, expected.clamp(-1, 1))

    tracked = make_trainer(dataclasses.replace(OPTIONS, per_prompt_stat_tracking=True,
                                               per_prompt_stat_tracking_buffer_size=4,
                                               per_prompt_stat_tracking_min_count=2))
    # prompt 0 twice (rewards 0 and 2), prompt 1 twice (10 and 14): each normalised by its own statistics
    out = tracked.advantages(torch.tensor([0.0, 10.0, 2.0, 14.0]), torch.tensor([0, 1, 0, 1]), PROMPTS)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, 1.0, 1.0]), atol=1e-5, rtol=0)
    assert tracked.state_dict()["tracker"]["buffers"] == {PROMPTS[0]: [0.0, 2.0], PROMPTS[1]: [10.0, 14.0]}


def test_the_same_seed_repeats_the_epoch_exactly():
    results = []
    for _ in range(2):
        trainer = make_trainer(dataclasses.replace(OPTIONS, train_gradient_accumulation_steps=2))
        traj, rows = trainer.sample_epoch(PROMPTS, epoch=3)
        stats = trainer.update(traj, torch.linspace(-1, 1, 8), epoch=4)
        results.append((stats, trainable_state(trainer)))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(v, results[1][1][k]) for k, v in results[0][1].items())


def test_a_nan_advantage_stops_the_update_before_the_weights_change():
    trainer = make_trainer()
    before = trainable_state(trainer)
    traj, _ = trainer.sample_epoch(PROMPTS, epoch=0)
    advantages = torch.zeros(8)
    advantages[3] = float("nan")
    with pytest.raises(NonFiniteUpdate, match="NaN"):
        trainer.update(traj, advantages, epoch=1)
    assert all(torch.equal(v, trainable_state(trainer)[k]) for k, v in before.items())
    assert trainer.global_step == 0
