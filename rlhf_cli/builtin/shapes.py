"""The built-in image world: one coloured shape on a plain background, described by a prompt.

It is the offline text-to-image task for DDPO (`rlhf ddpo`): the built-in pipeline
(`image_pipeline.py`) first learns from these images to draw what a prompt says, and rewards then
move it. Everything here is deterministic from a seed and needs nothing beyond numpy and Pillow.

The world:

* Images are ``size`` x ``size`` RGB (32 by default): a circle, square or triangle in one of six
  colours on a white, black or grey background, at a random position and size (``render``).
  The three shapes share one bounding box (a square of side ``2r``), so the share of it a shape
  fills tells them apart: square 1, circle pi/4 ~ 0.785, triangle (apex up) 0.5 (0.79 and 0.6 as
  measured on 32-pixel images).
* Prompts follow one grammar, ``"a red circle on a white background"`` (``make_prompt``,
  ``parse_prompt``; ``"red circle"`` leaves the background open). There are 6 x 3 x 3 = 54.
* Held out: four colour/shape pairs (``HELD_OUT_PAIRS``) never appear in training prompts, with
  any background, so held-out prompts test whether a model composes a colour and a shape it has
  only seen apart. Every colour keeps two shapes and every shape four colours in training.

Rewards take ``(images, prompts, metadata) -> list[float]``, the signature ``rlhf ddpo`` calls.
``images`` is a float tensor ``(B, 3, H, W)`` with values in [0, 1], which is what a diffusers
pipeline returns with ``output_type="pt"``; a list of PIL images or a uint8 array ``(B, H, W, 3)``
is accepted too, for convenience. ``metadata`` is ignored by the built-ins.

* ``alignment``: the gold prompt-alignment scorer, in [0, 1] per image (see its docstring).
* ``jpeg_compressibility`` / ``jpeg_incompressibility``: minus / plus the JPEG size in kB at
  quality 95 (Pillow), the DDPO paper's two tasks.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

# Pillow (the `diffusion` extra) is imported where images are converted: the text stages read this module's
# prompts through rlhf_cli.builtin.datasets on installs without it

SIZE = 32
SHAPES = ("circle", "square", "triangle")
# Saturated colours, pairwise >= 0.55 apart in RGB (0-1 scale) and none close to a background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "cyan": (30, 200, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
}
# (colour, shape) pairs seen only in held-out prompts.
HELD_OUT_PAIRS = (("red", "triangle"), ("green", "square"), ("blue", "circle"), ("purple", "triangle"))
# The share of its bounding box each shape fills, as the scorer measures it on rendered 32 x 32 images
# (mean of 360 each). Continuous shapes fill pi/4 and 0.5; at this resolution the triangle's 1-pixel apex
# row falls out of the measured box, which raises its share.
FILL_RATIO = {"circle": 0.79, "square": 1.0, "triangle": 0.6}

# Half-side of a shape and the gap it keeps to the image edge, in pixels of a 32-pixel image.
_MIN_HALF, _MAX_HALF, _MARGIN = 7.0, 11.0, 1.0
_SUPERSAMPLE = 4  # sub-pixels per pixel side: edges are anti-aliased, as in real images
_PROMPT_RE = re.compile(r"(?:an? )?(\w+) (\w+)(?: on an? (\w+) background)?")


# --- the prompt grammar -------------------------------------------------------------------------


def make_prompt(colour: str, shape: str, background: str | None = None) -> str:
    """``("red", "circle", "white")`` -> ``"a red circle on a white background"``; no background:
    ``"a red circle"``."""
    _check(colour, shape, background)
    text = f"a {colour} {shape}"
    return text if background is None else f"{text} on a {background} background"


def parse_prompt(prompt: str) -> tuple[str, str, str | None]:
    """The inverse of ``make_prompt``: ``(colour, shape, background or None)``.

    Accepts the article or not, any case and extra spaces (``"Red circle"``). Raises ValueError on
    text outside the grammar, so a scorer never silently scores a prompt it cannot read.
    """
    match = _PROMPT_RE.fullmatch(" ".join(prompt.lower().split()))
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not of the form 'a <colour> <shape> on a <background> background'")
    colour, shape, background = match.groups()
    _check(colour, shape, background, prompt)
    return colour, shape, background


def _check(colour: str, shape: str, background: str | None, prompt: str | None = None) -> None:
    where = f" in prompt {prompt!r}" if prompt else ""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}{where}; expected one of {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}{where}; expected one of {', '.join(SHAPES)}")
    if background is not None and background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}{where}; expected one of {', '.join(BACKGROUNDS)}")


def all_prompts() -> list[str]:
    """All 54 full prompts, in a fixed order (colour, then shape, then background)."""
    return [make_prompt(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def is_held_out(prompt: str) -> bool:
    colour, shape, _ = parse_prompt(prompt)
    return (colour, shape) in HELD_OUT_PAIRS


def prompts(split: str = "train") -> list[str]:
    """The full prompts of ``split``: "train" (42), "test" (the 12 held-out ones) or "all" (54)."""
    if split == "all":
        return all_prompts()
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'all'")
    return [p for p in all_prompts() if is_held_out(p) == (split == "test")]


# --- rendering ----------------------------------------------------------------------------------


def render(
    shape: str, colour: str, background: str, size: int = SIZE, rng: np.random.Generator | None = None
) -> np.ndarray:
    """One image, uint8 ``(size, size, 3)``.

    ``rng`` draws the half-side (7-11 px at size 32, scaled with ``size``) and the centre (the
    shape keeps 1 px from every edge); without it the shape is centred at the middle size (9 px).
    Anti-aliased by supersampling: each pixel averages 4 x 4 sub-pixel coverage tests.
    """
    _check(colour, shape, background)
    scale = size / SIZE
    if rng is None:
        half, cx, cy = (_MIN_HALF + _MAX_HALF) / 2 * scale, size / 2, size / 2
    else:
        half = rng.uniform(_MIN_HALF, _MAX_HALF) * scale
        low, high = _MARGIN * scale + half, size - _MARGIN * scale - half
        cx, cy = rng.uniform(low, high), rng.uniform(low, high)
    coverage = _coverage(shape, cx, cy, half, size)[..., None]  # (size, size, 1) in [0, 1]
    fg = np.asarray(COLOURS[colour], dtype=np.float64)
    bg = np.asarray(BACKGROUNDS[background], dtype=np.float64)
    return np.rint(bg + coverage * (fg - bg)).astype(np.uint8)


def _coverage(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """The share of each pixel the shape covers, ``(size, size)``, from sub-pixel centre tests."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE  # sub-pixel centres in pixel units
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= half**2
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # triangle, apex up: apex (cx, cy - half), base from (cx - half, cy + half) to (cx + half, cy + half)
        inside = (dy <= half) & (2 * np.abs(dx) <= dy + half)
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def render_prompt(prompt: str, size: int = SIZE, rng: np.random.Generator | None = None) -> np.ndarray:
    """``render`` for a prompt; a prompt without a background gets one drawn from ``rng`` (or white)."""
    colour, shape, background = parse_prompt(prompt)
    if background is None:
        background = "white" if rng is None else str(rng.choice(list(BACKGROUNDS)))
    return render(shape, colour, background, size=size, rng=rng)


