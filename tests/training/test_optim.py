"""AdamW as built by make_optimizer: fused where possible, the same update as the reference AdamW."""

import torch

from rlhf_cli.config.sections import TrainingConfig
from rlhf_cli.training.optim import make_optimizer


def test_fused_adamw_matches_the_reference_update_and_skips_decay_on_1d_params():
    torch.manual_seed(0)
    weights = [torch.randn(16, 8, requires_grad=True), torch.randn(8, requires_grad=True)]
    reference = [w.detach().clone().requires_grad_() for w in weights]
    training = TrainingConfig(learning_rate=1e-2, weight_decay=0.1)
    ours = make_optimizer(weights, training)
    assert ours.defaults["fused"] is True
    ref = torch.optim.AdamW([{"params": reference[:1], "weight_decay": 0.1}, {"params": reference[1:], "weight_decay": 0.0}],
                            lr=1e-2, foreach=False)
    for _ in range(5):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((weights, ours), (reference, ref)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(weights, reference, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
