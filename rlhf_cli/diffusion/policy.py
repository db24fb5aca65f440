"""What of a text-to-image pipeline trains (its UNet, whole or through LoRA), and how the result is written.

LoRA goes through peft (`get_peft_model` on the UNet: the adapter layers are injected into the UNet
module itself, so the pipeline samples with them). The run's output is what diffusers loads as it is:
the whole pipeline (`StableDiffusionPipeline.from_pretrained(output_dir)`), or for LoRA the adapter in
diffusers' format, `pytorch_lora_weights.safetensors` with the LoRA config in its metadata
(`pipe.load_lora_weights(output_dir)`), optionally with the merged pipeline in `merged/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from rlhf_cli.config.diffusion import UNET_LORA_TARGETS, UNetPeftConfig
from rlhf_cli.errors import UserError
from rlhf_cli.models.adapters import whole_copy

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: load_lora_weights(folder) finds it


def trainable_unet(pipe, peft_cfg: UNetPeftConfig):
    """Freeze the VAE and the text encoder; return the UNet with all its weights trainable, or a peft
    LoRA model around it (only the adapters train; gaussian init of A, zeros for B, as TRL's DDPO)."""
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if not peft_cfg.use_peft:
        pipe.unet.requires_grad_(True)
        return pipe.unet
    pipe.unet.requires_grad_(False)
    config = LoraConfig(r=peft_cfg.lora_r, lora_alpha=peft_cfg.lora_alpha, lora_dropout=peft_cfg.lora_dropout,
                        target_modules=list(peft_cfg.lora_target_modules or UNET_LORA_TARGETS),
                        init_lora_weights="gaussian")
    try:
        model = get_peft_model(pipe.unet, config)
    except ValueError as error:  # no module matches the targets
        raise UserError(f"peft.lora_target_modules: {' '.join(str(error).split())[:300]}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA on the UNet's %s: %d of %d parameters train (%.2f%%)", ", ".join(sorted(config.target_modules)),
             trainable, total, 100 * trainable / total)
    return model


def fuse_lora_weights(pipe, source: str) -> None:
    """Load LoRA weights (a folder or file diffusers' load_lora_weights reads) and fold them into the UNet:
    the pipeline then computes with them and has no adapter layers left."""
    try:
        pipe.load_lora_weights(source)
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"model.lora_weights: cannot load LoRA weights from {source!r}: "
                        f"{' '.join(str(error).split())[:300]}") from None
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    log.info("LoRA weights from %s fused into the UNet", source)


def lora_state(model: PeftModel) -> dict:
    """The adapter's tensors with the UNet's own module names (peft's wrapper prefix removed)."""
    return {k.removeprefix("base_model.model."): v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(model).items()}


def save_trained(pipe, unet, output_dir: Path, peft_cfg: UNetPeftConfig, state_dict: dict | None = None) -> None:
    """The run's result at the top of output_dir: the pipeline, or the LoRA weights (+ `merged/`).
    `state_dict`: the UNet's weights gathered from its shards (FSDP, ZeRO-3: training/sharding.py
    full_model_state), written through a whole copy of it."""
    if state_dict is not None:
        unet = whole_copy(unet, state_dict)
    if not isinstance(unet, PeftModel):
        pipe.unet = unet
        pipe.save_pretrained(output_dir, safe_serialization=True)
        return
    config = unet.peft_config["default"]
    type(pipe).save_lora_weights(output_dir, unet_lora_layers=lora_state(unet),
                                 unet_lora_adapter_metadata=config.to_dict(), weight_name=LORA_FILE)
    if peft_cfg.save_merged:
        pipe.unet = unet.merge_and_unload()  # folds the adapter into the UNet's weights, in place
        pipe.save_pretrained(output_dir / "merged", safe_serialization=True)
        log.info("the pipeline with the LoRA merged into its UNet written to %s", output_dir / "merged")
