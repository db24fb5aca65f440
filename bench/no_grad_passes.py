"""The online trainer's no-grad passes over a rollout (old log-probs, values, reference log-probs:
`OnlineTrainer.evaluate`) taken longest rows first, against the same passes in row order, on one rollout
of naturally stopping responses.

    python bench/no_grad_passes.py                    # PPO, builtin:small-gpt2 from bench/.work, 256 rows
    python bench/no_grad_passes.py --uniform-lengths  # responses cut at lengths drawn from 1..--response

The rollout is sampled once (temperature 1, stopping at EOS, at most --response tokens) by the bench's
policy -- which seldom stops early: `--uniform-lengths` then cuts each response at a length drawn uniformly
(a model whose answers range from a word to the whole budget, as reasoning models' do) --; then both orders
are timed alternately for --rounds rounds on the same rollout. Prints the
response lengths, the token columns each order computes (rows x trimmed width, summed over passes), the
median seconds of each, and ONE JSON line with the ratios.
"""

import argparse
import json
import statistics
import time

import torch
from common import WORK
from gold import POLICY, prepare_policy

from rlhf_cli.config.loader import build_stage
from rlhf_cli.lm.forward import trim_padding
from rlhf_cli.models.loading import load_tokenizer
from rlhf_cli.models.policy import load_policy
from rlhf_cli.ppo.trainer import PPOTrainer
from rlhf_cli.training.accel import make_accelerator

PROMPTS = ["I watched The", "My sister and I went to see", "It", "We caught", "The latest monster movie from",
           "Last night", "This film", "Honestly, the"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--forward-batch", type=int, default=64, help="local_rollout_forward_batch_size")
    parser.add_argument("--response", type=int, default=64, help="response_length (responses stop at EOS)")
    parser.add_argument("--uniform-lengths", action="store_true", help="cut responses at lengths drawn from 1..--response")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    prepare_policy()
    config = build_stage("ppo", {
        "model": {"model_name_or_path": str(POLICY)}, "reward": {"function": "builtin:sentiment"},
        "generation": {"response_length": a.response, "temperature": 1.0},
        "training": {"output_dir": str(WORK / "runs" / "no-grad-passes"), "per_device_train_batch_size": a.rows},
        "ppo": {"total_episodes": a.rows, "local_rollout_forward_batch_size": a.forward_batch},
    })
    tokenizer = load_tokenizer(str(POLICY), padding_side="left")
    policy, reference = load_policy(config.model, config.peft, seed=0)
    trainer = PPOTrainer(config, policy, tokenizer, make_accelerator(config.training, WORK), reference)
    torch.manual_seed(0)
    rollout = trainer.generate([PROMPTS[i % len(PROMPTS)] for i in range(a.rows)])
    if a.uniform_lengths:
        cut = torch.randint(1, rollout.response_ids.shape[1] + 1, (a.rows,), generator=torch.Generator().manual_seed(0))
        rollout = trainer.rollout_from(rollout.query_ids, rollout.query_mask, rollout.response_ids,
                                       response_lengths=torch.minimum(cut, rollout.response_mask.sum(1)))
    rollout.logprobs = rollout.values = None  # every no-grad pass: the policy with its value head, and the reference
    lengths = rollout.response_mask.sum(1).float()

    sorted_passes, _ = trainer._passes(rollout)
    in_order = [slice(i, i + a.forward_batch) for i in range(0, a.rows, a.forward_batch)]

    def columns(passes) -> int:  # rows x (prompt + response columns) after trimming, summed over the passes
        total = 0
        for rows in passes:
            q, _, resp, _ = trim_padding(rollout.query_ids[rows], rollout.query_mask[rows], rollout.response_ids[rows],
                                         rollout.response_mask[rows])
            total += q.shape[0] * (q.shape[1] + resp.shape[1])
        return total

    by_length = trainer._passes
    orders = {"by_length": by_length, "in_order": lambda r: (in_order, None)}
    times = {name: [] for name in orders}
    for _ in range(a.rounds):
        for name, passes in orders.items():
            trainer._passes = passes
            started = time.perf_counter()
            trainer.evaluate(rollout)
            times[name].append(time.perf_counter() - started)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{a.rows} responses: {lengths.mean():.1f} tokens on average (min {lengths.min():.0f}, max {lengths.max():.0f})")
    for name in orders:
        passes = sorted_passes if name == "by_length" else in_order
        print(f"{name:10s} {columns(passes):7d} token columns  {med[name]:.3f} s  ({', '.join(f'{t:.3f}' for t in times[name])})")
    print(json.dumps({
        "bench": "no_grad_passes", "rows": a.rows, "forward_batch": a.forward_batch, "response_length": a.response,
        "uniform_lengths": a.uniform_lengths, "mean_response_tokens": round(lengths.mean().item(), 1),
        "by_length_s": round(med["by_length"], 4), "in_order_s": round(med["in_order"], 4),
        "time_ratio": round(med["by_length"] / med["in_order"], 3),
        "columns_ratio": round(columns(sorted_passes) / columns(in_order), 3), "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
