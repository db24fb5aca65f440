"""lm/shared_prompts.py: each distinct prompt of a forward's rows runs once, and the sampled tokens,
log-probs and gradients are those of the plain forward, for every architecture users bring
(tests/architectures.py), behind LoRA, and through the GRPO trainer (sampling, the reference forward
and the update)."""

import pytest
import torch
from architectures import ARCHITECTURES, build_tiny
from conftest import read_head_in_chunks
from transformers import MistralConfig, MistralForCausalLM

from rlhf_cli.config.loader import build_stage
from rlhf_cli.lm import shared_prompts
from rlhf_cli.lm.forward import model_inputs
from rlhf_cli.lm.generation import install_sampling_config, sample_responses, sample_with_logprobs
from rlhf_cli.lm.logprobs import logprobs_from_logits
from rlhf_cli.lm.shared_prompts import SHARED, PromptSharing
from rlhf_cli.models.dropout import disable_dropout
from rlhf_cli.models.loading import load_tokenizer
from rlhf_cli.models.policy import load_policy
from rlhf_cli.online.grpo import GRPO
from rlhf_cli.online.trainer import OnlineTrainer
from rlhf_cli.training.accel import make_accelerator

pytestmark = pytest.mark.gpu  # also in bench/gpu.sh's GPU subset


def sharing_for(model, agree=None) -> PromptSharing:
    return PromptSharing([model], agree)


def test_plan_maps_each_row_to_one_row_of_its_prompt():
    model, _ = build_tiny("gpt2")
    plan = sharing_for(model).plan(torch.tensor([3, 1, 3, 3, 1]), prompt_width=4, length=6)
    # distinct prompts, sorted: 1 (first at row 1) and 3 (first at row 0)
    assert plan.first.tolist() == [1, 0]
    assert plan.row_prompt.tolist() == [1, 0, 1, 1, 0]
    assert plan.prompt_width == 4


def test_too_little_to_share_runs_plainly():
    sharing = sharing_for(build_tiny("gpt2")[0])
    assert sharing.plan(torch.tensor([0, 1, 2]), prompt_width=4, length=6) is None  # no two rows share
    assert sharing.plan(torch.tensor([0, 0, 1]), prompt_width=1, length=6) is None  # nothing before the rows
    # 5 rows of 3 prompts: 2 rows x 3 prompt columns spared = 6 tokens, 20% of 5 x 6, not of 5 x 7
    assert sharing.plan(torch.tensor([0, 0, 1, 1, 2]), prompt_width=4, length=6) is not None
    assert sharing.plan(torch.tensor([0, 0, 1, 1, 2]), prompt_width=4, length=7) is None


def test_where_the_model_cannot_share_it_says_why():
    model, _ = build_tiny("llama")
    assert sharing_for(model).why_not is None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert "gradient checkpointing" in sharing_for(model).why_not


def test_where_processes_must_agree_it_shares_only_where_every_one_would():
    """FSDP, ZeRO-3: a model call is a collective, so `agree` turns this process's decision into everyone's."""
    model, asked = build_tiny("gpt2")[0], []

    def others_refuse(share: bool) -> bool:
        asked.append(share)
        return False

    groups = torch.tensor([0, 0, 1, 1])
    assert sharing_for(model).plan(groups, prompt_width=8, length=10) is not None  # alone, it would share
    refused = sharing_for(model, others_refuse)
    assert refused.plan(groups, prompt_width=8, length=10) is None
    assert refused.plan(torch.tensor([0, 1, 2, 3]), prompt_width=8, length=10) is None
    assert asked == [True, False]  # every plan asks, also one that would not share (the others must hear it)
    assert "0 of 2 forwards" in refused.summary() and "the processes share only together" in refused.summary()
    agreed = sharing_for(model, lambda share: share)
    assert agreed.plan(groups, prompt_width=8, length=10).row_prompt.tolist() == [0, 0, 1, 1]
    assert agreed.shared == agreed.planned == 1


def test_a_sliding_window_shares_only_rows_that_fit_it():
    config = MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=64, vocab_size=64, sliding_window=8)
    sharing = sharing_for(MistralForCausalLM(config))
    assert sharing.why_not is None and sharing.window == 8
    groups = torch.tensor([0, 0, 0, 1])  # (spares 2 x 5 tokens: well above MIN_SAVING at either length)
    assert sharing.plan(groups, prompt_width=6, length=8) is not None
    assert sharing.plan(groups, prompt_width=6, length=9) is None


