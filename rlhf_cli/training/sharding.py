"""Models whose parameters are sharded between processes (FSDP 2, DeepSpeed ZeRO-3): their weights and
optimizer state gathered into plain tensors for the files rlhf writes (Hugging Face folders, checkpoints),
and put back on resume; the evaluation batches every process must run in step.

Under FSDP each parameter is a DTensor holding this process's shard; under ZeRO-3 each parameter is empty
outside the forward of its module, its shard held by DeepSpeed. Either way every forward gathers the whole
parameters of a block from all processes: whatever reads weights or runs a forward is a collective, so
every process calls it, the same number of times. Under DDP and ZeRO-2 (or one process) every function
here is the plain operation, so the files and figures are unchanged. (DeepSpeed's optimizer state, sharded
under ZeRO-2 as well, is checkpointed by DeepSpeed itself: training/checkpoint.py.)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from functools import partial

import torch
from accelerate.utils import DistributedType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from rlhf_cli.errors import UserError

# full (unsharded) tensors, on the CPU, held by the main process only (the others get {})
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(accelerator) -> bool:
    """FSDP (torch's sharded tensors and state-dict functions apply)."""
    return accelerator.distributed_type == DistributedType.FSDP


def zero_stage(accelerator) -> int:
    """DeepSpeed's ZeRO stage; 0 when DeepSpeed is not the engine."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def params_partitioned(accelerator) -> bool:
    """Every forward and every read of a weight is a collective: FSDP or ZeRO-3."""
    return is_sharded(accelerator) or zero_stage(accelerator) == 3


def on_every_process(accelerator, flag: bool) -> bool:
    """True where `flag` is true on every process (one all-reduce: every process must call it)."""
    count = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
    return round(count.item()) == accelerator.num_processes


def agreement(accelerator) -> Callable[[bool], bool] | None:
    """For a choice that changes which model calls a forward makes (lm/shared_prompts.py): this process's
    choice -> the one every process makes (true where all chose it); None where each may choose alone (one
    process, DDP). FSDP and ZeRO-3 gather the weights in every layer's forward, so every model call is a
    collective; ZeRO-1/2 reduce the gradients in buckets as they become ready, so a forward that will be
    backpropagated must take the same path on every process (else the buckets mix other parameters)."""
    if params_partitioned(accelerator):
        return partial(on_every_process, accelerator)
    if zero_stage(accelerator):
        return lambda choice: on_every_process(accelerator, choice) if torch.is_grad_enabled() else choice
    return None


def is_zero3_param(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def check_shardable(accelerator, model) -> None:
    """Exit 2, before anything is sharded, for what accelerate's FSDP 2 cannot wrap: an encoder-decoder model
    as the prepared module itself (sft, reward, dpo), whose one embedding is shared by encoder, decoder and
    LM head ("shared with a parameter already managed by another FSDP group"). Inside the online stages'
    policy wrapper (ppo, grpo, rloo) it is wrapped and trains as under DDP."""
    config = getattr(model, "config", None)
    if is_sharded(accelerator) and getattr(config, "is_encoder_decoder", False):
        raise UserError(f"FSDP: an encoder-decoder model ({config.model_type}) cannot be sharded for this stage "
                        "(its embedding is shared by encoder, decoder and LM head); launch with data parallel "
                        "instead (configs/accelerate/multi_gpu.yaml, cpu_ddp.yaml).")


def full_model_state(accelerator, model) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on the main process (None elsewhere); None everywhere when the model is
    not sharded (its own state_dict is whole: the caller saves it as it is). Collective under FSDP."""
    if not params_partitioned(accelerator):
        return None
    module = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3:  # the module (the engine's, or a part of it) whole on every process, copied
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} \
                if accelerator.is_main_process else None
    else:
        state = get_model_state_dict(module, options=GATHER)
    if not accelerator.is_main_process:
        return None
    for name in tied_aliases(module):  # gathered copies are separate tensors: save_pretrained would keep both
        state.pop(name, None)
    return state


