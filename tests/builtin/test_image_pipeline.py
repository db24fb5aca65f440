"""The built-in text-to-image pipeline: stock diffusers components, cached folders plain diffusers loads,
and samples that follow their prompt.

One pipeline is built for the module, on six prompts and with ~1/5 of the default recipe's work (~30 s
on one CPU core). It learns the prompted colour and background but not yet the shape, so the checks
also look at those parts of the alignment score; the default recipe's figures are in image_pipeline.py.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from rlhf_cli.builtin import image_pipeline, shapes

# Six prompts, each colour, shape and background twice, and a fifth of the default's work.
PROMPTS = ("a red circle on a white background", "a blue square on a black background",
           "a yellow triangle on a grey background", "a green triangle on a white background",
           "a cyan circle on a black background", "a purple square on a grey background")
FAST = dataclasses.replace(image_pipeline.RECIPE, prompts=PROMPTS, images_per_prompt=16, vae_steps=200,
                           unet_steps=300, unet_batch_size=32)


def swap(prompt: str, part: str) -> str:
    """The prompt with its colour or background replaced by the next one in the lists."""
    colour, shape, background = shapes.parse_prompt(prompt)
    if part == "colour":
        colours = list(shapes.COLOURS)
        colour = colours[(colours.index(colour) + 1) % len(colours)]
    else:
        backgrounds = list(shapes.BACKGROUNDS)
        background = backgrounds[(backgrounds.index(background) + 1) % len(backgrounds)]
    return shapes.make_prompt(colour, shape, background)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache for this run (xdist workers share it and take turns to build)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "rlhf-image-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLHF_CACHE", str(root))
        with FileLock(str(shared / "rlhf-image-cache.lock")):
            folder = image_pipeline.tiny_pipeline_folder(seed=0, recipe=FAST)
        yield folder


def test_tokenizer_has_one_token_per_word_and_fixed_ids():
    tokenizer = image_pipeline.build_tokenizer()
    words = {w for p in shapes.all_prompts() for w in p.split()}
    assert all(len(tokenizer(w).input_ids) == 3 for w in words)  # bos, the word, eos
    longest = max(len(tokenizer(p).input_ids) for p in shapes.all_prompts())
    assert longest <= image_pipeline.MAX_PROMPT_TOKENS == tokenizer.model_max_length
    assert tokenizer.get_vocab() == image_pipeline.build_tokenizer().get_vocab()
    assert tokenizer.decode(tokenizer("a pink star!").input_ids, skip_special_tokens=True) == "a pink star !"


@pytest.mark.slow
def test_cached_folder_is_a_plain_diffusers_pipeline(cache):
    assert cache == image_pipeline.cache_folder(0, FAST) and (cache / "model_index.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(cache)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == shapes.SIZE


def test_second_build_loads_from_the_cache(cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached pipeline was trained again")

    monkeypatch.setattr(image_pipeline, "train_pipeline", no_training)
    pipe = image_pipeline.build_tiny_pipeline(seed=0, recipe=FAST)
    reference = StableDiffusionPipeline.from_pretrained(cache)
    assert torch.equal(pipe.unet.conv_out.weight, reference.unet.conv_out.weight)
    # Another seed or recipe is another folder.
    assert image_pipeline.cache_folder(1, FAST) != cache != image_pipeline.cache_folder(0)


def test_a_process_of_rank_above_0_does_not_write_the_cache(tmp_path, monkeypatch):
    """In a multi-process launch transformers writes no weights from a rank above 0: its folder would lack the
    text encoder's weights, and once renamed into the cache every later run failed to load it (seen under
    `accelerate launch` of `rlhf ddpo` with two processes). Only rank 0 writes it; the others keep theirs."""
    from image_pipelines import untrained_pipeline

    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    monkeypatch.setattr(image_pipeline, "train_pipeline", lambda seed, recipe: untrained_pipeline())
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    pipe = image_pipeline.build_tiny_pipeline(seed=0, recipe=FAST)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert not image_pipeline.cache_folder(0, FAST).exists()
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    image_pipeline.build_tiny_pipeline(seed=0, recipe=FAST)
    assert (image_pipeline.cache_folder(0, FAST) / "text_encoder" / "model.safetensors").is_file()


def test_a_trained_pipeline_holds_no_gradients():
    """What a process of rank above 0 keeps (it does not load the cache, above) is the pipeline as trained: its
    last training step's gradients were left on the parameters, and DDPO's first backward on that process added
    to them (the first update of a launch that built the pipeline differed from later launches' by ~0.7%)."""
    pipe = image_pipeline.train_pipeline(seed=0, recipe=dataclasses.replace(
        FAST, images_per_prompt=2, vae_steps=2, unet_steps=2, unet_batch_size=4))
    for name in ("vae", "text_encoder", "unet"):
        assert all(p.grad is None for p in getattr(pipe, name).parameters()), name


def test_samples_follow_their_prompt(cache):
    pipe = image_pipeline.load_pipeline(cache)
    prompts = [p for p in PROMPTS for _ in range(8)]
    images = torch.cat([image_pipeline.sample(pipe, prompts[i:i + 24], seed=i) for i in (0, 24)])
    assert images.shape == (48, 3, 32, 32) and images.min() >= 0.0 and images.max() <= 1.0
    wrong = [PROMPTS[(i // 8 + 1 + i % 5) % 6] for i in range(48)]  # each of the five other prompts
    right_score = np.mean(shapes.alignment(images, prompts))
    assert right_score > 0.1 and right_score > 4 * np.mean(shapes.alignment(images, wrong))
    right = shapes.alignment_parts(images, prompts)
    for part in ("colour", "background"):  # chance: 1/6 and 1/3
        swapped = shapes.alignment_parts(images, [swap(p, part) for p in prompts])
        assert right[part].mean() > 0.5 and right[part].mean() > 2 * swapped[part].mean(), part


def test_sampling_is_seeded(cache):
    pipe = image_pipeline.load_pipeline(cache)
    prompts = shapes.prompts("test")[:4]
    first = image_pipeline.sample(pipe, prompts, seed=3, num_inference_steps=4)
    assert torch.equal(first, image_pipeline.sample(pipe, prompts, seed=3, num_inference_steps=4))
    assert not torch.equal(first, image_pipeline.sample(pipe, prompts, seed=4, num_inference_steps=4))


def test_an_untrained_pipeline_does_not_follow_prompts():
    """The baseline the trained pipeline is compared against: random weights draw no prompted shape."""
    pipe = image_pipeline.assemble(image_pipeline.build_components(seed=0, recipe=FAST))
    prompts = [p for p in PROMPTS for _ in range(3)]
    images = image_pipeline.sample(pipe, prompts, num_inference_steps=4)
    assert np.mean(shapes.alignment(images, prompts)) < 0.1
