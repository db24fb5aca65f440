"""Log-probs and entropy read through the LM head in chunks (lm/head.py) equal the plain computation
from full logits, values and gradients, while no head call projects more than one chunk."""

import pytest
import torch
from conftest import read_head_in_chunks
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config

from rlhf_cli.lm.head import chunked_stats, read_tokens, stats_from_logits

pytestmark = pytest.mark.gpu  # also in bench/gpu.sh's GPU subset

V, H = 50, 8


def setup(seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(3, 5, H, requires_grad=True)
    tokens = torch.randint(0, V, (3, 5))
    return head, hidden, tokens


def count_rows(head):
    rows = []
    head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.parametrize("entropy", ["none", "stat", "grad"])
def test_chunked_equals_plain_values_and_gradients(entropy, monkeypatch):
    head, hidden, tokens = setup()
    plain = stats_from_logits(head(hidden), tokens, 0.7, entropy)
    hits = head(hidden).argmax(-1) == tokens
    rows = count_rows(head)
    read_head_in_chunks(monkeypatch, 2 * V)  # 2 positions a chunk
    chunked = chunked_stats(head, hidden, tokens, 0.7, entropy, top1=True)
    assert_close(chunked.logprobs, plain.logprobs)
    assert torch.equal(chunked.top1, hits)
    if entropy == "none":
        assert chunked.entropy is None
    else:
        assert_close(chunked.entropy, plain.entropy)
        assert chunked.entropy.requires_grad == (entropy == "grad")

    grads = []
    for stats in (chunked, plain):
        loss = (stats.logprobs * torch.linspace(-1, 1, 15).view(3, 5)).sum()
        if entropy == "grad":
            loss = loss + 0.3 * stats.entropy.sum()
        grads.append(torch.autograd.grad(loss, [hidden, head.weight]))
    for a, b in zip(*grads, strict=True):
        assert_close(a, b)
    # 15 positions in chunks of 2: 8 calls forward, 8 more recomputing them in backward; never more rows
    assert rows[:8] == [2] * 7 + [1] and sorted(rows[8:]) == sorted(rows[:8])


def test_without_grad_nothing_is_recomputed_and_small_reads_are_one_call(monkeypatch):
    head, hidden, tokens = setup()
    rows = count_rows(head)
    chunked_stats(head, hidden, tokens, 1.0, "stat")  # 15 x 50 logits: far below WHOLE_LOGITS, one piece
    assert rows == [15]
    rows.clear()
    read_head_in_chunks(monkeypatch, 4 * V)
    with torch.no_grad():
        chunked_stats(head, hidden, tokens, 1.0, "stat")
    assert rows == [4, 4, 4, 3]


def tiny_causal(config_class, **extra):
    torch.manual_seed(0)
    config = config_class(vocab_size=V, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


GPT2 = {"n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 32}
# soft-capping at 0.5 changes logits of any size: a model whose logits are not its head's output
GEMMA2 = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 8, "final_logit_softcapping": 0.5}


@pytest.mark.parametrize(("config_class", "extra", "chunks"), [(GPT2Config, GPT2, True),
                                                              (Gemma2Config, GEMMA2, False)])
def test_read_tokens_chunks_only_models_whose_logits_are_the_head_output(config_class, extra, chunks):
    model = tiny_causal(config_class, **extra)
    input_ids = torch.randint(0, V, (2, 7))
    tokens = input_ids[:, 1:]  # position t predicts token t + 1

    def select(x):
        return x[:, :-1]

    def forward():
        return model(input_ids=input_ids).logits, "other"

    expected = stats_from_logits(select(forward()[0]), tokens, 0.9, "stat")
    widths = []
    model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[-2]))
    for _ in range(2):  # the second call uses what the first found out about the model
        widths.clear()
        stats, other = read_tokens(model, forward, select, tokens, 0.9, "stat")
        assert other == "other"
        assert_close(stats.logprobs, expected.logprobs)
        assert_close(stats.entropy, expected.entropy)
    # chunked: the model's own head call projects nothing, the chunk then projects the 12 positions;
    # post-processed logits: the model projects its 2 x 7 positions itself
    assert widths == ([0, 12] if chunks else [7])


def test_a_sharded_head_is_read_from_full_logits():
    """Under an engine that shards the head's weight (here as FSDP1 leaves it: a plain tensor, not a
    Parameter) the head is whole only inside the model's forward: the model projects, as before."""
    model = tiny_causal(GPT2Config, **GPT2)
    head = model.get_output_embeddings()
    model.lm_head = torch.nn.Linear(16, V, bias=False)
    del model.lm_head.weight
    model.lm_head.weight = head.weight.detach().clone()  # a plain tensor
    input_ids = torch.randint(0, V, (2, 7))
    widths = []
    model.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[-2]))
    stats, _ = read_tokens(model, lambda: (model(input_ids=input_ids).logits, None), lambda x: x[:, :-1],
                           input_ids[:, 1:], 1.0)
    assert widths == [7]
    assert_close(stats.logprobs, stats_from_logits(model(input_ids=input_ids).logits[:, :-1], input_ids[:, 1:],
                                                   1.0).logprobs)
