"""The pairwise (Bradley–Terry) reward-model loss, as a pure tensor function.

Bradley & Terry (1952) model the probability that response c is preferred to response r as
sigmoid(r_c - r_r). Maximising the likelihood of the human choice gives the loss of Stiennon et
al. (2020) and Ouyang et al. (2022):

    loss_i = -log sigmoid(r_c,i - r_r,i - m_i)  +  center * (r_c,i + r_r,i)^2

- m_i (optional, Llama 2, Touvron et al. 2023): a per-pair margin the chosen reward must beat the
  rejected one by; a pair rated "much better" can ask for a larger gap.
- center (optional, Eisenstein et al. 2023): the loss only sees differences of rewards, so any
  constant may be added to every reward; the penalty on (r_c + r_r)^2 pins that constant near zero,
  which keeps PPO's raw scores in a sensible range.
"""

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Per-pair loss (B,) from the rewards of the chosen (B,) and rejected (B,) responses.

    The caller sums or averages; the training loop sums and divides by the pairs of the whole step.
    `logsigmoid` rather than `log(sigmoid(.))`: it stays finite for large negative differences.
    """
    difference = chosen - rejected  # (B,)
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference)  # (B,)
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen + rejected) ** 2
    return loss
