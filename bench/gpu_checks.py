"""The checks of issue #11 that only a GPU can make, as one short script (about a minute on one GPU).

    python bench/gpu_checks.py            # on a CUDA machine; prints one JSON line, exits 1 if a check fails

What CPU tests cannot show (they check the same logic with torch's CPU GradScaler and CPU autocast):
  fp16_ppo   PPO under `training.fp16: true` through accelerate's real GradScaler: the first steps
             overflow by design and are skipped by the scaler (`fp16_overflow_skips`), the run does
             not stop, and the weights change.
  fp16_sft   The same for the SFT loop.
  bf16_ppo   `training.bf16: true` on CUDA kernels: KL at step 0 ~0 and the first mini-batch's
             ratio 1 within 1e-3, for a causal (tiny-gpt2) and an encoder-decoder (tiny-t5) policy.
On a machine without CUDA the fp16 checks report "skipped" and the bf16 ones run on the CPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

from rlhf_cli.config.loader import build_stage
from rlhf_cli.models.loading import load_tokenizer
from rlhf_cli.models.policy import load_policy
from rlhf_cli.ppo.trainer import PPOTrainer
from rlhf_cli.training.accel import make_accelerator

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["I watched The", "My sister and I went to see a film about", "It", "We caught Return to Seville in"] * 4


def trainer_for(model: str, out: Path, precision: str, **ppo) -> PPOTrainer:
    AcceleratorState._reset_state(reset_partial_state=False)  # each check picks its own precision
    config = build_stage("ppo", {
        "model": {"model_name_or_path": model},
        "reward": {"function": "builtin:sentiment"},
        "generation": {"response_length": 16, "temperature": 0.7},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 16, "learning_rate": 1e-3, precision: True},
        "ppo": {"total_episodes": 16, "num_mini_batches": 1, **ppo},
    })
    accelerator = make_accelerator(config.training, out)
    policy, reference = load_policy(config.model, config.peft, seed=0)
    return PPOTrainer(config, policy, load_tokenizer(model, padding_side="left"), accelerator, reference)


def fp16_ppo(out: Path) -> dict:
    trainer = trainer_for("builtin:tiny-gpt2", out, "fp16", num_ppo_epochs=4)
    before = [p.detach().clone() for p in trainer.unwrapped.parameters()]
    for _ in range(3):
        stats = trainer.step(trainer.generate(PROMPTS), torch.linspace(-1, 1, len(PROMPTS)))
    changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.unwrapped.parameters(), strict=True))
    return {"ok": changed and all(math.isfinite(v) for v in stats.values()),
            "fp16_overflow_skips": trainer.fp16_overflow_skips, "scale": trainer.accelerator.scaler.get_scale(),
            "weights_changed": changed}


def fp16_sft(out: Path) -> dict:
    AcceleratorState._reset_state(reset_partial_state=False)
    result = subprocess.run(
        [sys.executable, "-m", "rlhf_cli", "sft", "configs/quickstart-sft.yaml", "--output-dir", str(out),
         "--set", "training.max_steps=20", "--set", "training.fp16=true", "--set", "training.eval_steps=0",
         "--set", "training.logging_steps=5"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if result.returncode == 0 else []
    return {"ok": result.returncode == 0, "exit": result.returncode, "last": rows[-1] if rows else result.stderr[-500:]}


def bf16_ppo(model: str, out: Path) -> dict:
    trainer = trainer_for(model, out, "bf16", num_ppo_epochs=1)
    torch.manual_seed(0)
    stats = trainer.step(trainer.generate(PROMPTS), torch.linspace(-1, 1, len(PROMPTS)))
    kl, ratio = stats["objective/kl"], stats["val/ratio"]
    return {"ok": abs(kl) < 1e-2 and abs(ratio - 1) < 1e-3, "kl_step0": kl, "first_ratio": ratio}


def main() -> int:
    cuda = torch.cuda.is_available()
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if cuda:
            results["fp16_ppo"] = fp16_ppo(root / "fp16-ppo")
            results["fp16_sft"] = fp16_sft(root / "fp16-sft")
        else:
            results["fp16_ppo"] = results["fp16_sft"] = {"ok": True, "skipped": "no CUDA: fp16 needs a GPU"}
        for model in ("builtin:tiny-gpt2", "builtin:tiny-t5"):
            results[f"bf16_ppo[{model}]"] = bf16_ppo(model, root / model.replace(":", "-"))
    print(json.dumps(results, default=str))
    return 0 if all(r["ok"] for k, r in results.items() if k != "device") else 1


if __name__ == "__main__":
    sys.exit(main())
