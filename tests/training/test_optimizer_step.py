"""One optimizer step under a gradient scaler (fp16) and without one (training/optimizer_step.py).

fp16 needs a GPU in `accelerate`, so the scaler here is torch's CPU GradScaler inside accelerate's
AcceleratedOptimizer, driven through a stand-in for the two Accelerator methods the step uses,
which do what accelerate does under fp16 (unscale, then clip)."""

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from rlhf_cli.training.optimizer_step import optimizer_step


class Fp16Accelerator:
    distributed_type = DistributedType.NO

    def __init__(self, optimizer: AcceleratedOptimizer):
        self.scaler, self.optimizer = optimizer.scaler, optimizer

    def unscale_gradients(self):
        self.scaler.unscale_(self.optimizer.optimizer)  # raises if called twice before scaler.update()

    def clip_grad_norm_(self, params, max_norm):
        self.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class PlainAccelerator:
    scaler, distributed_type = None, DistributedType.NO

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


def backward(model, scaler, size: float):
    loss = model(torch.full((1, 3), size)).sum()
    (scaler.scale(loss) if scaler is not None else loss).backward()


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_fp16_overflow_is_skipped_by_the_scaler_and_training_goes_on(max_grad_norm):
    """The scaler's first scale overflows, as designed: the step is skipped and the scale halved,
    with no fault; the next steps apply. Stepping only on a finite norm would never let the scaler
    update, and the next clip would unscale twice and raise."""
    Accelerator(cpu=True)  # AcceleratedOptimizer reads the accelerate state
    model = torch.nn.Linear(3, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), scaler=scaler)
    accelerator = Fp16Accelerator(optimizer)
    before = model.weight.detach().clone()

    backward(model, scaler, 1e35)  # 1e35 * 65536 overflows float32
    outcome = optimizer_step(accelerator, optimizer, model.parameters(), max_grad_norm)
    optimizer.zero_grad()
    assert outcome.overflow and not outcome.applied and outcome.fault is None
    assert scaler.get_scale() == 2.0**15
    assert torch.equal(model.weight, before)

    for _ in range(2):
        backward(model, scaler, 1.0)
        outcome = optimizer_step(accelerator, optimizer, model.parameters(), max_grad_norm)
        optimizer.zero_grad()
        assert outcome.applied and not outcome.overflow and outcome.fault is None
    assert not torch.equal(model.weight, before)
    assert outcome.grad_norm == pytest.approx(2.0)  # unscaled: |d/dW| = |x| = sqrt(3), d/db = 1


def test_nan_gradient_without_a_scaler_is_a_fault_and_is_not_applied():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    backward(model, None, float("nan"))
    outcome = optimizer_step(PlainAccelerator(), optimizer, model.parameters(), 1.0)
    assert not outcome.applied and "NaN/inf" in outcome.fault
    assert torch.equal(model.weight, before)
