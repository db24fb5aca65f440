"""GRPO and RLOO maths on small tensors, answers worked out by hand (online/grpo.py, online/rloo.py,
online/groups.py)."""

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.config.options import GRPOOptions, RLOOOptions
from rlhf_cli.online.algorithm import MicroBatch
from rlhf_cli.online.experience import Experience
from rlhf_cli.online.grpo import GRPO
from rlhf_cli.online.rloo import RLOO

TRAINING = SimpleNamespace(gradient_accumulation_steps=1, per_device_train_batch_size=4)



def experience(scores, T=3, stopped=None, lengths=None) -> Experience:
    B = len(scores)
    lengths = torch.tensor(lengths or [T] * B)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    exp = Experience(torch.zeros(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.long),
                     torch.ones(B, T, dtype=torch.long), mask,
                     torch.tensor(stopped if stopped is not None else [True] * B), [""] * B, [""] * B)
    exp.scores = torch.tensor(scores, dtype=torch.float32)
    exp.old_logprobs = torch.zeros(B, T)
    exp.group_ids = torch.arange(B // 4).repeat_interleave(4) if B % 4 == 0 else None
    return exp


def grpo(**options) -> GRPO:
    return GRPO(GRPOOptions(num_generations=4, **options), TRAINING, response_length=3)


def test_grpo_group_normalised_advantages_and_a_zero_variance_group(one_process):
    # group 1: rewards 1 0 0 1, mean 0.5, unbiased std sqrt(1/3) = 0.57735; group 2: all 2 -> advantage 0
    exp = experience([1, 0, 0, 1, 2, 2, 2, 2])
    stats = grpo().prepare(exp, one_process)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # 0.86588
    torch.testing.assert_close(exp.advantages[:, 0], torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    assert (exp.advantages == exp.advantages[:, :1]).all()  # one advantage per response, on every token
    assert exp.advantages[4:].eq(0).all()  # exactly 0, no division by a zero std
    assert stats["frac_reward_zero_std"] == 0.5
    assert stats["reward"] == pytest.approx(1.25) and stats["reward_std"] == pytest.approx(math.sqrt(1 / 3) / 2)


def test_grpo_batch_and_no_reward_scaling(one_process):
    # batch std of [1 0 0 1 2 2 2 2]: mean 1.25, squared deviations sum 5.5, / 7 -> std 0.886405
    exp = experience([1, 0, 0, 1, 2, 2, 2, 2])
    grpo(scale_rewards="batch").prepare(exp, one_process)
    a = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    torch.testing.assert_close(exp.advantages[:, 0], torch.tensor([a, -a, -a, a, 0, 0, 0, 0]))
    exp = experience([1, 0, 0, 1, 2, 2, 2, 2])
    grpo(scale_rewards="none").prepare(exp, one_process)  # Dr. GRPO: centred only
    torch.testing.assert_close(exp.advantages[:, 0], torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def micro_batch(per_token_mask, logprobs=None, rows=None, tokens=None):
    mask = torch.tensor(per_token_mask, dtype=torch.bool)
    b, T = mask.shape
    logprobs = torch.zeros(b, T) if logprobs is None else torch.tensor(logprobs)
    n = mask.sum().float()
    return MicroBatch(torch.arange(b), slice(0, T), logprobs, torch.zeros(b, T), None, mask,
                      n if tokens is None else torch.tensor(tokens), n, rows or b)


@pytest.mark.parametrize(("loss_type", "expected"), [
    ("grpo", (2.0 + 4.0) / 2),  # each response's token mean (2 and 4), averaged over responses
    ("dapo", (1 + 2 + 3 + 4) / 4),  # every valid token alike
    ("bnpo", (1 + 2 + 3 + 4) / 4),  # the same on one process
    ("dr_grpo", (1 + 2 + 3 + 4) / (2 * 3)),  # summed / (responses x response_length 3)
])
def test_each_loss_type_normaliser(loss_type, expected):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])  # 99: padding, never counted
    batch = micro_batch([[1, 1, 1], [1, 0, 0]])
    assert grpo(loss_type=loss_type).aggregate(per_token, batch).item() == pytest.approx(expected)


def test_dapo_divides_by_all_processes_tokens_and_bnpo_by_its_own():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    batch = micro_batch([[1, 1, 1], [1, 0, 0]], tokens=8.0)  # (another process holds 12 tokens: (4 + 12) / 2)
    assert grpo(loss_type="dapo").aggregate(per_token, batch).item() == pytest.approx(10 / 8)
    assert grpo(loss_type="bnpo").aggregate(per_token, batch).item() == pytest.approx(10 / 4)


def test_two_sided_clip_and_clip_ratios():
    # three one-token responses: ratio 1.5 with A = +1 (clipped at 1 + epsilon_high = 1.28),
    # ratio 0.5 with A = -1 (clipped at 1 - epsilon = 0.8), ratio 0.5 with A = +1 (not clipped)
    exp = experience([0.0] * 3, T=1)
    exp.old_logprobs = torch.zeros(3, 1)
    exp.advantages = torch.tensor([[1.0], [-1.0], [1.0]])
    logprobs = [[math.log(1.5)], [math.log(0.5)], [math.log(0.5)]]
    batch = micro_batch([[1], [1], [1]], logprobs=logprobs)
    algorithm = GRPO(GRPOOptions(num_generations=3, epsilon=0.2, epsilon_high=0.28, loss_type="dapo"), TRAINING, 1)
    loss, stats = algorithm.loss(exp, batch)
    # per token: -min(1.5, 1.28) = -1.28; -min(-0.5, -0.8) = 0.8; -min(0.5, 0.8) = -0.5
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 0.5) / 3)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 3)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 3)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)


