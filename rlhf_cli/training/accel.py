"""The Accelerator for a run: processes, device, mixed precision, trackers, seeding."""

import logging
import os
import sys
import warnings
from pathlib import Path

import accelerate.utils.other
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
    ProjectConfiguration,
    disable_fsdp_ram_efficient_loading,
    set_seed,
)

from rlhf_cli.config.sections import TrainingConfig
from rlhf_cli.errors import UserError
from rlhf_cli.training.sharding import whole

log = logging.getLogger(__name__)


def mixed_precision(training: TrainingConfig) -> str:
    """'no', 'bf16' or 'fp16', with a clear error where the hardware cannot do it."""
    cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
    if training.fp16:
        if not cuda:
            raise UserError("training.fp16: float16 mixed precision needs a CUDA GPU; use training.bf16 or neither.")
        return "fp16"
    if training.bf16:
        if cuda and not torch.cuda.is_bf16_supported():
            raise UserError("training.bf16: this GPU does not support bfloat16; use training.fp16 instead.")
        return "bf16"
    return "no"


def unwrap_without_importing_deepspeed() -> None:
    """Make accelerate's unwrapping (`unwrap_model`, and transformers' `save_pretrained` through it) import
    DeepSpeed only where it can be in use.

    To test whether a model is DeepSpeed's engine, accelerate imports deepspeed whenever it is installed:
    1.3 s of every process here (1 s of it mlflow, which DeepSpeed's autotuner imports), in runs that never
    use it. A model can only be that engine once deepspeed has been imported, so the test is skipped until
    then; `is_deepspeed_available` in that module serves this test alone (accelerate 1.16)."""
    check = accelerate.utils.other.is_deepspeed_available
    if getattr(check, "rlhf_lazy", False):
        return

    def imported_and_available() -> bool:
        return "deepspeed" in sys.modules and check()

    imported_and_available.rlhf_lazy = True
    accelerate.utils.other.is_deepspeed_available = imported_and_available


def make_accelerator(training: TrainingConfig, output_dir: Path) -> Accelerator:
    """One Accelerator per run. Gradient accumulation is done by the loop itself (it needs the
    token count of the whole accumulated batch to normalise the loss). The trackers of
    training.report_to are named here and started once the output folder is ready
    (training/trackers.py); tensorboard writes under <output_dir>/tensorboard."""
    precision = mixed_precision(training)
    unwrap_without_importing_deepspeed()
    cpu = not torch.cuda.is_available()
    if cpu and asked_for("ACCELERATE_USE_DEEPSPEED"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        if PartialState._shared_state.get("distributed_type") == DistributedType.DEEPSPEED:
            # an earlier stage in this process (a recipe) switched it; the new Accelerator must start from what
            # accelerate chose (it would look for a DeepSpeed plugin that is not set up yet)
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        log_with=list(training.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
    )
    if cpu and asked_for("ACCELERATE_USE_FSDP") and accelerator.num_processes > 1:
        shard_on_cpu(accelerator)
    if cpu and asked_for("ACCELERATE_USE_DEEPSPEED") and accelerator.num_processes > 1:
        deepspeed_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin, training)
    load_models_whole(accelerator)
    set_seed(training.seed)
    return accelerator


