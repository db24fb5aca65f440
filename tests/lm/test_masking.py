"""Masks and masked statistics, on tensors small enough to check by hand."""

import torch
from torch.testing import assert_close

from rlhf_cli.lm.masking import (
    first_true_index,
    lengths_to_mask,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    truncate_after_stop,
)

T_, F_ = True, False
STOP, PAD = 2, 0


def test_first_true_index_and_none_gives_T():
    bools = torch.tensor([[F_, T_, T_], [F_, F_, F_], [T_, F_, T_]])
    assert first_true_index(bools).tolist() == [1, 3, 0]


def test_truncate_stop_mid_row_at_last_position_and_never():
    responses = torch.tensor(
        [
            [5, STOP, 7, STOP],  # stop at index 1: keep it, pad the rest -> length 2
            [5, 6, 7, STOP],  # stop at the last position -> length 4, nothing to pad
            [5, 6, 7, 8],  # never stops -> length T = 4
        ]
    )
    truncated, lengths, stopped = truncate_after_stop(responses, STOP, PAD)
    assert truncated.tolist() == [[5, STOP, PAD, PAD], [5, 6, 7, STOP], [5, 6, 7, 8]]
    assert lengths.tolist() == [2, 4, 4]
    assert stopped.tolist() == [True, True, False]


def test_truncate_when_pad_equals_eos_uses_first_stop_in_raw_tokens():
    eos = pad = 0
    responses = torch.tensor(
        [
            [5, eos, eos, eos],  # generate() padded with eos after the real eos: length 2
            [eos, 6, 7, 8],  # eos as the very first token: length 1, the rest is cut
        ]
    )
    truncated, lengths, stopped = truncate_after_stop(responses, eos, pad)
    assert truncated.tolist() == [[5, eos, pad, pad], [eos, pad, pad, pad]]
    assert lengths.tolist() == [2, 1]
    assert stopped.tolist() == [True, True]


def test_truncate_without_stop_token_never_stops():
    responses = torch.tensor([[5, STOP, 7], [1, 1, 1]])
    truncated, lengths, stopped = truncate_after_stop(responses, None, PAD)
    assert truncated.tolist() == responses.tolist()
    assert lengths.tolist() == [3, 3]
    assert stopped.tolist() == [False, False]


def test_lengths_to_mask():
    mask = lengths_to_mask(torch.tensor([0, 2, 3]), 3)
    assert mask.tolist() == [[F_, F_, F_], [T_, T_, F_], [T_, T_, T_]]


X = torch.tensor([[1.0, 2.0, 100.0], [4.0, -50.0, 100.0]])
MASK = torch.tensor([[T_, T_, F_], [T_, F_, F_]])  # valid entries: 1, 2, 4


def test_masked_sum_and_mean_ignore_invalid_entries():
    assert_close(masked_sum(X, MASK), torch.tensor(7.0))  # 1 + 2 + 4
    assert_close(masked_mean(X, MASK), torch.tensor(7.0 / 3.0))
    assert_close(masked_sum(X, MASK, dim=1), torch.tensor([3.0, 4.0]))  # 1 + 2 ; 4
    assert_close(masked_mean(X, MASK, dim=1), torch.tensor([1.5, 4.0]))  # 3 / 2 ; 4 / 1


def test_masked_mean_of_nothing_is_zero_not_nan():
    assert_close(masked_mean(X, torch.zeros_like(MASK)), torch.tensor(0.0))


def test_masked_sum_survives_nan_in_invalid_entries():
    x = torch.tensor([[1.0, float("nan")], [2.0, float("inf")]])
    mask = torch.tensor([[T_, F_], [T_, F_]])
    assert_close(masked_sum(x, mask), torch.tensor(3.0))


def test_masked_var():
    # valid 1, 2, 4: mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    assert_close(masked_var(X, MASK, unbiased=True), torch.tensor(7.0 / 3.0))  # (14/3) / 2
    assert_close(masked_var(X, MASK, unbiased=False), torch.tensor(14.0 / 9.0))  # (14/3) / 3
    # a single valid entry: no spread measurable -> 0, not inf/NaN
    one = torch.tensor([[T_, F_, F_], [F_, F_, F_]])
    assert_close(masked_var(X, one), torch.tensor(0.0))


W = torch.tensor([[1.0, 3.0, 999.0], [5.0, -999.0, 123.0]])
WMASK = torch.tensor([[T_, T_, F_], [T_, F_, F_]])
# valid 1, 3, 5: mean 3; unbiased var = (4 + 0 + 4) / 2 = 4; std 2


def test_masked_whiten_uses_valid_entries_only():
    # (x - 3) / 2 -> -1, 0, 1 ; invalid positions 0
    assert_close(masked_whiten(W, WMASK), torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    # the garbage at invalid positions does not matter
    other = W.masked_fill(~WMASK, -7.0)
    assert_close(masked_whiten(other, WMASK), masked_whiten(W, WMASK))


def test_masked_whiten_without_mean_shift():
    # (x - 3) / 2 + 3 -> 2, 3, 4
    assert_close(masked_whiten(W, WMASK, shift_mean=False), torch.tensor([[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]]))


def test_masked_whiten_fewer_than_two_entries():
    x = torch.tensor([[5.0, 9.0]])
    one = torch.tensor([[T_, F_]])
    assert_close(masked_whiten(x, one), torch.tensor([[0.0, 0.0]]))  # centred: 5 - 5
    assert_close(masked_whiten(x, one, shift_mean=False), torch.tensor([[5.0, 0.0]]))  # unscaled
    none = torch.tensor([[F_, F_]])
    assert_close(masked_whiten(x, none), torch.tensor([[0.0, 0.0]]))
