"""Our side of bench/ppo.py: `rlhf ppo` (the stage's run(), as the CLI calls it) with a clock on
each iteration's end. Usage: python ours_ppo.py SPEC.json RESULT.json"""

import json
from pathlib import Path

import sidekit

spec, result_path = sidekit.start()

from rlhf_cli.config.loader import build_stage  # noqa: E402
from rlhf_cli.online.trainer import OnlineTrainer  # noqa: E402
from rlhf_cli.stages import ppo as ppo_stage  # noqa: E402

s = spec
reward = {"model": s["reward_model"]} if s.get("reward_model") else {"function": s["reward_function"]}
config = build_stage("ppo", {
    "model": {"model_name_or_path": s["policy"]},
    "data": {"dataset_name": "builtin:review-prompts", "max_prompt_length": s["max_prompt_length"],
             "max_eval_samples": s["stage_eval_samples"],
             **({"dataset_test_split": None} if s.get("no_eval") else {})},  # no held-out sampling (bench/memory.py)
    "generation": {"response_length": s["response_length"], "temperature": s["temperature"], "top_k": 0, "top_p": 1.0},
    "reward": reward,
    "training": {"output_dir": s["output_dir"], "seed": s["seed"], "learning_rate": s["learning_rate"],
                 "per_device_train_batch_size": s["batch_size"] // s["num_mini_batches"],
                 "gradient_accumulation_steps": 1, "logging_steps": 1, "save_steps": 10**6,
                 "max_grad_norm": 0.0},  # TRL's PPO loop never clips gradients: same update rule
    "ppo": {"total_episodes": s["batch_size"] * s["iterations"], "num_mini_batches": s["num_mini_batches"],
            "num_ppo_epochs": s["num_ppo_epochs"], "local_rollout_forward_batch_size": s["rollout_forward_batch_size"],
            "kl_coef": s["kl_coef"], "cliprange": s["cliprange"], "cliprange_value": s["cliprange_value"],
            "vf_coef": s["vf_coef"], "gamma": s["gamma"], "lam": s["lam"],
            "missing_eos_penalty": s["missing_eos_penalty"], "num_sample_rows": 0},
})

clock = sidekit.Clock()
original_step = OnlineTrainer.step


def timed_step(self, rollout, scores):
    stats = original_step(self, rollout, scores)
    clock.tick()
    return stats


OnlineTrainer.step = timed_step
ppo_stage.run(config, overwrite=True)

rows = [json.loads(line) for line in (Path(s["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
rows = [r for r in rows if "time/update_s" in r]
phases = {k: [r[k] for r in rows] for k in ("time/generate_s", "time/score_s", "time/update_s")}
sidekit.finish(result_path, {"times": clock.times(), "cpu_times": clock.cpu_times(), "phases": phases,
                             "train_scores": [r["objective/scores"] for r in rows], "model_dir": s["output_dir"]})
