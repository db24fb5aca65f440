"""Log-probabilities and entropy at the sampling temperature."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_cli.lm.logprobs import entropy_from_logits, logprobs_from_logits

LN3 = math.log(3.0)
# B=2, T=3, V=2: every position has logits [0, ln 3]
LOGITS = torch.tensor([[0.0, LN3]]).expand(6, 2).reshape(2, 3, 2).contiguous()
TOKENS = torch.tensor([[0, 1, 0], [1, 1, 0]])

# temperature 1: softmax([0, ln 3]) = [1/4, 3/4] -> log p = ln(1/4) = -1.386294, ln(3/4) = -0.287682
LP_T1 = {0: -1.3862944, 1: -0.2876821}
# temperature 2: logits [0, ln 3 / 2] = [0, ln sqrt 3]: p = [1/(1+sqrt 3), sqrt 3/(1+sqrt 3)]
#   = [0.3660254, 0.6339746] -> log p = -1.0050525, -0.4557464
LP_T2 = {0: -1.0050525, 1: -0.4557464}


def expected(table):
    return torch.tensor([[table[t] for t in row] for row in TOKENS.tolist()])


def test_logprobs_temperature_one_and_two():
    assert_close(logprobs_from_logits(LOGITS, TOKENS, 1.0), expected(LP_T1))
    assert_close(logprobs_from_logits(LOGITS, TOKENS, 2.0), expected(LP_T2))


def test_logprobs_from_bf16_logits_are_float32_and_input_untouched():
    logits32 = LOGITS.clone()
    out = logprobs_from_logits(logits32, TOKENS, 2.0)
    assert_close(logits32, LOGITS)  # not divided in place
    out16 = logprobs_from_logits(LOGITS.to(torch.bfloat16), TOKENS, 2.0)
    assert out16.dtype == torch.float32
    assert_close(out16, out, atol=1e-2, rtol=0)  # ln 3 itself is rounded to bf16


def test_entropy_temperature_one_and_two():
    # T=1: -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.25 * 1.386294 + 0.75 * 0.287682 = 0.5623351
    assert_close(entropy_from_logits(LOGITS, 1.0), torch.full((2, 3), 0.5623351))
    # T=2: -(0.3660254 * -1.0050525 + 0.6339746 * -0.4557464) = 0.6568064
    assert_close(entropy_from_logits(LOGITS, 2.0), torch.full((2, 3), 0.6568064))


def test_entropy_of_uniform_is_log_vocab():
    # any temperature keeps a uniform distribution uniform: H = ln 4 = 1.3862944
    assert_close(entropy_from_logits(torch.zeros(2, 3, 4), 0.7), torch.full((2, 3), 1.3862944))


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(LOGITS, TOKENS, 0.0)
