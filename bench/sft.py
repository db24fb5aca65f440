"""`rlhf sft` vs TRL 1.16's SFTTrainer, side by side.

    python bench/sft.py                      # 2 rounds of A B A B, 10 optimizer steps per run

Both sides: the same `builtin:small-gpt2` start (bench/.work/policy-small-gpt2), builtin:reviews
(text, EOS appended), sequences packed whole into rows of `--max-length` tokens (ours: greedy packing
with a block-diagonal attention; TRL: its default best-fit-decreasing packing), the same batch size,
learning rate, schedule, weight decay and gradient clipping. Tokens/s: tokens of the measured steps
(as each trainer counts them in its logs) / their wall time; a step's time is the gap between two
consecutive optimizer steps, so the first step (and process start, data preparation) never counts.
Final loss: the mean training loss of the last 3 steps, and the held-out loss of each final model
on the first `--eval-rows` test reviews, computed by the same code for both.
Prints a table, then ONE JSON line with the ratios.
"""

from __future__ import annotations

import statistics

import torch
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


def throughput(res: dict, warmup: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) over the measured steps."""
    deltas = [b - a for a, b in zip(res["cum_tokens"], res["cum_tokens"][1:], strict=False)]  # tokens of steps 2..N
    n = min(len(deltas), len(res["times"]))
    keep = range(min(warmup, n - 1), n)
    tokens = sum(deltas[i] for i in keep)
    return tokens / sum(res["times"][i] for i in keep), tokens / sum(res["cpu_times"][i] for i in keep)


@torch.no_grad()
def held_out_loss(model_dir: str, rows: int) -> float:
    from rlhf_cli.builtin.datasets import load_builtin_dataset
    from rlhf_cli.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(POLICY), padding_side="right")
    model = load_model(model_dir, task="causal-lm").eval()
    texts = [t + tokenizer.eos_token for t in load_builtin_dataset("reviews")["test"]["text"][:rows]]
    total, count = 0.0, 0
    for start in range(0, len(texts), 25):
        enc = tokenizer(texts[start : start + 25], return_tensors="pt", padding=True, add_special_tokens=False)
        logits = model(**enc).logits[:, :-1].float()
        labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


def main() -> None:
    parser = steps_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-rows", type=int, default=100)
    a = parse_steps(parser)

    prepare_models()
    trl_python = peer_python("trl")
    base = {"model": str(POLICY), "seed": 42, "learning_rate": 2e-3, "warmup_steps": 2, "weight_decay": 0.01,
            "batch_size": a.batch_size, "steps": a.steps, "max_length": a.max_length}
    sides = {
        "ours": lambda r: run_side(OURS_PY, "ours_sft.py", {**base, "output_dir": str(WORK / "runs" / f"sft-ours-{r}")},
                                   f"sft-ours-{r}", a.threads),
        "trl": lambda r: run_side(trl_python, "trl_sft.py", {**base, "output_dir": str(WORK / "runs" / f"sft-trl-{r}")},
                                  f"sft-trl-{r}", a.threads),
    }
    results = alternate(sides, a.rounds)

    stats = {}
    for name, runs in results.items():
        tps = [throughput(res, a.warmup) for res in runs]
        stats[name] = {
            "tps": [t[0] for t in tps], "cpu_tps": [t[1] for t in tps],
            "rss": statistics.median(res["peak_rss_mb"] for res in runs),
            "loss": statistics.fmean(statistics.fmean(res["losses"][-3:]) for res in runs),
            "held_out": statistics.fmean(held_out_loss(res["model_dir"], a.eval_rows) for res in runs),
        }
    rows = [(name, f"{statistics.median(s['tps']):.0f}", spread(s["tps"]), f"{statistics.median(s['cpu_tps']):.0f}",
             spread(s["cpu_tps"]), f"{s['rss']:.0f}", f"{s['loss']:.4f}", f"{s['held_out']:.4f}")
            for name, s in stats.items()]
    print_table(f"SFT: {a.steps} steps x {a.batch_size} packed rows of {a.max_length} tokens, {a.rounds} rounds",
                rows, ("side", "tokens/s", "spread", "tokens/cpu-s", "spread", "peak RSS MB", "final loss",
                       "held-out loss"))
    o, t = stats["ours"], stats["trl"]
    final_json({
        "bench": "sft", "steps": a.steps, "rounds": a.rounds,
        "ours_tokens_per_s": round(statistics.median(o["tps"])), "trl_tokens_per_s": round(statistics.median(t["tps"])),
        "throughput_ratio": round(statistics.median(o["tps"]) / statistics.median(t["tps"]), 3),
        "throughput_ratio_cpu": round(statistics.median(o["cpu_tps"]) / statistics.median(t["cpu_tps"]), 3),
        "ours_peak_rss_mb": round(o["rss"]), "trl_peak_rss_mb": round(t["rss"]),
        "ours_final_loss": round(o["loss"], 4), "trl_final_loss": round(t["loss"], 4),
        "ours_held_out_loss": round(o["held_out"], 4), "trl_held_out_loss": round(t["held_out"], 4),
        "machine": machine_note(a.threads),
    })


if __name__ == "__main__":
    main()
