"""The run of every online stage (`rlhf ppo`, `rlhf grpo`, `rlhf rloo`): rollout -> score ->
advantages -> update, one iteration at a time, for the stage's Algorithm (online/algorithm.py)."""

import json
import logging
import math
import time
from pathlib import Path

import torch

from rlhf_cli.data.loading import column_values, load_splits, require_columns
from rlhf_cli.environments.rollout import (
    environment_from_config,
    environment_tools,
    episode_stats,
    prompt_tools,
)
from rlhf_cli.errors import UserError
from rlhf_cli.lm.generation import encode_prompt_set, left_pad
from rlhf_cli.models.adapters import save_final_model
from rlhf_cli.models.loading import load_stage_tokenizer
from rlhf_cli.models.policy import load_policy
from rlhf_cli.online.alarms import AlarmMonitor, describe, observation
from rlhf_cli.online.algorithm import Algorithm
from rlhf_cli.online.estimates import batch_estimates
from rlhf_cli.online.experience import Experience
from rlhf_cli.online.trainer import OnlineTrainer
from rlhf_cli.online.updater import NonFiniteBatch
from rlhf_cli.rewards.combined import CombinedReward
from rlhf_cli.stages.common import finish_run, record_model, start_run
from rlhf_cli.training.accel import replica_checksum
from rlhf_cli.training.cadence import RunCadence
from rlhf_cli.training.checkpoint import load_checkpoint, save_checkpoint
from rlhf_cli.training.loop import BatchOrder, nonfinite_message
from rlhf_cli.training.metrics import truncate_jsonl
from rlhf_cli.training.progress import StepProgress, print_samples
from rlhf_cli.training.sharding import full_model_state, lockstep_batches

log = logging.getLogger(__name__)

def prepare_prompts(dataset, tokenizer, config, split: str, tools: list[dict] | None = None) -> tuple[list[list[int]], dict[str, list]]:
    """Token ids of every prompt (encoded once; conversations rendered with `tools`, the tool schemas of
    protocol chat) and the other columns (passed to reward functions)."""
    column = config.data.prompt_column
    require_columns(dataset, {"data.prompt_column": column}, f"{config.data.dataset_name} ({split})")
    ids = encode_prompt_set(column_values(dataset, column), tokenizer, config.data, f"{split} prompts", tools)
    columns = {c: dataset[c] for c in dataset.column_names if c != column}
    return ids, columns


def score(reward: CombinedReward, rollout: Experience, columns: dict, rows: list[int], accelerator) -> tuple[torch.Tensor, dict]:
    """The rollout's scores (B,) and each source's part (`rows`: the dataset row of each response); reward models run at the run's compute
    precision, like the policy and the reference (docs/ppo.md, Precision)."""
    batch_columns = {name: [values[i] for i in rows] for name, values in columns.items()}
    if rollout.episodes is not None:  # a text environment's episodes reach reward functions as `episodes`
        batch_columns["episodes"] = rollout.episodes
    with accelerator.autocast():
        return reward.score(rollout.prompts, rollout.responses, batch_columns)


@torch.no_grad()
def held_out_scores(trainer: OnlineTrainer, reward: CombinedReward, prompts, columns, seed: int) -> dict[str, float]:
    """Mean reward of one response sampled for each held-out prompt (same seed every time; the
    training RNG is left untouched)."""
    device, pad = trainer.accelerator.device, trainer.tokenizer.pad_token_id
    rows = list(range(trainer.accelerator.process_index, len(prompts), trainer.accelerator.num_processes))
    total = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for chunk, real in lockstep_batches(rows, trainer.forward_batch_size, trainer.accelerator):
            q, m = left_pad([prompts[i] for i in chunk], pad)
            rollout = trainer.generate(query_ids=q.to(device), query_mask=m.to(device), num_generations=1)
            if not real:  # generated only to keep step with the other FSDP processes
                continue
            scores, parts = score(reward, rollout, columns, chunk, trainer.accelerator)
            for name, values in {"scores": scores, **parts}.items():
                total[name] = total.get(name, 0.0) + values.sum().item()
    sums = torch.tensor(list(total.values()) + [float(len(rows))], device=device)
    sums = trainer.accelerator.reduce(sums, "sum")
    return {f"eval/{name}": (v / sums[-1]).item() for name, v in zip(total, sums[:-1], strict=True)}


