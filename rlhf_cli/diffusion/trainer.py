"""DDPO's epoch for one pipeline: sample the denoising chains -> advantages from rewards -> the update.

The update (Black et al. 2023; TRL's DDPOTrainer did the same): for each of `train_num_inner_epochs`
passes, shuffle the epoch's images, draw for each image its own random order of the denoising steps
and keep the first `int(sample_num_steps * train_timestep_fraction)`, then cut the images into
micro-batches of `train_batch_size`. A micro-batch trains on its selected steps, accumulating
gradients: step j of every image in it, then step j + 1, ..., `train_timesteps_per_call` of them per
UNet call (TRL: one; more is the same gradient in fewer, larger calls, faster where memory allows); an optimizer step follows
every `train_gradient_accumulation_steps` micro-batches, so each loss term is divided by
(timesteps x accumulation) and a step's gradient is the mean over its images and timesteps.

Everything random here comes from generators seeded by (seed, epoch, ...), not from torch's global
RNG, so a run resumed at an epoch boundary samples and shuffles exactly as the uninterrupted run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhf_cli.config.diffusion import DDPOOptions
from rlhf_cli.config.sections import TrainingConfig
from rlhf_cli.diffusion.advantages import PerPromptStatTracker, batch_advantages, clip_advantages
from rlhf_cli.diffusion.loss import clipped_loss, score_function_loss
from rlhf_cli.diffusion.sampling import Trajectory, cat_trajectories, sample_trajectories, step_log_probs
from rlhf_cli.training.optim import make_optimizer, make_scheduler
from rlhf_cli.training.optimizer_step import micro_batch, optimizer_step


class NonFiniteUpdate(Exception):
    """A loss or gradient norm of the update was NaN/inf; nothing of that optimizer step was applied."""


def seeded(*parts: int) -> torch.Generator:
    """A CPU generator for one purpose at one point of the run, e.g. seeded(seed, epoch, batch, rank)."""
    value = 0
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


class DDPOTrainer:
    """The trainable UNet (full or LoRA, `unet`) of `pipe`, its optimizer and schedule, the per-prompt
    reward statistics, and one epoch's three parts: `sample`, `advantages`, `update`."""

    # purposes of the seeded generators: different streams for the same (seed, epoch)
    SAMPLE, PROMPTS, SHUFFLE = 1, 2, 3

    def __init__(self, pipe, unet, options: DDPOOptions, training: TrainingConfig, accelerator):
        self.pipe, self.options, self.training, self.accelerator = pipe, options, training, accelerator
        self.micro_batches = options.sample_batch_size * options.sample_num_batches_per_epoch // options.train_batch_size
        self.timesteps_per_image = max(1, int(options.sample_num_steps * options.train_timestep_fraction))
        self.steps_per_epoch = self.micro_batches // options.train_gradient_accumulation_steps * options.train_num_inner_epochs
        optimizer = make_optimizer(unet.parameters(), training)
        self.scheduler = make_scheduler(optimizer, training, options.num_epochs * self.steps_per_epoch)
        self.unet, self.optimizer = accelerator.prepare(unet, optimizer)
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.tracker = (PerPromptStatTracker(options.per_prompt_stat_tracking_buffer_size,
                                             options.per_prompt_stat_tracking_min_count)
                        if options.per_prompt_stat_tracking else None)
        self.global_step = 0  # optimizer steps taken
        self.nonfinite_skips = 0
        # training with guidance in the update (train_cfg) uses the sampling scale; else the conditional output
        self.update_guidance = options.sample_guidance_scale if options.train_cfg else 1.0

    @property
    def unwrapped(self):
        """The UNet, or the peft model around it, without the data-parallel wrapper: what sampling calls. Under
        FSDP it is the sharded root, whose forward gathers the root's own parameters (calling pipe.unet, the
        UNet inside a LoRA model, would bypass that)."""
        return self.accelerator.unwrap_model(self.unet)

    # --- 1. sampling ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator) -> Trajectory:
        """One image per prompt with the whole chain (B rows; see diffusion/sampling.py)."""
        self.unet.eval()
        with self.accelerator.autocast():
            return sample_trajectories(self.pipe, prompts, self.options.sample_num_steps, self.options.sample_eta,
                                       self.options.sample_guidance_scale, generator, unet=self.unwrapped)

    def sample_epoch(self, prompts: list[str], epoch: int) -> tuple[Trajectory, Tensor]:
        """This process's images of `epoch`: sample_num_batches_per_epoch batches of sample_batch_size prompts
        drawn with replacement from `prompts` (as TRL's prompt function did). Returns the trajectory and the
        (B,) indices of its prompts in `prompts`."""
        rank, seed = self.accelerator.process_index, self.training.seed
        batches, rows = [], []
        for b in range(self.options.sample_num_batches_per_epoch):
            picked = torch.randint(len(prompts), (self.options.sample_batch_size,),
                                   generator=seeded(seed, self.PROMPTS, epoch, b, rank))
            batches.append(self.sample([prompts[i] for i in picked.tolist()], seeded(seed, self.SAMPLE, epoch, b, rank)))
            rows.append(picked)
        return cat_trajectories(batches), torch.cat(rows)

    # --- 2. advantages --------------------------------------------------------------------------

    def advantages(self, rewards: Tensor, prompt_rows: Tensor, prompts: list[str]) -> Tensor:
        """This process's (B,) rewards -> its (B,) advantages, normalised over every process's images (per
        prompt with the tracker, else over the batch) and clipped to train_adv_clip_max."""
        device = self.accelerator.device
        all_rewards = self.accelerator.gather(rewards.float().to(device)).cpu()  # (B x processes,)
        all_rows = self.accelerator.gather(prompt_rows.to(device)).cpu()
        if self.tracker is not None:
            advantages = self.tracker.update([prompts[i] for i in all_rows.tolist()], all_rewards)
        else:
            advantages = batch_advantages(all_rewards)
        advantages = clip_advantages(advantages, self.options.train_adv_clip_max)
        start = self.accelerator.process_index * len(rewards)
        return advantages[start : start + len(rewards)]

    # --- 3. the update --------------------------------------------------------------------------

    def update(self, traj: Trajectory, advantages: Tensor, epoch: int) -> dict[str, float]:
        """train_num_inner_epochs passes over the epoch's images; returns the means of loss, approx_kl,
        clipfrac and grad_norm over the pass (every process's). Raises NonFiniteUpdate on a NaN/inf loss or
        gradient norm (before that optimizer step)."""
        options, device = self.options, self.accelerator.device
        num_images, num_steps = traj.log_probs.shape
        per_image, size = self.timesteps_per_image, options.train_batch_size
        chunk = options.train_timesteps_per_call or per_image
        accumulation = options.train_gradient_accumulation_steps
        generator = seeded(self.training.seed, self.SHUFFLE, epoch, self.accelerator.process_index)
        advantages = advantages.to(device)
        sums = torch.zeros(3, device=device)  # loss, approx_kl, clipfrac: sums over micro-steps
        count, norms = 0, []
        self.unet.train()
        for _ in range(options.train_num_inner_epochs):
            order = torch.randperm(num_images, generator=generator)
            # (N, per_image): each image's own random selection and order of its denoising steps
            steps = torch.stack([torch.randperm(num_steps, generator=generator)[:per_image] for _ in range(num_images)])
            for m in range(self.micro_batches):
                rows = order[m * size : (m + 1) * size]
                closes_step = (m + 1) % accumulation == 0
                for j in range(0, per_image, chunk):
                    # c of the images' selected steps in one UNet call: (c * n,) rows, step j first for all
                    c = min(chunk, per_image - j)
                    last = closes_step and j + c == per_image
                    sync = micro_batch(self.accelerator, self.unet, last)
                    with sync:
                        loss, stats = self._loss(traj, advantages, rows.repeat(c), steps[rows, j : j + c].T.flatten())
                        # the mean over c steps' rows, weighted as c separate per-step means would be
                        self.accelerator.backward(loss * c / (per_image * accumulation))
                    sums += c * torch.stack([loss.detach(), stats["approx_kl"], stats["clipfrac"]])
                    count += c
                if closes_step:
                    norms.append(self._optimizer_step())
        totals = self.accelerator.reduce(sums, "mean") / count
        if not math.isfinite(totals[0].item()):
            raise NonFiniteUpdate(f"the DDPO loss is {totals[0].item()} (NaN/inf)")
        return {"loss": totals[0].item(), "approx_kl": totals[1].item(), "clipfrac": totals[2].item(),
                "grad_norm": sum(norms) / len(norms) if norms else float("nan")}

    def _loss(self, traj: Trajectory, advantages: Tensor, rows: Tensor, steps: Tensor) -> tuple[Tensor, dict]:
        """The objective of one micro-step: images `rows` (n,) at their denoising steps `steps` (n,)."""
        with self.accelerator.autocast():
            log_prob = step_log_probs(self.pipe, traj, rows, steps, self.options.sample_eta, self.update_guidance,
                                      unet=self.unet)
        old = traj.log_probs[rows, steps]
        if self.options.loss_type == "score_function":
            loss = score_function_loss(advantages[rows], log_prob)
            ratio = torch.exp(log_prob.detach() - old)
            stats = {"approx_kl": 0.5 * ((log_prob.detach() - old) ** 2).mean(),
                     "clipfrac": ((ratio - 1).abs() > self.options.train_clip_range).float().mean()}
            return loss, stats
        return clipped_loss(advantages[rows], log_prob, old, self.options.train_clip_range)

    def _optimizer_step(self) -> float:
        outcome = optimizer_step(self.accelerator, self.optimizer, self.params, self.training.max_grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        if outcome.fault:
            raise NonFiniteUpdate(outcome.fault)
        if outcome.applied:
            self.scheduler.step()
            self.global_step += 1
        return outcome.grad_norm if outcome.grad_norm is not None else float("nan")

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "nonfinite_skips": self.nonfinite_skips,
                "tracker": self.tracker.state_dict() if self.tracker is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.nonfinite_skips = state["global_step"], state["nonfinite_skips"]
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