def tied_aliases(module: torch.nn.Module) -> list[str]:
    """Names of parameters that are another name's parameter (a tied LM head), as the model's own
    state_dict would leave out when saved."""
    seen, aliases = set(), []
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.append(name)
        seen.add(id(param))
    return aliases


def load_full_model_state(accelerator, model, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load whole tensors (as read from a checkpoint folder) into the model, each process keeping its shard.
    Returns (missing, unexpected) keys, as `load_state_dict(strict=False)` does."""
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(model).load_state_dict(state, strict=False)
    result = set_model_state_dict(accelerator.unwrap_model(model), state,
                                  options=StateDictOptions(full_state_dict=True, strict=False))
    return list(result.missing_keys), list(result.unexpected_keys)


def adapter_state_for_model(module, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An adapter file's tensors under the names the peft-wrapped `module` has for them: the active adapter's
    name put back (`lora_A.weight` -> `lora_A.default.weight`, `score.weight` ->
    `score.modules_to_save.default.weight`), as peft's `set_peft_model_state_dict` does for a whole model."""
    name = module.active_adapter

    def saved_as(key: str) -> str:
        return key.replace(f".modules_to_save.{name}.", ".").replace(f".{name}.", ".")

    mapped = {key: saved[saved_as(key)] for key in module.state_dict() if saved_as(key) != key and saved_as(key) in saved}
    unused = sorted(set(saved) - {saved_as(key) for key in mapped})
    if unused:
        raise RuntimeError(f"adapter weights not in the model: {unused[:3]}")
    return mapped


def optimizer_state(accelerator, model, optimizer) -> dict | None:
    """What checkpoint-N/optimizer.pt holds: torch's state dict (parameters by index), or under FSDP the
    whole state keyed by parameter name (gathered on the main process; None elsewhere). Collective under FSDP."""
    if not is_sharded(accelerator):
        return optimizer.state_dict()
    state = get_optimizer_state_dict(accelerator.unwrap_model(model), _torch_optimizer(optimizer), options=GATHER)
    return state if accelerator.is_main_process else None


def load_optimizer_state(accelerator, model, optimizer, state: dict) -> None:
    if not is_sharded(accelerator):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(accelerator.unwrap_model(model), _torch_optimizer(optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # under accelerate's AcceleratedOptimizer


def synced_generation(model) -> bool | None:
    """`generate`'s `synced_gpus`: True for a model with FSDP-sharded parts, whose every decoding step is a
    collective (a process whose rows all stopped keeps stepping until every process's have); None elsewhere,
    leaving transformers' own choice (it detects DeepSpeed ZeRO-3, and FSDP only where it sharded the model)."""
    if any(isinstance(m, FSDPModule) for m in model.modules()) or any(is_zero3_param(p) for p in model.parameters()):
        return True
    return None


@contextmanager
def root_gathered(model):
    """Around `generate`, or a forward of an inner module, of a model FSDP shards: the root module's own
    parameters (embeddings, final norm, LM head, value head) gathered. FSDP gathers them in the root's
    forward, which neither passes through (peft's `generate` goes to the wrapped model's; the LoRA
    reference calls the policy inside the value-head wrapper); each block still gathers its own in its
    forward. Elsewhere: nothing."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as one plain tensor (collective for a DTensor or a ZeRO-3 parameter)."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    if is_zero3_param(tensor):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().clone()
    return tensor


def lockstep_batches(rows: list[int], batch_size: int, accelerator) -> list[tuple[list[int], int]]:
    """This process's rows in batches, as (row indices, how many of them are real). Under FSDP every process
    must run as many forwards as the others (also ZeRO-3), so a process with fewer batches runs extra ones of its
    first row (real count 0) whose results the caller drops."""
    batches = [(rows[i : i + batch_size], len(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]
    if not params_partitioned(accelerator):
        return batches
    most = int(accelerator.gather(torch.tensor([len(batches)], device=accelerator.device)).max())
    filler = rows[:1] or [0]
    return batches + [(filler, 0)] * (most - len(batches))
