"""TRL's side of bench/grpo.py and bench/rloo.py: trl 1.16 `GRPOTrainer` / `RLOOTrainer` (run in
bench/.venv-trl) on the same policy folder, prompts (the same built-in train split; they are at
most a few tokens, so TRL's own tokenisation gives our ids: checked below), group size, rollout
and micro-batch sizes, passes (num_iterations), completion length (forced to full length on both
sides: min_new_tokens here, generation.min_response_length on ours), reward function
(rlhf_cli.builtin.sentiment.sentiment_reward, what `builtin:sentiment` resolves to) and
optimiser settings. Usage: python trl_group.py SPEC.json RESULT.json
"""

import sidekit

spec, result_path = sidekit.start()
clock = sidekit.Clock()
sidekit.clock_optimizer_steps(clock)

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from rlhf_cli.builtin.sentiment import sentiment_reward  # noqa: E402
from rlhf_cli.config.loader import build_stage  # noqa: E402
from rlhf_cli.data.loading import load_splits  # noqa: E402
from rlhf_cli.models.loading import load_tokenizer  # noqa: E402
from rlhf_cli.stages.online import prepare_prompts  # noqa: E402

s = spec
algorithm = s["algorithm"]
tokenizer = load_tokenizer(s["policy"], padding_side="left")
data_cfg = build_stage(algorithm, {"reward": {"function": "builtin:sentiment"},
                                   "data": {"dataset_name": s.get("dataset_name", "builtin:review-prompts"),
                                            "max_prompt_length": s["max_prompt_length"]}})
train_raw, _ = load_splits(data_cfg.data)
ours_ids, _ = prepare_prompts(train_raw, tokenizer, data_cfg, "train")
texts = list(train_raw[data_cfg.data.prompt_column])
theirs = tokenizer(text=texts)["input_ids"]
mismatched = sum(a != b for a, b in zip(ours_ids, theirs, strict=True))
if mismatched:
    raise SystemExit(f"{mismatched} prompts tokenise differently on the two sides: the comparison would be unfair")
dataset = Dataset.from_dict({"prompt": texts})

steps_per_rollout = s["steps_per_generation"] // s.get("gradient_accumulation_steps", 1) * s["num_iterations"]
common = dict(
    output_dir=s["output_dir"], seed=s["seed"], learning_rate=s["learning_rate"], lr_scheduler_type="linear",
    warmup_steps=0, weight_decay=0.0, max_grad_norm=s["max_grad_norm"],
    per_device_train_batch_size=s["micro_batch_size"], gradient_accumulation_steps=s.get("gradient_accumulation_steps", 1),
    steps_per_generation=s["steps_per_generation"], num_generations=s["num_generations"],
    num_iterations=s["num_iterations"], max_steps=s["iterations"] * steps_per_rollout,
    max_completion_length=s["response_length"], temperature=s["temperature"], top_k=0, top_p=1.0,
    generation_kwargs={"min_new_tokens": s["min_response_length"]} if s["min_response_length"] else None,
    beta=s["beta"], epsilon=s["epsilon"],
    bf16=False, fp16=False, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
)
if algorithm == "grpo":
    args = GRPOConfig(**common, loss_type=s["loss_type"], scale_rewards=s["scale_rewards"])
    trainer_class = GRPOTrainer
else:
    args = RLOOConfig(**common, normalize_advantages=s["normalize_advantages"])
    trainer_class = RLOOTrainer
class KeepLogs(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs and logs["reward"] == logs["reward"]:  # not NaN
            kept.append(dict(logs))


kept = []


def sentiment(prompts, completions, **_):
    """TRL's reward-function interface (keyword arguments) around the very function ours calls."""
    return sentiment_reward(prompts, completions)


model = AutoModelForCausalLM.from_pretrained(s["policy"])
trainer = trainer_class(model=model, reward_funcs=sentiment, args=args, train_dataset=dataset,
                        processing_class=tokenizer, callbacks=[KeepLogs()])
trainer.train()
trainer.save_model(s["output_dir"])
tokenizer.save_pretrained(s["output_dir"])
per_iteration = clock.every(steps_per_rollout)
rewards = [row["reward"] for row in kept]
sidekit.finish(result_path, {"times": per_iteration.times(), "cpu_times": per_iteration.cpu_times(),
                             "optimizer_steps": len(clock.stamps), "train_rewards": rewards,
                             "lengths": [row.get("completions/mean_length") for row in kept],
                             "model_dir": s["output_dir"]})
