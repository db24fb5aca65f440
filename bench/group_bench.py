"""The runner behind bench/grpo.py and bench/rloo.py: `rlhf grpo` / `rlhf rloo` vs TRL 1.16's
GRPOTrainer / RLOOTrainer, side by side, plus the floor of any such algorithm (bench/sides/floor_ppo.py).

Both sides: the same `builtin:small-gpt2` policy (bench/.work/policy-small-gpt2), the same prompts
(builtin:review-prompts, train split), the same group size (num_generations), rollout batch
(`--batch-size` responses = batch / num_generations prompts), micro-batch (steps_per_generation =
batch / micro-batch), micro-batches per optimizer step (gradient_accumulation_steps, `--gradient-accumulation`:
steps_per_generation / it optimizer steps per pass), passes over each rollout (num_iterations), beta,
epsilon, loss settings, sampling settings, learning rate, schedule and gradient clipping, and the
same reward function (builtin:sentiment, i.e. rlhf_cli.builtin.sentiment.sentiment_reward, on
prompt + completion). Every completion is `--response-length` tokens on every side (the stop token
is suppressed until then: min_new_tokens), so no side is faster for having learnt to stop early;
`--natural-stop` lets both stop at EOS instead. `--prompt-words N` gives every side prompts of N words
(cut from builtin:reviews texts) instead of the short review openings; `--unshared` adds our side with
`share_prompt_prefix` off (each row runs its own prompt).

Each run is a fresh process; the sides alternate (ours, TRL, ... per beta, then the floor) every
round. Both sides tick a clock after every optimizer step (the same hook on torch's AdamW); every
(optimizer steps per pass x num_iterations)-th tick ends an iteration (a rollout: sample, score, update),
and an iteration's time is the gap between two such ends, so the first iteration (process start,
loading) never counts; `--warmup` more are dropped. Reward reached: each side's own mean training
reward over the last quarter of its iterations, and the gold score (builtin:sentiment on responses
sampled by each final policy for the first `--gold-prompts` held-out prompts, same seed and code).
Prints a table, then ONE JSON line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics

import common
import torch
from common import (
    OURS_PY,
    WORK,
    alternate,
    final_json,
    machine_note,
    median_after_warmup,
    peer_python,
    print_table,
    run_side,
    spread,
)
from gold import POLICY, gold_score, prepare_policy


def parse(algorithm: str, doc: str, betas: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=8, help="rollouts per run (the first is warm-up)")
    parser.add_argument("--warmup", type=int, default=0, help="further iterations dropped per run")
    parser.add_argument("--betas", default=betas, help="comma-separated KL weights, one case each")
    parser.add_argument("--batch-size", type=int, default=32, help="responses per rollout (whole groups)")
    parser.add_argument("--num-generations", type=int, default=8 if algorithm == "grpo" else 4)
    parser.add_argument("--gradient-accumulation", type=int, default=1,
                        help="micro-batches per optimizer step (gradient_accumulation_steps, both sides)")
    parser.add_argument("--micro-batch-size", type=int, default=16,
                        help="per_device_train_batch_size (steps_per_generation = batch / micro-batch; an "
                             "optimizer step every --gradient-accumulation of them)")
    parser.add_argument("--num-iterations", type=int, default=2, help="passes over each rollout (mu)")
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--natural-stop", action="store_true", help="stop at EOS (default: full length)")
    parser.add_argument("--prompt-words", type=int, default=0,
                        help="prompts of this many words (cut from builtin:reviews texts; 0: the short "
                             "builtin:review-prompts, at most 7 tokens)")
    parser.add_argument("--unshared", action="store_true",
                        help="also run ours with share_prompt_prefix off (each row runs its own prompt)")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--gold-prompts", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42, help="every side's seed (prompt order, sampling, initialisation)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (the same for all)")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--no-trl", action="store_true", help="ours (and the floor) only")
    parser.add_argument("--tag", default=algorithm, help="names this run's files under bench/.work")
    parser.add_argument("--reuse-results", action="store_true",
                        help="read the result of a run already in bench/.work (same label and spec) instead of "
                             "running it again: finishes an interrupted benchmark")
    a = parser.parse_args(argv)
    if a.batch_size % a.num_generations or a.batch_size % (a.micro_batch_size * a.gradient_accumulation):
        parser.error("--batch-size must be a multiple of --num-generations and of --micro-batch-size x "
                     "--gradient-accumulation")
    return a


def long_prompts(words: int) -> str:
    """A jsonl file of prompts `words` words long, cut from the builtin:reviews texts (train split) one after
    another, for every side: prompts as long as a task statement, each distinct."""
    path = WORK / f"prompts-{words}w.jsonl"
    if not path.exists():
        from rlhf_cli.builtin.datasets import load_builtin_dataset

        stream = " ".join(load_builtin_dataset("reviews")["train"]["text"]).split()  # consecutive reviews
        rows = [" ".join(stream[i : i + words]) for i in range(0, len(stream) - words, words)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"prompt": row}) + "\n" for row in rows))
    return str(path)


def main(algorithm: str, doc: str, betas: str, argv=None) -> None:
    a = parse(algorithm, doc, betas, argv)
    common.REUSE = a.reuse_results
    torch.set_num_threads(a.threads)
    prepare_policy()
    trl_python = None if a.no_trl else peer_python("trl")
    steps_per_generation = a.batch_size // a.micro_batch_size
    dataset, max_prompt_length = "builtin:review-prompts", 32
    if a.prompt_words:
        dataset, max_prompt_length = long_prompts(a.prompt_words), 4 * a.prompt_words
    base = {
        "algorithm": algorithm, "policy": str(POLICY), "seed": a.seed, "batch_size": a.batch_size,
        "micro_batch_size": a.micro_batch_size, "steps_per_generation": steps_per_generation,
        "gradient_accumulation_steps": a.gradient_accumulation,
        "num_generations": a.num_generations, "num_iterations": a.num_iterations, "iterations": a.iterations,
        "response_length": a.response_length, "min_response_length": 0 if a.natural_stop else a.response_length,
        "temperature": 0.7, "epsilon": 0.2, "learning_rate": a.learning_rate, "max_grad_norm": 1.0,
        "dataset_name": dataset, "max_prompt_length": max_prompt_length, "stage_eval_samples": 8,
        "reward_function": "builtin:sentiment",
        # GRPO: TRL's defaults (and ours); RLOO: no advantage whitening (both defaults)
        **({"loss_type": "dapo", "scale_rewards": "group"} if algorithm == "grpo" else {"normalize_advantages": False}),
    }
    betas = [float(b) for b in a.betas.split(",")]
    cases = {f"beta_{b:g}": b for b in betas}

    def spec_for(case: str, side: str, r: int, **extra) -> dict:
        return {**base, "beta": cases[case], "output_dir": str(WORK / "runs" / f"{a.tag}-{case}-{side}-{r}"), **extra}

    sides = {}
    for case in cases:
        sides[f"ours/{case}"] = lambda r, c=case: run_side(OURS_PY, "ours_group.py", spec_for(c, "ours", r),
                                                           f"{a.tag}-{c}-ours-{r}", a.threads)
        if a.unshared:
            sides[f"ours_unshared/{case}"] = lambda r, c=case: run_side(
                OURS_PY, "ours_group.py", spec_for(c, "ours_unshared", r, share_prompt_prefix=False),
                f"{a.tag}-{c}-ours_unshared-{r}", a.threads)
        if trl_python:
            sides[f"trl/{case}"] = lambda r, c=case: run_side(trl_python, "trl_group.py", spec_for(c, "trl", r),
                                                              f"{a.tag}-{c}-trl-{r}", a.threads)
    if not a.no_floor:
        floor = {"policy": str(POLICY), "seed": a.seed, "batch_size": a.batch_size, "iterations": a.iterations,
                 "num_generations": a.num_generations, "num_mini_batches": steps_per_generation,
                 "num_ppo_epochs": a.num_iterations, "response_length": a.response_length,
                 "min_response_length": base["min_response_length"], "temperature": base["temperature"],
                 "dataset_name": dataset, "max_prompt_length": max_prompt_length, "logits_to_keep": True}
        sides["floor"] = lambda r: run_side(OURS_PY, "floor_ppo.py", floor, f"{a.tag}-floor-{r}", a.threads)
    results = alternate(sides, a.rounds)

    steps = {name: {res["optimizer_steps"] for res in runs} for name, runs in results.items() if name != "floor"}
    if len(set().union(*steps.values())) > 1:
        print(f"WARNING: the sides took different numbers of optimizer steps: {steps}", flush=True)
    per_run = {name: [median_after_warmup(res["times"], a.warmup) for res in runs] for name, runs in results.items()}
    med = {name: statistics.median(v) for name, v in per_run.items()}
    cpu_run = {name: [median_after_warmup(res["cpu_times"], a.warmup) for res in runs] for name, runs in results.items()}
    cpu = {name: statistics.median(v) for name, v in cpu_run.items()}
    rss = {name: statistics.median(res["peak_rss_mb"] for res in runs) for name, runs in results.items()}
    tail = max(1, a.iterations // 4)
    train = {name: statistics.fmean(statistics.fmean(res["train_rewards"][-tail:]) for res in runs)
             for name, runs in results.items() if name != "floor"}
    first = {name: statistics.fmean(res["train_rewards"][0] for res in runs)
             for name, runs in results.items() if name != "floor"}
    print("\ngold scores (held-out prompts) ...", flush=True)
    initial_gold = gold_score(str(POLICY), base, a.gold_prompts)
    gold = {name: statistics.fmean(gold_score(res["model_dir"], base, a.gold_prompts) for res in runs)
            for name, runs in results.items() if name != "floor"}

    episodes = a.batch_size * a.iterations
    rows = [(name, f"{med[name]:.3f}", spread(per_run[name]), f"{cpu[name]:.3f}", spread(cpu_run[name]),
             f"{a.batch_size / med[name]:.2f}", f"{rss[name]:.0f}",
             f"{first[name]:+.4f}" if name in first else "-", f"{train[name]:+.4f}" if name in train else "-",
             f"{gold[name]:+.4f}" if name in gold else "-") for name in results]
    print_table(f"{algorithm.upper()}: s/iteration (median; spread of per-run medians over {a.rounds} rounds), "
                f"{a.batch_size} responses ({a.batch_size // a.num_generations} prompts x {a.num_generations}) x "
                f"{a.response_length} tokens, {steps_per_generation // a.gradient_accumulation} x {a.num_iterations} optimizer steps per "
                f"iteration; rewards after {episodes} episodes (untrained policy's gold: {initial_gold:+.4f})",
                rows, ("side", "s/iter", "spread", "cpu s/iter", "spread", "episodes/s", "peak RSS MB",
                       "reward it.1", f"reward last {tail}", "gold"))
    for name, runs in results.items():
        if "phases" in runs[-1]:
            print(f"{name} phases (median over iterations 2.. of the last run, wall s): " + ", ".join(
                f"{k.split('/')[1]}={statistics.median(v[1:] or v):.3f}" for k, v in runs[-1]["phases"].items()))

    payload = {"bench": algorithm, "episodes": episodes, "batch_size": a.batch_size,
               "num_generations": a.num_generations, "num_iterations": a.num_iterations,
               "steps_per_generation": steps_per_generation, "gradient_accumulation": a.gradient_accumulation,
               "response_length": a.response_length,
               "fixed_length": not a.natural_stop, "prompt_words": a.prompt_words, "iterations": a.iterations, "seed": a.seed,
               "rounds": a.rounds,
               "initial_gold": round(initial_gold, 4)}
    for case in cases:
        ours = f"ours/{case}"
        entry = {"ours_s_per_iter": round(med[ours], 4), "ours_cpu_s_per_iter": round(cpu[ours], 4),
                 "ours_episodes_per_s": round(a.batch_size / med[ours], 3), "ours_train_reward": round(train[ours], 4),
                 "ours_gold": round(gold[ours], 4), "ours_peak_rss_mb": round(rss[ours])}
        trl = f"trl/{case}"
        if trl in med:
            entry.update({"trl_s_per_iter": round(med[trl], 4), "trl_cpu_s_per_iter": round(cpu[trl], 4),
                          "trl_episodes_per_s": round(a.batch_size / med[trl], 3),
                          "trl_train_reward": round(train[trl], 4), "trl_gold": round(gold[trl], 4),
                          "trl_peak_rss_mb": round(rss[trl]),
                          "ours_over_trl_time": round(med[ours] / med[trl], 3),  # target <= 0.5
                          "ours_over_trl_cpu": round(cpu[ours] / cpu[trl], 3),
                          "speedup_vs_trl": round(med[trl] / med[ours], 2)})
        unshared = f"ours_unshared/{case}"
        if unshared in med:
            entry["ours_unshared_s_per_iter"] = round(med[unshared], 4)
            entry["ours_over_unshared_time"] = round(med[ours] / med[unshared], 3)
            if trl in med:
                entry["unshared_over_trl_time"] = round(med[unshared] / med[trl], 3)
        if "floor" in med:
            entry["ours_over_floor_time"] = round(med[ours] / med["floor"], 3)
            entry["ours_over_floor_cpu"] = round(cpu[ours] / cpu["floor"], 3)
        payload[case] = entry
    if "floor" in med:
        payload["floor_s_per_iter"] = round(med["floor"], 4)
        payload["floor_cpu_s_per_iter"] = round(cpu["floor"], 4)
    payload["machine"] = machine_note(a.threads)
    final_json(payload)
