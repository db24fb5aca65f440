"""Image rewards for DDPO (rlhf_cli/diffusion/rewards.py): built-ins, user functions, their errors, weights."""

import sys
import textwrap

import numpy as np
import pytest
import torch

from rlhf_cli.builtin import shapes
from rlhf_cli.config.loader import build
from rlhf_cli.diffusion.rewards import (
    BUILTIN_IMAGE_REWARDS,
    CombinedImageReward,
    ImageReward,
    ImageRewardConfig,
    ImageRewardSourceConfig,
)
from rlhf_cli.errors import UserError

PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green triangle on a grey background"]

# A module of reward functions, written per test under tmp_path (tests/ is not a package).
USER_REWARDS = textwrap.dedent("""
    import numpy as np
    import torch

    def mean_pixel(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))

    def as_numpy(images, prompts, metadata):
        return np.arange(len(prompts), dtype=np.float64)

    def as_ints(images, prompts, metadata):
        return [i for i in range(len(prompts))]

    def as_scalar_tensors(images, prompts, metadata):
        return [torch.tensor(float(i)) for i in range(len(prompts))]

    def from_metadata(images, prompts, metadata):
        return [m["score"] for m in metadata]

    def in_place(images, prompts, metadata):
        images.zero_()
        return [0.0] * len(prompts)

    def boom(images, prompts, metadata):
        raise RuntimeError("model\\nnot loaded")

    def one_number(images, prompts, metadata):
        return 1.0

    def strings(images, prompts, metadata):
        return ["1.0"] * len(prompts)

    def column(images, prompts, metadata):
        return torch.zeros(len(prompts), 1)

    def short(images, prompts, metadata):
        return [0.0] * (len(prompts) - 1)

    def nan_second(images, prompts, metadata):
        return [0.0, float("nan")] + [0.0] * (len(prompts) - 2)

    def inf_first(images, prompts, metadata):
        return np.array([np.inf] + [0.0] * (len(prompts) - 1))

    class Scorer:
        @staticmethod
        def score(images, prompts, metadata):
            return [1.0] * len(prompts)
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """`image_rewards_user:<fn>` specs resolve to USER_REWARDS."""
    (tmp_path / "image_rewards_user.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "image_rewards_user", raising=False)
    return "image_rewards_user"


def rendered(prompts=PROMPTS) -> torch.Tensor:
    """The shapes world's images of `prompts` as the float (B, 3, H, W) tensor in [0, 1] DDPO decodes."""
    pixels = np.stack([shapes.render_prompt(p) for p in prompts])  # (B, H, W, 3) uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def no_metadata(n=len(PROMPTS)) -> list[dict]:
    return [{} for _ in range(n)]


def raises_user_error(reward, key, images=None, prompts=PROMPTS, metadata=None) -> str:
    """Call `reward` expecting a one-line UserError naming `key` and the spec; return its message."""
    images = rendered(prompts) if images is None else images
    with pytest.raises(UserError) as caught:
        reward(images, prompts, metadata if metadata is not None else no_metadata(len(prompts)))
    message = str(caught.value)
    assert key in message and reward.spec in message and "\n" not in message, message
    return message


# --- built-ins ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN_IMAGE_REWARDS))
def test_each_builtin_scores_a_rendered_batch(name):
    reward = ImageReward(f"builtin:{name}")
    scores = reward(rendered(), PROMPTS, no_metadata())
    assert reward.name == name
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()


def test_alignment_scores_a_rendered_image_of_its_own_prompt_high():
    scores = ImageReward("builtin:alignment")(rendered(), PROMPTS, no_metadata())
    assert (scores > 0.8).all()


def test_a_flat_image_is_more_compressible_than_noise():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noise = torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    compress = ImageReward("builtin:jpeg_compressibility")
    incompress = ImageReward("builtin:jpeg-incompressibility")  # the hyphenated spelling works too
    prompt, meta = ["a red circle"], [{}]
    assert compress(flat, prompt, meta) > compress(noise, prompt, meta)
    assert incompress(flat, prompt, meta) < incompress(noise, prompt, meta)
    assert incompress.name == "jpeg_incompressibility"


# --- user functions -----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["mean_pixel", "as_numpy", "as_ints", "as_scalar_tensors"])
def test_every_kind_of_number_sequence_is_accepted(user_module, fn):
    reward = ImageReward(f"{user_module}:{fn}")
    scores = reward(rendered(), PROMPTS, no_metadata())
    assert scores.shape == (3,) and scores.dtype == torch.float32 and reward.name == fn


def test_metadata_reaches_the_function(user_module):
    metadata = [{"score": 0.5}, {"score": -1}, {"score": 2.0}]
    scores = ImageReward(f"{user_module}:from_metadata")(rendered(), PROMPTS, metadata)
    assert scores.tolist() == [0.5, -1.0, 2.0]


def test_a_function_editing_its_inputs_cannot_change_the_callers_images(user_module):
    images = rendered()
    before = images.clone()
    ImageReward(f"{user_module}:in_place")(images, PROMPTS, no_metadata())
    assert torch.equal(images, before)


def test_the_name_of_a_nested_callable_is_its_attribute(user_module):
    assert ImageReward(f"{user_module}:Scorer.score").name == "score"


# --- errors -------------------------------------------------------------------------------------


def test_a_function_that_raises_is_a_user_error_with_its_frames(user_module):
    reward = ImageReward(f"{user_module}:boom", key="reward.sources[1].function")
    with pytest.raises(UserError) as caught:
        reward(rendered(), PROMPTS, no_metadata())
    message = str(caught.value)
    assert "reward.sources[1].function" in message and "RuntimeError: model not loaded" in message
    assert "\n" not in message
    assert "image_rewards_user.py" in caught.value.detail


@pytest.mark.parametrize("fn", ["one_number", "strings", "column"])
def test_a_return_that_is_not_numbers_is_a_user_error(user_module, fn):
    message = raises_user_error(ImageReward(f"{user_module}:{fn}"), "reward.function")
    assert "must return one number per image" in message


def test_the_wrong_count_is_a_user_error(user_module):
    message = raises_user_error(ImageReward(f"{user_module}:short"), "reward.function")
    assert "returned 2 values for 3 images; it must return exactly one per image" in message


@pytest.mark.parametrize(("fn", "index"), [("nan_second", 1), ("inf_first", 0)])
def test_a_non_finite_reward_names_the_image_and_its_prompt(user_module, fn, index):
    message = raises_user_error(ImageReward(f"{user_module}:{fn}"), "reward.function")
    assert f"image {index}" in message and PROMPTS[index] in message


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("builtin:sentiment", "unknown built-in"),  # a text built-in is not an image reward
        ("builtin:nope", "builtin:jpeg_compressibility"),
        ("os", "package.module:callable"),
        ("no_such_module_xyz:fn", "cannot import"),
        ("image_rewards_user:missing", "has no attribute"),
    ],
)
def test_a_bad_spec_is_a_user_error_naming_the_key(user_module, spec, expected):
    with pytest.raises(UserError) as caught:
        ImageReward(spec, key="reward.sources[0].function")
    message = str(caught.value)
    assert "reward.sources[0].function" in message and expected in message and "\n" not in message


