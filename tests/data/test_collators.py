"""SFT batches: padding, the block-diagonal mask, and proof on a tiny GPT-2 that packed examples
give the same logits and loss as the same examples run alone."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_cli.data.collators import SFTCollator, block_diagonal_causal_mask, supports_packed_attention
from rlhf_cli.data.packing import pack_dataset

PAD, X = 0, -100
VOCAB = 64
# Lengths 5, 3, 6, 2 with masked prompts: packed into 8 tokens they give rows [5 + 3], [6 + 2].
EXAMPLES = [
    ([5, 6, 7, 8, 9], [X, X, 7, 8, 9]),
    ([11, 12, 13], [11, 12, 13]),
    ([21, 22, 23, 24, 25, 26], [X, X, X, 24, 25, 26]),
    ([31, 32], [X, 32]),
]


def tiny_gpt2(attn_implementation: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=1, eos_token_id=1, pad_token_id=PAD, attn_implementation=attn_implementation,
    )
    return GPT2LMHeadModel(config).eval()


def rows(examples=EXAMPLES) -> list[dict]:
    return [{"input_ids": ids, "labels": labels} for ids, labels in examples]


def packed_rows(max_length=8) -> list[dict]:
    data = Dataset.from_dict({"input_ids": [e[0] for e in EXAMPLES], "labels": [e[1] for e in EXAMPLES]})
    return list(pack_dataset(data, max_length))


# --- batches -------------------------------------------------------------------------------------


def test_right_padding_labels_and_attention_mask():
    batch = SFTCollator(pad_token_id=PAD, pad_to_multiple_of=4)(rows(EXAMPLES[:2]))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, PAD, PAD, PAD], [11, 12, 13, PAD, PAD, PAD, PAD, PAD]]
    assert batch["labels"].tolist() == [[X, X, 7, 8, 9, X, X, X], [11, 12, 13, X, X, X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]


def test_packed_batch_has_position_ids_and_a_block_diagonal_causal_mask():
    row = {"input_ids": [5, 6, 11, 12, 13], "labels": [X, 6, X, 12, 13], "position_ids": [0, 1, 0, 1, 2]}
    batch = SFTCollator(pad_token_id=PAD, pad_to_multiple_of=3)([row])
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0]]  # the padding is its own "example"
    assert batch["labels"].tolist() == [[X, 6, X, 12, 13, X]]
    allowed = batch["attention_mask"][0, 0] == 0  # (seq_q, seq_k)
    assert allowed.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert batch["attention_mask"].shape == (1, 1, 6, 6)
    assert batch["attention_mask"].min() == torch.finfo(torch.float32).min


def test_without_block_diagonal_mask_packed_batches_carry_no_attention_mask():
    batch = SFTCollator(pad_token_id=PAD, block_diagonal_mask=False)(packed_rows())
    assert set(batch) == {"input_ids", "labels", "position_ids"}


def test_mask_follows_position_restarts_not_zeros_only():
    # A row may start mid-count (e.g. a continued document): a jump in positions starts an example.
    mask = block_diagonal_causal_mask(torch.tensor([[3, 4, 0, 1]]))
    assert (mask[0, 0] == 0).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


# --- on a model ----------------------------------------------------------------------------------


def solo_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0]  # (len(ids), vocab)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("block_diagonal_mask", [True, False])
@torch.no_grad()
def test_packed_logits_equal_each_example_run_alone(attn, block_diagonal_mask):
    model = tiny_gpt2(attn)
    packed = packed_rows(max_length=8)
    assert [r["position_ids"] for r in packed] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]]
    batch = SFTCollator(pad_token_id=PAD, pad_to_multiple_of=16, block_diagonal_mask=block_diagonal_mask)(packed)
    batch.pop("labels")
    # use_cache=False: needed for the position_ids route, harmless for the mask route.
    logits = model(**batch, use_cache=False).logits  # (2, 16, vocab)
    spans = [(0, 0, 5), (0, 5, 8), (1, 0, 6), (1, 6, 8)]  # (row, start, end) of each example
    for (ids, _), (row, start, end) in zip(EXAMPLES, spans, strict=True):
        torch.testing.assert_close(logits[row, start:end], solo_logits(model, ids), atol=1e-5, rtol=0)


@torch.no_grad()
def test_position_ids_alone_do_not_isolate_examples_when_a_cache_is_used():
    # GPT-2's config has use_cache=True; the forward then builds a cache and transformers skips its
    # packed-sequence detection: the second example attends to the first.
    model = tiny_gpt2("sdpa")
    batch = SFTCollator(pad_token_id=PAD, block_diagonal_mask=False)(packed_rows()[:1])
    batch.pop("labels")
    logits = model(**batch).logits[0]
    assert not torch.allclose(logits[5:8], solo_logits(model, EXAMPLES[1][0]), atol=1e-3)
    assert supports_packed_attention(model, block_diagonal_mask=False)  # the probe passes use_cache=False


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_supports_packed_attention_on_gpt2(attn):
    model = tiny_gpt2(attn).train()
    assert supports_packed_attention(model)
    assert supports_packed_attention(model, block_diagonal_mask=False)
    assert model.training  # the probe restores the mode


class MixesEverything(torch.nn.Module):
    """A 'model' that ignores masks and positions: each position sees the mean of all embeddings before it."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, **kwargs):
        hidden = self.embed(input_ids).cumsum(1)
        return type("Out", (), {"logits": self.head(hidden)})


