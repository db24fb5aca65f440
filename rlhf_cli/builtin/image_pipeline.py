"""The built-in text-to-image pipeline: a tiny Stable Diffusion that learned to draw ``shapes.py``.

DDPO needs a policy that already draws what a prompt says: a random UNet makes noise, and "the
reward went up" means little on noise. So the offline world ships a Stable-Diffusion-style pipeline
built from stock diffusers/transformers classes and trained, deterministically from a seed, on the
shapes world's 42 training prompts (held-out colour/shape pairs are never seen):

    tokenizer     CLIPTokenizer, 567 tokens: the byte symbols plus one token per grammar word;
                  prompts padded to 12 tokens (the longest has 9 with bos and eos)
    text_encoder  CLIPTextModel, 2 layers x 32 wide (36k parameters), trained with the UNet
    vae           AutoencoderKL, 32x32x3 images <-> 4x8x8 latents, channels (8, 16, 32) (165k)
    unet          UNet2DConditionModel on 4x8x8 latents, channels (16, 32), cross-attention at 4x4
                  and in the mid block, epsilon prediction (253k)
    scheduler     DDIMScheduler with Stable Diffusion's schedule (scaled_linear 0.00085-0.012, 1000 steps)

Training (``Recipe``): the VAE on reconstruction, 500 steps; then the UNet and text encoder on the
noise-prediction loss with Min-SNR weights, 700 steps of 128, the prompt replaced by "" for 10% of
examples so classifier-free guidance works. Residual branches start at zero, as in the original
Stable Diffusion code, which is what lets so few steps learn anything.

What it reaches (seed 0; alignment = ``shapes.alignment``, mean over 4 samples of every prompt,
10 DDIM steps, eta 0, guidance 3): training prompts 0.54, held-out prompts 0.43; the same images
scored against a random other prompt 0.02, and an untrained pipeline 0.02. It draws the prompted
colour (0.95 of the shape's pixels) and background (0.99) and triangles clearly; circles and squares
are often rounded squares (shape factor 0.57), which leaves an alignment reward room to improve.

Cost, one CPU thread of a busy 2-core machine: build ~2 min (VAE 32 s, the rest the UNet); load from
the cache 0.1 s; 32 images in 10 DDIM steps with guidance 0.3 s. Under contention keep torch to one
thread (``OMP_NUM_THREADS=1``): two threads on two busy cores ran the training steps 10x slower.

``build_tiny_pipeline(seed)`` returns the pipeline, building it on first use and then loading it
from ``$RLHF_CACHE/builtin/pipelines/tiny-sd-seed<seed>-<hash>/`` (default cache ``~/.cache/rlhf``),
a plain ``save_pretrained`` folder that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads
as it is (no safety checker). The hash covers the recipe and this module's and ``shapes.py``'s source,
so editing either rebuilds instead of reusing stale weights. The folder is written atomically (built in a
temporary sibling, then renamed), so concurrent processes never see half a pipeline.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rlhf_cli.builtin import shapes
from rlhf_cli.builtin.cache import cache_root, write_atomically

log = logging.getLogger(__name__)

NAME = "tiny-sd"
PIPELINE_VERSION = 1
MAX_PROMPT_TOKENS = 12
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class Recipe:
    """Everything besides the seed that decides the trained weights (hashed into the cache folder's name).

    The defaults were tuned for the build budget (about two minutes of one CPU core); see the module
    docstring for what they reach. Tests pass a smaller recipe.
    """

    prompts: tuple[str, ...] | None = None  # what to learn to draw; None: the 42 training prompts
    images_per_prompt: int = 48  # jittered renders of each prompt
    vae_channels: tuple[int, int, int] = (8, 16, 32)  # three levels: 32x32 -> 16x16 -> 8x8
    vae_steps: int = 500
    vae_batch_size: int = 16
    vae_learning_rate: float = 3e-3
    vae_latent_l2: float = 1e-4  # keeps latents near the origin (the part of a KL term that matters here)
    text_hidden: int = 32
    unet_channels: tuple[int, ...] = (16, 32)  # 8x8 then 4x4
    unet_attention: tuple[bool, ...] = (False, True)  # cross-attention at 4x4 (and in the mid block)
    unet_steps: int = 700
    unet_batch_size: int = 128
    unet_learning_rate: float = 3e-3
    uncond_prob: float = 0.1  # share of prompts replaced by "" so classifier-free guidance works
    min_snr_gamma: float | None = 5.0


RECIPE = Recipe()


# --- components ---------------------------------------------------------------------------------


def build_tokenizer() -> CLIPTokenizer:
    """A stock CLIPTokenizer whose vocabulary is CLIP-shaped but tiny (~570 tokens).

    Vocabulary: bos, eos, the 256 byte symbols of byte-level BPE (alone and ending a word, as CLIP
    has them), then one token per merge, with merges learned by BPE over the prompt grammar's words
    until every word is a single token. Other text still encodes, byte by byte. Built by plain code
    (no trainer, whose tie-breaking is not specified), so the ids are the same everywhere.
    """
    symbols = _byte_symbols()
    vocab = {BOS: 0, EOS: 1}
    for suffix in ("", "</w>"):
        for symbol in symbols:
            vocab[symbol + suffix] = len(vocab)
    merges = _learn_merges(sorted({w for p in shapes.all_prompts() for w in p.split()} | {"an"}))
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_PROMPT_TOKENS)


def _byte_symbols() -> list[str]:
    """The printable character byte-level BPE writes for each byte 0..255: printable Latin-1 bytes
    stand for themselves, the rest take code points from 256 upward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(shifted)) for byte in range(256)]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make each word one symbol: merge the most frequent adjacent pair (ties: the
    alphabetically first) until no word has two symbols left. Words are split as CLIP splits them."""
    split = [[*word[:-1], word[-1] + "</w>"] for word in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for parts in split:
            for pair in zip(parts, parts[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for i, parts in enumerate(split):
            merged: list[str] = []
            for part in parts:
                if merged and (merged[-1], part) == best:
                    merged[-1] += part
                else:
                    merged.append(part)
            split[i] = merged


def build_components(seed: int, recipe: Recipe = RECIPE) -> dict:
    """Untrained components with weights fixed by ``seed`` (the global torch RNG is left untouched)."""
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=recipe.text_hidden, intermediate_size=2 * recipe.text_hidden,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_PROMPT_TOKENS,
            projection_dim=recipe.text_hidden, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=recipe.vae_channels, layers_per_block=1, latent_channels=4, norm_num_groups=8,
            sample_size=shapes.SIZE, mid_block_add_attention=False,
        )
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in recipe.unet_attention)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(recipe.unet_attention))
        unet = UNet2DConditionModel(
            sample_size=shapes.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=recipe.unet_channels, down_block_types=down, up_block_types=up,
            cross_attention_dim=recipe.text_hidden, attention_head_dim=4, norm_num_groups=8,
        )
        _zero_residual_branches(vae)
        _zero_residual_branches(unet)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def _zero_residual_branches(model: torch.nn.Module) -> None:
    """Zero the last layer of every residual branch (ResNet ``conv2``, attention ``proj_out``), as the
    original Stable Diffusion code does: each block starts as the identity, which trains much faster."""
    for name, module in model.named_modules():
        if name.endswith(("conv2", "proj_out")) and isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def assemble(components: dict) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- training -----------------------------------------------------------------------------------


def train_pipeline(seed: int = 0, recipe: Recipe = RECIPE) -> StableDiffusionPipeline:
    """Build the components and train them on the shapes world.

    Deterministic for a seed on one machine and thread count: every random draw comes from one
    ``torch.Generator`` (batches, noise, timesteps, prompt dropout) or the seeded render.
    """
    components = build_components(seed, recipe)
    generator = torch.Generator().manual_seed(seed)
    prompts = shapes.prompts("train") if recipe.prompts is None else list(recipe.prompts)
    images, texts = shapes.render_dataset(prompts, recipe.images_per_prompt, seed=seed)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 32, 32) in [-1, 1]
    start = time.perf_counter()
    _train_vae(components["vae"], pixels, recipe, generator)
    log.info("tiny-sd seed %d: VAE trained in %.1f s", seed, time.perf_counter() - start)
    _train_unet(components, pixels, texts, recipe, generator)
    log.info("tiny-sd seed %d: UNet and text encoder trained, %.1f s in all", seed, time.perf_counter() - start)
    for module in ("vae", "text_encoder", "unet"):
        components[module].eval().requires_grad_(False)
        components[module].zero_grad(set_to_none=True)  # the last step's: a later backward must not add to them
    return assemble(components)


def _train_vae(vae: AutoencoderKL, pixels: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> None:
    """Reconstruction MSE (+ a small L2 on the latents); then ``scaling_factor`` = 1 / latent std.

    It trains on the posterior mean, not a sample: at initialisation the posterior std is ~1, which
    drowns the signal and stalls training for thousands of steps. The UNet trains on means too, and
    text-to-image only ever decodes.
    """
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.vae_learning_rate, total_steps=recipe.vae_steps, pct_start=0.1
    )
    for _ in range(recipe.vae_steps):
        batch = pixels[torch.randint(len(pixels), (recipe.vae_batch_size,), generator=generator)]
        latents = vae.encode(batch).latent_dist.mean  # (B, 4, 8, 8)
        loss = F.mse_loss(vae.decode(latents).sample, batch) + recipe.vae_latent_l2 * latents.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval()
    with torch.no_grad():
        std = vae.encode(pixels[:512]).latent_dist.mean.std().item()
    # Stable Diffusion's convention: the UNet sees latents * scaling_factor, which should have unit variance.
    vae.register_to_config(scaling_factor=1.0 / std)


def _train_unet(components: dict, pixels: torch.Tensor, texts: list[str], recipe: Recipe,
                generator: torch.Generator) -> None:
    """Epsilon prediction on the frozen VAE's scaled latents, the text encoder trained alongside.

    ``loss = w(t) * |eps - unet(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, text)|^2`` with t uniform
    over the 1000 training steps and Min-SNR weights ``w(t) = min(snr_t, gamma) / snr_t`` (Hang et al.
    2023), which stop the many easy low-noise steps from dominating and speed up learning.
    """
    vae, unet, text_encoder = components["vae"], components["unet"], components["text_encoder"]
    tokenizer, scheduler = components["tokenizer"], components["scheduler"]
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
        latents = latents * vae.config.scaling_factor  # (N, 4, 8, 8), unit variance
    unique = [*sorted(set(texts)), ""]  # "" last: the unconditional prompt
    prompt_index = torch.tensor([unique.index(t) for t in texts])
    token_ids = tokenizer(unique, padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True,
                          return_tensors="pt").input_ids  # (43, 12), as the pipeline tokenizes
    unet.train()
    text_encoder.train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.unet_learning_rate, total_steps=recipe.unet_steps, pct_start=0.05
    )
    alphas_cumprod = scheduler.alphas_cumprod  # (1000,)
    for _ in range(recipe.unet_steps):
        rows = torch.randint(len(latents), (recipe.unet_batch_size,), generator=generator)
        dropped = torch.rand(len(rows), generator=generator) < recipe.uncond_prob
        prompt_ids = torch.where(dropped, len(unique) - 1, prompt_index[rows])
        # Encode each distinct prompt of the batch once (at most 43 rows), then gather per example.
        present, inverse = prompt_ids.unique(return_inverse=True)
        embeds = text_encoder(token_ids[present])[0][inverse]  # (B, 12, text_hidden)
        noise = torch.randn(latents[rows].shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents[rows] + (1 - abar).sqrt() * noise
        error = (unet(noisy, t, encoder_hidden_states=embeds).sample - noise).pow(2).mean(dim=(1, 2, 3))
        if recipe.min_snr_gamma is not None:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            error = error * snr.clamp(max=recipe.min_snr_gamma) / snr
        optimizer.zero_grad(set_to_none=True)
        error.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()


# --- cache and use ------------------------------------------------------------------------------


def cache_folder(seed: int = 0, recipe: Recipe = RECIPE) -> Path:
    """Where the pipeline for ``seed`` and ``recipe`` is cached (it may not exist yet)."""
    return cache_root() / "pipelines" / f"{NAME}-seed{seed}-{_recipe_hash(recipe)}"


def _recipe_hash(recipe: Recipe) -> str:
    """Hash of what decides the weights: the recipe and the source of this module and ``shapes.py``."""
    this_module = inspect.getmodule(_recipe_hash)
    payload = {"version": PIPELINE_VERSION, "recipe": asdict(recipe),
               "sources": [inspect.getsource(shapes), inspect.getsource(this_module)]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def build_tiny_pipeline(seed: int = 0, cache: bool = True, recipe: Recipe = RECIPE) -> StableDiffusionPipeline:
    """The built-in pipeline for ``seed``: loaded from the cache, or trained (and cached when ``cache``)."""
    folder = cache_folder(seed, recipe)
    if cache and (folder / "model_index.json").is_file():
        return load_pipeline(folder)
    pipe = train_pipeline(seed, recipe)
    if not cache or not _writes_weights():
        return pipe  # (the same weights the process of rank 0 caches: training is seeded)
    _save_atomically(pipe, folder)
    return load_pipeline(folder)  # what every later run loads: the first run must not differ from them


def _writes_weights() -> bool:
    """transformers' `save_pretrained` writes no weights in a process of rank > 0 of a process group (a
    multi-process launch): such a folder lacks its text encoder's weights, and had it won the rename to the
    cache, every later run would fail to load it. The process of rank 0 writes the cache."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def tiny_pipeline_folder(seed: int = 0, recipe: Recipe = RECIPE) -> Path:
    """The cached folder of the pipeline for ``seed``, built first if missing: a path for from_pretrained."""
    folder = cache_folder(seed, recipe)
    if not (folder / "model_index.json").is_file():
        _save_atomically(train_pipeline(seed, recipe), folder)
    return folder


def load_pipeline(folder: str | Path) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline.from_pretrained(folder)`` without the safety checker or progress bars."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_atomically(pipe: StableDiffusionPipeline, folder: Path) -> None:
    write_atomically(folder, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), "model_index.json")


def sample(pipe: StableDiffusionPipeline, prompts: list[str], seed: int = 0, num_inference_steps: int = 10,
           guidance_scale: float = 4.0, eta: float = 0.0) -> torch.Tensor:
    """Images ``(B, 3, 32, 32)`` in [0, 1] for ``prompts`` (one batch), from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                   generator=generator, output_type="pt")
    return out.images
