"""Reward functions: any `package.module:callable`, or a `builtin:` one, taking text and returning floats.

The callable receives `(prompts, responses, **columns)`: lists of strings and the other dataset
columns of the batch (lists of the same length), and returns one number per response.
"""

import importlib
import math
from collections.abc import Callable, Sequence

import torch

from rlhf_cli.errors import UserError, user_frames

BUILTIN_FUNCTIONS = {
    "sentiment": ("rlhf_cli.builtin.sentiment", "sentiment_reward"),
    "mild-toxicity": ("rlhf_cli.builtin.toxicity", "mild_toxicity_reward"),
    "exact-answer": ("rlhf_cli.builtin.arithmetic", "exact_answer_reward"),
    "tool-answer": ("rlhf_cli.builtin.tool_world", "tool_answer_reward"),
}


def import_callable(spec: str, key: str = "reward.function", builtins: dict | None = None) -> Callable:
    """Import exactly the `module:callable` named in the config (nothing else is ever imported).

    `builtins` maps `builtin:` names to (module, attribute); the text rewards' table by default, so
    another kind of reward (images) can resolve its own built-ins with the same rules.
    """
    table = BUILTIN_FUNCTIONS if builtins is None else builtins
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in table:
            raise UserError(f"{key}: unknown built-in {spec!r}; choose one of: {', '.join('builtin:' + n for n in table)}.")
        module_name, attr = table[name]
    else:
        module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(
            f"{key}: cannot import module {module_name!r} ({err}); check the name and that it is on PYTHONPATH."
        ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"{key}: module {module_name!r} has no attribute {attr!r}.")
    if not callable(fn):
        raise UserError(f"{key}: {spec!r} is not callable.")
    return fn


class FunctionReward:
    """Calls a reward function on a batch and checks what it returns."""

    def __init__(self, spec: str, key: str = "reward.function"):
        self.spec, self.key = spec, key
        self.fn = import_callable(spec, key)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], columns: dict[str, list]) -> torch.Tensor:
        try:
            values = self.fn(list(prompts), list(responses), **columns)
        except Exception as err:
            raise UserError(f"{self.key}: {self.spec} raised {type(err).__name__}: {err}", user_frames(err)) from err
        try:
            scores = [float(v) for v in values]
        except (TypeError, ValueError):
            raise UserError(f"{self.key}: {self.spec} must return one number per response, got {values!r:.200}.") from None
        if len(scores) != len(responses):
            raise UserError(
                f"{self.key}: {self.spec} returned {len(scores)} values for {len(responses)} responses; "
                "it must return exactly one per response."
            )
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise UserError(
                f"{self.key}: {self.spec} returned a non-finite value ({scores[bad[0]]}) for response {bad[0]}: "
                f"{responses[bad[0]]!r:.120}."
            )
        return torch.tensor(scores, dtype=torch.float32)
