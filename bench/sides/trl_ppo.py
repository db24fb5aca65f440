"""TRL's side of bench/ppo.py: trl 1.12.0 `trl.experimental.ppo.PPOTrainer` (run in bench/.venv-trl-ppo).

The same policy folder, prompts (encoded by the same code), hyperparameters and reward. TRL's PPO
needs a separate value model: it is initialised from the policy (as a sequence classifier with a
fresh scalar head), which is what our value head on the policy starts from. TRL 1.12 takes only a
reward MODEL; for the reward-function case the gold function is wrapped as one (see
SentimentAsRewardModel). Usage: python trl_ppo.py SPEC.json RESULT.json
"""

import sidekit

spec, result_path = sidekit.start()

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

from rlhf_cli.builtin.sentiment import sentiment_scores  # noqa: E402
from rlhf_cli.config.loader import build_stage  # noqa: E402
from rlhf_cli.data.loading import load_splits  # noqa: E402
from rlhf_cli.models.loading import load_tokenizer  # noqa: E402
from rlhf_cli.stages.online import prepare_prompts  # noqa: E402

s = spec
tokenizer = load_tokenizer(s["policy"], padding_side="left")


class _Backbone(torch.nn.Module):
    """Decodes each (left-padded query + truncated response) and scores the text with the gold
    function; the score fills every position so TRL can pick it at the last real token."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # gives .to(device) a target

    def forward(self, input_ids, attention_mask, **_):
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]
        scores = torch.tensor(sentiment_scores(tokenizer.batch_decode(rows, skip_special_tokens=True)))
        hidden = scores.to(self.anchor.device)[:, None, None].expand(-1, input_ids.shape[1], 1)
        return type("Out", (), {"hidden_states": (hidden,)})()


class SentimentAsRewardModel(torch.nn.Module):
    """The gold function `builtin:sentiment` behind TRL 1.12's reward-model interface."""

    base_model_prefix = "backbone"

    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.score = torch.nn.Identity()


# the same prompt ids as our side: the same dataset, config and encoding code
data_cfg = build_stage("ppo", {"reward": {"function": "builtin:sentiment"}, "data": {"dataset_name": "builtin:review-prompts",
                                         "max_prompt_length": s["max_prompt_length"]}})
train_raw, _ = load_splits(data_cfg.data)
ids, _ = prepare_prompts(train_raw, tokenizer, data_cfg, "train")
dataset = Dataset.from_dict({"input_ids": ids})

policy = AutoModelForCausalLM.from_pretrained(s["policy"])
ref = AutoModelForCausalLM.from_pretrained(s["policy"])
value = AutoModelForSequenceClassification.from_pretrained(s["policy"], num_labels=1)
if s.get("reward_model"):
    reward = AutoModelForSequenceClassification.from_pretrained(s["reward_model"], num_labels=1)
else:
    reward = SentimentAsRewardModel()

args = PPOConfig(
    output_dir=s["output_dir"], seed=s["seed"], learning_rate=s["learning_rate"],
    # TRL: rollout batch = per_device_train_batch_size x gradient_accumulation_steps, split into
    # num_mini_batches; with accumulation 1 each mini-batch is one forward/backward, as on our side.
    per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
    num_mini_batches=s["num_mini_batches"], num_ppo_epochs=s["num_ppo_epochs"],
    total_episodes=s["batch_size"] * s["iterations"],
    local_rollout_forward_batch_size=s["rollout_forward_batch_size"],
    response_length=s["response_length"], temperature=s["temperature"], stop_token="eos",
    kl_coef=s["kl_coef"], cliprange=s["cliprange"], cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"],
    gamma=s["gamma"], lam=s["lam"], missing_eos_penalty=s["missing_eos_penalty"],
    bf16=False, fp16=False, report_to=[], num_sample_generations=0, logging_steps=1,
    save_strategy="no", disable_tqdm=True,
)

clock = sidekit.Clock()
scores_seen = []


class Tick(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        clock.tick()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "objective/scores" in logs:
            scores_seen.append(logs["objective/scores"])


trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                     train_dataset=dataset, value_model=value, callbacks=[Tick()])
trainer.train()
trainer.accelerator.unwrap_model(trainer.model).policy.save_pretrained(s["output_dir"])
tokenizer.save_pretrained(s["output_dir"])
sidekit.finish(result_path, {"times": clock.times(), "cpu_times": clock.cpu_times(), "train_scores": scores_seen, "model_dir": s["output_dir"]})
