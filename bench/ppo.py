"""`rlhf ppo` vs TRL 1.12.0's PPOTrainer, side by side, plus the floor of any PPO.

    python bench/ppo.py                 # both reward cases, 2 rounds of A B A B
    python bench/ppo.py --reward model --rounds 3 --iterations 8

Both sides: the same `builtin:small-gpt2` policy (saved once to bench/.work/policy-small-gpt2), the
same prompts (builtin:review-prompts, encoded by the same code), the same hyperparameters, and
  * reward "model": the same reward model, a builtin:tiny-gpt2 trained for 150 steps by
    `rlhf reward` on builtin:review-preferences (bench/.work/reward-tiny-gpt2, made on first use);
  * reward "function": the gold scorer builtin:sentiment. TRL 1.12's PPO takes only a reward model,
    so on its side the same function is wrapped as one (bench/sides/trl_ppo.py).
TRL's separate value model starts from the policy's weights (our value head sits on the policy).

Each run is a fresh process; the sides alternate (ours, TRL, ..., floor) every round. Per run, the
time of an iteration is the gap between consecutive iteration ends, so the first iteration (and
process start, model loading) is a warm-up that never counts; `--warmup` more are dropped.
The gold score: builtin:sentiment on responses sampled for the first `--gold-prompts` held-out
prompts (test split) by each final policy, with the same seed and sampling settings, by the same code.
Prints a table, then ONE JSON line with the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess

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

REWARD_MODEL = WORK / "reward-tiny-gpt2"


def prepare_models() -> None:
    """The policy folder (so both sides load the same weights) and the reward model, once."""
    prepare_policy()
    if not (REWARD_MODEL / "config.json").exists():
        print("training the benchmark reward model (rlhf reward, builtin:tiny-gpt2, 150 steps) ...", flush=True)
        subprocess.run([OURS_PY, "-m", "rlhf_cli", "reward", "configs/quickstart-reward.yaml", "--overwrite",
                        "--output-dir", str(REWARD_MODEL), "--set", "model.model_name_or_path=builtin:tiny-gpt2",
                        "--set", "training.max_steps=150", "--set", "training.learning_rate=1e-3",
                        "--set", "training.eval_steps=150", "--set", "training.save_steps=1000"],
                       check=True, stdout=subprocess.DEVNULL, cwd=WORK.parent.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", choices=["model", "function", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=6, help="PPO iterations per run (the first is warm-up)")
    parser.add_argument("--warmup", type=int, default=0, help="further iterations dropped per run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-mini-batches", type=int, default=2)
    parser.add_argument("--num-ppo-epochs", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--gold-prompts", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (the same for all)")
    parser.add_argument("--no-floor", action="store_true")
    parser.add_argument("--ours-src", default=None, help="like --compare-src, for the side 'ours' (default: "
                        "the working tree)")
    parser.add_argument("--tag", default="ppo", help="names this run's files under bench/.work (runs may overlap)")
    parser.add_argument("--no-trl", action="store_true", help="ours (and the floor) only: for profiling work")
    parser.add_argument("--compare-src", default=None,
                        help="a folder with another copy of rlhf_cli (e.g. the code before an optimisation): adds "
                             "a side 'before' that imports it, alternated with ours in the same run")
    parser.add_argument("--reuse-results", action="store_true",
                        help="read the result of a run already in bench/.work (same label and spec) instead of "
                             "running it again: finishes an interrupted benchmark")
    a = parser.parse_args()
    common.REUSE = a.reuse_results

    torch.set_num_threads(a.threads)
    prepare_models()
    trl_python = None if a.no_trl else peer_python("trl-ppo")
    base = {
        "policy": str(POLICY), "seed": 42, "batch_size": a.batch_size, "num_mini_batches": a.num_mini_batches,
        "num_ppo_epochs": a.num_ppo_epochs, "iterations": a.iterations, "response_length": a.response_length,
        "temperature": 0.7, "kl_coef": 0.05, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
        "gamma": 1.0, "lam": 0.95, "missing_eos_penalty": 1.0, "learning_rate": a.learning_rate,
        "max_prompt_length": 32, "rollout_forward_batch_size": 64, "stage_eval_samples": 8,
    }
    cases = ["model", "function"] if a.reward == "both" else [a.reward]

    def spec_for(case: str, side: str, r: int) -> dict:
        reward = {"reward_model": str(REWARD_MODEL)} if case == "model" else {"reward_function": "builtin:sentiment"}
        return {**base, **reward, "output_dir": str(WORK / "runs" / f"{a.tag}-{case}-{side}-{r}")}

    sides = {}
    for case in cases:
        if a.compare_src:
            sides[f"before/{case}"] = lambda r, c=case: run_side(
                OURS_PY, "ours_ppo.py", spec_for(c, "before", r), f"{a.tag}-{c}-before-{r}", a.threads, a.compare_src)
        sides[f"ours/{case}"] = lambda r, c=case: run_side(OURS_PY, "ours_ppo.py", spec_for(c, "ours", r),
                                                           f"{a.tag}-{c}-ours-{r}", a.threads, a.ours_src)
        if trl_python:
            sides[f"trl/{case}"] = lambda r, c=case: run_side(trl_python, "trl_ppo.py", spec_for(c, "trl", r),
                                                              f"{a.tag}-{c}-trl-{r}", a.threads)
    if not a.no_floor:
        sides["floor"] = lambda r: run_side(OURS_PY, "floor_ppo.py", {**base}, f"{a.tag}-floor-{r}", a.threads)
    results = alternate(sides, a.rounds)

    # medians per run, then the median over rounds (and the spread of the per-run medians)
    per_run = {name: [median_after_warmup(res["times"], a.warmup) for res in runs] for name, runs in results.items()}
    med = {name: statistics.median(v) for name, v in per_run.items()}
    cpu_run = {name: [median_after_warmup(res["cpu_times"], a.warmup) for res in runs] for name, runs in results.items()}
    cpu = {name: statistics.median(v) for name, v in cpu_run.items()}
    rss = {name: statistics.median(res["peak_rss_mb"] for res in runs) for name, runs in results.items()}
    gold = {}
    print("\ngold scores (held-out prompts) ...", flush=True)
    initial_gold = gold_score(str(POLICY), base, a.gold_prompts)
    for name, runs in results.items():
        if name != "floor":
            gold[name] = statistics.fmean(gold_score(res["model_dir"], base, a.gold_prompts) for res in runs)

    rows = []
    for name in results:
        rows.append((name, f"{med[name]:.3f}", spread(per_run[name]), f"{cpu[name]:.3f}", spread(cpu_run[name]),
                     f"{a.batch_size / med[name]:.2f}", f"{rss[name]:.0f}",
                     f"{gold[name]:+.4f}" if name in gold else "-"))
    episodes = a.batch_size * a.iterations
    print_table(f"PPO: s/iteration (median; spread of per-run medians over {a.rounds} rounds), batch {a.batch_size}, "
                f"gold after {episodes} episodes (untrained policy: {initial_gold:+.4f})",
                rows, ("side", "s/iter", "spread", "cpu s/iter", "spread", "episodes/s", "peak RSS MB", "gold"))
    for name, runs in results.items():
        if "phases" in runs[-1]:
            print(f"{name} phases (median over iterations 2.. of the last run, wall s): " + ", ".join(
                f"{k.split('/')[1]}={statistics.median(v[1:] or v):.3f}" for k, v in runs[-1]["phases"].items()))

    payload = {"bench": "ppo", "episodes": episodes, "batch_size": a.batch_size, "rounds": a.rounds,
               "initial_gold": round(initial_gold, 4)}
    for case in cases:
        ours = f"ours/{case}"
        entry = {"ours_s_per_iter": round(med[ours], 4), "ours_cpu_s_per_iter": round(cpu[ours], 4),
                 "ours_episodes_per_s": round(a.batch_size / med[ours], 3), "ours_gold": round(gold[ours], 4),
                 "ours_peak_rss_mb": round(rss[ours])}
        before = f"before/{case}"
        if before in med:
            entry.update({"before_s_per_iter": round(med[before], 4), "before_cpu_s_per_iter": round(cpu[before], 4),
                          "ours_over_before_time": round(med[ours] / med[before], 3),
                          "ours_over_before_cpu": round(cpu[ours] / cpu[before], 3)})
        trl = f"trl/{case}"
        if trl in med:
            entry.update({"trl_s_per_iter": round(med[trl], 4), "trl_cpu_s_per_iter": round(cpu[trl], 4),
                          "trl_episodes_per_s": round(a.batch_size / med[trl], 3), "trl_gold": round(gold[trl], 4),
                          "trl_peak_rss_mb": round(rss[trl]),
                          "ours_over_trl_time": round(med[ours] / med[trl], 3),
                          "ours_over_trl_cpu": round(cpu[ours] / cpu[trl], 3),
                          "speedup_vs_trl": round(med[trl] / med[ours], 2)})
        if "floor" in med:
            entry["ours_over_floor_time"] = round(med[ours] / med["floor"], 3)
            entry["ours_over_floor_cpu"] = round(cpu[ours] / cpu["floor"], 3)
        payload[f"reward_{case}"] = entry
    if "floor" in med:
        payload["floor_s_per_iter"] = round(med["floor"], 4)
        payload["floor_cpu_s_per_iter"] = round(cpu["floor"], 4)
    payload["machine"] = machine_note(a.threads)
    final_json(payload)


if __name__ == "__main__":
    main()
