"""Image rewards for `rlhf ddpo`: a `builtin:` scorer or any `package.module:callable`, alone or weighted.

A reward function is called as ``fn(images, prompts, metadata)``:

* ``images``: float32 tensor ``(B, 3, H, W)`` in [0, 1] on the CPU (what a diffusers pipeline returns
  with ``output_type="pt"``), a copy per call;
* ``prompts``: the B prompts, a ``list[str]``;
* ``metadata``: B dicts, the other dataset columns of each image's prompt row (empty when there are none);

and returns one number per image: a list or tuple of numbers (0-d tensors count), a 1-D numpy array
or a 1-D tensor. Whatever it does wrong (raises, returns the wrong count, NaN) becomes a one-line
`UserError` naming the config key, since the function is the user's code, not ours.
"""

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rlhf_cli.config.diffusion import ImageRewardConfig, ImageRewardSourceConfig  # noqa: F401  (re-exported)
from rlhf_cli.errors import UserError, user_frames
from rlhf_cli.rewards.function import import_callable

BUILTIN_IMAGE_REWARDS = {
    name: ("rlhf_cli.builtin.shapes", name)
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "alignment")
}
_BUILTIN_LIST = ", ".join(f"`builtin:{name}`" for name in BUILTIN_IMAGE_REWARDS)


# --- one reward function ------------------------------------------------------------------------


