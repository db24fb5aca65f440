"""`rlhf ddpo`: DDPO (Black et al. 2023) -- sample images from a text-to-image pipeline, score them, and
train its UNet (or LoRA on it) with the clipped importance-ratio objective over the denoising steps
(docs/ddpo.md). One epoch = one logged step: sample -> score -> advantages -> update."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from rlhf_cli.config.diffusion import DDPOConfig
from rlhf_cli.data.loading import column_values, load_splits, require_columns
from rlhf_cli.diffusion.grid import save_grid
from rlhf_cli.diffusion.pipeline import load_pipeline
from rlhf_cli.diffusion.policy import fuse_lora_weights, save_trained, trainable_unet
from rlhf_cli.diffusion.rewards import CombinedImageReward
from rlhf_cli.diffusion.sampling import sample_trajectories
from rlhf_cli.diffusion.trainer import DDPOTrainer, NonFiniteUpdate, seeded
from rlhf_cli.errors import UserError
from rlhf_cli.stages.common import finish_run, start_run
from rlhf_cli.training.accel import replica_checksum
from rlhf_cli.training.cadence import RunCadence
from rlhf_cli.training.checkpoint import load_checkpoint, save_checkpoint
from rlhf_cli.training.loop import nonfinite_message
from rlhf_cli.training.progress import StepProgress
from rlhf_cli.training.sharding import full_model_state, lockstep_batches, params_partitioned

log = logging.getLogger(__name__)

PROGRESS_KEYS = ("reward_mean", "loss", "approx_kl", "clipfrac")
GRID_ROWS = 4  # prompts in the default grid
EVAL = 4  # purpose of the evaluation's and the grid's seeded generators (trainer.py has 1-3)


class Prompts:
    """A split's prompt texts and, per prompt, the row's other columns (the reward functions' metadata)."""

    def __init__(self, dataset, column: str, where: str):
        require_columns(dataset, {"data.prompt_column": column}, where)
        self.texts = [str(p) for p in column_values(dataset, column)]
        others = [c for c in dataset.column_names if c != column]
        self.metadata = [{c: row[c] for c in others} for row in dataset] if others else [{} for _ in self.texts]
        if not self.texts:
            raise UserError(f"{where}: no prompts")


def run(config: DDPOConfig, resume: bool = False, overwrite: bool = False) -> None:
    options, training = config.ddpo, config.training
    # 1. Output folder, accelerator, logging
    run_ = start_run("ddpo", config, resume, overwrite)
    accelerator = run_.accelerator

    # 2. The reward and the prompts (one that cannot be loaded stops the run before the pipeline is), then the
    #    pipeline (any LoRA weights given fused in); eval mode ends here. Loaded whole, as every model is
    #    (training/accel.py `load_models_whole`); the UNet is sharded when it is prepared (diffusion/trainer.py)
    reward = CombinedImageReward(config.reward)
    train_raw, test_raw = load_splits(config.data)
    train = Prompts(train_raw, config.data.prompt_column, f"{config.data.dataset_name} (train)")
    test = Prompts(test_raw, config.data.prompt_column, f"{config.data.dataset_name} (test)") if test_raw is not None else None
    grid_prompts = options.grid_prompts or (test or train).texts[:GRID_ROWS]
    pipe = load_pipeline(config.model.model_name_or_path)
    if config.model.lora_weights:
        fuse_lora_weights(pipe, config.model.lora_weights)
    pipe.to(accelerator.device)

    trainer = None  # step 3's: once it exists its UNet (or peft model) samples (DDPOTrainer.unwrapped)

    def denoiser():
        return trainer.unwrapped if trainer else pipe.unet

    def evaluate(step: int) -> dict[str, float]:
        scores = held_out_scores(pipe, denoiser(), test, reward, options, training, accelerator) if test else {}
        if scores:
            run_.metrics.log(step, scores)
        return scores

    def grid(name: str) -> None:
        # under FSDP / ZeRO-3 every process samples the grid with the main one (each UNet call is a collective)
        if options.grid_epochs and (accelerator.is_main_process or params_partitioned(accelerator)):
            write_grid(pipe, denoiser(), grid_prompts, options, accelerator, run_.output_dir / "grids" / f"{name}.png")

    if options.eval_only:
        evaluate_only(run_, pipe, evaluate, grid)
        return

    # 3. What trains (the UNet or LoRA on it), the trainer (optimizer, schedule, per-prompt statistics);
    #    resume where a checkpoint left off
    unet = trainable_unet(pipe, config.peft)
    if training.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    trainer = DDPOTrainer(pipe, unet, options, training, accelerator)
    epoch = 0
    if run_.resume_from is not None:
        state = load_checkpoint(run_.resume_from, accelerator, trainer.unet, trainer.optimizer, trainer.scheduler)
        trainer.load_state_dict(state["trainer"])
        epoch = state["step"]
        run_.metrics.truncate_after(epoch)
        log.info("resumed from %s at epoch %d", run_.resume_from, epoch)
    images = options.sample_batch_size * options.sample_num_batches_per_epoch
    log.info("%d epochs x %d images per process x %d process(es); %d optimizer steps per epoch, each over %d "
             "image(s) x %d of %d denoising steps", options.num_epochs, images, accelerator.num_processes,
             trainer.steps_per_epoch, options.train_batch_size * options.train_gradient_accumulation_steps,
             trainer.timesteps_per_image, options.sample_num_steps)

    # 4. The starting pipeline's held-out reward and grid (a resumed run has them)
    if epoch == 0:
        evaluate(0)
        grid("epoch-0000")

    def checkpoint(at: int) -> Path:
        return save_checkpoint(run_.output_dir, at, accelerator, trainer.unet, trainer.optimizer, trainer.scheduler,
                               {"trainer": trainer.state_dict()}, save_total_limit=training.save_total_limit)

    # 5. The epochs: sample -> score -> advantages -> update, in the shared run skeleton
    progress = StepProgress(options.num_epochs, "ddpo", PROGRESS_KEYS, enabled=accelerator.is_main_process,
                            start=epoch)
    cadence = RunCadence(total=options.num_epochs, training=training, accelerator=accelerator, metrics=run_.metrics,
                         progress=progress, save=checkpoint, evaluate=evaluate)
    while epoch < options.num_epochs:
        t0 = time.perf_counter()
        traj, prompt_rows = trainer.sample_epoch(train.texts, epoch)
        t1 = time.perf_counter()
        total, parts = reward(traj.images.float().cpu(), traj.prompts, [train.metadata[i] for i in prompt_rows])
        advantages = trainer.advantages(total, prompt_rows, train.texts)
        t2 = time.perf_counter()
        epoch += 1
        try:
            stats = trainer.update(traj, advantages, epoch)
        except NonFiniteUpdate as fault:
            if not training.skip_nonfinite_batches:
                raise cadence.fail(nonfinite_message(str(fault), epoch, run_.output_dir,
                                                     "training.skip_nonfinite_batches")) from None
            log.warning("epoch %d: %s; the rest of this epoch's update is skipped "
                        "(training.skip_nonfinite_batches).", epoch, fault)
            trainer.nonfinite_skips += 1
            stats = {}
        t3 = time.perf_counter()
        stats.update(reward_stats(total, parts, accelerator))
        stats.update({"epoch": epoch, "lr": trainer.scheduler.get_last_lr()[0], "optimizer_steps": trainer.global_step,
                      "images_per_s": len(traj.prompts) * accelerator.num_processes / (t3 - t0),
                      "time/sample_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2,
                      "time/epoch_s": t3 - t0})
        if trainer.tracker is not None:
            stats["per_prompt/num_prompts"] = trainer.tracker.stats()["num_prompts"]
        if trainer.nonfinite_skips:
            stats["nonfinite_skips"] = trainer.nonfinite_skips
        if options.grid_epochs and epoch % options.grid_epochs == 0 and epoch < options.num_epochs:
            grid(f"epoch-{epoch:04d}")
        cadence.after_step(epoch, stats if cadence.log_due(epoch) else None, shown=stats)
    cadence.close()

    # 6. Held-out reward and grid of the trained pipeline, final checkpoint, the pipeline (or LoRA) itself
    evaluate(epoch)
    grid(f"epoch-{epoch:04d}")
    checkpoint(epoch)
    replica_checksum(accelerator, trainer.unet)  # every process must end with the same weights
    gathered = full_model_state(accelerator, trainer.unet)  # FSDP, ZeRO-3: the whole weights (collective); else None
    if accelerator.is_main_process:
        save_trained(pipe, trainer.unwrapped, run_.output_dir, config.peft, gathered)
        log.info("done: %d epochs, %d optimizer steps; %s written to %s", epoch, trainer.global_step,
                 "LoRA weights" if config.peft.use_peft else "pipeline", run_.output_dir)
    finish_run(run_)


def evaluate_only(run_, pipe, evaluate, grid) -> None:
    """ddpo.eval_only: the pipeline's held-out reward (eval.json, metrics.jsonl at step 0) and grid."""
    scores = evaluate(0)
    grid("eval")
    if run_.accelerator.is_main_process:
        (run_.output_dir / "eval.json").write_text(json.dumps(scores, indent=2) + "\n")
        log.info("held-out: %s", ", ".join(f"{k} {v:.4g}" for k, v in scores.items()) or "no held-out split")
    finish_run(run_)


def reward_stats(total: torch.Tensor, parts: dict[str, torch.Tensor], accelerator) -> dict[str, float]:
    """reward_mean / reward_std (TRL's names) over every process's images, and each source's mean."""
    device = accelerator.device
    rewards = accelerator.gather(total.float().to(device))
    stats = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item()}
    for name, values in parts.items():
        stats[f"reward/{name}"] = accelerator.gather(values.float().to(device)).mean().item()
    return stats


