"""KL to the reference policy: per-token estimators and the KL coefficient controllers.

Implementation details 3 and 4. The reward is penalised by kl_coef * KL(pi || pi_ref) so the policy
stays close to the reference (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", eq. 2: R(x, y) = r(x, y) - beta * log(pi(y|x) / rho(y|x))).
"""

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3"]


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probabilities of the sampled tokens.

    logprobs, ref_logprobs: (B, T) log pi(y_t) and log pi_ref(y_t)  ->  (B, T).
    With r = pi_ref(y_t) / pi(y_t) (J. Schulman, "Approximating KL divergence", 2020):
        k1 = -log r = logprobs - ref_logprobs      unbiased, can be negative per token
        k3 = (r - 1) - log r                       unbiased, always >= 0, lower variance
    Padding positions are not masked here: callers mask.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        log_r = -log_ratio
        return torch.expm1(log_r) - log_r  # expm1 keeps precision when r is close to 1
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float):
        if value < 0:
            raise ValueError(f"kl_coef must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Nothing to restore: a fixed coefficient is configuration, so a resumed run uses the
        configured one (a changed `kl_coef` applies from the resumed iteration on)."""


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards a target (Ziegler et al. 2019, sec. 2.2):

        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    `n_steps` is the number of episodes in the batch just collected and `horizon` is counted in
    episodes too (lm-human-preferences used 10,000), so the adaptation speed does not depend on
    the batch size. The clip keeps one odd batch from moving beta by more than 20% per horizon.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"KL horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient. Target and horizon stay as configured for this run, so a resumed
        run may change them; they are saved only to document the checkpoint."""
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(kl_coef: float, adaptive: bool, target_kl: float, horizon: float) -> KLController:
    """The controller the config asks for; `target_kl` and `horizon` are used only when adaptive."""
    if adaptive:
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    return FixedKLController(kl_coef)