def test_supports_packed_attention_is_false_when_examples_leak():
    assert not supports_packed_attention(MixesEverything())
    assert not supports_packed_attention(MixesEverything(), block_diagonal_mask=False)


def manual_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal LM loss by hand: logits (B, T, V) at t predict labels[t + 1]; mean over labels != -100."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B * (T-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B * (T-1),)
    keep = shifted_labels != X
    return F.cross_entropy(shifted_logits[keep], shifted_labels[keep], reduction="sum") / keep.sum()


@torch.no_grad()
def test_model_loss_on_a_batch_equals_the_manual_shifted_masked_mean():
    model = tiny_gpt2("sdpa")
    batch = SFTCollator(pad_token_id=PAD, pad_to_multiple_of=8)(rows())
    out = model(**batch)
    torch.testing.assert_close(out.loss, manual_loss(out.logits, batch["labels"]))
    # 3 + 2 + 3 + 1 trained targets (labels[0] is never a target): padding and prompts add nothing.
    assert (batch["labels"][:, 1:] != X).sum() == 9


@torch.no_grad()
def test_packed_loss_equals_the_loss_over_the_examples_run_alone():
    model = tiny_gpt2("eager")
    batch = SFTCollator(pad_token_id=PAD)(packed_rows())
    packed_loss = model(**batch, use_cache=False).loss
    # Alone: sum each example's token losses, divide by all their trained targets.
    total, count = 0.0, 0
    for ids, labels in EXAMPLES:
        labels_t = torch.tensor([labels])
        total += manual_loss(solo_logits(model, ids)[None], labels_t) * (labels_t[:, 1:] != X).sum()
        count += int((labels_t[:, 1:] != X).sum())
    torch.testing.assert_close(packed_loss, total / count, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_builtin_world_messages_to_packed_batch_end_to_end():
    models = pytest.importorskip("rlhf_cli.builtin.models")
    from rlhf_cli.config.schema import SFTDataConfig
    from rlhf_cli.data.sft_format import tokenize_dataset

    model, tok = models.build_builtin("tiny-gpt2", task="causal-lm")
    model.eval()
    chats = [("a fine film", "yes it was"), ("the plot?", "dull and slow"), ("actors", "great cast"), ("end", "ok")]
    data = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in chats]}
    )
    cfg = SFTDataConfig(max_length=32, packing=True)
    tokenized, stats = tokenize_dataset(data, tok, cfg)
    assert stats["kept"] == 4
    packed = pack_dataset(tokenized, cfg.max_length)
    assert len(packed) < len(tokenized)
    assert supports_packed_attention(model)

    batch = SFTCollator(tok.pad_token_id, pad_to_multiple_of=8)(list(packed))
    out = model(**batch, use_cache=False)
    torch.testing.assert_close(out.loss, manual_loss(out.logits, batch["labels"]))
    # Each example's logits inside its pack equal the example run alone.
    starts = [(r, i) for r, row in enumerate(packed) for i, p in enumerate(row["position_ids"]) if p == 0]
    for (row, start), example in zip(starts, tokenized, strict=True):
        ids = example["input_ids"]
        torch.testing.assert_close(out.logits[row, start : start + len(ids)], solo_logits(model, ids), atol=1e-5, rtol=0)
