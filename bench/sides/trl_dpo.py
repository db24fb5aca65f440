"""TRL's side of bench/dpo.py: trl 1.16 DPOTrainer (run in bench/.venv-trl), same model, pairs and
hyperparameters; its reference is a frozen copy, as ours; held-out implicit-reward accuracy from its
own evaluate() on the same held-out pairs."""

import sidekit

spec, result_path = sidekit.start()
clock = sidekit.Clock()
sidekit.clock_optimizer_steps(clock)

from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from rlhf_cli.builtin.datasets import load_builtin_dataset  # noqa: E402
from rlhf_cli.models.loading import load_tokenizer  # noqa: E402

s = spec
tokenizer = load_tokenizer(s["model"], padding_side="right")
data = load_builtin_dataset("review-preferences")
test = data["test"].select(range(s["eval_pairs"]))
model = AutoModelForCausalLM.from_pretrained(s["model"])
args = DPOConfig(
    output_dir=s["output_dir"], seed=s["seed"], learning_rate=s["learning_rate"], lr_scheduler_type="linear",
    warmup_steps=s["warmup_steps"], weight_decay=0.0, max_grad_norm=1.0,
    per_device_train_batch_size=s["batch_size"], per_device_eval_batch_size=32, gradient_accumulation_steps=1,
    max_steps=s["steps"], logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], bf16=False,
    fp16=False, disable_tqdm=True, max_length=s["max_length"], beta=s["beta"], loss_type="sigmoid",
)
losses = []


class Keep(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            losses.append(logs["loss"])


trainer = DPOTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=test,
                     processing_class=tokenizer, callbacks=[Keep()])
trainer.train()
times, cpu_times = clock.times(), clock.cpu_times()  # before evaluate() (it takes no optimizer step anyway)
metrics = trainer.evaluate()
sidekit.finish(result_path, {"times": times, "cpu_times": cpu_times, "losses": losses,
                             "eval_accuracy": metrics.get("eval_rewards/accuracies"), "model_dir": s["output_dir"]})