def test_a_module_failing_on_import_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "broken_image_reward.py").write_text("raise RuntimeError('no weights here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "broken_image_reward", raising=False)
    with pytest.raises(UserError, match=r"reward.function: importing .* raised RuntimeError: no weights here"):
        ImageReward("broken_image_reward:fn")


def test_a_builtin_given_a_prompt_it_cannot_read_is_a_user_error():
    reward = ImageReward("builtin:alignment")
    message = raises_user_error(reward, "reward.function", images=rendered(PROMPTS[:1]), prompts=["a photo of a dog"])
    assert "ValueError" in message


# --- combinations and config --------------------------------------------------------------------


def config(**fields) -> ImageRewardConfig:
    return build(ImageRewardConfig, fields, "reward")


def test_a_single_function_is_one_weighted_source():
    reward = CombinedImageReward(config(function="builtin:alignment", weight=2.0))
    total, parts = reward(rendered(), PROMPTS, no_metadata())
    assert reward.names == ["alignment"]
    assert torch.allclose(total, 2.0 * parts["alignment"]) and total.dtype == torch.float32


def test_sources_are_summed_with_their_weights_and_named_uniquely(user_module):
    reward = CombinedImageReward(config(sources=[
        {"function": "builtin:jpeg_compressibility", "weight": 0.5},
        {"function": f"{user_module}:from_metadata", "weight": -2.0},
        {"function": f"{user_module}:from_metadata", "weight": 0.0},
    ]))
    metadata = [{"score": 1.0}, {"score": 2.0}, {"score": 3.0}]
    total, parts = reward(rendered(), PROMPTS, metadata)
    assert reward.names == ["jpeg_compressibility", "from_metadata", "from_metadata_2"]
    assert list(parts) == reward.names
    expected = 0.5 * parts["jpeg_compressibility"] - 2.0 * torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(total, expected) and total.shape == (3,)


def test_the_config_loads_sources_from_yaml_shaped_data():
    raw = {"sources": [{"function": "builtin:alignment", "weight": 0.5}, "builtin:jpeg-compressibility"]}
    loaded = build(ImageRewardConfig, raw, "reward")
    assert loaded.function is None and loaded.weight == 1.0
    assert all(isinstance(s, ImageRewardSourceConfig) for s in loaded.sources)
    assert [(s.function, s.weight) for s in loaded.sources] == [
        ("builtin:alignment", 0.5), ("builtin:jpeg-compressibility", 1.0)
    ]
    assert CombinedImageReward(loaded).names == ["alignment", "jpeg_compressibility"]


def test_the_config_refuses_an_unknown_key():
    with pytest.raises(UserError, match=r"reward.sources\[0\].wieght: unknown key; did you mean"):
        build(ImageRewardConfig, {"sources": [{"function": "builtin:alignment", "wieght": 1}]}, "reward")


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({}, "reward.function"),  # neither
        ({"function": "builtin:alignment", "sources": ["builtin:alignment"]}, "reward.sources"),  # both
        ({"sources": [{"weight": 1.0}]}, "reward.sources[0].function"),
        ({"sources": ["builtin:alignment"], "weight": 2.0}, "reward.weight"),
        ({"function": "builtin:alignment", "weight": "nan"}, "reward.weight"),
    ],
)
def test_a_bad_combination_is_a_user_error_naming_the_key(fields, key):
    with pytest.raises(UserError) as caught:
        CombinedImageReward(config(**fields))
    assert key in str(caught.value) and "\n" not in str(caught.value)