def test_kl_term_is_k3_weighted_by_beta_and_absent_at_beta_zero():
    exp = experience([0.0, 0.0], T=1)
    exp.advantages = torch.zeros(2, 1)
    exp.ref_logprobs = torch.tensor([[math.log(0.5)], [0.0]])  # policy log-prob 0: r = p_ref / p = 0.5, 1
    batch = micro_batch([[1], [1]])
    k3 = (0.5 - 1) - math.log(0.5)  # 0.19315
    options = {"num_generations": 2, "loss_type": "dapo"}
    loss, stats = GRPO(GRPOOptions(beta=0.1, **options), TRAINING, 1).loss(exp, batch)
    assert loss.item() == pytest.approx(0.1 * k3 / 2) and stats["kl_loss_term"].item() == pytest.approx(k3 / 2)
    without = GRPO(GRPOOptions(beta=0.0, **options), TRAINING, 1)
    assert not without.uses_reference and without.loss(exp, batch)[0].item() == 0.0


def test_mask_truncated_completions_leaves_them_out_of_the_loss(one_process):
    exp = experience([1, 0, 0, 1], stopped=[True, False, True, True])
    grpo(mask_truncated_completions=True).prepare(exp, one_process)
    assert exp.loss_mask[1].sum() == 0 and exp.loss_mask[0].all()
    assert exp.advantages[1, 0] != 0  # it still counts in its group's statistics


def test_rloo_leave_one_out_baseline(one_process):
    # group 1: 1 2 3 -> baselines 2.5, 2, 1.5 -> advantages -1.5, 0, 1.5; group 2: all 0 -> 0
    exp = experience([1, 2, 3, 0, 0, 0])
    exp.group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    RLOO(RLOOOptions(num_generations=3, beta=0.0), TRAINING, 3).prepare(exp, one_process)
    torch.testing.assert_close(exp.advantages[:, 0], torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))


def test_rloo_kl_in_the_reward_and_normalised_advantages(one_process):
    exp = experience([1.0, 1.0], T=2)
    exp.group_ids = torch.tensor([0, 0])
    exp.old_logprobs = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    exp.ref_logprobs = torch.tensor([[-1.0, -1.0], [0.0, 0.0]])  # summed k1: 2 and 0
    algorithm = RLOO(RLOOOptions(num_generations=2, beta=0.5), TRAINING, 2)
    algorithm.prepare(exp, one_process)
    # rewards 1 - 0.5 x 2 = 0 and 1 -> advantages 0 - 1 = -1 and 1 - 0 = +1
    torch.testing.assert_close(exp.advantages[:, 0], torch.tensor([-1.0, 1.0]))
    exp = experience([1.0, 3.0, 0.0, 0.0], T=1)
    exp.group_ids = torch.tensor([0, 0, 1, 1])
    RLOO(RLOOOptions(num_generations=2, beta=0.0, normalize_advantages=True), TRAINING, 1).prepare(exp, one_process)
    # advantages -2, 2, 0, 0: mean 0, unbiased std sqrt(8 / 3)
    s = math.sqrt(8 / 3) + 1e-4
    torch.testing.assert_close(exp.advantages[:, 0], torch.tensor([-2 / s, 2 / s, 0.0, 0.0]))


def test_rloo_ratio_is_per_response_and_the_loss_a_mean_over_responses():
    # one response of 2 tokens, each 0.1 more likely in log-prob: ratio exp(0.2) = 1.2214 > 1.2 -> clipped
    exp = experience([0.0], T=2)
    exp.old_logprobs = torch.zeros(1, 2)
    exp.advantages = torch.ones(1, 2)
    batch = micro_batch([[1, 1]], logprobs=[[0.1, 0.1]])
    loss, stats = RLOO(RLOOOptions(num_generations=2, beta=0.0), TRAINING, 2).loss(exp, batch)
    assert loss.item() == pytest.approx(-1.2)
    assert stats["clip_ratio/high_mean"].item() == 1.0


def test_responses_of_a_prompt_must_be_whole_consecutive_groups(one_process):
    exp = experience([1, 0, 0, 1])
    exp.group_ids = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="consecutive"):
        grpo().prepare(exp, one_process)
