"""Held-out perplexity of a causal LM on a text set: exp(token-weighted mean next-token NLL).

Texts are tokenized as `rlhf sft` tokenizes its `text` format (no bos, eos appended unless present,
the first max_length tokens kept) and every token after the first is predicted, so the figure is
the SFT stage's `eval_perplexity` when the same texts are given.
"""

import logging

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.nn.utils.rnn import pad_sequence

from rlhf_cli.config.options import EvalOptions
from rlhf_cli.data.loading import load_dataset_dict, require_columns
from rlhf_cli.errors import UserError
from rlhf_cli.evaluation.metrics import perplexity
from rlhf_cli.evaluation.sampling import EvalModel

log = logging.getLogger(__name__)


def load_texts(options: EvalOptions, world_seed: int) -> tuple[list[str], str]:
    """The texts of eval.perplexity_dataset and the split they come from (perplexity_split, or the only one)."""
    name, split = options.perplexity_dataset, options.perplexity_split
    splits = load_dataset_dict(name, None, world_seed)
    if split not in splits:
        if len(splits) != 1:
            raise UserError(
                f"eval.perplexity_split: {split!r} is not a split of {name}; it has: {', '.join(splits)}."
            )
        split = next(iter(splits))
    dataset: Dataset = splits[split]
    require_columns(dataset, {"eval.perplexity_text_column": options.perplexity_text_column}, f"{name} ({split})")
    if options.perplexity_max_samples:
        dataset = dataset.select(range(min(options.perplexity_max_samples, len(dataset))))
    texts = [t for t in dataset[options.perplexity_text_column] if isinstance(t, str) and t]
    if not texts:
        raise UserError(f"eval.perplexity_dataset: {name} ({split}) has no non-empty text in column "
                        f"{options.perplexity_text_column!r}.")
    return texts, split


def encode_texts(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    encoded = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        encoded.append(ids[:max_length])
    return encoded


@torch.no_grad()
def held_out_perplexity(lm: EvalModel, texts: list[str], max_length: int, batch_size: int) -> float | None:
    """Perplexity of `lm` on the texts; None for an encoder-decoder (it has no plain text likelihood)."""
    if lm.encoder_decoder:
        log.info("%s is an encoder-decoder model: no held-out perplexity", lm.name)
        return None
    rows = [ids for ids in encode_texts(texts, lm.tokenizer, max_length) if len(ids) >= 2]
    nll_sum, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        tensors = [torch.tensor(r, dtype=torch.long) for r in rows[start : start + batch_size]]
        ids = pad_sequence(tensors, batch_first=True, padding_value=lm.tokenizer.pad_token_id).to(lm.device)
        mask = pad_sequence([torch.ones_like(t) for t in tensors], batch_first=True).to(lm.device)
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
        targets, valid = ids[:, 1:], mask[:, 1:].bool()
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, L-1)
        nll_sum += torch.where(valid, nll, torch.zeros_like(nll)).sum().item()
        count += int(valid.sum())
    return perplexity(nll_sum, count) if count else None
