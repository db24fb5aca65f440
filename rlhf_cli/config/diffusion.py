"""The config of `rlhf ddpo`: a text-to-image pipeline, LoRA on its UNet, prompts, and DDPO's options
under the names TRL's `DDPOConfig` gave them (docs/ddpo.md)."""

from dataclasses import dataclass

from rlhf_cli.config.fields import option, section
from rlhf_cli.config.sections import DataConfig, PeftConfig, TrainingConfig

# The attention projections of a Stable Diffusion UNet, where LoRA for diffusion models usually goes
# (TRL's DDPO and diffusers' training scripts adapt the same four).
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@dataclass
class PipelineModelConfig:
    model_name_or_path: str = option(
        "builtin:tiny-sd",
        "The text-to-image pipeline: a Hub id or local folder of a Stable-Diffusion-style diffusers pipeline "
        "(model_index.json with scheduler, unet, vae, text_encoder, tokenizer), or `builtin:tiny-sd[?seed=N]`, "
        "the offline world's 32x32 shapes pipeline. Its scheduler is made a DDIMScheduler from its own config.",
    )
    lora_weights: str | None = option(
        None,
        "A folder (or file) of LoRA weights for the UNet, as `rlhf ddpo` with peft writes them "
        "(pytorch_lora_weights.safetensors); loaded with diffusers' load_lora_weights and fused into the UNet "
        "before training or evaluation. null: none.",
    )


@dataclass
class UNetPeftConfig(PeftConfig):
    use_peft: bool = option(
        True, "Train LoRA adapters on the UNet (through `peft`) instead of all its weights; the VAE and the "
        "text encoder are always frozen."
    )
    lora_r: int = option(4, "LoRA rank.", min=1)
    lora_alpha: int = option(4, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).", min=1)
    lora_dropout: float = option(0.0, "Dropout on the LoRA branch during training.", min=0.0, max=1.0)
    lora_target_modules: list[str] | None = option(
        list(UNET_LORA_TARGETS), "UNet modules to adapt; null: the same default, the attention projections."
    )
    save_merged: bool = option(
        False, "Also write the whole pipeline with the LoRA fused into its UNet, in `<output_dir>/merged`."
    )


@dataclass
class ImagePromptDataConfig(DataConfig):
    dataset_name: str = option(
        "builtin:shape-prompts",
        "Prompts: a `builtin:` name (`builtin:shape-prompts`: the shapes world's 42 training and 12 held-out "
        "prompts), Hub name, local file or `save_to_disk` folder.",
    )
    prompt_column: str = option("prompt", "Column holding the prompt text; the other columns reach reward functions.")


@dataclass
class ImageRewardSourceConfig:
    """One image reward. A plain string in `reward.sources` is its `function`."""

    SHORTHAND = "function"
    function: str | None = option(
        None,
        "The reward of each image: `builtin:jpeg_compressibility` (minus the JPEG size in kB: flat images "
        "win), `builtin:jpeg_incompressibility` (plus it: detail wins), `builtin:alignment` (the built-in "
        "shapes world's prompt-alignment score in [0, 1]), or any Python callable `package.module:callable` "
        "taking (images, prompts, metadata) - images a float32 tensor (B, 3, H, W) in [0, 1] on the CPU, "
        "prompts B strings, metadata B dicts of the prompt rows' other dataset columns - and returning one "
        "finite number per image (a list, a 1-D numpy array or a 1-D tensor).",
    )
    weight: float = option(
        1.0, "Weight of this reward in the combined reward (negative: a penalty; 0: logged, not trained on)."
    )


@dataclass
class ImageRewardConfig(ImageRewardSourceConfig):
    sources: list[ImageRewardSourceConfig] = option(
        [],
        "Several image rewards combined as a weighted sum (instead of `function` above): a list of "
        "{function, weight} mappings, or of function strings (weight 1).",
    )