def ragged_rows(vocab: int, pad: int):
    """Three prompts of 2, 5 and 3 tokens (left-padded to 5) answered by 7 rows in shuffled order,
    responses of 1 to 6 tokens (right-padded to 6)."""
    g = torch.Generator().manual_seed(0)
    prompt_lengths, groups = [2, 5, 3], torch.tensor([1, 0, 2, 1, 0, 2, 2])
    prompts = torch.full((3, 5), pad)
    prompt_mask = torch.zeros(3, 5, dtype=torch.bool)
    for i, n in enumerate(prompt_lengths):
        prompts[i, 5 - n :] = torch.randint(4, vocab, (n,), generator=g)
        prompt_mask[i, 5 - n :] = True
    lengths = torch.tensor([6, 1, 4, 3, 6, 2, 5])
    response_mask = torch.arange(6) < lengths[:, None]
    responses = torch.randint(4, vocab, (7, 6), generator=g).masked_fill(~response_mask, pad)
    return prompts[groups], prompt_mask[groups], responses, response_mask, groups


def plain_and_shared(model, pad: int):
    """(log-probs (7, 6), gradients) of the plain forward and of the shared one, valid tokens only."""
    query, query_mask, responses, response_mask, groups = ragged_rows(model.config.vocab_size, pad)
    inputs = model_inputs(model.config, query, query_mask, responses, response_mask)
    P, T = query.shape[1], responses.shape[1]
    plan = PromptSharing([model]).plan(groups, P, P + T)
    assert plan is not None and len(plan.first) == 3
    results = []
    for shared in (None, plan):
        run = {**inputs, "__tokens": responses}
        if shared is not None:
            run[SHARED] = shared
        tokens = run.pop("__tokens")
        logits = shared_prompts.logits(model, run)
        if not model.config.is_encoder_decoder:
            logits = logits[:, :T] if shared is not None else logits[:, P - 1 : P - 1 + T]
        logprobs = logprobs_from_logits(logits, tokens, 0.7) * response_mask
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(logprobs.sum(), params, materialize_grads=True)  # (zeros where unused)
        results.append((logprobs.detach(), grads))
    return results


