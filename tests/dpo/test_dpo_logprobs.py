"""Sequence log-probs of a pair batch: prompt and padding masked, one concatenated pass equal to two
separate passes, padding-free equal to padded, logits only where a response token is predicted."""

import pytest
import torch

from rlhf_cli.data.dpo_pairs import DPOCollator
from rlhf_cli.dpo.logprobs import sequence_logps
from rlhf_cli.models.dropout import disable_dropout
from rlhf_cli.models.loading import load_model

# prompt, chosen, rejected token ids of three pairs of different lengths
ROWS = [
    {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9, 1], "rejected_input_ids": [10, 1]},
    {"prompt_input_ids": [11], "chosen_input_ids": [12, 13, 14, 15, 1], "rejected_input_ids": [16, 17, 1]},
    {"prompt_input_ids": [20, 21, 22, 23, 24], "chosen_input_ids": [25, 1], "rejected_input_ids": [26, 27, 28, 1]},
]


@pytest.fixture(scope="module")
def model():
    model = load_model("builtin:tiny-gpt2", task="causal-lm", seed=0)
    disable_dropout(model)
    return model.eval()


def by_hand(model, prompt: list[int], response: list[int]) -> float:
    """One sequence alone, no padding, full logits: sum of log p(response token | everything before)."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    return sum(logp[len(prompt) + i - 1, tok].item() for i, tok in enumerate(response))


@torch.no_grad()
def test_masks_prompt_and_padding(model):
    batch = DPOCollator(pad_token_id=0)(ROWS)
    assert batch["input_ids"].shape == (6, 9)  # 2B rows, the longest sequence
    out = sequence_logps(model, batch)
    want = [by_hand(model, r["prompt_input_ids"], r[f"{side}_input_ids"]) for side in ("chosen", "rejected") for r in ROWS]
    assert out.logps.tolist() == pytest.approx(want, abs=1e-4)
    assert out.num_tokens.tolist() == [3, 5, 2, 2, 3, 4]


@torch.no_grad()
def test_one_concatenated_pass_equals_two_separate_passes(model):
    collate = DPOCollator(pad_token_id=0)
    together = sequence_logps(model, collate(ROWS)).logps  # (6,)
    # chosen alone and rejected alone: each side in its own batch with its own padding
    only = {side: [{"prompt_input_ids": r["prompt_input_ids"], "chosen_input_ids": r[f"{side}_input_ids"],
                    "rejected_input_ids": r[f"{side}_input_ids"]} for r in ROWS] for side in ("chosen", "rejected")}
    chosen = sequence_logps(model, collate(only["chosen"])).halves("logps")[0]
    rejected = sequence_logps(model, collate(only["rejected"])).halves("logps")[0]
    torch.testing.assert_close(together, torch.cat([chosen, rejected]), atol=1e-5, rtol=1e-5)


def test_padding_free_equals_padded_with_gradients(model):
    padded = sequence_logps(model, DPOCollator(0)(ROWS))
    flat_batch = DPOCollator(0, padding_free=True)(ROWS)
    assert flat_batch["input_ids"].shape == (1, sum(len(r["prompt_input_ids"]) + len(r[s]) for s in
                                                    ("chosen_input_ids", "rejected_input_ids") for r in ROWS))
    flat = sequence_logps(model, flat_batch)
    torch.testing.assert_close(flat.logps, padded.logps, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flat.logits_sum, padded.logits_sum, atol=1e-4, rtol=1e-4)
    assert flat.num_tokens.tolist() == padded.num_tokens.tolist()
    flat.logps.sum().backward()
    assert model.transformer.wte.weight.grad is not None


def test_logits_only_at_predicting_positions(model, monkeypatch):
    """The LM head sees only the positions that predict a response token, in both layouts: not the
    prompt, not a longer prompt's columns, not padding."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        with torch.no_grad():
            sequence_logps(model, DPOCollator(0)([ROWS[0], ROWS[2]]))
            sequence_logps(model, DPOCollator(0, padding_free=True)([ROWS[0], ROWS[2]]))
    finally:
        hook.remove()
    # one position per response token (3 + 2 + 2 + 4), gathered into one row; the model's own head
    # call then projects none of them (lm/head.py), the chunked read all 11
    assert [shape[-2] for shape in seen] == [0, 11, 0, 11]


def tiny_real(name: str):
    """Tiny random models of real architectures: tied embeddings and RoPE (Llama), a bias-free
    untied head (Qwen2), a projection after the decoder (OPT) and soft-capped logits (Gemma 2, which
    transforms the logits after the LM head: the gathered head must keep that)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, OPTConfig, Qwen2Config

    common = {"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = {
        "llama": lambda: LlamaConfig(**common, intermediate_size=32, num_key_value_heads=1, tie_word_embeddings=True),
        "qwen2": lambda: Qwen2Config(**common, intermediate_size=32, num_key_value_heads=2, tie_word_embeddings=False),
        "opt": lambda: OPTConfig(**common, ffn_dim=32, word_embed_proj_dim=8, max_position_embeddings=32),
        "gemma2": lambda: Gemma2Config(**common, intermediate_size=32, num_key_value_heads=1, head_dim=8,
                                       final_logit_softcapping=0.5),
    }[name]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", ["llama", "qwen2", "opt", "gemma2"])
def test_real_architectures_give_the_by_hand_log_probs(name):
    model = tiny_real(name)
    out = sequence_logps(model, DPOCollator(pad_token_id=0)(ROWS))
    want = [by_hand(model, r["prompt_input_ids"], r[f"{side}_input_ids"]) for side in ("chosen", "rejected") for r in ROWS]
    assert out.logps.tolist() == pytest.approx(want, abs=1e-4)
    out.logps.sum().backward()
    assert all(p.grad is not None for p in model.get_output_embeddings().parameters())


def test_a_model_without_logits_to_keep_gives_the_same_log_probs(model):
    """The fallback: all columns computed, the head hook still projects only the predicting ones."""

    class NoKeep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    batch = DPOCollator(pad_token_id=0)(ROWS)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(NoKeep(model), batch).logps, sequence_logps(model, batch).logps)


@torch.no_grad()
def test_an_encoder_decoder_scores_each_response_as_the_decoders_target():
    """T5: the prompt is the encoder's input; a response's log-prob is its decoding's, each pair's
    sides alone and unpadded equal to the padded 2B-row batch."""
    from rlhf_cli.data.dpo_pairs import Seq2SeqDPOCollator

    t5 = load_model("builtin:tiny-t5", task="seq2seq-lm", seed=0).eval()
    batch = Seq2SeqDPOCollator(t5.config.pad_token_id, t5.config.decoder_start_token_id)(ROWS)
    out = sequence_logps(t5, batch)

    def alone(prompt: list[int], response: list[int]) -> float:
        loss = t5(input_ids=torch.tensor([prompt]), labels=torch.tensor([response])).loss  # mean NLL per token
        return -loss.item() * len(response)

    want = [alone(r["prompt_input_ids"], r[f"{side}_input_ids"]) for side in ("chosen", "rejected") for r in ROWS]
    assert out.logps.tolist() == pytest.approx(want, abs=1e-4)
    assert out.num_tokens.tolist() == [3, 5, 2, 2, 3, 4]
