"""SFT's per-token loss (stages/sft.py token_losses), read through the LM head in chunks: the same
loss, gradients and token accuracy as the model's own cross-entropy from full logits, and in bf16
behind accelerate's mixed-precision wrapper it still never projects the whole batch at once."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import read_head_in_chunks

from rlhf_cli.builtin.tokenizer import VOCAB_SIZE
from rlhf_cli.models.loading import load_model
from rlhf_cli.stages.sft import token_losses

pytestmark = pytest.mark.gpu  # also in bench/gpu.sh's GPU subset


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, VOCAB_SIZE, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 8:] = 0  # a shorter row, right-padded
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # a prompt that is not trained on
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("chunk_positions", [None, 5])  # the default chunk (all 33 positions), or 5 at a time
def test_token_losses_equal_the_models_own_loss(monkeypatch, chunk_positions):
    if chunk_positions:
        read_head_in_chunks(monkeypatch, chunk_positions * VOCAB_SIZE)
    model = load_model("builtin:tiny-gpt2", task="causal-lm")
    b = batch()
    loss, correct, mask = token_losses(model, b)
    assert mask.sum() == 8 + 8 + 4  # labels 4..11 predicted from positions 3..10, the short row's 4..7
    ours = loss.sum() / mask.sum()
    ours_grad = torch.autograd.grad(ours, model.transformer.wte.weight)[0]

    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    torch.testing.assert_close(ours, out.loss)
    torch.testing.assert_close(ours_grad, torch.autograd.grad(out.loss, model.transformer.wte.weight)[0])
    predicted = out.logits[:, :-1].argmax(-1) == b["labels"][:, 1:]
    assert torch.equal(correct, predicted & mask)


def test_bf16_behind_accelerate_reads_the_head_in_chunks():
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        model = accelerator.prepare(load_model("builtin:tiny-gpt2", task="causal-lm"))
        widths = []
        model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[-2]))
        with accelerator.autocast():
            loss, _, mask = token_losses(model, batch())
        # the model's own head call projects nothing; the chunk projects the 33 predicting positions
        assert widths == [0, 33]
        assert loss.dtype == torch.float32 and torch.isfinite(loss[mask]).all()
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
