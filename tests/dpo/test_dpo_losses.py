"""Each DPO loss_type on two pairs whose answers are worked out by hand, and the implicit-reward metrics."""

import math

import pytest
import torch

from rlhf_cli.config.options import DPOOptions
from rlhf_cli.dpo.logprobs import SequenceLogps
from rlhf_cli.dpo.losses import dpo_losses
from rlhf_cli.dpo.objective import DPOObjective, pair_terms, summarize

BETA = 0.5
# pair 1: policy (-1, -3), reference (-2, -2): log-ratios c = +1, r = -1, h = c - r = 2, beta h = 1
# pair 2: policy (-3, -1), reference (-2, -2): c = -1, r = +1, h = -2, beta h = -1
POLICY_C, POLICY_R = torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0])
REF_C, REF_R = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log(1 + math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


E = 0.1
HAND = {
    # -log s(beta h) = log(1 + e^{-beta h}): log(1 + e^-1) = 0.3133, log(1 + e) = 1.3133
    ("sigmoid", 0.0): [softplus(-1), softplus(1)],
    # cDPO: (1 - e) (-log s(bh)) + e (-log s(-bh))
    ("sigmoid", E): [0.9 * softplus(-1) + 0.1 * softplus(1), 0.9 * softplus(1) + 0.1 * softplus(-1)],
    # robust: ((1 - e)(-log s(bh)) - e(-log s(-bh))) / (1 - 2e)
    ("robust", E): [(0.9 * softplus(-1) - 0.1 * softplus(1)) / 0.8, (0.9 * softplus(1) - 0.1 * softplus(-1)) / 0.8],
    # ipo: (h - 1/(2 beta))^2 = (2 - 1)^2, (-2 - 1)^2
    ("ipo", 0.0): [1.0, 9.0],
    # hinge: max(0, 1 - beta h) = max(0, 0), max(0, 2)
    ("hinge", 0.0): [0.0, 2.0],
    # apo_zero: 1 - s(beta c) + s(beta r) = 1 - s(0.5) + s(-0.5), 1 - s(-0.5) + s(0.5)
    ("apo_zero", 0.0): [1 - sigmoid(0.5) + sigmoid(-0.5), 1 - sigmoid(-0.5) + sigmoid(0.5)],
}


@pytest.mark.parametrize(("loss_type", "smoothing"), list(HAND))
def test_each_loss_type_by_hand(loss_type, smoothing):
    loss, chosen, rejected = dpo_losses(POLICY_C, POLICY_R, REF_C, REF_R, BETA, loss_type, smoothing)
    assert loss.tolist() == pytest.approx(HAND[loss_type, smoothing], abs=1e-6)
    # implicit rewards: beta * log-ratio, whatever the loss
    assert chosen.tolist() == pytest.approx([0.5, -0.5]) and rejected.tolist() == pytest.approx([-0.5, 0.5])


def test_robust_without_noise_is_sigmoid_and_gradient_flows():
    policy_c = POLICY_C.clone().requires_grad_(True)
    loss, _, _ = dpo_losses(policy_c, POLICY_R, REF_C, REF_R, BETA, "robust", 0.0)
    assert loss.tolist() == pytest.approx(HAND["sigmoid", 0.0])
    loss.sum().backward()
    # d/dc of -log s(beta h) = -beta (1 - s(beta h)): pair 1 at beta h = 1, pair 2 at -1
    assert policy_c.grad.tolist() == pytest.approx([-BETA * (1 - sigmoid(1)), -BETA * (1 - sigmoid(-1))])


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_losses(POLICY_C, POLICY_R, REF_C, REF_R, BETA, "kto")


def sequences(logps, tokens, logits_sum=None) -> SequenceLogps:
    logps = torch.tensor(logps)
    return SequenceLogps(logps, torch.tensor(logits_sum or [0.0] * len(logps)), torch.tensor(tokens))


def test_implicit_reward_accuracy_margins_and_logged_names():
    # 3 pairs; rows: chosen 1..3 then rejected 1..3. Reference 0 everywhere (as reference_free).
    seq = sequences([-1.0, -4.0, -2.0, -3.0, -1.0, -2.0], [2.0, 4.0, 1.0, 3.0, 1.0, 2.0], [2.0, 8.0, 1.0, 3.0, 3.0, 4.0])
    opts = DPOOptions(beta=1.0)
    terms = pair_terms(seq, torch.zeros(6), opts)
    row = summarize(terms)
    # rewards: chosen (-1, -4, -2), rejected (-3, -1, -2): margins (2, -3, 0) -> only pair 1 counts (strictly)
    assert row["rewards/accuracies"] == pytest.approx(1 / 3)
    assert row["rewards/margins"] == pytest.approx(-1 / 3)
    assert row["rewards/chosen"] == pytest.approx(-7 / 3) and row["rewards/rejected"] == pytest.approx(-2.0)
    assert row["logps/chosen"] == pytest.approx(-7 / 3)
    # logits/*: per pair, the mean logit per response token (logits_sum / tokens), averaged over pairs
    assert row["logits/chosen"] == pytest.approx((1 + 2 + 1) / 3) and row["logits/rejected"] == pytest.approx((1 + 3 + 2) / 3)
    # the objective's sums give the same figures in the loop
    objective = DPOObjective(opts, reference=None)
    sums = {f"{k}_sum": float(v.sum()) for k, v in terms.items()}
    margins = terms["rewards/chosen"] - terms["rewards/rejected"]
    sums.update(correct=float((margins > 0).sum()), margin_sum=float(margins.sum()), num_pairs=3.0)
    logged = objective.finalize(sums)
    assert set(logged) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}
    assert logged == pytest.approx({k: v for k, v in row.items() if k in logged})


def test_ipo_uses_length_averaged_logps_and_rpo_adds_chosen_nll():
    # chosen: logp -4 over 4 tokens, rejected: -6 over 2 tokens; reference 0; beta 0.5
    seq = sequences([-4.0, -6.0], [4.0, 2.0])
    ipo = pair_terms(seq, torch.zeros(2), DPOOptions(beta=0.5, loss_type="ipo"))
    # averaged: c = -1, r = -3, h = 2 -> (2 - 1)^2 = 1
    assert ipo["loss"].item() == pytest.approx(1.0)
    rpo = pair_terms(seq, torch.zeros(2), DPOOptions(beta=0.5, rpo_alpha=0.5))
    # sigmoid on sums: h = 2, beta h = 1 -> log(1 + e^-1); plus 0.5 * (4 / 4 tokens) mean chosen NLL
    assert rpo["loss"].item() == pytest.approx(softplus(-1) + 0.5 * 1.0)
    assert rpo["nll_loss"].item() == pytest.approx(1.0)