def run_online(stage: str, config, options, algorithm: Algorithm, resume: bool, overwrite: bool,
               critic: str | None = None, num_generations: int = 1, share_prompts: bool = False) -> None:
    """`options`: the stage's own section (total_episodes, local_rollout_forward_batch_size,
    sample_steps, num_sample_rows); `critic`: a separate critic model for an algorithm with one;
    `share_prompts`: forwards run each distinct prompt once (lm/shared_prompts.py)."""
    # 1. Output folder, accelerator, logging
    run_ = start_run(stage, config, resume, overwrite)
    accelerator, training = run_.accelerator, config.training

    # 2. Tokenizer (left padding: prompts end where responses start), rewards, tools and prompts (under
    #    protocol chat, conversations rendered with the tools' schemas): a reward, tool or dataset that cannot
    #    be loaded stops the run here, before the policy is (minutes, for a large model)
    tokenizer = load_stage_tokenizer(config.model, padding_side="left")
    reward = CombinedReward(config.reward, accelerator.device)
    tools = environment_tools(config.environment) if config.environment.tools else None
    schemas = prompt_tools(config.environment, tools)
    train_raw, test_raw = load_splits(config.data)
    train_ids, train_columns = prepare_prompts(train_raw, tokenizer, config, "train", schemas)
    test_ids, test_columns = (prepare_prompts(test_raw, tokenizer, config, "test", schemas) if test_raw is not None
                              else (None, None))

    # 3. Policy (with a value head for a critic), reference (when used)
    model, reference = load_policy(config.model, config.peft, training.seed, critic,
                                   with_value=algorithm.uses_critic, with_reference=algorithm.uses_reference)
    record_model(run_, model.policy)
    if training.gradient_checkpointing:
        model.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # 4. The trainer (optimizer, schedule, algorithm and alarm state); resume where a checkpoint left off
    alarms = AlarmMonitor(options, stage)  # reward-hacking alarms and stopping rules (online/alarms.py)
    monitored = [name for name, weight in zip(reward.names, reward.weights, strict=True) if weight == 0]
    trainer = OnlineTrainer(config, algorithm, options.total_episodes, model, tokenizer, accelerator, reference,
                            options.local_rollout_forward_batch_size, num_generations, alarms=alarms,
                            share_prompts=share_prompts)
    if tools is not None:
        trainer.environment = environment_from_config(config.environment, config.generation, trainer.unwrapped.policy,
                                                      tokenizer, trainer.stop_id, config.model.model_name_or_path,
                                                      accelerator.autocast, tools)
        log.info("text environment: tools %s, at most %d turns and %d tokens per episode%s",
                 ", ".join(trainer.environment.runner.tools), config.environment.max_turns, config.environment.max_length,
                 " (protocol chat)" if config.environment.protocol == "chat" else "")
    prompts_per_batch = trainer.batch_size // num_generations
    order = BatchOrder(len(train_ids), prompts_per_batch, accelerator.num_processes, accelerator.process_index,
                       training.seed)
    if order.batches_per_epoch == 0:
        raise UserError(f"the prompt set has {len(train_ids)} rows, fewer than one rollout batch "
                        f"({prompts_per_batch} prompts x {accelerator.num_processes} processes).")
    iteration = 0
    if run_.resume_from is not None:
        state = load_checkpoint(run_.resume_from, accelerator, trainer.unwrapped.policy, trainer.optimizer,
                                trainer.scheduler, extra_modules=value_head_module(trainer), trained=trainer.model)
        trainer.load_state_dict(state["trainer"])
        iteration = state["step"]
        run_.metrics.truncate_after(iteration)
        if accelerator.is_main_process:
            truncate_jsonl(run_.output_dir / "samples.jsonl", iteration)
        log.info("resumed from %s at iteration %d (episode %d)", run_.resume_from, iteration, trainer.episode)
    planned = trainer.num_iterations * trainer.batch_size * accelerator.num_processes
    log.info("%d iterations x %d rollouts per process x %d process(es) = %d episodes%s", trainer.num_iterations,
             trainer.batch_size, accelerator.num_processes, planned,
             "" if planned == options.total_episodes else
             f" (total_episodes {options.total_episodes} rounded to whole iterations)")

    def evaluate_held_out(step: int) -> None:
        if test_ids is not None:
            run_.metrics.log(step, held_out_scores(trainer, reward, test_ids, test_columns, training.seed))

    if iteration == 0:
        evaluate_held_out(0)

    def checkpoint(at: int) -> Path:
        save(run_, trainer, at, tokenizer, training.save_total_limit)
        return run_.output_dir / f"checkpoint-{at}"

    # 5. The loop: generate -> score -> step -> samples, in the shared run skeleton (training/cadence.py:
    #    log / evaluate / checkpoint / signals)
    progress = StepProgress(trainer.num_iterations, stage, algorithm.progress_keys, enabled=accelerator.is_main_process,
                            start=iteration)
    cadence = RunCadence(total=trainer.num_iterations, training=training, accelerator=accelerator,
                         metrics=run_.metrics, progress=progress, save=checkpoint, evaluate=evaluate_held_out)
    while iteration < trainer.num_iterations:
        prompt_rows = order.indices(iteration)
        rows = [i for i in prompt_rows for _ in range(num_generations)]  # each prompt's group: consecutive rows
        q, m = left_pad([train_ids[i] for i in prompt_rows], tokenizer.pad_token_id)
        t0 = time.perf_counter()
        rollout = trainer.generate(query_ids=q.to(accelerator.device), query_mask=m.to(accelerator.device))
        t1 = time.perf_counter()
        scores, parts = score(reward, rollout, train_columns, rows, accelerator)
        t2 = time.perf_counter()
        try:
            stats = trainer.step(rollout, scores)
        except NonFiniteBatch as fault:
            if not training.skip_nonfinite_batches:
                raise cadence.fail(nonfinite_message(str(fault), iteration + 1, run_.output_dir,
                                                     "training.skip_nonfinite_batches")) from None
            # (with skipping on, only a rollout's inputs raise, before any update) the data order moves on
            log.warning("iteration %d: %s; skipping the batch (training.skip_nonfinite_batches).", iteration + 1, fault)
            trainer.nonfinite_skips += 1
            iteration += 1
            continue
        bad = sorted(k for k, v in stats.items() if not math.isfinite(v))
        if bad:  # a last guard: statistics of an update that ran on finite inputs and gradients
            raise cadence.fail(nonfinite_message(f"{', '.join(bad)} not finite after the update", iteration + 1,
                                              run_.output_dir, "training.skip_nonfinite_batches"))
        if trainer.nonfinite_skips:
            stats["nonfinite_skips"] = trainer.nonfinite_skips
        if trainer.fp16_overflow_skips:
            stats["fp16_overflow_skips"] = trainer.fp16_overflow_skips
        iteration += 1
        elapsed = time.perf_counter() - t0
        tokens = accelerator.reduce(rollout.response_mask.sum().float(), "sum").item()
        episodes = len(rows) * accelerator.num_processes
        if rollout.episodes is not None:
            stats.update(environment_stats(trainer.environment, rollout, accelerator))
        stats.update({
            "time/generate_s": t1 - t0, "time/score_s": t2 - t1,
            "episodes_per_s": episodes / elapsed, "tokens_per_s": tokens / elapsed,
            **{f"reward/{name}": accelerator.reduce(v.float().mean().to(accelerator.device), "mean").item()
               for name, v in parts.items()},
        })
        fired = len(alarms.events)
        optimised, *watched = batch_estimates([scores, *(parts[name] for name in monitored)], accelerator)
        watched = dict(zip(monitored, watched, strict=True))
        stats.update(alarms.observe(iteration, observation(stats, tokens / episodes, optimised, watched)))
        if accelerator.is_main_process and len(alarms.events) > fired:
            alarms.write(run_.output_dir)  # at once: a run that fails later still leaves the record for `rlhf eval`
        if alarms.stop is not None:  # every process computed the same stop from the same reduced numbers
            log.warning("stopping after step %d: %s (%s); the run ends as at its planned end (final save, "
                        "exit status 0).", iteration, alarms.stop["rule"], alarms.stop["reason"])
            cadence.finish_at(iteration)
        if accelerator.is_main_process and options.num_sample_rows and iteration % options.sample_steps == 0:
            write_samples(run_.output_dir, iteration, rollout, scores, options.num_sample_rows, progress)
        cadence.after_step(iteration, stats if cadence.log_due(iteration) else None, shown=stats)
        if alarms.stop is not None:
            break
    cadence.close()
    if trainer.prompt_sharing is not None:
        log.info(trainer.prompt_sharing.summary())

    # 6. Held-out score, final checkpoint, the model (with its value head) at the top of output_dir
    evaluate_held_out(iteration)
    save(run_, trainer, iteration, tokenizer, training.save_total_limit)
    replica_checksum(accelerator, trainer.model)
    unwrapped = trainer.unwrapped
    gathered = {name: full_model_state(accelerator, module)  # FSDP: whole weights (every process); else None
                for name, module in {"policy": unwrapped.policy, **value_head_module(trainer)}.items()}
    if accelerator.is_main_process:
        save_final_model(unwrapped.policy, tokenizer, run_.output_dir, config.peft, gathered["policy"])
        if unwrapped.value_head is not None:
            unwrapped.value_head.save(run_.output_dir, gathered["value_head"])
        log.info("done: %d iterations, %d episodes; %s written to %s", iteration, trainer.episode,
                 "policy and value head" if unwrapped.value_head is not None else "policy", run_.output_dir)
        alarms.write(run_.output_dir)
        if alarms.events or alarms.stop:
            log.warning("reward-hacking alarms in this run: %s (alarms.json)", describe(alarms.summary()))
    finish_run(run_)


