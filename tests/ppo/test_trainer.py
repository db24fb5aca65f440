"""PPOTrainer on built-in tiny models: log-prob consistency, one step, the Python API."""

from pathlib import Path

import pytest
import torch

from rlhf_cli.config.loader import build_stage
from rlhf_cli.lm.forward import trim_padding
from rlhf_cli.lm.logprobs import logprobs_from_logits
from rlhf_cli.models.loading import load_tokenizer
from rlhf_cli.models.policy import load_policy
from rlhf_cli.ppo.trainer import PPOTrainer
from rlhf_cli.training.accel import make_accelerator

PROMPTS = ["I watched The", "My sister and I went to see a film about", "It", "We caught Return to Seville in"]


def make_trainer(tmp_path: Path, model: str, use_peft: bool = False, training: dict | None = None, **ppo) -> PPOTrainer:
    config = build_stage("ppo", {
        "model": {"model_name_or_path": model},
        "peft": {"use_peft": use_peft},
        "reward": {"function": "builtin:sentiment"},
        "generation": {"response_length": 12, "temperature": 0.7},
        "training": {"output_dir": str(tmp_path), "per_device_train_batch_size": 2, "learning_rate": 1e-3,
                     **(training or {})},
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
        stats, _ = trainer._policy_forward(alone, slice(0, 1))
        new = stats.logprobs[0]  # (T',): the row's own response length
        assert torch.allclose(new, old_logprobs[i][mask[i]][: len(new)], atol=1e-5)
        assert len(new) == int(mask[i].sum())
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


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one precision per process: let a test build an Accelerator with another."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    yield
    AcceleratorState._reset_state(reset_partial_state=False)


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_bf16_rollout_and_update_share_one_precision(tmp_path, model, fresh_accelerate_state):
    """Under `bf16: true` generation, the reference and the update all run under the same autocast
    (value head in float32): with identical weights the KL at step 0 is ~0 and the ratio of the
    first mini-batch, before any optimizer step, is 1. (Before, only the update ran in bf16: KL
    0.027 on tiny-t5 at step 0.)"""
    trainer = make_trainer(tmp_path, model, training={"bf16": True, "per_device_train_batch_size": 16},
                           total_episodes=16, num_mini_batches=1, num_ppo_epochs=1)
    torch.manual_seed(0)
    rollout = trainer.generate(PROMPTS * 4)
    stats = trainer.step(rollout, torch.linspace(-1, 1, 16))  # one mini-batch: its ratio is the first one
    assert abs(stats["objective/kl"]) < 1e-3, stats["objective/kl"]
    assert stats["val/ratio"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.gpu
def test_bf16_every_forward_computes_in_bf16_and_values_in_float32(tmp_path, fresh_accelerate_state):
    """The precision policy, checked where it is applied: the policy's layers compute in bf16 while
    sampling and in the update, the reference's in the rollout; the value head in float32 in both."""
    trainer = make_trainer(tmp_path, "builtin:tiny-gpt2", training={"bf16": True})
    seen = {}

    def record(name):
        return lambda module, args, output: seen.setdefault(name, set()).add(output.dtype)

    trainer.unwrapped.policy.transformer.h[0].mlp.c_fc.register_forward_hook(record("policy"))
    trainer.reference.transformer.h[0].mlp.c_fc.register_forward_hook(record("reference"))
    trainer.unwrapped.value_head.register_forward_hook(record("values"))
    rollout = trainer.generate(PROMPTS)
    assert seen == {"policy": {torch.bfloat16}, "values": {torch.float32}}
    trainer.step(rollout, torch.tensor([1.0, -1.0, 0.5, 0.0]))
    assert seen == {"policy": {torch.bfloat16}, "reference": {torch.bfloat16}, "values": {torch.float32}}


def test_any_rollout_size_updates_every_row(tmp_path, monkeypatch):
    """Mini-batches are sized from the rollout: 7 rows (not the configured 2 x 2) are all updated in
    every epoch, and 1 row with 2 mini-batches works."""
    trainer = make_trainer(tmp_path, "builtin:tiny-gpt2", num_ppo_epochs=2)
    seen = []
    micro_step = trainer.updater._micro_step
    monkeypatch.setattr(trainer.updater, "_micro_step",
                        lambda r, idx, *a: (seen.append(idx.tolist()), micro_step(r, idx, *a))[1])
    prompts = PROMPTS + PROMPTS[:3]
    stats = trainer.step(trainer.generate(prompts), torch.linspace(-1, 1, 7))
    assert all(len(rows) <= 2 for rows in seen)
    per_epoch = len(seen) // 2
    for epoch in (seen[:per_epoch], seen[per_epoch:]):
        assert sorted(i for rows in epoch for i in rows) == list(range(7))
    assert stats["episode"] == 7

    seen.clear()
    trainer.step(trainer.generate(PROMPTS[:1]), torch.tensor([1.0]))
    assert seen == [[0], [0]]  # one row, once per epoch


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_no_grad_passes_take_rows_of_similar_length_together(tmp_path, monkeypatch, model):
    """A rollout longer than local_rollout_forward_batch_size (3 here) is read in passes that go longest rows
    first: each pass is trimmed to its longest prompt and response, so they hold fewer padding columns; and
    every row gets its own old log-probs, values and reference log-probs, those of passes in row order."""
    trainer = make_trainer(tmp_path, model)
    query_ids, query_mask = trainer.encode(PROMPTS + PROMPTS[:2])  # prompts of 3, 10, 2, 6, 3 and 10 tokens
    words = trainer.tokenizer.encode("the soundtrack is better than I expected and the chase scenes are terrific",
                                     add_special_tokens=False)[:12]
    rollout = trainer.rollout_from(query_ids, query_mask, torch.tensor([words] * 6),
                                   response_lengths=torch.tensor([2, 12, 3, 11, 1, 10]))
    passes, _ = trainer._passes(rollout)
    assert [sorted(rows.tolist()) for rows in passes] == [[1, 3, 5], [0, 2, 4]]

    def columns(rows) -> int:  # rows x (prompt + response columns) after trimming: what a pass computes
        q, _, resp, _ = trim_padding(rollout.query_ids[rows], rollout.query_mask[rows], rollout.response_ids[rows],
                                     rollout.response_mask[rows])
        return q.shape[0] * (q.shape[1] + resp.shape[1])

    in_order = [slice(0, 3), slice(3, 6)]
    assert sum(map(columns, passes)) < 0.7 * sum(map(columns, in_order))

    by_length = trainer.evaluate(rollout)
    monkeypatch.setattr(trainer, "_passes", lambda r: (in_order, None))
    mask = rollout.response_mask  # (past a row's end a pass holds what its longest row needs: masked)
    for sorted_rows, plain in zip(by_length, trainer.evaluate(rollout), strict=True):  # log-probs, values, reference
        torch.testing.assert_close(sorted_rows[mask], plain[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_micro_batches_of_a_mini_batch_go_longest_first_with_the_same_step(tmp_path, monkeypatch, model):
    """One optimizer step over 6 rows in 3 micro-batches of 2 (gradient accumulation): the micro-batches
    take the rows longest first (each is trimmed to its longest row) and the step is the one of micro-batches
    in shuffled order -- every loss divides by the mini-batch's counts, not the micro-batch's -- to float
    rounding (Adam's epsilon 1e-3 keeps a rounding-sized gradient from becoming a full step)."""
    training = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3, "adam_epsilon": 1e-3}
    results = []
    for ordered in (True, False):
        trainer = make_trainer(tmp_path / str(ordered), model, training=training, num_mini_batches=1,
                               local_rollout_forward_batch_size=6)
        if not ordered:
            monkeypatch.setattr(trainer.updater, "_micro_batches", lambda exp, idx: torch.split(idx, 2))
        seen = []
        micro_step = trainer.updater._micro_step
        monkeypatch.setattr(trainer.updater, "_micro_step",
                            lambda r, idx, *a, seen=seen, step=micro_step: (seen.append(idx.tolist()), step(r, idx, *a))[1])
        query_ids, query_mask = trainer.encode(PROMPTS + PROMPTS[:2])
        words = trainer.tokenizer.encode("the soundtrack is better than I expected and the chase scenes are terrific",
                                         add_special_tokens=False)[:12]
        rollout = trainer.rollout_from(query_ids, query_mask, torch.tensor([words] * 6),
                                       response_lengths=torch.tensor([2, 12, 3, 11, 1, 10]))
        torch.manual_seed(0)  # the update's row order
        stats = trainer.step(rollout, torch.linspace(-1, 1, 6))
        results.append((seen, stats, {k: v.detach().clone() for k, v in trainer.unwrapped.named_parameters()}))
    (seen, stats, weights), (seen_plain, stats_plain, weights_plain) = results
    # rows of 5, 22, 5, 17, 4 and 20 tokens: 22, 20 | 17, 5 | 5, 4 (the two of 5 in the shuffled order)
    assert sorted(seen[0]) == [1, 5] and 3 in seen[1] and 4 in seen[2]
    assert sorted(sum(seen[:3], [])) == sorted(sum(seen_plain[:3], [])) == list(range(6))  # one mini-batch
    assert seen[:3] != seen_plain[:3]
    for key, value in stats_plain.items():  # (val/ratio_var: the mean of each micro-batch's variance)
        if not key.startswith("time/") and key != "val/ratio_var":
            assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for key, value in weights_plain.items():
        torch.testing.assert_close(weights[key], value, atol=1e-6, rtol=0)


def test_rollout_from_masks_right_padding(tmp_path):
    """Right-padded responses whose pad token is not the stop token (builtin: pad 0, eos 1): the pad
    is not response, so the score lands on the last real token; explicit lengths work too."""
    trainer = make_trainer(tmp_path, "builtin:tiny-gpt2")
    pad, eos = trainer.tokenizer.pad_token_id, trainer.stop_id
    assert pad != eos
    query_ids, query_mask = trainer.encode(PROMPTS[:3])
    responses = torch.tensor([[5, 6, 7, pad, pad], [5, eos, pad, pad, pad], [5, 6, 7, 8, 9]])
    r = trainer.rollout_from(query_ids, query_mask, responses)
    assert r.response_mask.sum(1).tolist() == [3, 2, 5]
    assert r.stopped.tolist() == [False, True, False]
    explicit = trainer.rollout_from(query_ids, query_mask, responses, response_lengths=torch.tensor([2, 5, 4]))
    assert explicit.response_mask.sum(1).tolist() == [2, 2, 4]


def test_trl_style_step_with_token_lists(tmp_path):
    """step(queries, responses, scores): lists of 1-D token tensors of any lengths, as TRL took them."""
    trainer = make_trainer(tmp_path, "builtin:tiny-gpt2")
    tok = trainer.tokenizer
    queries = [torch.tensor(tok.encode(p)) for p in PROMPTS[:3]]
    responses = [torch.tensor(tok.encode(t)) for t in (" a fine film.", " dull", " I loved every minute of it")]
    before = [p.detach().clone() for p in trainer.unwrapped.parameters()]
    stats = trainer.step(queries, responses, [1.0, -1.0, torch.tensor(0.5)])
    assert stats["episode"] == 3 and stats["objective/scores"] == pytest.approx(0.5 / 3)
    assert stats["val/response_length"] == pytest.approx(sum(len(x) for x in responses) / 3)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.unwrapped.parameters(), strict=True))
    with pytest.raises(ValueError, match="one per row"):
        trainer.step(queries, responses, [1.0])


def test_logged_kl_coef_is_the_one_the_rewards_used(tmp_path):
    trainer = make_trainer(tmp_path, "builtin:tiny-gpt2", kl_coef=0.05, adaptive_kl=True, target_kl=0.001)
    stats = trainer.step(trainer.generate(PROMPTS), torch.tensor([1.0, -1.0, 0.5, 0.0]))
    assert stats["objective/kl_coef"] == 0.05
    assert trainer.kl_ctl.value != 0.05  # adapted after the update, used by the next iteration
