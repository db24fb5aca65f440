"""PPOTrainer on built-in tiny models: log-prob consistency, one step, the Python API."""

from pathlib import Path

import pytest
import torch

from rlhf_cli.config.loader import build_stage
from rlhf_cli.models.loading import load_tokenizer
from rlhf_cli.models.policy import load_policy
from rlhf_cli.ppo.logprobs import logprobs_from_logits
from rlhf_cli.ppo.trainer import PPOTrainer
from rlhf_cli.training.accel import make_accelerator

PROMPTS = ["I watched The", "My sister and I went to see a film about", "It", "We caught Return to Seville in"]


def make_trainer(tmp_path: Path, model: str, use_peft: bool = False, **ppo) -> PPOTrainer:
    config = build_stage("ppo", {
        "model": {"model_name_or_path": model},
        "peft": {"use_peft": use_peft},
        "reward": {"function": "builtin:sentiment"},
        "generation": {"response_length": 12, "temperature": 0.7},
        "training": {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "learning_rate": 1e-3},
        "ppo": {"total_episodes": 8, "num_mini_batches": 2, "local_rollout_forward_batch_size": 3, **ppo},
    })
    accelerator = make_accelerator(config.training, tmp_path)
    tokenizer = load_tokenizer(model, padding_side="left")
    policy, reference = load_policy(config.model, config.peft, seed=0)
    return PPOTrainer(config, policy, tokenizer, accelerator, reference)


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_update_logprobs_equal_rollout_logprobs_with_left_padding(tmp_path, model):
    """Ratio 1 at the first minibatch: the update's forward (train mode, one row at a time, no
    padding) reproduces the log-probs the rollout computed for the whole left-padded batch, and
    those equal the sampling distribution that `generate` used (its logits, temperature-scaled)."""
    trainer = make_trainer(tmp_path, model)
    query_ids, query_mask = trainer.encode(PROMPTS)
    assert (query_mask == 0).any()  # prompts of different lengths -> real left padding
    policy = trainer.unwrapped.policy
    torch.manual_seed(0)
    out = policy.generate(input_ids=query_ids, attention_mask=query_mask, output_logits=True, return_dict_in_generate=True)
    start = 1 if policy.config.is_encoder_decoder else query_ids.shape[1]  # skip decoder start / the prompt
    rollout = trainer.rollout_from(query_ids, query_mask, out.sequences[:, start:])
    old_logprobs, _, ref_logprobs = trainer.evaluate(rollout)
    mask = rollout.response_mask

    # the sampling distribution: generate's own (raw) logits at the sampled tokens, temperature-scaled
    sampled_logits = torch.stack(out.logits, dim=1)  # (B, T, V)
    from_generate = logprobs_from_logits(sampled_logits, rollout.response_ids, trainer.temperature)
    assert torch.allclose(from_generate[mask], old_logprobs[mask], atol=1e-4)

    # the update's forward: train mode (dropout is off), one row at a time without its left padding
    trainer.model.train()
    for i in range(len(PROMPTS)):
        real = query_mask[i].bool()
        alone = trainer.rollout_from(query_ids[i : i + 1, real], query_mask[i : i + 1, real], rollout.response_ids[i : i + 1])
        logits, _ = trainer.policy_forward(alone, slice(0, 1))
        new = logprobs_from_logits(logits, alone.response_ids, trainer.temperature)[0]
        assert torch.allclose(new[mask[i]], old_logprobs[i][mask[i]], atol=1e-5)
    # the reference equals the policy before any update
    assert torch.allclose(ref_logprobs[mask], old_logprobs[mask], atol=1e-5)


def test_step_returns_trl_named_statistics_and_changes_weights(tmp_path):
    trainer = make_trainer(tmp_path, "builtin:tiny-gpt2")
    before = [p.detach().clone() for p in trainer.unwrapped.parameters()]
    rollout = trainer.generate(PROMPTS)
    stats = trainer.step(rollout, torch.tensor([1.0, -1.0, 0.5, 0.0]))
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                "loss/value_avg", "val/clipfrac_avg", "val/num_eos_tokens", "lr", "episode"):
        assert key in stats, key
    assert stats["episode"] == 4 and stats["objective/scores"] == pytest.approx(0.125)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.unwrapped.parameters(), strict=True))


def test_python_api_step_on_user_rewards(tmp_path):
    """Drive the loop by hand: generate, reward however you like, step."""
    trainer = make_trainer(tmp_path, "builtin:tiny-gpt2", use_peft=True)
    rollout = trainer.generate(PROMPTS)
    rewards = torch.tensor([float(len(r.split())) for r in rollout.responses])  # e.g. a human's scores
    stats = trainer.step(rollout, rewards)
    assert stats["objective/scores"] == pytest.approx(rewards.mean().item())
    assert trainer.reference is None  # LoRA: the reference is the adapter switched off
