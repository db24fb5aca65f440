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
    """The LM head sees only the columns from the first response position on, not the prompt."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        with torch.no_grad():
            sequence_logps(model, DPOCollator(0)([ROWS[0], ROWS[2]]))
            sequence_logps(model, DPOCollator(0, padding_free=True)([ROWS[0], ROWS[2]]))
    finally:
        hook.remove()
    # padded: T = 9, first response column 3 -> columns 2..8 (7 of 9); padding-free: one position
    # per response token (3 + 2 + 2 + 4)
    assert seen[0][:2] == (4, 7) and seen[1][:2] == (1, 11)