@dataclass
class DDPOOptions:
    num_epochs: int = option(100, "Rounds of sampling then training (one logged step each).", min=1)
    sample_num_steps: int = option(50, "DDIM denoising steps per image.", min=1)
    sample_eta: float = option(
        1.0, "DDIM eta: the sampler's noise (1: DDPM's variance). DDPO needs a stochastic sampler, so > 0.",
        min=0.0, max=1.0,
    )
    sample_guidance_scale: float = option(
        5.0, "Classifier-free guidance scale while sampling (and in the update with train_cfg); <= 1: none.", min=0.0
    )
    sample_batch_size: int = option(1, "Images sampled per batch, per process.", min=1)
    sample_num_batches_per_epoch: int = option(2, "Sampling batches per epoch, per process.", min=1)
    train_batch_size: int = option(
        1, "Images per training micro-batch (each trained on its selected timesteps); must divide sample_batch_size.",
        min=1,
    )
    train_gradient_accumulation_steps: int = option(
        1, "Micro-batches (each with all its timesteps) per optimizer step; the epoch's micro-batches must be a "
        "multiple of it.", min=1,
    )
    train_num_inner_epochs: int = option(1, "Passes of the update over each epoch's samples.", min=1)
    train_timestep_fraction: float = option(
        1.0, "Share of each image's denoising steps trained on, drawn at random per image and pass.",
        greater_than=0.0, max=1.0,
    )
    train_timesteps_per_call: int | None = option(
        1, "Denoising steps of a micro-batch scored in one UNet call (a call of train_batch_size x this rows, "
        "doubled with guidance): the same gradient as one step per call (TRL's way), in fewer, larger calls, "
        "faster where memory allows. null: all of an image's selected steps in one call.", min=1,
    )
    train_clip_range: float = option(
        1e-4, "Clip range of the importance ratio (small: the log-probability is a mean over latent dimensions).",
        greater_than=0.0,
    )
    train_adv_clip_max: float = option(5.0, "Clip advantages to [-train_adv_clip_max, train_adv_clip_max].",
                                       greater_than=0.0)
    train_cfg: bool = option(
        True, "Apply classifier-free guidance in the update as when sampling (false: the conditional UNet output "
        "alone, so the first ratio is not 1 when sampling used guidance).",
    )
    loss_type: str = option(
        "clipped",
        "`clipped`: DDPO-IS, the PPO-style clipped importance ratio (several updates per batch of samples); "
        "`score_function`: DDPO-SF, REINFORCE (meant for one optimizer step per epoch).",
        choices=("clipped", "score_function"),
    )
    per_prompt_stat_tracking: bool = option(
        False, "Normalise each reward with the recent rewards of its own prompt (else over the whole batch)."
    )
    per_prompt_stat_tracking_buffer_size: int = option(16, "Rewards kept per prompt for its statistics.", min=1)
    per_prompt_stat_tracking_min_count: int = option(
        16, "Rewards a prompt needs before its own statistics are used (else the batch's).", min=1
    )
    eval_samples_per_prompt: int = option(
        2, "Images per held-out prompt (fixed seeds) for the eval/ metrics; 0: no evaluation.", min=0
    )
    grid_prompts: list[str] | None = option(
        None, "Prompts of the PNG grid of samples (one row each); null: the first 4 held-out prompts (or training "
        "prompts without a held-out split).",
    )
    grid_seeds: list[int] = option([0, 1, 2, 3], "Seeds of the grid's columns: the same noise at every epoch.", min=0)
    grid_epochs: int = option(
        1, "Write grids/epoch-<N>.png every this many epochs (and before the first, and at the end); 0: never.", min=0
    )
    eval_only: bool = option(
        False, "Only score the pipeline on the held-out prompts and write its grid (eval.json, grids/eval.png): "
        "no training.",
    )


@dataclass
class DDPOConfig:
    model: PipelineModelConfig = section(PipelineModelConfig, "The text-to-image pipeline whose UNet is trained.")
    peft: UNetPeftConfig = section(UNetPeftConfig, "LoRA adapters on the UNet (the default), or all its weights.")
    data: ImagePromptDataConfig = section(ImagePromptDataConfig, "The prompts (train split; held-out: test split).")
    training: TrainingConfig = section(
        TrainingConfig, "Optimisation (learning rate, AdamW, max_grad_norm, schedule), seed, precision, logging, "
        "checkpoints; logging_steps, eval_steps and save_steps count epochs.",
    )
    reward: ImageRewardConfig = section(ImageRewardConfig, "What scores an image.")
    ddpo: DDPOOptions = section(DDPOOptions, "Sampling, advantages and the update, with TRL DDPOConfig's key names.")
