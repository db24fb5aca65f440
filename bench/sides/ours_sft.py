"""Our side of bench/sft.py: the `rlhf sft` stage with a clock on every optimizer step."""

import json
from pathlib import Path

import sidekit

spec, result_path = sidekit.start()
clock = sidekit.Clock()
sidekit.clock_optimizer_steps(clock)

from rlhf_cli.config.loader import build_stage  # noqa: E402
from rlhf_cli.stages import sft as sft_stage  # noqa: E402

s = spec
config = build_stage("sft", {
    "model": {"model_name_or_path": s["model"]},
    "data": {"dataset_name": "builtin:reviews", "dataset_format": "text", "max_length": s["max_length"],
             "packing": True, "max_eval_samples": 8},
    "training": {"output_dir": s["output_dir"], "seed": s["seed"], "learning_rate": s["learning_rate"],
                 "lr_scheduler_type": "linear", "warmup_steps": s["warmup_steps"], "weight_decay": s["weight_decay"],
                 "max_grad_norm": 1.0, "per_device_train_batch_size": s["batch_size"],
                 "gradient_accumulation_steps": 1, "max_steps": s["steps"], "logging_steps": 1,
                 "save_steps": 10**6, "eval_steps": None},
})
sft_stage.run(config, overwrite=True)
rows = [json.loads(line) for line in (Path(s["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
rows = [r for r in rows if "num_tokens" in r and "loss" in r]
sidekit.finish(result_path, {"times": clock.times(), "cpu_times": clock.cpu_times(),
                             "cum_tokens": [r["num_tokens"] for r in rows], "losses": [r["loss"] for r in rows],
                             "model_dir": s["output_dir"]})