def load_models_whole(accelerator: Accelerator) -> None:
    """Every process loads every model whole, as for built-in models; the engine shards the trained one when
    it is prepared. The engines' settings that transformers' `from_pretrained` reads would do otherwise:
    - DeepSpeed: accelerate leaves its config where transformers reads it, and under ZeRO-3 `from_pretrained`
      then partitions every model as it loads it (deepspeed.zero.Init). The frozen models (reference, reward
      model, text encoder), which no engine holds, were unusable, and the evaluation before training read
      empty weights (SFT from a model folder failed with "'weight' must be 2-D", PPO with "torch.cat():
      expected a non-empty list").
    - FSDP with `fsdp_cpu_ram_efficient_loading`: transformers leaves the weights a checkpoint lacks (a new
      score head) on the meta device on every process but the first, for FSDP to copy the first one's at
      prepare. A critic's head, copied into the value head before that, had no data ("Cannot copy out of meta
      tensor"), as would a frozen reward model's. The stored weights load on every process either way, so
      this costs the fresh weights' initialisation alone; the plugin, already built, still copies the first
      process's weights at prepare (equal ones now).
    The environment variable this sets goes with the stage (recipe/runner.py restores the environment)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    elif accelerator.distributed_type == DistributedType.FSDP:
        disable_fsdp_ram_efficient_loading()


def asked_for(variable: str) -> bool:
    return os.environ.get(variable, "false").lower() == "true"


def shard_on_cpu(accelerator: Accelerator) -> None:
    """FSDP on CPU processes (gloo), as the launcher's config asks: accelerate applies FSDP on accelerators
    only and would run these processes as plain data parallel, although FSDP 2 itself (torch's fully_shard)
    runs on CPU tensors. Switching the state before anything is prepared makes `prepare` shard the model
    with the plugin read from the launcher's FSDP_* variables, exactly as on GPUs
    (tests/test_fsdp.py: equal to DDP's results)."""
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UserError("FSDP on CPU processes: rlhf runs FSDP 2 there (fsdp_version: 2 in the accelerate config); "
                        "FSDP 1 needs GPUs.")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    # both shared states: every later AcceleratorState() copies PartialState's over its own (as accelerate
    # itself does when it picks FSDP on a GPU)
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def deepspeed_on_cpu(accelerator: Accelerator) -> None:
    """DeepSpeed ZeRO on CPU processes, as the launcher's config asks (DeepSpeed's CPU accelerator over the
    processes' gloo group): accelerate applies DeepSpeed on accelerators only. As `shard_on_cpu`, the state is
    switched before anything is prepared, with the plugin read from the launcher's ACCELERATE_DEEPSPEED_*
    variables, as accelerate reads it on GPUs (tests/test_deepspeed.py: equal to DDP's results)."""
    try:
        import deepspeed.comm
    except ImportError as error:
        raise UserError(f"the launcher asks for DeepSpeed, which is not installed here ({error}); "
                        "pip install 'rlhf-cli[deepspeed]', or launch without it.") from error
    deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # joins the processes' group
    plugin = DeepSpeedPlugin()
    if plugin.zero_stage not in (2, 3):
        raise UserError(f"DeepSpeed on CPU processes: rlhf runs ZeRO stage 2 or 3 there, not {plugin.zero_stage} "
                        "(zero_stage in the accelerate config).")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.deepspeed_plugins = {"default": plugin}
    plugin.select(_from_accelerator_state=True)
    accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED


def configure_deepspeed(plugin: DeepSpeedPlugin, training: TrainingConfig) -> None:
    """What the training loop decides itself, written into DeepSpeed's config (GPUs and CPUs alike): one
    micro-batch of per_device_train_batch_size per engine backward, accumulation left to the loop (it marks
    the step boundary: training/optimizer_step.py `micro_batch`), clipping at training.max_grad_norm, and
    ZeRO-3's weights gathered whole when a model is saved."""
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = training.per_device_train_batch_size
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = training.max_grad_norm
    config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
    # DeepSpeed's ZeRO calls all_gather_into_tensor and reduce_scatter_tensor, which torch 2.13 deprecates: a
    # FutureWarning per call, dozens per step in the run's log, that only DeepSpeed can act on
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                            FutureWarning)


ENGINES = {DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.FSDP: "FSDP"}
# The stages whose path under each engine has run: FSDP 2 and DeepSpeed ZeRO-2/3 on CPU processes, against
# DDP, with resume (tests/test_fsdp.py, tests/test_deepspeed.py). A stage added later warns until it is there.
TESTED_UNDER = {"FSDP": ("sft", "reward", "dpo", "ppo", "grpo", "rloo", "ddpo"),
                "DeepSpeed": ("sft", "reward", "dpo", "ppo", "grpo", "rloo", "ddpo")}
# What `accelerate launch` exports when its config asks for an engine; accelerate applies either on GPUs
# only (rlhf applies them to CPU processes itself: `shard_on_cpu`, `deepspeed_on_cpu`).
LAUNCHER_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP"}


def launch_warnings(accelerator: Accelerator, stage: str) -> list[str]:
    """What a user should know about how the run was launched, said at start-up instead of found out later:
    an engine rlhf has not been tested under for this stage, an engine the launcher asked for that is not
    applied (one process), and a launcher's mixed precision that the config overrides
    (`accelerate launch` exports its config's `mixed_precision`; training.bf16 / training.fp16 decide)."""
    warnings = []
    engine = ENGINES.get(accelerator.distributed_type)
    if engine is not None and stage not in TESTED_UNDER.get(engine, ()):
        tested = ", ".join(TESTED_UNDER.get(engine, ())) or "none"
        warnings.append(f"{engine}: rlhf {stage} has not been tested under {engine} yet (stages tested: {tested}); "
                        "generation with sharded parameters, checkpoints and resume may fail.")
    for variable, asked in LAUNCHER_ENGINES.items():
        if asked_for(variable) and engine != asked:
            warnings.append(f"the launcher asks for {asked}, but accelerate runs this as {accelerator.distributed_type.value} "
                            f"({accelerator.num_processes} process(es) on {accelerator.device.type}): one process has "
                            "nothing to shard with, so it holds the whole model.")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", accelerator.mixed_precision):
        warnings.append(f"the launcher asks for mixed precision {launcher!r}, but this run uses "
                        f"{accelerator.mixed_precision!r}: rlhf takes it from training.bf16 / training.fp16 in the "
                        "config (set one of them, or mixed_precision: \"no\" in the accelerate config).")
    return warnings


@torch.no_grad()
def replica_checksum(accelerator: Accelerator, model) -> float:
    """A checksum of the weights, checked to be identical on every process.

    Data-parallel replicas must hold bit-identical weights after every step (FSDP shards: the gathered
    weights, identical by construction, so the checksum compares with a DDP run's); a mismatch means a
    broken setup (e.g. a process that skipped a step), so it stops the run instead of saving.
    """
    params = [whole(p) for p in accelerator.unwrap_model(model).parameters()]  # FSDP: gathered (collective)
    local = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()]) for p in params]).flatten()
    local = local.to(accelerator.device)
    everyone = accelerator.gather(local.unsqueeze(0))  # (processes, 2 * params)
    if not bool((everyone == everyone[0]).all()):
        raise RuntimeError("data-parallel processes ended with different weights; the run is not consistent")
    checksum = float(local.sum())
    if accelerator.num_processes > 1:
        log.info("all %d processes hold identical weights (checksum %.6e)", accelerator.num_processes, checksum)
    return checksum
