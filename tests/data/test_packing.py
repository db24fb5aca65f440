"""Greedy packing: every token once, positions restart per example, no training across boundaries."""

import pytest
from datasets import Dataset

from rlhf_cli.data.packing import pack_dataset

X = -100

# Five examples of lengths 3, 2, 4, 1, 5 with distinct token ids (example e's tokens are 10*e + i) and
# a masked prompt in examples 2 and 4.
EXAMPLES = [
    ([10, 11, 12], [10, 11, 12]),
    ([20, 21], [20, 21]),
    ([30, 31, 32, 33], [X, X, 32, 33]),
    ([40], [40]),
    ([50, 51, 52, 53, 54], [X, 51, 52, 53, 54]),
]


def dataset(examples=EXAMPLES) -> Dataset:
    return Dataset.from_dict({"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})


def test_greedy_rows_positions_and_boundary_labels():
    packed = pack_dataset(dataset(), max_length=6)
    assert packed.column_names == ["input_ids", "labels", "position_ids"]
    # Greedy in order: [3 + 2] (4 won't fit), [4 + 1], [5].
    assert packed["input_ids"] == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 40], [50, 51, 52, 53, 54]]
    assert packed["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0], [0, 1, 2, 3, 4]]
    # Each example's first label is ignored: a shifted loss would predict it from the previous example.
    assert packed["labels"] == [[X, 11, 12, X, 21], [X, X, 32, 33, X], [X, 51, 52, 53, 54]]


def test_every_token_appears_exactly_once_and_rows_fit():
    examples = [([1000 * e + i for i in range(n)], [1000 * e + i for i in range(n)]) for e, n in
                enumerate([7, 1, 8, 3, 3, 2, 8, 5, 1, 1, 6])]
    packed = pack_dataset(dataset(examples), max_length=8)
    flat = [t for row in packed["input_ids"] for t in row]
    assert sorted(flat) == sorted(t for ids, _ in examples for t in ids)
    assert len(flat) == len(set(flat))
    assert all(len(row) <= 8 for row in packed["input_ids"])
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])
        # A token's position is its index inside its own example.
        assert row["position_ids"] == [t % 1000 for t in row["input_ids"]]


def test_packing_a_selected_view_uses_the_selected_rows():
    packed = pack_dataset(dataset().select([4, 1]), max_length=8)
    assert packed["input_ids"] == [[50, 51, 52, 53, 54, 20, 21]]
    assert packed["labels"] == [[X, 51, 52, 53, 54, X, 21]]


def test_examples_longer_than_max_length_must_be_truncated_first():
    with pytest.raises(ValueError, match="truncate first"):
        pack_dataset(dataset(), max_length=4)
