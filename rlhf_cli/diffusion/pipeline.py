"""Loading the policy of `rlhf ddpo`: a Stable-Diffusion-style diffusers pipeline from a hub id, a
local folder or `builtin:tiny-sd[?seed=N]`, with a DDIM scheduler (DDPO's log-probabilities are
those of the stochastic DDIM step: diffusion/ddim.py), and one-line errors for what is not one."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from rlhf_cli.errors import UserError
from rlhf_cli.hub import before_lookup

BUILTIN = "builtin:tiny-sd"
# what DDPO reads from a pipeline: text -> embeddings -> denoiser -> latents -> images
REQUIRED = ("scheduler", "unet", "vae", "text_encoder", "tokenizer")


def load_pipeline(name: str, key: str = "model.model_name_or_path"):
    """The pipeline `name` (safety checker off, progress bars off) with its scheduler made a
    DDIMScheduler from its own config. `key` names the config key in errors."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if name.startswith("builtin:"):
        pipe = _builtin(name, key)
    else:
        folder = _pipeline_folder(name, key)
        _check_components(folder, name, key)
        try:
            pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as error:
            raise UserError(f"{key}: cannot load a diffusers pipeline from {name!r}: "
                            f"{' '.join(str(error).split())[:300]}") from error
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _builtin(name: str, key: str):
    match = re.fullmatch(r"builtin:tiny-sd(?:\?seed=(\d+))?", name.strip())
    if match is None:
        raise UserError(f"{key}: unknown built-in pipeline {name!r}; the built-in one is {BUILTIN} "
                        "(optionally with ?seed=N)")
    from rlhf_cli.builtin.image_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(seed=int(match.group(1) or 0))


def _pipeline_folder(name: str, key: str) -> str:
    """A local folder as it is; otherwise a hub id, fetched (or found in the cache) whole."""
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise UserError(f"{key}: {name!r} is a file; give the folder of a diffusers pipeline (model_index.json).")
    before_lookup(name)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name)
    except Exception as error:  # offline, unknown id, gated: one line either way
        raise UserError(
            f"{key}: {name!r} is neither a local folder nor reachable on the Hugging Face Hub (offline?); "
            f"use a local pipeline folder or {BUILTIN}. [{' '.join(str(error).split())[:200]}]") from error


def _check_components(folder: str, name: str, key: str) -> None:
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        raise UserError(f"{key}: {name!r} is not a diffusers pipeline: it has no model_index.json "
                        "(a folder written by a pipeline's save_pretrained has one).")
    listed = json.loads(index.read_text())
    missing = [part for part in REQUIRED if not (isinstance(listed.get(part), list) and listed[part][0])]
    if missing:
        raise UserError(f"{key}: the pipeline {name!r} has no {', '.join(missing)}; DDPO needs a text-to-image "
                        f"pipeline with {', '.join(REQUIRED)} (Stable Diffusion's layout).")