class ImageReward:
    """Calls one reward function on a batch of images and checks what it returns.

    `name` is short and safe in a metric key (`reward/<name>`): the built-in's name, or the
    callable's attribute name.
    """

    def __init__(self, spec: str, key: str = "reward.function"):
        self.spec, self.key = spec, key
        self.fn = _load(spec, key)
        self.name = _short_name(spec)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> torch.Tensor:
        """images (B, 3, H, W) float in [0, 1] -> rewards (B,) float32 on the CPU."""
        _check_batch(images, prompts, metadata)
        values = self._call(images, prompts, metadata)
        scores = self._numbers(values)
        self._check_count(scores, len(prompts))
        self._check_finite(scores, prompts)
        return torch.tensor(scores, dtype=torch.float32)

    def _call(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> Any:
        """Run the user's function on copies, so one that edits its inputs in place (`clamp_`, say)
        cannot change what the next reward source or the saved sample grid sees."""
        copies = images.detach().to("cpu", torch.float32, copy=True)
        try:
            return self.fn(copies, list(prompts), [dict(m) for m in metadata])
        except Exception as err:
            raise UserError(f"{self.key}: {self.spec} raised {type(err).__name__}: {_one_line(err)}",
                            user_frames(err)) from err

    def _numbers(self, values: Any) -> list[float]:
        scores = _as_floats(values)
        if scores is None:
            raise UserError(
                f"{self.key}: {self.spec} must return one number per image (a list, a 1-D numpy array or a "
                f"1-D tensor), got {_describe(values)}."
            )
        return scores

    def _check_count(self, scores: list[float], count: int) -> None:
        if len(scores) != count:
            raise UserError(
                f"{self.key}: {self.spec} returned {len(scores)} values for {count} images; "
                "it must return exactly one per image."
            )

    def _check_finite(self, scores: list[float], prompts: Sequence[str]) -> None:
        bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
        if bad is not None:
            raise UserError(
                f"{self.key}: {self.spec} returned a non-finite value ({scores[bad]}) for image {bad} "
                f"(prompt {prompts[bad]!r:.120}); a reward must be a finite number."
            )


def _load(spec: str, key: str):
    """The callable `spec` names; importing the user's module may fail in any way, all of them UserErrors."""
    if ":" not in spec:
        raise UserError(f"{key}: {spec!r} must be `package.module:callable` or one of {_BUILTIN_LIST}.")
    try:
        return import_callable(_canonical(spec), key, builtins=BUILTIN_IMAGE_REWARDS)
    except UserError:
        raise
    except Exception as err:  # the module imports but fails on the way (SyntaxError, a raise at top level)
        raise UserError(f"{key}: importing {spec!r} raised {type(err).__name__}: {_one_line(err)}",
                        user_frames(err)) from None


def _canonical(spec: str) -> str:
    """`builtin:jpeg-compressibility` -> `builtin:jpeg_compressibility` (both spellings are accepted)."""
    if spec.startswith("builtin:"):
        return spec.replace("-", "_")
    return spec


def _short_name(spec: str) -> str:
    """`builtin:alignment` -> `alignment`; `my.module:Scorer.score` -> `score`."""
    attr = _canonical(spec).partition(":")[2].rpartition(".")[2]
    return re.sub(r"\W", "_", attr) or "reward"


def _check_batch(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> None:
    """A mismatch here is the caller's bug, not the user's: a plain ValueError."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if not len(images) == len(prompts) == len(metadata):
        raise ValueError(f"got {len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata rows")


def _as_floats(values: Any) -> list[float] | None:
    """What a reward function returned as Python floats, or None when it is not one number per item."""
    if isinstance(values, torch.Tensor):
        if values.ndim != 1 or values.is_complex():
            return None
        values = values.detach().to("cpu", torch.float64).tolist()
    elif isinstance(values, np.ndarray):
        if values.ndim != 1:
            return None
        values = values.tolist()  # numeric items become Python numbers; object items stay as they are
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
        return None
    if not all(_is_number(v) for v in values):
        return None
    return [float(v) for v in values]


def _is_number(value: Any) -> bool:
    """A real number: Python/numpy scalars and 0-d tensors or arrays (not strings, not complex)."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_complex()
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and value.dtype.kind in "biuf"
    return isinstance(value, (numbers.Real, np.bool_))


def _describe(values: Any) -> str:
    """A one-line description of a wrong return value (a tensor's repr spans lines)."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        return f"a {type(values).__name__} of shape {tuple(values.shape)} and dtype {values.dtype}"
    if isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        bad = next((i for i, v in enumerate(values) if not _is_number(v)), None)
        if bad is not None:
            return f"a {type(values).__name__} whose item {bad} is {_one_line(repr(values[bad]), 80)}"
    return f"{type(values).__name__} {_one_line(repr(values), 80)}"


def _one_line(text: Any, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# --- weighted combinations ----------------------------------------------------------------------


class CombinedImageReward:
    """total (B,) = sum_i weight_i * source_i(images, prompts, metadata), from an `ImageRewardConfig`.

    Each source's unweighted rewards are returned too, under `names` (unique: a repeated name gets
    `_2`, `_3`, ...), so a run logs every part, including weight-0 ones kept only to watch.
    """

    def __init__(self, config: Any, key: str = "reward"):
        specs = source_specs(config, key)
        self.sources = [ImageReward(spec, spec_key) for spec, _, spec_key in specs]
        self.weights = [weight for _, weight, _ in specs]
        self.names = _unique([source.name for source in self.sources])

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, 3, H, W) -> (total (B,) float32, {name: part (B,) float32})."""
        parts = {}
        total = torch.zeros(len(prompts), dtype=torch.float32)
        for name, weight, source in zip(self.names, self.weights, self.sources, strict=True):
            parts[name] = source(images, prompts, metadata)
            total = total + weight * parts[name]
        return total, parts


def source_specs(config: Any, key: str) -> list[tuple[str, float, str]]:
    """(function spec, weight, config key of the spec) of each source; exactly one way of giving them."""
    if config.function is not None and config.sources:
        raise UserError(f"{key}: give either {key}.function or {key}.sources, not both.")
    if config.function is not None:
        specs = [(config.function, config.weight, f"{key}.function")]
    elif config.sources:
        if config.weight != 1.0:
            raise UserError(f"{key}.weight: applies to {key}.function only; give each of {key}.sources its weight.")
        specs = [(s.function, s.weight, f"{key}.sources[{i}].function") for i, s in enumerate(config.sources)]
    else:
        raise UserError(
            f"{key}: no reward; set {key}.function ({_BUILTIN_LIST} or `package.module:callable`) "
            f"or list several in {key}.sources."
        )
    for spec, weight, spec_key in specs:
        _check_source(spec, weight, spec_key)
    return specs


def _check_source(spec: str | None, weight: float, spec_key: str) -> None:
    if spec is None:
        raise UserError(f"{spec_key}: missing; name this source's reward ({_BUILTIN_LIST} or `package.module:callable`).")
    if not math.isfinite(weight):
        weight_key = spec_key.rpartition(".")[0] + ".weight"
        raise UserError(f"{weight_key}: {weight} is not a finite number.")


def _unique(names: list[str]) -> list[str]:
    """["a", "a", "b"] -> ["a", "a_2", "b"]; a suffix never collides with a name already taken."""
    taken: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.append(candidate)
    return taken