def render_dataset(
    prompt_list: Sequence[str], per_prompt: int, seed: int = 0, size: int = SIZE
) -> tuple[np.ndarray, list[str]]:
    """``per_prompt`` jittered images of every prompt: uint8 ``(N, size, size, 3)`` and the N prompts.

    Rows are ordered prompt by prompt; the same arguments give the same bytes on every machine.
    """
    rng = np.random.default_rng(seed)
    texts = [p for p in prompt_list for _ in range(per_prompt)]
    return np.stack([render_prompt(p, size=size, rng=rng) for p in texts]), texts


def to_pil(images: Any) -> list:
    """Images in any accepted form (see the module docstring) as RGB PIL images."""
    from PIL import Image

    return [Image.fromarray(image) for image in _as_uint8(images)]


# --- rewards ------------------------------------------------------------------------------------


def _as_float(images: Any) -> np.ndarray:
    """Accepted image forms -> float64 ``(B, H, W, 3)`` in [0, 1]."""
    if is_pil(images):
        images = [images]
    if isinstance(images, (list, tuple)) and images and is_pil(images[0]):
        return np.stack([np.asarray(i.convert("RGB"), dtype=np.float64) / 255 for i in images])
    if hasattr(images, "detach"):  # a torch tensor (B, 3, H, W) in [0, 1]; torch stays an optional import
        array = images.detach().float().cpu().numpy()
        if array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(f"expected image tensor of shape (B, 3, H, W), got {tuple(array.shape)}")
        return np.clip(array.transpose(0, 2, 3, 1).astype(np.float64), 0.0, 1.0)
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected images (B, 3, H, W) tensor, PIL list or (B, H, W, 3) array, got {array.shape}")
    return array.astype(np.float64) / 255 if array.dtype == np.uint8 else np.clip(array, 0.0, 1.0)


