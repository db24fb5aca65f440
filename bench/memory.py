"""Peak memory of a PPO iteration and an SFT step against the vocabulary and the sequence length:
`rlhf` vs TRL (1.12's PPOTrainer, 1.16's SFTTrainer), side by side.

    python bench/memory.py                                  # V 4k/32k/128k x L 128/512/1024, both stages
    python bench/memory.py --vocab 32768 --lengths 512 --stages sft --compare-src /tmp/before

The model: a GPT-2 2 layers x 64 wide with a vocabulary of V (bench/.work/memory-v{V}, the built-in
tokenizer; ids past its 4,096 tokens are valid for the model and decode to nothing), so the LM head
is what grows with V: the peak is the logits, as in large-vocabulary models. Per run, one process:
  * ppo: one iteration of `--batch-size` rows of a `--length`-token response (one mini-batch, one
    epoch: the iteration's update is one micro-step), reward builtin:sentiment; the sides' own
    stage/trainer code (bench/sides/ours_ppo.py, trl_ppo.py, as bench/ppo.py runs them);
  * sft: 2 optimizer steps on `--batch-size` packed rows of `--length` tokens of builtin:reviews.
The figure is the process's peak RSS (ru_maxrss; on a GPU machine also torch's peak allocation)
minus the RSS of the same side's process at the smallest size measured here (4k, 128): what the
step needs beyond the interpreter, the libraries and the tiny models. Peak RSS is a high-water
mark of the whole run, so it includes sampling and the rollout's no-grad forwards on the PPO side.
Prints a table, then ONE JSON line (the curve and the TRL/ours ratios).
"""

from __future__ import annotations

import argparse

import common
from common import OURS_PY, WORK, final_json, machine_note, peer_python, print_table, run_side

VOCABS = (4096, 32768, 131072)
LENGTHS = (128, 512, 1024)


def model_folder(vocab: int, length: int) -> str:
    """A tiny GPT-2 with `vocab` output classes and room for `length` tokens (+ the prompt), saved once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_cli.models.loading import load_tokenizer

    folder = WORK / f"memory-v{vocab}-n{length + 64}"
    if not (folder / "config.json").exists():
        tokenizer = load_tokenizer("builtin:tiny-gpt2")
        config = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=2, n_positions=length + 64,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
        import torch

        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def ppo_spec(model: str, length: int, batch: int, out: str) -> dict:
    return {
        "policy": model, "seed": 0, "batch_size": batch, "num_mini_batches": 1, "num_ppo_epochs": 1,
        "iterations": 1, "response_length": length, "temperature": 1.0, "kl_coef": 0.05, "cliprange": 0.2,
        "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95, "missing_eos_penalty": 1.0,
        "learning_rate": 1e-4, "max_prompt_length": 32, "rollout_forward_batch_size": batch,
        "stage_eval_samples": 2, "reward_function": "builtin:sentiment", "output_dir": out,
        "no_eval": True,  # ours: no held-out sampling before and after (TRL's side samples none either)
    }


def sft_spec(model: str, length: int, batch: int, out: str) -> dict:
    return {"model": model, "max_length": length, "batch_size": batch, "steps": 2, "seed": 0,
            "learning_rate": 1e-4, "warmup_steps": 0, "weight_decay": 0.0, "output_dir": out}


SIDES = {  # stage -> side -> (script, peer venv or None for ours)
    "ppo": {"ours": ("ours_ppo.py", None), "trl": ("trl_ppo.py", "trl-ppo")},
    "sft": {"ours": ("ours_sft.py", None), "trl": ("trl_sft.py", "trl")},
}


def peak(result: dict) -> float:
    return result.get("peak_gpu_mb", result["peak_rss_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", choices=list(SIDES), default=list(SIDES))
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-trl", action="store_true", help="ours (and --compare-src) only")
    parser.add_argument("--compare-src", default=None,
                        help="a folder with another copy of rlhf_cli (e.g. before an optimisation): a side 'before'")
    parser.add_argument("--reuse-results", action="store_true", help="read results already in bench/.work")
    a = parser.parse_args()
    common.REUSE = a.reuse_results

    sizes = [(v, n) for v in sorted(a.vocab) for n in sorted(a.lengths)]
    floor_size = sizes[0]
    rows, curve = [], {}
    for stage in a.stages:
        sides = {"ours": (OURS_PY, SIDES[stage]["ours"][0], None)}
        if a.compare_src:
            sides["before"] = (OURS_PY, SIDES[stage]["ours"][0], a.compare_src)
        if not a.no_trl:
            script, venv = SIDES[stage]["trl"]
            sides["trl"] = (peer_python(venv), script, None)
        spec_of = ppo_spec if stage == "ppo" else sft_spec
        for side, (python, script, src) in sides.items():
            floor = None
            for vocab, length in sizes:
                label = f"memory-{stage}-{side}-v{vocab}-n{length}"
                spec = spec_of(model_folder(vocab, length), length, a.batch_size, str(WORK / "runs" / label))
                print(f"{stage} {side}: vocabulary {vocab}, length {length} ...", flush=True)
                mb = peak(run_side(python, script, spec, label, a.threads, src))
                floor = mb if (vocab, length) == floor_size else floor
                curve.setdefault(stage, {}).setdefault(side, {})[f"{vocab}x{length}"] = {
                    "peak_mb": round(mb, 1), "above_floor_mb": round(mb - floor, 1)}
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for stage, by_side in curve.items():
        names = list(by_side)  # ours, then before / trl
        for key in by_side["ours"]:
            ours = by_side["ours"][key]["above_floor_mb"]
            ratio = {f"ours/{side}": round(ours / max(by_side[side][key]["above_floor_mb"], 1.0), 3)
                     for side in names[1:]}
            ratios.setdefault(stage, {})[key] = ratio
            cells = [f"{by_side[s][key]['peak_mb']:.0f} (+{by_side[s][key]['above_floor_mb']:.0f})" for s in names]
            rows.append((stage, key, *cells, ", ".join(f"{k} {v}" for k, v in ratio.items())))
        print_table(f"{stage}: peak memory, MB (+ above the side's own {floor_size[0]}x{floor_size[1]} run); "
                    f"batch {a.batch_size}", rows, ("stage", "vocab x length", *names, "ratio (above floor)"))
        rows = []
    final_json({"benchmark": "memory", "batch_size": a.batch_size, "curve": curve, "ratios": ratios,
                "machine": machine_note(a.threads)})


if __name__ == "__main__":
    main()
