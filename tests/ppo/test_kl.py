"""KL estimators and the KL coefficient controllers."""

import json

import pytest
import torch
from torch.testing import assert_close

from rlhf_cli.ppo.kl import AdaptiveKLController, FixedKLController, kl_per_token, make_kl_controller

# B=2, T=2
LOGP = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
REF = torch.tensor([[-2.0, -1.0], [-0.5, -3.0]])


def test_k1_is_the_log_ratio():
    # -1 - (-2) = 1 ; -2 - (-1) = -1 ; equal -> 0
    assert_close(kl_per_token(LOGP, REF, "k1"), torch.tensor([[1.0, -1.0], [0.0, 0.0]]))


def test_k3():
    # r = exp(ref - logp).  logp=-1, ref=-2: r = e^-1, k3 = (e^-1 - 1) - (-1) = e^-1 = 0.3678794
    # logp=-2, ref=-1: r = e, k3 = (e - 1) - 1 = e - 2 = 0.7182818 ; equal: (1 - 1) - 0 = 0
    assert_close(kl_per_token(LOGP, REF, "k3"), torch.tensor([[0.3678794, 0.7182818], [0.0, 0.0]]))


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(LOGP, REF, "k2")


def test_fixed_controller_never_moves_and_round_trips():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=64)
    assert ctl.value == 0.05
    state = json.loads(json.dumps(ctl.state_dict()))
    other = FixedKLController(1.0)
    other.load_state_dict(state)
    assert other.value == 1.0  # a fixed coefficient is configuration: a resumed run uses the configured one


def test_adaptive_controller_with_error_clip():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # KL 9: e = 9/6 - 1 = 0.5 -> clipped to 0.2; value = 0.1 * (1 + 0.2 * 1000/10000) = 0.1 * 1.02 = 0.102
    ctl.update(current_kl=9.0, n_steps=1000)
    assert ctl.value == pytest.approx(0.102)
    # KL 5.4: e = 0.9 - 1 = -0.1 (inside the clip); value = 0.102 * (1 - 0.1 * 0.1) = 0.102 * 0.99 = 0.10098
    ctl.update(current_kl=5.4, n_steps=1000)
    assert ctl.value == pytest.approx(0.10098)
    # KL 0: e = -1 -> clipped to -0.2; value = 0.10098 * (1 - 0.02) = 0.0989604
    ctl.update(current_kl=0.0, n_steps=1000)
    assert ctl.value == pytest.approx(0.0989604)

    state = json.loads(json.dumps(ctl.state_dict()))
    restored = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    restored.load_state_dict(state)
    assert restored.value == pytest.approx(0.0989604)


def test_make_kl_controller():
    fixed = make_kl_controller(0.05, adaptive=False, target_kl=6.0, horizon=10_000)
    adaptive = make_kl_controller(0.05, adaptive=True, target_kl=6.0, horizon=10_000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    assert (
        isinstance(adaptive, AdaptiveKLController) and adaptive.target == 6.0 and adaptive.horizon == 10_000
    )
