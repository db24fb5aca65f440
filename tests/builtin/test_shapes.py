"""The built-in image world: deterministic renders, the prompt grammar and splits, the gold scorers."""

import numpy as np
import pytest
import torch
from PIL import Image

from rlhf_cli.builtin import shapes


def swap(prompt: str, part: str) -> str:
    """The prompt with its colour, shape or background replaced by the next one in the lists."""
    colour, shape, background = shapes.parse_prompt(prompt)
    colours, shape_names, backgrounds = list(shapes.COLOURS), list(shapes.SHAPES), list(shapes.BACKGROUNDS)
    if part == "colour":
        colour = colours[(colours.index(colour) + 1) % len(colours)]
    elif part == "shape":
        shape = shape_names[(shape_names.index(shape) + 1) % len(shape_names)]
    else:
        background = backgrounds[(backgrounds.index(background) + 1) % len(backgrounds)]
    return shapes.make_prompt(colour, shape, background)


@pytest.fixture(scope="module")
def rendered():
    """Three jittered renders of each of the 54 prompts: uint8 (162, 32, 32, 3) and the prompts."""
    return shapes.render_dataset(shapes.prompts("all"), 3, seed=7)


# --- rendering ----------------------------------------------------------------------------------


def test_render_is_deterministic_and_seeded():
    a, prompts_a = shapes.render_dataset(shapes.prompts("train")[:5], 4, seed=1)
    b, prompts_b = shapes.render_dataset(shapes.prompts("train")[:5], 4, seed=1)
    c, _ = shapes.render_dataset(shapes.prompts("train")[:5], 4, seed=2)
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and prompts_a == prompts_b
    assert not np.array_equal(a, c)


def test_render_draws_the_colour_and_the_shape_where_expected():
    # Centred (no rng): half-side 9 px around (16, 16), so the box spans pixels 7..24.
    square = shapes.render("square", "red", "white")
    assert tuple(square[16, 16]) == shapes.COLOURS["red"]
    assert tuple(square[8, 8]) == shapes.COLOURS["red"]  # a square fills its corners
    assert tuple(square[0, 0]) == shapes.BACKGROUNDS["white"]
    circle = shapes.render("circle", "blue", "black")
    assert tuple(circle[16, 16]) == shapes.COLOURS["blue"]
    assert tuple(circle[8, 8]) == shapes.BACKGROUNDS["black"]  # a circle leaves them empty
    triangle = shapes.render("triangle", "green", "grey")
    assert tuple(triangle[23, 9]) == shapes.COLOURS["green"]  # bottom-left of the base
    assert tuple(triangle[9, 9]) == shapes.BACKGROUNDS["grey"]  # top-left is empty: apex up


def test_render_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.render("circle", "pink", "white")
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.render("star", "red", "white")


# --- prompts and splits -------------------------------------------------------------------------


def test_prompt_grammar_round_trips():
    prompt = shapes.make_prompt("purple", "triangle", "grey")
    assert prompt == "a purple triangle on a grey background"
    assert shapes.parse_prompt(prompt) == ("purple", "triangle", "grey")
    assert shapes.parse_prompt("  Red   Circle ") == ("red", "circle", None)
    assert all(shapes.parse_prompt(p) for p in shapes.all_prompts())
    for bad in ("a pink circle", "a red star", "a red circle on a blue background", "draw something"):
        with pytest.raises(ValueError):
            shapes.parse_prompt(bad)


def test_splits_hold_out_colour_shape_pairs():
    train, test = shapes.prompts("train"), shapes.prompts("test")
    assert len(train) == 42 and len(test) == 12 and not set(train) & set(test)
    assert sorted(train + test) == sorted(shapes.prompts("all"))
    train_pairs = {shapes.parse_prompt(p)[:2] for p in train}
    test_pairs = {shapes.parse_prompt(p)[:2] for p in test}
    assert test_pairs == set(shapes.HELD_OUT_PAIRS) and not train_pairs & test_pairs
    # Every colour and every shape of a held-out pair is still seen in training, with another partner.
    assert {c for c, _ in train_pairs} == set(shapes.COLOURS)
    assert {s for _, s in train_pairs} == set(shapes.SHAPES)


