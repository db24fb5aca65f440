"""Rollout throughput of a text environment, and what a slow or hanging tool costs.

    python bench/environment.py MODEL       # MODEL: e.g. the output of configs/quickstart-sft-tools.yaml

One rollout of `--episodes` held-out builtin:tool-arithmetic problems (the same seed each time) with
the calculator as it is, after a 0.1 s and a 1 s sleep, and hanging past a 0.5 s timeout: episodes/s,
the wall time spent waiting for tools and its share, turns, calls and errors per episode. No peer:
TRL has no maintained multi-turn environment to run beside it.
"""

from __future__ import annotations

import argparse
import time

import torch

from rlhf_cli.builtin.datasets import load_builtin_dataset
from rlhf_cli.config.sections import GenerationConfig
from rlhf_cli.environments.calculator import calculate
from rlhf_cli.environments.rollout import TextEnvironment, episode_stats
from rlhf_cli.environments.tools import Tool
from rlhf_cli.lm.generation import install_sampling_config, left_pad
from rlhf_cli.models.loading import load_model, load_tokenizer


def sleeping(seconds: float):
    def calculator(argument: str) -> str:
        time.sleep(seconds)
        return calculate(argument)

    return calculator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--tool-workers", type=int, default=16)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model, padding_side="left")
    model = load_model(args.model, task="causal-lm").eval()
    install_sampling_config(model, GenerationConfig(response_length=48, temperature=0.7), tokenizer.eos_token_id,
                            tokenizer.pad_token_id)
    prompts = load_builtin_dataset("tool-arithmetic", seed=0, num_train=64, num_test=200)["test"]["prompt"]
    query, mask = left_pad([tokenizer.encode(p, add_special_tokens=False) for p in prompts[: args.episodes]],
                           tokenizer.pad_token_id)
    cases = {"calculator": (calculate, 5.0), "after a 0.1 s sleep": (sleeping(0.1), 5.0),
             "after a 1 s sleep": (sleeping(1.0), 5.0), "hangs 30 s, timeout 0.5 s": (sleeping(30.0), 0.5)}
    print(f"| tool | episodes/s | time in tools | turns | calls per episode | error rate |\n|{'---|' * 6}")
    for name, (fn, timeout) in cases.items():
        env = TextEnvironment(model, tokenizer, {"calculator": Tool("calculator", fn, "")}, max_turns=3,
                              max_length=128, response_length=48, tool_timeout_s=timeout,
                              tool_workers=args.tool_workers)
        torch.manual_seed(0)
        started = time.perf_counter()
        exp = env.rollout(query, mask)
        wall = time.perf_counter() - started
        s = episode_stats(exp.episodes)
        tools = env.timings["tools_s"]
        print(f"| {name} | {len(exp) / wall:.1f} | {tools:.2f} s of {wall:.1f} ({tools / wall:.0%}) | "
              f"{s['env/turns']:.2f} | {s['env/tool_calls']:.2f} | {s['env/tool_error_rate']:.2f} |")


if __name__ == "__main__":
    main()
