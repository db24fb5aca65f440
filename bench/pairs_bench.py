"""What bench/dpo.py and bench/reward.py share: ours and TRL 1.16's trainer on pairs, side by side.

Each side trains `--steps` optimizer steps on builtin:review-preferences from the same start
(bench/.work/policy-small-gpt2), in fresh processes alternating A B A B for `--rounds` rounds. Pairs/s: pairs
of the measured steps / their wall time (a step's time is the gap between two consecutive optimizer steps,
so the first step never counts); peak RSS of each side's process; held-out accuracy: each trainer's own
evaluation on the same first `--eval-pairs` test pairs. Prints a table, then ONE JSON line with the ratios.
"""

from __future__ import annotations

import statistics

from common import (
    OURS_PY,
    WORK,
    alternate,
    final_json,
    machine_note,
    parse_steps,
    peer_python,
    print_table,
    run_side,
    spread,
    steps_parser,
)
from ppo import POLICY, prepare_models


def rates(res: dict, batch: int, warmup: int) -> tuple[float, float]:
    times, cpu = res["times"][warmup:] or res["times"], res["cpu_times"][warmup:] or res["cpu_times"]
    return batch * len(times) / sum(times), batch * len(cpu) / sum(cpu)


def main(stage: str, title: str, doc: str, settings: dict) -> None:
    """`settings`: the stage's own keys of both sides' specs (learning rate, beta, ...)."""
    parser = steps_parser(doc)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--eval-pairs", type=int, default=200)
    a = parse_steps(parser)

    prepare_models()
    trl_python = peer_python("trl")
    base = {"model": str(POLICY), "seed": 42, "warmup_steps": 2, "batch_size": a.batch_size, "steps": a.steps,
            "max_length": 128, "eval_pairs": a.eval_pairs, **settings}

    def side(name: str, python: str):
        return lambda r: run_side(python, f"{name}_{stage}.py",
                                  {**base, "output_dir": str(WORK / "runs" / f"{stage}-{name}-{r}")}, f"{stage}-{name}-{r}",
                                  a.threads)

    sides = {"ours": side("ours", OURS_PY), "trl": side("trl", trl_python)}
    results = alternate(sides, a.rounds)

    stats = {}
    for name, runs in results.items():
        r = [rates(res, a.batch_size, a.warmup) for res in runs]
        stats[name] = {"pps": [x[0] for x in r], "cpu_pps": [x[1] for x in r],
                       "rss": statistics.median(res["peak_rss_mb"] for res in runs),
                       "loss": statistics.fmean(statistics.fmean(res["losses"][-3:]) for res in runs),
                       "acc": statistics.fmean(res["eval_accuracy"] for res in runs)}
    rows = [(name, f"{statistics.median(s['pps']):.2f}", spread(s["pps"]), f"{statistics.median(s['cpu_pps']):.2f}",
             spread(s["cpu_pps"]), f"{s['rss']:.0f}", f"{s['loss']:.4f}", f"{s['acc']:.3f}")
            for name, s in stats.items()]
    print_table(f"{title}: {a.steps} steps x {a.batch_size} pairs, {a.rounds} rounds", rows,
                ("side", "pairs/s", "spread", "pairs/cpu-s", "spread", "peak RSS MB", "final loss", "held-out acc"))
    o, t = stats["ours"], stats["trl"]
    final_json({
        "bench": stage, "steps": a.steps, "rounds": a.rounds,
        "ours_pairs_per_s": round(statistics.median(o["pps"]), 3), "trl_pairs_per_s": round(statistics.median(t["pps"]), 3),
        "throughput_ratio": round(statistics.median(o["pps"]) / statistics.median(t["pps"]), 3),
        "throughput_ratio_cpu": round(statistics.median(o["cpu_pps"]) / statistics.median(t["cpu_pps"]), 3),
        "ours_peak_rss_mb": round(o["rss"]), "trl_peak_rss_mb": round(t["rss"]),
        "ours_held_out_accuracy": round(o["acc"], 4), "trl_held_out_accuracy": round(t["acc"], 4),
        "ours_final_loss": round(o["loss"], 4), "trl_final_loss": round(t["loss"], 4),
        "machine": machine_note(a.threads),
    })