# --- the alignment scorer -----------------------------------------------------------------------


def test_alignment_scores_renders_of_their_own_prompt_high(rendered):
    images, prompts = rendered
    scores = np.array(shapes.alignment(images, prompts))
    assert scores.min() > 0.6 and scores.mean() > 0.9


@pytest.mark.parametrize("part", ["colour", "shape", "background"])
def test_alignment_scores_a_wrong_colour_shape_or_background_low(rendered, part):
    images, prompts = rendered
    scores = np.array(shapes.alignment(images, [swap(p, part) for p in prompts]))
    assert scores.mean() < 0.05 and scores.max() < 0.5


def test_alignment_by_hand():
    """Images drawn here with plain numpy, not by render: crisp shapes at odd sizes and places."""
    canvas = np.zeros((32, 32, 3), np.uint8)  # black
    square = canvas.copy()
    square[3:15, 10:22] = shapes.COLOURS["yellow"]  # a 12 x 12 yellow square near the top
    parts = shapes.alignment_parts([Image.fromarray(square)], ["a yellow square on a black background"])
    assert parts["fill"][0] == 1.0 and parts["colour"][0] == 1.0 and parts["background"][0] == 1.0
    assert shapes.alignment(square[None], ["a yellow square on a black background"])[0] > 0.95
    assert shapes.alignment(square[None], ["a yellow circle on a black background"])[0] < 0.1
    assert shapes.alignment(square[None], ["a yellow triangle"])[0] < 0.01  # no background asked: fine
    assert shapes.alignment(square[None], ["a green square on a black background"])[0] == 0.0
    assert shapes.alignment(square[None], ["a yellow square on a white background"])[0] == 0.0

    yy, xx = np.mgrid[:32, :32]
    disc = np.full((32, 32, 3), 255, np.uint8)
    disc[(yy - 20) ** 2 + (xx - 12) ** 2 <= 8**2] = shapes.COLOURS["cyan"]  # radius 8, off-centre
    assert shapes.alignment(disc[None], ["cyan circle"])[0] > 0.8
    assert shapes.alignment(disc[None], ["cyan square"])[0] < 0.2

    half = np.full((32, 32, 3), 128, np.uint8)
    half[:, 16:] = shapes.COLOURS["red"]  # half the image red: its border is not grey
    assert shapes.alignment(half[None], ["a red square on a grey background"])[0] < 0.6
    blank = np.full((2, 32, 32, 3), 255, np.uint8)
    assert shapes.alignment(blank, ["a red circle on a white background"] * 2) == [0.0, 0.0]
    noise = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    assert np.mean(shapes.alignment(noise, ["a red circle on a white background"] * 8)) < 0.1


def test_alignment_accepts_tensors_pil_and_arrays_alike(rendered):
    images, prompts = rendered[0][:6], rendered[1][:6]
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
    expected = shapes.alignment(images, prompts)
    assert shapes.alignment(tensor, prompts) == pytest.approx(expected)
    assert shapes.alignment(shapes.to_pil(tensor), prompts, {"any": "metadata"}) == pytest.approx(expected)
    with pytest.raises(ValueError, match="6 images but 5 prompts"):
        shapes.alignment(tensor, prompts[:5])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        shapes.alignment(tensor[:, :2], prompts)


# --- JPEG rewards -------------------------------------------------------------------------------


def test_jpeg_rewards_order_flat_images_and_noise():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    images, prompts = torch.cat([flat, noise]), ["a red circle"] * 2
    compress = shapes.jpeg_compressibility(images, prompts, None)
    incompress = shapes.jpeg_incompressibility(images, prompts, None)
    assert compress[0] > compress[1] and incompress[1] > incompress[0]
    assert compress == pytest.approx([-kb for kb in incompress])
    assert 0 < incompress[0] < 1.0 < incompress[1] < 10  # kB: a flat 32x32 JPEG is ~0.6 kB, noise ~2-3 kB
    shape_image = shapes.render("circle", "red", "white")[None]
    assert incompress[0] < shapes.jpeg_incompressibility(shape_image, prompts[:1])[0] < incompress[1]
