"""One optimizer step with gradient clipping and the NaN/inf policy, shared by every training loop.

Two regimes, because "the gradient is not finite" means different things in each:

- **fp16 with a gradient scaler.** The scaler multiplies the loss by a large factor so small
  gradients survive float16, and its starting factor is meant to overflow in the first steps: it
  finds out how large it may be by overflowing, skipping that step and halving. It only learns of
  an overflow inside `optimizer.step()` (which runs `scaler.step` and `scaler.update`), so the step
  is always called and then asked whether it was skipped. An overflow the scaler handles is not a
  fault; checking the norm first and not stepping would leave the scaler's per-step state behind
  (the next clip would unscale twice and raise) and the scale would never come down.
- **No scaler (fp32, bf16).** A NaN/inf gradient norm is a real fault: the step is not applied and
  the caller decides to stop or skip the batch.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from rlhf_cli.training.sharding import is_sharded, whole


@dataclass
class StepOutcome:
    grad_norm: float | None  # the (unscaled) norm before clipping; None when not computed
    applied: bool  # the optimizer changed the weights
    overflow: bool = False  # fp16: the scaler skipped this step and lowered its scale (not a fault)

    @property
    def fault(self) -> str | None:
        """Why the step was refused (a NaN/inf gradient without a scaler), or None."""
        if self.applied or self.overflow:
            return None
        return f"the gradient norm is {self.grad_norm} (NaN/inf)"


def gradient_norm(params) -> torch.Tensor:
    """The 2-norm of all gradients together; of the whole gradients where they are FSDP shards (collective)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if any(isinstance(g, DTensor) for g in grads):  # sharded: each process's part, summed over processes
        return whole(torch.nn.utils.get_total_norm(grads))
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


@contextlib.contextmanager
def micro_batch(accelerator, model, last: bool):
    """Around one micro-batch's forward and backward: the last of an optimizer step's micro-batches syncs the
    gradients; the earlier ones accumulate locally (DDP's `no_sync`). DeepSpeed's engine reduces, clips and
    steps inside the backward of a micro-batch that accelerate marks as a step boundary (`sync_gradients`),
    so there the earlier micro-batches are marked as not one."""
    if last:
        yield
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.gradient_state._set_sync_gradients(False)
        try:
            yield
        finally:
            accelerator.gradient_state._set_sync_gradients(True)
    else:
        with accelerator.no_sync(model):
            yield


def optimizer_step(accelerator, optimizer, params, max_grad_norm: float) -> StepOutcome:
    """Clip (when `max_grad_norm` > 0), then step unless the gradient is NaN/inf; one host sync.

    The caller zeroes the gradients afterwards. With data parallelism the gradients are already
    all-reduced, so every process reaches the same decision. Under DeepSpeed the engine has already
    clipped (at the config's max_grad_norm, written into its config) and stepped in the last
    micro-batch's backward, or skipped a step with a NaN/inf norm (not in bf16, where it does not
    check); this reads the norm it took, and a NaN/inf one is reported as a step not applied."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        norm = accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        return StepOutcome(norm, applied=norm is None or math.isfinite(norm))
    if is_sharded(accelerator):
        # the parameters the optimizer holds: under FSDP the module's registered ones can be other objects at this
        # point (a PPO policy with a separate critic, or a T5 policy, listed none of the optimizer's: nothing was
        # clipped, and the run drifted from DDP's by 2e-3 in two iterations)
        params = [p for group in optimizer.param_groups for p in group["params"]]
    params = [p for p in params if p.requires_grad]
    if max_grad_norm > 0 and not is_sharded(accelerator):
        norm = accelerator.clip_grad_norm_(params, max_grad_norm)  # unscales first under a scaler
    else:  # also FSDP: accelerate clips there only when `params` are all of a model's (not so under LoRA)
        if accelerator.scaler is not None:
            accelerator.unscale_gradients()
        norm = gradient_norm(params)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
    norm = None if norm is None else float(norm)
    if accelerator.scaler is not None:
        optimizer.step()  # scaler.step + scaler.update: skips an overflowed step and lowers the scale
        skipped = bool(optimizer.step_was_skipped)
        return StepOutcome(norm, applied=not skipped, overflow=skipped)
    if norm is not None and not math.isfinite(norm):
        return StepOutcome(norm, applied=False)
    optimizer.step()
    return StepOutcome(norm, applied=True)
