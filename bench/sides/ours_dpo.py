"""Our side of bench/dpo.py: the `rlhf dpo` stage with a clock on every optimizer step."""

import json
from pathlib import Path

import sidekit

spec, result_path = sidekit.start()
clock = sidekit.Clock()
sidekit.clock_optimizer_steps(clock)

from rlhf_cli.config.loader import build_stage  # noqa: E402
from rlhf_cli.stages import dpo as dpo_stage  # noqa: E402

s = spec
config = build_stage("dpo", {
    "model": {"model_name_or_path": s["model"]},
    "data": {"dataset_name": "builtin:review-preferences", "max_length": s["max_length"], "max_prompt_length": 64,
             "max_eval_samples": s["eval_pairs"]},
    "training": {"output_dir": s["output_dir"], "seed": s["seed"], "learning_rate": s["learning_rate"],
                 "lr_scheduler_type": "linear", "warmup_steps": s["warmup_steps"], "weight_decay": 0.0,
                 "max_grad_norm": 1.0, "per_device_train_batch_size": s["batch_size"],
                 "per_device_eval_batch_size": 32, "gradient_accumulation_steps": 1, "max_steps": s["steps"],
                 "logging_steps": 1, "save_steps": 10**6, "eval_steps": 10**6},
    "dpo": {"beta": s["beta"], "loss_type": "sigmoid"},
})
dpo_stage.run(config, overwrite=True)
rows = [json.loads(line) for line in (Path(s["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
evals = [r for r in rows if "eval_rewards/accuracies" in r]
train = [r for r in rows if "loss" in r]
sidekit.finish(result_path, {"times": clock.times(), "cpu_times": clock.cpu_times(),
                             "losses": [r["loss"] for r in train],
                             "eval_accuracy": evals[-1]["eval_rewards/accuracies"], "model_dir": s["output_dir"]})
