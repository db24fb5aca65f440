"""What trains in a pipeline and what a run writes (diffusion/policy.py): the LoRA file diffusers'
load_lora_weights reads back to the same UNet, the merged and the full pipelines from_pretrained loads."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from image_pipelines import unet_output
from image_pipelines import untrained_pipeline as make_pipe

from rlhf_cli.config.diffusion import UNetPeftConfig
from rlhf_cli.diffusion.policy import LORA_FILE, fuse_lora_weights, save_trained, trainable_unet
from rlhf_cli.errors import UserError


def trained_lora(alpha: int = 8):
    """A LoRA UNet whose adapters moved (B starts at zero: unmoved adapters would change nothing)."""
    pipe = make_pipe()
    torch.manual_seed(0)
    model = trainable_unet(pipe, UNetPeftConfig(use_peft=True, lora_r=4, lora_alpha=alpha))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return pipe, model


def test_full_training_freezes_vae_and_text_encoder_only():
    pipe = make_pipe()
    unet = trainable_unet(pipe, UNetPeftConfig(use_peft=False))
    assert unet is pipe.unet and all(p.requires_grad for p in unet.parameters())
    assert not any(p.requires_grad for p in [*pipe.vae.parameters(), *pipe.text_encoder.parameters()])


def test_lora_file_loads_into_a_fresh_pipeline_with_diffusers(tmp_path):
    pipe, model = trained_lora(alpha=8)  # alpha != r: the scale must travel with the weights
    expected = unet_output(model)
    assert not torch.allclose(expected, unet_output(make_pipe().unet))
    save_trained(pipe, model, tmp_path, UNetPeftConfig(use_peft=True))
    assert (tmp_path / LORA_FILE).is_file() and not (tmp_path / "merged").exists()

    fresh = make_pipe()
    fresh.load_lora_weights(tmp_path)
    torch.testing.assert_close(unet_output(fresh.unet), expected, rtol=1e-4, atol=1e-5)

    fused = make_pipe()
    fuse_lora_weights(fused, str(tmp_path))  # model.lora_weights: folded in, no adapter layers left
    assert not any("lora" in name for name, _ in fused.unet.named_parameters())
    torch.testing.assert_close(unet_output(fused.unet), expected, rtol=1e-4, atol=1e-5)


def test_save_merged_writes_a_whole_pipeline_with_the_lora_in_its_unet(tmp_path):
    pipe, model = trained_lora()
    expected = unet_output(model)
    save_trained(pipe, model, tmp_path, UNetPeftConfig(use_peft=True, save_merged=True))
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(unet_output(merged.unet), expected, rtol=1e-4, atol=1e-5)


def test_full_weights_write_the_pipeline_from_pretrained_loads(tmp_path):
    pipe = make_pipe()
    unet = trainable_unet(pipe, UNetPeftConfig(use_peft=False))
    with torch.no_grad():
        next(unet.parameters()).add_(0.1)
    save_trained(pipe, unet, tmp_path, UNetPeftConfig(use_peft=False))
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    torch.testing.assert_close(unet_output(loaded.unet), unet_output(unet))


def test_unknown_lora_targets_and_unreadable_lora_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="peft.lora_target_modules"):
        trainable_unet(make_pipe(), UNetPeftConfig(use_peft=True, lora_target_modules=["no_such_layer"]))
    with pytest.raises(UserError, match="model.lora_weights"):
        fuse_lora_weights(make_pipe(), str(tmp_path / "missing"))
