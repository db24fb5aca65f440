"""Profile our PPO iteration (the same setting as bench/ppo.py, reward model case), in-process.

    python bench/profile_ppo.py [--iterations 3] [--threads 1] [--rows 25]

Wraps the trainer's phases in torch.profiler.record_function labels (generate, score, evaluate,
policy_forward, reference_logprobs, update, micro_step) and prints the phase totals and the top
operators by self CPU time, for every iteration after the first (warm-up).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from ppo import POLICY, REWARD_MODEL, prepare_models
from torch.profiler import ProfilerActivity, profile, record_function


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reward", choices=["model", "function"], default="model")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    prepare_models()

    from rlhf_cli.config.loader import build_stage
    from rlhf_cli.data.loading import load_splits
    from rlhf_cli.lm.generation import left_pad
    from rlhf_cli.models.loading import load_tokenizer
    from rlhf_cli.models.policy import load_policy
    from rlhf_cli.ppo.trainer import PPOTrainer
    from rlhf_cli.rewards.combined import CombinedReward
    from rlhf_cli.stages.online import prepare_prompts
    from rlhf_cli.training.accel import make_accelerator

    reward = {"model": str(REWARD_MODEL)} if a.reward == "model" else {"function": "builtin:sentiment"}
    config = build_stage("ppo", {
        "model": {"model_name_or_path": str(POLICY)},
        "data": {"dataset_name": "builtin:review-prompts", "max_prompt_length": 32},
        "generation": {"response_length": 32, "temperature": 0.7, "top_k": 0, "top_p": 1.0},
        "reward": reward,
        "training": {"output_dir": "bench/.work/runs/profile", "seed": 42, "learning_rate": 3e-4,
                     "per_device_train_batch_size": a.batch_size // 2, "max_grad_norm": 0.0},
        "ppo": {"total_episodes": a.batch_size * a.iterations, "num_mini_batches": 2, "num_ppo_epochs": 4,
                "kl_coef": 0.05, "missing_eos_penalty": 1.0},
    })
    accelerator = make_accelerator(config.training, Path(config.training.output_dir))
    tokenizer = load_tokenizer(str(POLICY), padding_side="left")
    model, reference = load_policy(config.model, config.peft, 42)
    trainer = PPOTrainer(config, model, tokenizer, accelerator, reference)
    scorer = CombinedReward(config.reward, accelerator.device)
    ids, _ = prepare_prompts(load_splits(config.data)[0], tokenizer, config, "train")

    for owner, name in ((trainer, "evaluate"), (trainer, "_policy_forward"), (trainer, "reference_logprobs"),
                        (trainer.updater, "update"), (trainer.updater, "_micro_step")):
        method = getattr(owner, name)

        @functools.wraps(method)
        def labelled(*args, _m=method, _n=name, **kwargs):
            with record_function(_n.strip("_")):
                return _m(*args, **kwargs)

        setattr(owner, name, labelled)

    def iteration(i: int) -> None:
        q, m = left_pad(ids[i * a.batch_size : (i + 1) * a.batch_size], tokenizer.pad_token_id)
        with record_function("generate"):
            rollout = trainer.generate(query_ids=q, query_mask=m)
        with record_function("score"):
            scores, _ = scorer.score(rollout.prompts, rollout.responses, {})
        trainer.step(rollout, scores)

    iteration(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for i in range(1, a.iterations):
            iteration(i)
        wall = (time.perf_counter() - started) / (a.iterations - 1)
    events = prof.key_averages()
    phases = ["generate", "score", "evaluate", "policy_forward", "reference_logprobs", "update", "micro_step"]
    n = a.iterations - 1
    print(f"wall s/iteration: {wall:.3f}")
    for e in events:
        if e.key in phases:
            print(f"  {e.key:18s} {e.cpu_time_total / 1e6 / n:8.3f} s/iteration ({e.count // n} calls)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
