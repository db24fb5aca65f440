"""The DPO family of losses on per-pair sequence log-probs (TRL's `loss_type` names).

Inputs are (B,) tensors: the policy's and the reference's summed response log-probs of the chosen
and rejected responses. With the log-ratios to the reference

    c = log pi(y_c|x) - log ref(y_c|x),   r = log pi(y_r|x) - log ref(y_r|x),   h = c - r

the implicit reward of a response is beta * its log-ratio (Rafailov et al. 2023), and

    sigmoid  -(1-e) log s(beta h) - e log s(-beta h)          DPO; e = label_smoothing gives cDPO
    robust   (-(1-e) log s(beta h) + e log s(-beta h)) / (1-2e)   unbiased under label noise e
                                                                   (Chowdhury et al. 2024)
    ipo      (h - 1/(2 beta))^2                               IPO (Azar et al. 2023): a target margin
                                                              instead of an ever-growing one; the
                                                              caller passes length-averaged log-probs
    hinge    max(0, 1 - beta h)                               SLiC (Zhao et al. 2023)
    apo_zero (1 - s(beta c)) + s(beta r)                      APO-zero (D'Oosterlinck et al. 2024):
                                                              pushes chosen up and rejected down
                                                              each against the reference, for pairs
                                                              whose chosen beats the policy's own text
s is the logistic sigmoid. docs/dpo.md gives the reasons for each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "apo_zero")


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) log-probs -> (loss (B,), chosen reward (B,), rejected reward (B,)); rewards are detached."""
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    e = label_smoothing
    if loss_type == "sigmoid":
        loss = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        loss = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    elif loss_type == "apo_zero":
        loss = (1 - torch.sigmoid(beta * chosen_ratio)) + torch.sigmoid(beta * rejected_ratio)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    return loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