def environment_stats(environment, rollout: Experience, accelerator) -> dict[str, float]:
    """The environment's figures of this batch (environments/rollout.py `episode_stats`) and the seconds
    its rollout spent waiting for tools, averaged over processes."""
    stats = episode_stats(rollout.episodes)
    stats["time/tools_s"] = environment.timings["tools_s"]
    values = accelerator.reduce(torch.tensor(list(stats.values()), device=accelerator.device), "mean").tolist()
    return dict(zip(stats, values, strict=True))


def value_head_module(trainer: OnlineTrainer) -> dict:
    """The checkpoint's extra modules: the value head, for an algorithm with a critic."""
    head = trainer.unwrapped.value_head
    return {"value_head": head} if head is not None else {}


def save(run_, trainer: OnlineTrainer, iteration: int, tokenizer, limit) -> None:
    save_checkpoint(
        run_.output_dir, iteration, trainer.accelerator, trainer.unwrapped.policy, trainer.optimizer,
        trainer.scheduler, {"trainer": trainer.state_dict()}, extra_modules=value_head_module(trainer),
        tokenizer=tokenizer, save_total_limit=limit, trained=trainer.model,
    )


def write_samples(output_dir, iteration: int, rollout: Experience, scores: torch.Tensor, n: int, progress) -> None:
    """A few (prompt, response, reward) rows to samples.jsonl, and as a table on a terminal."""
    rows = [
        {"step": iteration, "prompt": p, "response": r, "score": float(s)}
        for p, r, s in zip(rollout.prompts[:n], rollout.responses[:n], scores[:n].tolist(), strict=True)
    ]
    with (output_dir / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    if progress.interactive:
        print_samples(rows)