def assert_same(plain, shared):
    (lp_plain, g_plain), (lp_shared, g_shared) = plain, shared
    torch.testing.assert_close(lp_shared, lp_plain, atol=2e-5, rtol=0)
    for a, b in zip(g_shared, g_plain, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5 * max(1.0, b.abs().max().item()), rtol=1e-4)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_shared_prompts_give_the_plain_forwards_logprobs_and_gradients(name):
    model, tokenizer = build_tiny(name)
    disable_dropout(model)
    model.train()
    assert PromptSharing([model]).why_not is None
    plain, shared = plain_and_shared(model, tokenizer.pad_token_id)
    assert plain[0].abs().sum() > 0 and any(g.abs().sum() > 0 for g in plain[1])
    assert_same(plain, shared)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_behind_lora_the_adapters_gradients_are_the_same(name):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = build_tiny(name)
    task = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=task,
                                             init_lora_weights=False))
    disable_dropout(model)
    assert PromptSharing([model]).why_not is None
    assert_same(*plain_and_shared(model, tokenizer.pad_token_id))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_sampling_from_prompts_run_once_draws_the_same_tokens_and_logprobs(name):
    """generate from a cache (an encoder output) that each distinct prompt filled once: for a seed, the
    same responses as from the rows' own prompts, and (causal) the same recorded log-probs."""
    model, tokenizer = build_tiny(name)
    model.eval()
    gen = build_stage("grpo", {"reward": {"function": "builtin:sentiment"},
                               "generation": {"response_length": 6, "temperature": 0.7}}).generation
    install_sampling_config(model, gen, tokenizer.eos_token_id, tokenizer.pad_token_id)
    query, query_mask, *_ = ragged_rows(model.config.vocab_size, tokenizer.pad_token_id)
    order = torch.tensor([0, 3, 1, 4, 2, 5, 6])  # rows of a prompt next to each other, as the trainer repeats them
    query, query_mask = query[order], query_mask[order]
    shared = PromptSharing([model]).plan(shared_prompts.duplicate_rows(query, query_mask), 5, 11)
    assert shared is not None and len(shared.first) == 3
    runs = []
    for prefilled in (None, shared_prompts.prefill(model, query, query_mask, shared)):
        torch.manual_seed(0)
        if model.config.is_encoder_decoder:
            runs.append((sample_responses(model, query, query_mask, prefilled), None))
        else:
            responses, logprobs, _ = sample_with_logprobs(model, None, query, query_mask, 0.7, prefilled)
            assert logprobs is not None  # every step was seen
            runs.append((responses, logprobs))
    (plain, lp_plain), (shared_run, lp_shared) = runs
    assert torch.equal(shared_run, plain)
    if lp_plain is not None:
        torch.testing.assert_close(lp_shared, lp_plain, atol=2e-5, rtol=0)
    else:  # (a tiny random decoder barely reads its encoder: check what it was given)
        encoded = shared_prompts.prefill(model, query, query_mask, shared)["encoder_outputs"].last_hidden_state
        own = model.get_encoder()(input_ids=query, attention_mask=query_mask.long()).last_hidden_state
        torch.testing.assert_close(encoded, own, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- through the GRPO trainer

PROMPTS = ["I watched The Citadel at Istanbul last night with my sister, and I have to say that the film",
           "My sister and I went to see a film about a detective in Port Alder, and the acting",
           "It was a cold evening in November when we caught the late showing, and the plot",
           "We caught Return to Seville in a small cinema downtown; the soundtrack and the chase scenes"]


def grpo_trainer(tmp_path, share: bool, model="builtin:tiny-gpt2", use_peft=False) -> OnlineTrainer:
    config = build_stage("grpo", {
        "model": {"model_name_or_path": model},
        "peft": {"use_peft": use_peft},
        "reward": {"function": "builtin:sentiment"},
        "generation": {"response_length": 8, "temperature": 0.7},
        "training": {"output_dir": str(tmp_path / str(share)), "per_device_train_batch_size": 6, "learning_rate": 1e-3,
                     "seed": 0},
        "grpo": {"total_episodes": 12, "num_generations": 3, "beta": 0.1, "num_iterations": 2,
                 "local_rollout_forward_batch_size": 12, "share_prompt_prefix": share},
    })
    accelerator = make_accelerator(config.training, tmp_path)
    tokenizer = load_tokenizer(model, padding_side="left")
    policy, reference = load_policy(config.model, config.peft, seed=0, with_value=False, with_reference=True)
    algorithm = GRPO(config.grpo, config.training, config.generation.response_length)
    return OnlineTrainer(config, algorithm, 12, policy, tokenizer, accelerator, reference, 12, num_generations=3,
                         share_prompts=share)


@pytest.fixture(params=["one-chunk", "chunked"])
def head_chunks(request, monkeypatch):
    """The LM head read in one piece or 4 positions at a time (lm/head.py): both must share alike."""
    if request.param == "chunked":
        from rlhf_cli.builtin.tokenizer import VOCAB_SIZE
        read_head_in_chunks(monkeypatch, 4 * VOCAB_SIZE)


@pytest.mark.parametrize(("model", "use_peft"), [("builtin:tiny-gpt2", False), ("builtin:tiny-gpt2", True),
                                                 ("builtin:tiny-t5", False)])
def test_a_grpo_step_with_shared_prompts_equals_one_without(tmp_path, monkeypatch, model, use_peft, head_chunks):
    """Two trainers, sharing and not, sample 4 prompts x 3 responses and step on them: the same
    responses and recorded log-probs, reference log-probs, statistics and weights after 4 optimizer
    steps (2 passes x 2 mini-batches of shuffled rows); and the sharing one did share, in sampling,
    the reference forward and the update."""
    calls = {"shared": 0, "prefilled": 0}
    logits, prefill = shared_prompts.logits, shared_prompts.prefill

    def counting(m, inputs):
        calls["shared"] += SHARED in inputs
        return logits(m, inputs)

    def counting_prefill(*args):
        calls["prefilled"] += 1
        return prefill(*args)

    monkeypatch.setattr(shared_prompts, "logits", counting)
    monkeypatch.setattr("rlhf_cli.lm.sampler.prefill", counting_prefill)
    results = []
    for share in (False, True):
        trainer = grpo_trainer(tmp_path, share, model, use_peft)
        before = {k: v.detach().clone() for k, v in trainer.unwrapped.policy.named_parameters() if v.requires_grad}
        torch.manual_seed(0)
        exp = trainer.generate(PROMPTS)
        scores = torch.arange(len(exp), dtype=torch.float32) % 5
        before_evaluate = calls["shared"]
        ref = trainer.evaluate(exp)[2]
        evaluate_calls = calls["shared"] - before_evaluate
        torch.manual_seed(1)  # the update's row order
        stats = trainer.step(exp, scores)
        update_calls = calls["shared"] - before_evaluate - 2 * evaluate_calls  # (step evaluates again)
        assert (evaluate_calls > 0, update_calls > 0) == (share, share)
        weights = {k: v.detach().clone() for k, v in trainer.unwrapped.policy.named_parameters() if v.requires_grad}
        assert any(not torch.equal(before[k], w) for k, w in weights.items())  # the update moved the weights
        results.append((exp.response_ids, exp.logprobs, ref, stats, weights))
        assert (calls["shared"] > 0) == share and (calls["prefilled"] > 0) == share
    (resp_a, lp_a, ref_a, stats_a, w_a), (resp_b, lp_b, ref_b, stats_b, w_b) = results
    assert torch.equal(resp_a, resp_b)  # sampled from a prefilled cache: the same tokens for the seed
    if lp_a is not None:  # (causal policies: the log-probs recorded while sampling)
        torch.testing.assert_close(lp_b, lp_a, atol=2e-5, rtol=0)
    torch.testing.assert_close(ref_b, ref_a, atol=2e-5, rtol=0)
    for key, value in stats_a.items():
        if not key.startswith("time/"):
            assert stats_b[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    for key, value in w_a.items():  # Adam divides by sqrt(v): where a gradient is ~0, float rounding becomes
        # a visible part of a step (lr 1e-3), so weights are equal to a tenth of one step
        torch.testing.assert_close(w_b[key], value, atol=1e-4, rtol=0)
