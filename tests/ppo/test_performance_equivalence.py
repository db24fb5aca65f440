"""The PPO speed-ups compute the same thing as the plain computation (docs/performance.md).

The plain computation, written out here on purpose: one forward of the whole left/right-padded
batch, full-length logits, log-probs from log-softmax, values from the last hidden state of all
layers' outputs, and the entropy kept in the loss's graph. Each test compares what the trainer
computes (trimmed micro-batches, logits only where they are needed, log-probs and values
collected while sampling, entropy outside the graph) with it.
"""

from pathlib import Path

import pytest
import torch
from conftest import read_head_in_chunks

from rlhf_cli.config.loader import build_stage
from rlhf_cli.lm.forward import model_inputs, response_slice
from rlhf_cli.lm.logprobs import entropy_from_logits, logprobs_from_logits
from rlhf_cli.lm.masking import masked_mean
from rlhf_cli.models.loading import load_tokenizer
from rlhf_cli.models.policy import load_policy
from rlhf_cli.ppo.losses import policy_loss, value_loss
from rlhf_cli.ppo.trainer import PPOTrainer
from rlhf_cli.training.accel import make_accelerator

pytestmark = pytest.mark.gpu  # also in bench/gpu.sh's GPU subset

PROMPTS = ["I watched The", "My sister and I went to see a film about", "It", "We caught Return to Seville in",
           "The acting", "Honestly, the best part of the whole evening was"]


def make_trainer(tmp_path: Path, model: str, use_peft: bool = False, **ppo) -> PPOTrainer:
    config = build_stage("ppo", {
        "model": {"model_name_or_path": model},
        "peft": {"use_peft": use_peft},
        "reward": {"function": "builtin:sentiment"},
        "generation": {"response_length": 10, "temperature": 0.7},
        "training": {"output_dir": str(tmp_path), "per_device_train_batch_size": 3, "learning_rate": 1e-3},
        "ppo": {"total_episodes": 12, "num_mini_batches": 2, "local_rollout_forward_batch_size": 4, **ppo},
    })
    accelerator = make_accelerator(config.training, tmp_path)
    tokenizer = load_tokenizer(model, padding_side="left")
    policy, reference = load_policy(config.model, config.peft, seed=0)
    return PPOTrainer(config, policy, tokenizer, accelerator, reference)


def ragged_rollout(trainer: PPOTrainer):
    """Queries of different lengths (left padding) and responses that stop at different places
    (right padding): every micro-batch has padding that a trimmed forward can drop."""
    query_ids, query_mask = trainer.encode(PROMPTS)
    g = torch.Generator().manual_seed(0)
    responses = torch.randint(10, 200, (len(PROMPTS), 10), generator=g)
    stop = trainer.stop_id
    for row, length in enumerate([3, 10, 1, 6, 2, 4]):  # a stop token ends rows early
        if length < 10:
            responses[row, length - 1] = stop
    return trainer.rollout_from(query_ids, query_mask, responses)


