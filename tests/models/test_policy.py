"""The PPO policy: value head in the same forward, reloading with its head, a separate critic."""

import torch

from rlhf_cli.config.sections import ModelConfig, PeftConfig
from rlhf_cli.models.loading import load_model, load_tokenizer
from rlhf_cli.models.policy import load_policy
from rlhf_cli.ppo.forward import causal_inputs


def batch():
    tok = load_tokenizer("builtin:tiny-gpt2", padding_side="left")
    q = tok(["I watched The", "It"], return_tensors="pt", padding=True)
    r = torch.tensor([[10, 11, 12], [13, 14, 1]])
    return causal_inputs(q["input_ids"], q["attention_mask"], r, torch.ones_like(r, dtype=torch.bool))


def test_logits_and_values_come_from_one_forward():
    model, reference = load_policy(ModelConfig(model_name_or_path="builtin:tiny-gpt2"), PeftConfig(), seed=0)
    calls = []
    model.policy.register_forward_hook(lambda *_: calls.append(1))
    logits, values = model(**batch())
    assert len(calls) == 1
    assert logits.shape[:2] == values.shape and values.dtype == torch.float32
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())


def test_saved_policy_reloads_with_its_value_head(tmp_path):
    model, _ = load_policy(ModelConfig(model_name_or_path="builtin:tiny-gpt2"), PeftConfig(), seed=0)
    torch.nn.init.normal_(model.value_head.summary.weight)  # a head that is not the fresh init
    model.policy.save_pretrained(tmp_path)
    load_tokenizer("builtin:tiny-gpt2").save_pretrained(tmp_path)
    model.value_head.save(tmp_path)
    again, _ = load_policy(ModelConfig(model_name_or_path=str(tmp_path)), PeftConfig(), seed=1)
    inputs = batch()
    for a, b in zip(model(**inputs), again(**inputs), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_lora_policy_has_no_reference_copy():
    model, reference = load_policy(ModelConfig(model_name_or_path="builtin:tiny-gpt2"), PeftConfig(use_peft=True), seed=0)
    assert reference is None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)


def test_separate_critic_starts_from_the_reward_model(tmp_path):
    rm = load_model("builtin:tiny-gpt2", task="sequence-classification", num_labels=1, seed=3)
    rm.save_pretrained(tmp_path)
    load_tokenizer("builtin:tiny-gpt2").save_pretrained(tmp_path)
    model, _ = load_policy(ModelConfig(model_name_or_path="builtin:tiny-gpt2"), PeftConfig(), seed=0, critic=str(tmp_path))
    assert torch.equal(model.value_head.summary.weight, rm.score.weight)
    inputs = batch()
    _, values = model(**inputs)
    # the critic's value at each position is the reward model's score head on its hidden state
    hidden = rm.transformer(**inputs).last_hidden_state
    assert torch.allclose(values, rm.score(hidden).squeeze(-1), atol=1e-5)
