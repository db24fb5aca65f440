"""Greedy packing of tokenized SFT examples into rows of at most `max_length` tokens.

Examples are taken in order and appended to the current row until the next one does not fit; then a
new row starts. Every row is therefore a contiguous run of examples, which lets the whole job run
on flat arrow/numpy arrays (one Python step per example, none per token). Order-preserving greedy
wastes a little more room than best-fit, but keeps the data order the sampler shuffled and is
trivially reproducible.

Each packed row holds:
- `input_ids`: the examples' tokens back to back, every token of every example exactly once;
- `position_ids`: 0, 1, 2, ... restarting at 0 where each example starts, so position embeddings
  (GPT-2's learned ones, RoPE) see each example as if it were alone, and so the collator /
  transformers can find the example boundaries (see docs/packing.md);
- `labels`: the examples' labels, except -100 at each example's first token. A causal LM shifts
  labels internally: the logit at position t is trained on labels[t + 1]. The first token of an
  example would thus be predicted from the LAST token of the previous example in the row, a target
  that has nothing to do with either example. Alone, an example's first label is never trained
  (nothing precedes it), so masking it keeps the packed loss equal to the unpacked one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

from rlhf_cli.data.sft_format import IGNORE_INDEX


def pack_dataset(dataset: Dataset, max_length: int) -> Dataset:
    """Pack a dataset with `input_ids` and `labels` (lists of ints) into rows of <= max_length tokens.

    Returns a Dataset with `input_ids`, `labels` and `position_ids`. Examples must already be
    truncated to max_length (tokenize_dataset does it); a longer one raises ValueError.
    """
    table = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    ids_list = table.column("input_ids").combine_chunks()
    labels_list = table.column("labels").combine_chunks()
    lengths = pc.list_value_length(ids_list).to_numpy(zero_copy_only=False).astype(np.int64)  # (n,)
    if len(lengths) and lengths.max() > max_length:
        raise ValueError(f"an example has {lengths.max()} tokens, more than max_length={max_length}; truncate first")
    if not np.array_equal(lengths, pc.list_value_length(labels_list).to_numpy(zero_copy_only=False)):
        raise ValueError("input_ids and labels differ in length in some example")

    # Flat token streams, shape (total_tokens,), and each example's start in them, shape (n,).
    ids = ids_list.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    labels = labels_list.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)

    # position_ids: index of each token inside its own example.
    positions = np.arange(len(ids), dtype=np.int64) - np.repeat(starts, lengths)
    # No example is trained on across a boundary: the first label of every example is ignored.
    labels[starts[lengths > 0]] = IGNORE_INDEX

    row_offsets = _greedy_row_offsets(lengths, max_length)  # (rows + 1,) token offsets into the streams

    # Arrow lists with int32 offsets hold up to 2**31 tokens per column; beyond that, large lists.
    list_type = pa.ListArray if len(ids) < 2**31 else pa.LargeListArray
    offsets = pa.array(row_offsets, pa.int32() if list_type is pa.ListArray else pa.int64())

    def as_rows(values: np.ndarray) -> pa.Array:
        return list_type.from_arrays(offsets, pa.array(values, pa.int64()))

    return Dataset(
        pa.table({"input_ids": as_rows(ids), "labels": as_rows(labels), "position_ids": as_rows(positions)})
    )


def _greedy_row_offsets(lengths: np.ndarray, max_length: int) -> np.ndarray:
    """Token offsets where packed rows start (plus the total at the end), shape (rows + 1,)."""
    offsets = [0]
    filled = 0  # tokens in the current row
    total = 0
    for length in lengths.tolist():  # one step per example, not per token
        if filled + length > max_length:
            offsets.append(total)
            filled = 0
        filled += length
        total += length
    if total > offsets[-1]:
        offsets.append(total)
    return np.asarray(offsets, dtype=np.int64)