def plain_forward(trainer: PPOTrainer, r, rows, model=None):
    """(logits (b, T, V), values (b, T)) from one forward of the padded rows, as before any speed-up."""
    wrapper = trainer.unwrapped
    inputs = model_inputs(wrapper.policy.config, r.query_ids[rows], r.query_mask[rows], r.response_ids[rows],
                          r.response_mask[rows])
    P, T = r.query_ids.shape[1], r.response_ids.shape[1]
    out = (model or wrapper.policy)(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    enc_dec = wrapper.is_encoder_decoder
    hidden = out.decoder_hidden_states[-1] if enc_dec else out.hidden_states[-1]
    return response_slice(out.logits, P, T, enc_dec), response_slice(wrapper.value_head(hidden), P, T, enc_dec)


@pytest.fixture(params=["one-chunk", "chunked"])
def head_chunks(request, monkeypatch):
    """The LM head read in one piece (these small vocabularies fit one chunk) or 4 positions at a
    time, checkpointed (lm/head.py): both must equal the plain computation."""
    if request.param == "chunked":
        from rlhf_cli.builtin.tokenizer import VOCAB_SIZE
        read_head_in_chunks(monkeypatch, 4 * VOCAB_SIZE)
    return request.param


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_evaluate_equals_plain_forward(tmp_path, model, head_chunks):
    trainer = make_trainer(tmp_path, model)
    r = ragged_rollout(trainer)
    logprobs, values, ref_logprobs = trainer.evaluate(r)
    rows = slice(0, len(PROMPTS))
    with torch.no_grad():
        trainer.model.eval()
        logits, plain_values = plain_forward(trainer, r, rows)
        ref_logits, _ = plain_forward(trainer, r, rows, model=trainer.reference)
    mask = r.response_mask
    plain = logprobs_from_logits(logits, r.response_ids, trainer.temperature)
    plain_ref = logprobs_from_logits(ref_logits, r.response_ids, trainer.temperature)
    torch.testing.assert_close(logprobs[mask], plain[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[mask], plain_values.float()[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_logprobs[mask], plain_ref[mask], atol=1e-5, rtol=1e-5)


def micro_step(trainer, r, idx, old_logprobs, old_values, advantages, returns, tokens):
    """The updater's micro-step on rows `idx` of `r` carrying these rollout tensors (one process:
    the mini-batch's token count is both the loss normaliser and the local count)."""
    r.old_logprobs, r.values, r.advantages, r.returns = old_logprobs, old_values, advantages, returns
    return trainer.updater._micro_step(r, idx, trainer.algorithm, trainer._policy_forward, (tokens, tokens), len(idx))


@pytest.mark.parametrize(("model", "entropy_coef"), [("builtin:tiny-gpt2", 0.0), ("builtin:tiny-t5", 0.0),
                                                     ("builtin:tiny-gpt2", 0.3)])
def test_micro_step_gradients_equal_plain_loss(tmp_path, model, entropy_coef, head_chunks):
    """The trainer's micro-step (trimmed forward, logits only for the response, entropy as a
    statistic without a coefficient, in the loss with one) gives the same loss gradients and
    statistics as the plain loss."""
    trainer = make_trainer(tmp_path, model, entropy_coef=entropy_coef)
    r = ragged_rollout(trainer)
    old_logprobs, old_values, _ = trainer.evaluate(r)
    g = torch.Generator().manual_seed(1)
    advantages = torch.randn(old_logprobs.shape, generator=g).masked_fill(~r.response_mask, 0)
    returns = torch.randn(old_logprobs.shape, generator=g).masked_fill(~r.response_mask, 0)
    old_logprobs = old_logprobs + 0.05 * torch.randn(old_logprobs.shape, generator=g)  # ratios away from 1
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    ppo = trainer.ppo
    for idx in (torch.tensor([2, 4, 0]), torch.tensor([1, 5, 3])):
        trainer.model.train()
        trainer.optimizer.zero_grad(set_to_none=True)
        mask = r.response_mask[idx]
        # the summed loss over twice this micro-batch's tokens: half the gradient of its mean
        stats, n = micro_step(trainer, r, idx, old_logprobs, old_values, advantages, returns, 2 * mask.sum())
        assert n == mask.sum()
        fast = [p.grad.clone() for p in params]

        trainer.optimizer.zero_grad(set_to_none=True)
        logits, values = plain_forward(trainer, r, idx)
        logprobs = logprobs_from_logits(logits, r.response_ids[idx], trainer.temperature)
        pg_loss, pg = policy_loss(logprobs, old_logprobs[idx], advantages[idx], mask, ppo.cliprange)
        vf_loss, vf = value_loss(values.float(), old_values[idx], returns[idx], mask, ppo.cliprange_value)
        entropy = masked_mean(entropy_from_logits(logits, trainer.temperature), mask)
        ((pg_loss + ppo.vf_coef * vf_loss - ppo.entropy_coef * entropy) / 2).backward()
        for a, b in zip(fast, [p.grad for p in params], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        for key, expected in (("loss/policy_avg", pg_loss), ("loss/value_avg", vf_loss),
                              ("policy/entropy_avg", entropy), ("policy/approxkl_avg", pg["approxkl"]),
                              ("policy/clipfrac_avg", pg["clipfrac"]), ("val/clipfrac_avg", vf["clipfrac"])):
            torch.testing.assert_close(stats[key], expected.detach(), atol=1e-6, rtol=1e-5, msg=key)


def test_micro_step_with_entropy_bonus_keeps_its_gradient(tmp_path, head_chunks):
    """With entropy_coef > 0 the entropy stays in the loss: the gradient differs from coef 0."""
    grads = []
    for coef in (0.0, 0.5):
        trainer = make_trainer(tmp_path / str(coef), "builtin:tiny-gpt2", entropy_coef=coef)
        r = ragged_rollout(trainer)
        old_logprobs, old_values, _ = trainer.evaluate(r)
        zeros = torch.zeros_like(old_logprobs)
        trainer.model.train()
        rows = torch.tensor([0, 1, 2])
        micro_step(trainer, r, rows, old_logprobs, old_values, zeros, zeros, r.response_mask[rows].sum())
        grads.append(trainer.unwrapped.policy.transformer.wte.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def check_recorded_equals_forward(trainer: PPOTrainer):
    """Sample PROMPTS and check that the log-probs and values recorded while sampling equal those of a
    no-grad forward of the policy over the finished rollout; returns (rollout, the forward's log-probs)."""
    torch.manual_seed(0)
    r = trainer.generate(PROMPTS)
    assert r.logprobs is not None and r.values is not None
    assert r.logprobs.shape == r.values.shape == r.response_ids.shape
    with torch.no_grad():
        trainer.model.eval()
        logits, values = plain_forward(trainer, r, slice(0, len(PROMPTS)))
    mask = r.response_mask
    plain = logprobs_from_logits(logits, r.response_ids, trainer.temperature)
    torch.testing.assert_close(r.logprobs[mask], plain[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r.values[mask], values.float()[mask], atol=1e-4, rtol=1e-4)
    return r, plain


@pytest.mark.parametrize("use_peft", [False, True])
def test_generation_records_the_logprobs_and_values_of_a_forward(tmp_path, use_peft):
    """The log-probs and values recorded while sampling equal those of a no-grad forward of the
    policy over the finished rollout (left-padded queries, rows stopping at different steps; two
    generate calls, chunks of 4 and 2, padded to one width)."""
    trainer = make_trainer(tmp_path, "builtin:tiny-gpt2", use_peft=use_peft, local_rollout_forward_batch_size=4)
    r, plain = check_recorded_equals_forward(trainer)
    mask = r.response_mask
    # evaluate() takes them as they are and adds the reference's
    logprobs, vals, ref_logprobs = trainer.evaluate(r)
    assert logprobs is r.logprobs and vals is r.values
    torch.testing.assert_close(ref_logprobs[mask], plain[mask], atol=1e-4, rtol=1e-4)  # reference == policy at start


def test_step_on_recorded_rollout_equals_step_with_a_forward(tmp_path):
    """A PPO step from the recorded log-probs/values updates the weights as one that recomputes them."""
    after = []
    for recorded in (True, False):
        trainer = make_trainer(tmp_path / str(recorded), "builtin:tiny-gpt2")
        torch.manual_seed(0)
        r = trainer.generate(PROMPTS)
        if not recorded:
            r.logprobs, r.values = None, None
        torch.manual_seed(1)  # the same mini-batch order
        trainer.step(r, torch.linspace(-1, 1, len(PROMPTS)))
        after.append([p.detach().clone() for p in trainer.unwrapped.parameters()])
    for a, b in zip(*after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_seq2seq_rollout_falls_back_to_a_forward(tmp_path):
    trainer = make_trainer(tmp_path, "builtin:tiny-t5")
    r = trainer.generate(PROMPTS)
    assert r.logprobs is None and r.values is None
    logprobs, values, _ = trainer.evaluate(r)
    assert logprobs.shape == values.shape == r.response_ids.shape
