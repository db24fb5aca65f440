"""Batches of a rollout's rows longest first, against the same batches in row order, on one rollout: the
online trainer's no-grad passes (old log-probs, values, reference log-probs: `OnlineTrainer.evaluate`) and
a whole step (those passes, then the update, whose mini-batches are split into micro-batches for gradient
accumulation: `Updater._micro_batches`).

    python bench/length_order.py --uniform-lengths  # PPO, builtin:small-gpt2 from bench/.work, 256 rows
    python bench/length_order.py                    # responses as the bench's policy samples them

The rollout is sampled once (temperature 1, stopping at EOS, at most --response tokens) by the bench's
policy -- which seldom stops early: `--uniform-lengths` then cuts each response at a length drawn uniformly
(a model whose answers range from a word to the whole budget, as reasoning models' do) --; passes of
--forward-batch rows; the update: one epoch of --mini-batches optimizer steps, each of
--gradient-accumulation micro-batches. Both orders are timed alternately for --rounds rounds on the same
rollout. Prints the token columns each order computes (rows x trimmed width, summed over batches), the
median seconds, and ONE JSON line with the ratios.
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
    parser.add_argument("--mini-batches", type=int, default=4, help="num_mini_batches (optimizer steps)")
    parser.add_argument("--gradient-accumulation", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--response", type=int, default=64, help="response_length (responses stop at EOS)")
    parser.add_argument("--uniform-lengths", action="store_true", help="cut responses at lengths drawn from 1..--response")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    prepare_policy()
    micro = a.rows // (a.mini_batches * a.gradient_accumulation)
    config = build_stage("ppo", {
        "model": {"model_name_or_path": str(POLICY)}, "reward": {"function": "builtin:sentiment"},
        "generation": {"response_length": a.response, "temperature": 1.0},
        "training": {"output_dir": str(WORK / "runs" / "length-order"), "per_device_train_batch_size": micro,
                     "gradient_accumulation_steps": a.gradient_accumulation},
        "ppo": {"total_episodes": a.rows, "local_rollout_forward_batch_size": a.forward_batch,
                "num_mini_batches": a.mini_batches, "num_ppo_epochs": 1},
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
    scores = torch.linspace(-1, 1, a.rows)

    def columns(batches) -> int:  # rows x (prompt + response columns) after trimming, summed over the batches
        total = 0
        for rows in batches:
            q, _, resp, _ = trim_padding(rollout.query_ids[rows], rollout.query_mask[rows], rollout.response_ids[rows],
                                         rollout.response_mask[rows])
            total += q.shape[0] * (q.shape[1] + resp.shape[1])
        return total

    shuffled = torch.randperm(a.rows, generator=torch.Generator().manual_seed(1))
    minis = torch.tensor_split(shuffled, a.mini_batches)
    longest_first = {"passes": trainer._passes, "micro": trainer.updater._micro_batches}
    in_order = {"passes": lambda r: (list(torch.split(torch.arange(a.rows), a.forward_batch)), None),
                "micro": lambda exp, idx: torch.split(idx, micro)}
    orders = {"longest_first": longest_first, "in_order": in_order}
    cols = {name: {"passes": columns(order["passes"](rollout)[0]),
                   "micro": columns([m for mini in minis for m in order["micro"](rollout, mini)])}
            for name, order in orders.items()}
    times = {name: {"passes": [], "step": []} for name in orders}
    for _ in range(a.rounds):
        for name, order in orders.items():
            trainer._passes, trainer.updater._micro_batches = order["passes"], order["micro"]
            started = time.perf_counter()
            trainer.evaluate(rollout)
            times[name]["passes"].append(time.perf_counter() - started)
            started = time.perf_counter()
            trainer.step(rollout, scores)
            times[name]["step"].append(time.perf_counter() - started)
    med = {name: {part: statistics.median(t) for part, t in parts.items()} for name, parts in times.items()}
    print(f"{a.rows} responses: {lengths.mean():.1f} tokens on average (min {lengths.min():.0f}, max {lengths.max():.0f})")
    for name in orders:
        print(f"{name:13s} passes: {cols[name]['passes']:6d} token columns {med[name]['passes']:.3f} s; "
              f"update micro-batches: {cols[name]['micro']:6d} columns; step {med[name]['step']:.3f} s")
    ratio = {part: round(med["longest_first"][part] / med["in_order"][part], 3) for part in ("passes", "step")}
    print(json.dumps({
        "bench": "length_order", "rows": a.rows, "forward_batch": a.forward_batch, "mini_batches": a.mini_batches,
        "gradient_accumulation": a.gradient_accumulation, "response_length": a.response,
        "uniform_lengths": a.uniform_lengths, "mean_response_tokens": round(lengths.mean().item(), 1),
        **{f"{name}_{part}_s": round(v, 4) for name, parts in med.items() for part, v in parts.items()},
        "passes_time_ratio": ratio["passes"], "step_time_ratio": ratio["step"],
        "passes_columns_ratio": round(cols["longest_first"]["passes"] / cols["in_order"]["passes"], 3),
        "micro_columns_ratio": round(cols["longest_first"]["micro"] / cols["in_order"]["micro"], 3),
        "threads": a.threads,
    }))


if __name__ == "__main__":
    main()
