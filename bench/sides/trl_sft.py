"""TRL's side of bench/sft.py: trl 1.16 SFTTrainer (run in bench/.venv-trl), same model and data.

Packing with TRL's default strategy (best-fit decreasing, sequences kept whole, position ids
restart per sequence), as our packing keeps reviews whole with a block-diagonal attention."""

import sidekit

spec, result_path = sidekit.start()
clock = sidekit.Clock()
sidekit.clock_optimizer_steps(clock)

from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from rlhf_cli.builtin.datasets import load_builtin_dataset  # noqa: E402
from rlhf_cli.models.loading import load_tokenizer  # noqa: E402

s = spec
tokenizer = load_tokenizer(s["model"], padding_side="right")
train = load_builtin_dataset("reviews")["train"]
model = AutoModelForCausalLM.from_pretrained(s["model"])
args = SFTConfig(
    output_dir=s["output_dir"], seed=s["seed"], learning_rate=s["learning_rate"], lr_scheduler_type="linear",
    warmup_steps=s["warmup_steps"], weight_decay=s["weight_decay"], max_grad_norm=1.0,
    per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1, max_steps=s["steps"],
    logging_steps=1, save_strategy="no", report_to=[], bf16=False, fp16=False, disable_tqdm=True,
    max_length=s["max_length"], packing=True, dataset_text_field="text",
)
logs = []


class Keep(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            logs_copy = dict(logs)
            logs_copy["_num_tokens"] = state.num_input_tokens_seen
            globals()["logs"].append(logs_copy)


trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[Keep()])
trainer.train()
trainer.model.save_pretrained(s["output_dir"])
tokenizer.save_pretrained(s["output_dir"])
sidekit.finish(result_path, {"times": clock.times(), "cpu_times": clock.cpu_times(),
                             "cum_tokens": [r.get("num_tokens", r["_num_tokens"]) for r in logs],
                             "losses": [r["loss"] for r in logs], "model_dir": s["output_dir"]})
