"""Our side of bench/grpo.py and bench/rloo.py: `rlhf grpo` / `rlhf rloo` (the stage's run(), as the
CLI calls it), with a clock on every optimizer step (the same hook as TRL's side).
Usage: python ours_group.py SPEC.json RESULT.json"""

import importlib
import json
from pathlib import Path

import sidekit

spec, result_path = sidekit.start()
clock = sidekit.Clock()
sidekit.clock_optimizer_steps(clock)

from rlhf_cli.config.loader import build_stage  # noqa: E402

s = spec
algorithm = s["algorithm"]  # "grpo" or "rloo"
options = {"total_episodes": s["batch_size"] * s["iterations"], "num_generations": s["num_generations"],
           "steps_per_generation": s["steps_per_generation"], "num_iterations": s["num_iterations"],
           "beta": s["beta"], "epsilon": s["epsilon"],
           "local_rollout_forward_batch_size": s["batch_size"],  # one generate call per rollout, as TRL
           "num_sample_rows": 0, "share_prompt_prefix": s.get("share_prompt_prefix", True)}
if algorithm == "grpo":
    options.update({"loss_type": s["loss_type"], "scale_rewards": s["scale_rewards"]})
else:
    options.update({"normalize_advantages": s["normalize_advantages"]})
config = build_stage(algorithm, {
    "model": {"model_name_or_path": s["policy"]},
    "data": {"dataset_name": s.get("dataset_name", "builtin:review-prompts"), "max_prompt_length": s["max_prompt_length"],
             "max_eval_samples": s["stage_eval_samples"]},  # (a --prompt-words file has no held-out split)
    "generation": {"response_length": s["response_length"], "min_response_length": s["min_response_length"],
                   "temperature": s["temperature"], "top_k": 0, "top_p": 1.0},
    "reward": {"function": s["reward_function"]},
    "training": {"output_dir": s["output_dir"], "seed": s["seed"], "learning_rate": s["learning_rate"],
                 "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
                 "max_grad_norm": s["max_grad_norm"], "per_device_train_batch_size": s["micro_batch_size"],
                 "gradient_accumulation_steps": s.get("gradient_accumulation_steps", 1), "logging_steps": 1, "save_steps": 10**6},
    algorithm: options,
})
importlib.import_module(f"rlhf_cli.stages.{algorithm}").run(config, overwrite=True)

steps = s["steps_per_generation"] // s.get("gradient_accumulation_steps", 1) * s["num_iterations"]  # optimizer steps per rollout
per_iteration = clock.every(steps)
rows = [json.loads(line) for line in (Path(s["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
rows = [r for r in rows if "reward" in r]
phases = {k: [r[k] for r in rows] for k in ("time/generate_s", "time/score_s", "time/update_s")}
sidekit.finish(result_path, {"times": per_iteration.times(), "cpu_times": per_iteration.cpu_times(),
                             "optimizer_steps": len(clock.stamps), "phases": phases,
                             "train_rewards": [r["reward"] for r in rows],
                             "lengths": [r.get("completions/mean_length") for r in rows],
                             "model_dir": s["output_dir"]})