def is_pil(image: Any) -> bool:
    return type(image).__module__.startswith("PIL.")  # without importing Pillow where it is absent


def _as_uint8(images: Any) -> np.ndarray:
    return np.rint(_as_float(images) * 255).astype(np.uint8)


def jpeg_kb(images: Any, quality: int = 95) -> list[float]:
    """JPEG size of each image in kB (1000 bytes) at ``quality``, written by Pillow."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


def jpeg_compressibility(images: Any, prompts: Sequence[str], metadata: Any = None) -> list[float]:
    """Reward = minus the JPEG size in kB at quality 95 (DDPO's "compressibility"): flat images win."""
    return [-kb for kb in jpeg_kb(images)]


def jpeg_incompressibility(images: Any, prompts: Sequence[str], metadata: Any = None) -> list[float]:
    """Reward = the JPEG size in kB at quality 95 (DDPO's "incompressibility"): detail and noise win."""
    return jpeg_kb(images)


_CHANGED_DISTANCE = 0.1  # RGB distance (0-1 scale) from the background below which a pixel is background
_MIN_FG_PIXELS = 9  # fewer foreground pixels than this (at 32 x 32) means no shape was drawn
_FILL_SIGMA = 0.07  # width of the shape likelihood around each shape's fill ratio


def alignment(images: Any, prompts: Sequence[str], metadata: Any = None) -> list[float]:
    """Gold prompt-alignment score in [0, 1] per image: colour x shape x background.

    Each factor is read from the pixels the way a person would check the picture:

    * background: the share of the 2-pixel border nearest (in RGB) to the prompted background
      among the three backgrounds and six colours (1 when the prompt names none).
    * colour: every pixel farther than 0.1 (RGB, 0-1 scale) from the border's median colour is
      written as background + a (colour - background) for the colour whose segment passes nearest
      to it (so an anti-aliased edge, a blend with the background, keeps its colour); it is
      foreground when a >= 0.5. The factor is the share of the foreground that went to the prompted
      colour. An image with under 9 foreground pixels (per 32 x 32) drew nothing and scores 0.
    * shape: the share of the foreground's bounding box the foreground fills (stray pixels with
      fewer than two foreground 4-neighbours are left out of the box), turned into the probability of
      the prompted shape under Gaussians (sigma 0.07) around ``FILL_RATIO`` (square 1, circle 0.79, triangle 0.6).

    A rendered image of its own prompt scores about 0.9-1; a different colour or shape scores near 0.
    Use ``alignment_parts`` to see the three factors.
    """
    parts = alignment_parts(images, prompts)
    return (parts["colour"] * parts["shape"] * parts["background"]).tolist()


def alignment_parts(images: Any, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """The factors of ``alignment``: {"colour", "shape", "background", "fill"}, each ``(B,)`` float."""
    pixels = _as_float(images)
    if len(pixels) != len(prompts):
        raise ValueError(f"got {len(pixels)} images but {len(prompts)} prompts")
    parsed = [parse_prompt(p) for p in prompts]
    out = {key: np.zeros(len(pixels)) for key in ("colour", "shape", "background", "fill")}
    for i, (image, (colour, shape, background)) in enumerate(zip(pixels, parsed, strict=True)):
        parts = _score_one(image, colour, shape, background)
        for key, value in parts.items():
            out[key][i] = value
    return out


_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.asarray(list(COLOURS.values()), dtype=np.float64) / 255  # (6, 3)
_BACKGROUND_RGB = np.asarray(list(BACKGROUNDS.values()), dtype=np.float64) / 255  # (3, 3)
_SHAPE_FILL = np.asarray([FILL_RATIO[s] for s in SHAPES])


def _score_one(image: np.ndarray, colour: str, shape: str, background: str | None) -> dict[str, float]:
    """The factors for one image ``(H, W, 3)`` in [0, 1]."""
    h, w, _ = image.shape
    scale = h * w / SIZE**2
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[2:-2, :2].reshape(-1, 3), image[2:-2, -2:].reshape(-1, 3)])
    background_score = 1.0
    if background is not None:
        # Nearest among backgrounds and colours: a red border pixel is not "grey" just because grey
        # is the nearest background.
        palette = np.concatenate([_BACKGROUND_RGB, _COLOUR_RGB])  # (9, 3)
        nearest = np.linalg.norm(border[:, None] - palette[None], axis=-1).argmin(axis=1)
        background_score = float(np.mean(nearest == list(BACKGROUNDS).index(background)))

    bg = np.median(border, axis=0)
    offset = image - bg  # (H, W, 3)
    changed = np.linalg.norm(offset, axis=-1) > _CHANGED_DISTANCE  # (H, W)
    # Each changed pixel p = bg + a (c - bg) + residual for the colour c whose segment passes nearest.
    direction = _COLOUR_RGB - bg  # (6, 3)
    points = offset[changed]  # (N, 3)
    along = np.clip(points @ direction.T / np.maximum((direction**2).sum(-1), 1e-9), 0.0, 1.0)  # (N, 6)
    residual = np.linalg.norm(points[:, None] - along[..., None] * direction[None], axis=-1)  # (N, 6)
    nearest = residual.argmin(axis=1)  # (N,)
    covered = along[np.arange(len(nearest)), nearest] >= 0.5  # the colour covers at least half the pixel
    fg = np.zeros_like(changed)
    fg[changed] = covered
    if fg.sum() < _MIN_FG_PIXELS * scale:
        return {"colour": 0.0, "shape": 0.0, "background": background_score, "fill": 0.0}
    colour_score = float(np.mean(nearest[covered] == _COLOUR_NAMES.index(colour)))

    fill = _fill_ratio(fg)
    likelihood = np.exp(-0.5 * ((fill - _SHAPE_FILL) / _FILL_SIGMA) ** 2) + 1e-12
    shape_score = float(likelihood[SHAPES.index(shape)] / likelihood.sum())
    return {"colour": colour_score, "shape": shape_score, "background": background_score, "fill": fill}


def _fill_ratio(fg: np.ndarray) -> float:
    """Foreground pixels / area of their bounding box; the box ignores isolated speckles."""
    padded = np.pad(fg, 1)
    neighbours = (padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:])
    core = fg & (neighbours >= 2)
    rows, cols = np.nonzero(core if core.any() else fg)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    return float(fg[top:bottom, left:right].sum() / ((bottom - top) * (right - left)))
