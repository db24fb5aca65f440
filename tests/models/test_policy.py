"""The PPO policy: value head in the same forward, reloading with its head, a separate critic."""

import torch

from rlhf_cli.config.sections import ModelConfig, PeftConfig
from rlhf_cli.lm.forward import causal_inputs
from rlhf_cli.models.loading import load_model, load_tokenizer
from rlhf_cli.models.policy import load_policy


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


def adapter_folder(tmp_path):
    """A LoRA adapter on builtin:tiny-gpt2 whose weights moved (adapter on != adapter off), saved as
    `rlhf sft` with peft.use_peft saves it."""
    from rlhf_cli.models.adapters import apply_lora

    model = apply_lora(load_model("builtin:tiny-gpt2", task="causal-lm", is_trainable=True), PeftConfig(use_peft=True),
                       task_type="CAUSAL_LM")
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    folder = tmp_path / "sft-adapter"
    model.save_pretrained(folder)
    load_tokenizer("builtin:tiny-gpt2").save_pretrained(folder)
    return folder


def test_policy_from_an_adapter_folder_has_the_starting_policy_as_reference(tmp_path):
    from rlhf_cli.models.policy import has_reference_adapter, reference_mode

    model, reference = load_policy(ModelConfig(model_name_or_path=str(adapter_folder(tmp_path))), PeftConfig(), seed=0)
    policy = model.policy.eval()
    assert reference is None and has_reference_adapter(policy)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n or n.startswith("value_head") for n in trainable)
    inputs = batch()
    with torch.no_grad():
        start = policy(**inputs).logits
        with reference_mode(policy):
            ref = policy(**inputs).logits
        with policy.disable_adapter():
            base = policy(**inputs).logits
    assert torch.equal(ref, start)  # KL 0 before any update
    assert not torch.allclose(base, start, atol=1e-2)  # the base model before SFT is not the reference
    # the trained adapter is active and trainable again; the reference adapter stays frozen
    assert policy.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_fresh_lora_reference_is_the_adapter_disabled():
    from rlhf_cli.models.policy import has_reference_adapter, reference_mode

    model, _ = load_policy(ModelConfig(model_name_or_path="builtin:tiny-gpt2"), PeftConfig(use_peft=True), seed=0)
    policy = model.policy.eval()
    assert not has_reference_adapter(policy)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.fill_(0.1)  # as after some updates
        with reference_mode(policy):
            ref = policy(**batch()).logits
        with policy.disable_adapter():
            base = policy(**batch()).logits
    assert torch.equal(ref, base)


def test_final_model_holds_only_the_trained_adapter(tmp_path):
    from peft import PeftModel

    from rlhf_cli.models.adapters import save_final_model

    folder = adapter_folder(tmp_path)
    model, _ = load_policy(ModelConfig(model_name_or_path=str(folder)), PeftConfig(), seed=0)
    out = tmp_path / "out"
    save_final_model(model.policy, load_tokenizer("builtin:tiny-gpt2"), out, PeftConfig())
    assert (out / "adapter_model.safetensors").is_file() and not (out / "reference").exists()
    again = PeftModel.from_pretrained(load_model("builtin:tiny-gpt2", task="causal-lm"), out)
    assert list(again.peft_config) == ["default"]


def bf16_folder(tmp_path, task: str = "causal-lm"):
    """A model saved in bfloat16, as most Hub models are: model.dtype auto loads it in bfloat16."""
    model = load_model("builtin:tiny-gpt2", task=task, dtype="bfloat16", seed=3)
    folder = tmp_path / f"bf16-{task}"
    model.save_pretrained(folder)
    load_tokenizer("builtin:tiny-gpt2").save_pretrained(folder)
    return folder


def test_full_weights_saved_in_bf16_train_in_float32(tmp_path):
    folder = bf16_folder(tmp_path)
    assert load_model(str(folder), task="causal-lm").dtype == torch.bfloat16  # what auto gives
    model, reference = load_policy(ModelConfig(model_name_or_path=str(folder)), PeftConfig(), seed=0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in reference.parameters()} == {torch.float32}  # the same starting weights
    # float32 master weights keep small updates: after 10 AdamW steps at lr 1e-6 most weights moved
    # (in bfloat16, about 98% stayed exactly as they were)
    policy = model.policy
    start = [p.detach().clone() for p in policy.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, weight_decay=0.0)
    inputs = batch()
    for _ in range(10):
        policy(**inputs).logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    unchanged = sum((a == p).sum().item() for a, p in zip(start, policy.parameters(), strict=True))
    assert unchanged / sum(a.numel() for a in start) < 0.5


def test_lora_on_a_bf16_base_keeps_the_base_in_bf16(tmp_path):
    model, _ = load_policy(ModelConfig(model_name_or_path=str(bf16_folder(tmp_path))), PeftConfig(use_peft=True), seed=0)
    assert {p.dtype for p in model.policy.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.policy.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_separate_critic_saved_in_bf16_trains_in_float32(tmp_path):
    folder = bf16_folder(tmp_path, "sequence-classification")
    model, _ = load_policy(ModelConfig(model_name_or_path="builtin:tiny-gpt2"), PeftConfig(), seed=0, critic=str(folder))
    assert {p.dtype for p in model.critic.parameters()} == {torch.float32}
