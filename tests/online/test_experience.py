"""online/experience.py: the order in which batches take a rollout's rows (longest first, groups together)."""

import torch

from rlhf_cli.lm.masking import lengths_to_mask
from rlhf_cli.online.experience import Experience


def rollout(response_lengths: list[int], prompt_lengths: list[int], group_ids=None) -> Experience:
    P, T = max(prompt_lengths), max(response_lengths)
    query_mask = torch.stack([torch.arange(P) >= P - n for n in prompt_lengths]).long()  # left-padded
    response_mask = lengths_to_mask(torch.tensor(response_lengths), T)
    rows = len(response_lengths)
    return Experience(torch.ones(rows, P, dtype=torch.long), query_mask, torch.ones(rows, T, dtype=torch.long),
                      response_mask, torch.zeros(rows, dtype=torch.bool), [""] * rows, [""] * rows,
                      group_ids=group_ids)


def test_rows_go_longest_first_counting_prompt_and_response():
    r = rollout([1, 9, 4, 4, 6], [5, 1, 2, 2, 2])  # totals 6, 10, 6, 6, 8
    assert r.longest_first(torch.arange(5)).tolist() == [1, 4, 0, 2, 3]  # ties keep their order
    assert r.longest_first(torch.tensor([3, 0, 4])).tolist() == [4, 3, 0]  # a subset, in its own order


def test_a_groups_rows_keep_together_placed_by_its_longest_row():
    lengths = [1, 1, 1, 9, 5, 5, 5, 5, 2, 2, 2, 7]
    grouped = rollout(lengths, [2] * 12, group_ids=torch.arange(3).repeat_interleave(4))
    assert grouped.longest_first(torch.arange(12)).tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7]
    # a shuffled mini-batch: each group's rows in it still meet
    assert grouped.longest_first(torch.tensor([5, 0, 9, 3, 4, 11])).tolist() == [0, 3, 9, 11, 5, 4]
    assert rollout(lengths, [2] * 12).longest_first(torch.arange(12)).tolist()[:4] == [3, 11, 4, 5]
    ids = torch.tensor([7, 7, 7, 7, 1000, 1000, 1000, 1000, 42, 42, 42, 42])  # any ids name the groups
    assert rollout(lengths, [2] * 12, group_ids=ids).longest_first(torch.arange(12)).tolist() == \
        [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7]