@torch.no_grad()
def held_out_scores(pipe, unet, prompts: Prompts, reward, options, training, accelerator) -> dict[str, float]:
    """Mean reward of eval_samples_per_prompt images of every held-out prompt, from fixed seeds (the same
    noise at every evaluation, so the figures move only with the weights), split over processes. `unet`: the
    denoiser that samples (pipe.unet, or the peft model around it as it trains)."""
    if not options.eval_samples_per_prompt:
        return {}
    unet.eval()
    jobs = [(i, k) for k in range(options.eval_samples_per_prompt) for i in range(len(prompts.texts))]
    mine = list(range(accelerator.process_index, len(jobs), accelerator.num_processes))
    sums: dict[str, float] = {}
    batch = training.per_device_eval_batch_size
    # in lockstep under FSDP / ZeRO-3 (every UNet call is a collective): a process with fewer batches samples
    # extra ones whose scores are dropped
    for b, (rows, real) in enumerate(lockstep_batches(mine, batch, accelerator)):
        chunk = [jobs[r] for r in rows]
        texts = [prompts.texts[i] for i, _ in chunk]
        generator = seeded(training.seed, EVAL, accelerator.process_index, b * batch)
        with accelerator.autocast():
            traj = sample_trajectories(pipe, texts, options.sample_num_steps, options.sample_eta,
                                       options.sample_guidance_scale, generator, unet=unet)
        if not real:
            continue
        total, parts = reward(traj.images.float().cpu(), texts, [prompts.metadata[i] for i, _ in chunk])
        for name, values in {"reward_mean": total, **{f"reward/{n}": v for n, v in parts.items()}}.items():
            sums[name] = sums.get(name, 0.0) + values.sum().item()
    # the same names in the same order on every process, also one with no held-out job (more processes
    # than images): the sums are all-reduced position by position
    names = ["reward_mean", *(f"reward/{n}" for n in reward.names)]
    totals = torch.tensor([sums.get(n, 0.0) for n in names] + [float(len(mine))], device=accelerator.device)
    totals = accelerator.reduce(totals, "sum")
    return {f"eval/{name}": (value / totals[-1]).item() for name, value in zip(names, totals[:-1], strict=True)}


@torch.no_grad()
def write_grid(pipe, unet, prompts: list[str], options, accelerator, path: Path) -> None:
    """One row per prompt, one column per seed of grid_seeds: each column's noise is the same at every epoch.
    Written by the main process (the others, where they take part, only sample)."""
    columns = []
    unet.eval()
    for seed in options.grid_seeds:
        with accelerator.autocast():
            traj = sample_trajectories(pipe, prompts, options.sample_num_steps, options.sample_eta,
                                       options.sample_guidance_scale, torch.Generator().manual_seed(seed), unet=unet)
        columns.append(traj.images.float().cpu())
    if not accelerator.is_main_process:
        return
    images = torch.stack(columns, dim=1).flatten(0, 1)  # (P * S, 3, H, W): row-major, prompt by prompt
    save_grid(images, path, columns=len(options.grid_seeds), row_labels=prompts)
