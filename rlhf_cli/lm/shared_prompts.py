"""One forward over rows that share prompts, each distinct prompt run through the model once.

A group algorithm (GRPO, RLOO) samples num_generations responses per prompt, so a micro-batch of
its rollout holds the same prompt several times. The plain forward runs every row's prompt again;
here each distinct prompt runs once and every row of its group reads the result:

- causal LM: the prompts without their last token (U, P-1) fill a KV cache; the cache is indexed
  by each row's prompt (b, ...): an index, so in backward the gradient of a prompt's keys and
  values is the sum over its rows, as in the plain forward. Then each row's last prompt token and
  its response but the last token (b, T) run against that cache, and their T outputs are exactly
  the positions that predict the T response tokens.
- encoder-decoder: the encoder runs over the U prompts, and its output is indexed per row.

Sampling shares the same way (`prefill`): `generate` starts from a cache, or an encoder output, that
each distinct prompt filled once.

The log-probs and gradients are those of the plain forward, to float rounding. What it spares is
about the prompt's share of the tokens times (1 - U/b): nothing worth a second model call with the
GRPO benchmark's 7-token prompts (MIN_SAVING), 0.43x the iteration's time with 170-token ones
(docs/grpo.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf_cli.lm.forward import forward_takes, innermost_model, supports_logits_to_keep

SHARED = "shared_prompts"  # the key of a SharedPrompts in a forward's inputs

# Share only where it spares at least this fraction of the rows' tokens: a second model call and the
# cache's indexing cost something, and on the GRPO benchmark (docs/grpo.md) sparing 12-14% (7-token
# prompts) was within noise of not sharing (1.06x, 0.99x the time), sparing 30% took 0.78x the time.
MIN_SAVING = 0.2


@dataclass
class SharedPrompts:
    first: torch.Tensor  # (U,) long: a row of each distinct prompt
    row_prompt: torch.Tensor  # (b,) long: each row's index into `first`
    prompt_width: int  # P: the (left-padded) prompt columns of the inputs


def _cache_argument(model) -> str | None:
    """The name under which `model.forward` takes a KV cache (transformers renames it in 5.x)."""
    return next((name for name in ("cache", "past_key_values") if forward_takes(model, name)), None)


def _new_cache(model):
    """An empty DynamicCache laid out for `model` (None where transformers cannot lay one out)."""
    from transformers.cache_utils import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except (TypeError, ValueError, KeyError):
        return None


class PromptSharing:
    """Whether and how the forwards of `models` (the policy, and its reference if apart) share prompts."""

    def __init__(self, models: list, agree: Callable[[bool], bool] | None = None):
        """`agree`: where the processes must choose alike (FSDP, DeepSpeed: training/sharding.py `agreement`),
        this process's choice -> all of theirs (share only where every process would); None: each process
        chooses for its own rows."""
        self.window: int | None = None  # the smallest sliding-window span: longer rows run plainly
        self.agree = agree
        self.planned = self.shared = 0  # forwards (and sampling batches) planned, and those that shared
        self.why_not = next((why for why in (self._unsupported(m) for m in models) if why), None)

    def _unsupported(self, model) -> str | None:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        base = innermost_model(model)
        checkpointing = getattr(base, "is_activation_checkpointing", None)  # (older transformers: the name below)
        if checkpointing if checkpointing is not None else getattr(base, "is_gradient_checkpointing", False):
            return "gradient checkpointing recomputes layers without the cache"
        peft_config = getattr(model, "active_peft_config", None)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            return "a prompt-learning adapter brings its own cache"
        if getattr(model.config, "is_encoder_decoder", False):
            return None if hasattr(model, "get_encoder") else "the model has no separate encoder"
        cache = _new_cache(model) if _cache_argument(model) else None
        if cache is None:
            return "the model takes no KV cache"
        for layer in cache.layers:
            if type(layer) is DynamicSlidingWindowLayer:  # whole keys and values while rows fit the window
                self.window = min(self.window or layer.sliding_window, layer.sliding_window)
            elif type(layer) is not DynamicLayer:
                return f"the model has {type(layer).__name__} layers"
        return None

    def plan(self, group_ids: torch.Tensor | None, prompt_width: int, length: int) -> SharedPrompts | None:
        """group_ids (b,): the prompt each row answers; rows of `length` columns (prompt + response) ->
        a SharedPrompts, or None to run the rows plainly: sharing is off, a row would not fit the window,
        or it would spare less than MIN_SAVING of the tokens (no two rows share a prompt, short prompts), or
        (with `agree`) that holds for another process's rows."""
        if self.why_not or group_ids is None:
            return None
        shared = self._plan(group_ids, prompt_width, length)
        if self.agree is not None and not self.agree(shared is not None):
            shared = None
        self.planned, self.shared = self.planned + 1, self.shared + (shared is not None)
        return shared

    def _plan(self, group_ids: torch.Tensor, prompt_width: int, length: int) -> SharedPrompts | None:
        if self.window and length > self.window:
            return None
        distinct, row_prompt = torch.unique(group_ids, return_inverse=True)
        spared = (len(group_ids) - len(distinct)) * (prompt_width - 1)  # the prompt columns run ahead, once
        if spared == 0 or spared < MIN_SAVING * len(group_ids) * length:
            return None
        rows = torch.arange(len(group_ids), device=group_ids.device)
        first = torch.full_like(distinct, len(group_ids)).scatter_reduce(0, row_prompt, rows, "amin")
        return SharedPrompts(first, row_prompt, prompt_width)

    def summary(self) -> str:
        """One line for the log: how often it shared, and what kept the rest from it."""
        return (f"share_prompt_prefix: {self.shared} of {self.planned} forwards and sampling batches ran each "
                f"prompt once; the rest ran every row's prompt (sharing would have spared less than "
                f"{MIN_SAVING:.0%} of their tokens" + (", or rows were longer than the sliding window" if self.window else "")
                + ("; under this engine the processes share only together" if self.agree else "") + ")")


def duplicate_rows(query_ids: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """(b,) long: a prompt index per row, the same for consecutive rows that hold the same prompt (the
    trainer repeats each query num_generations times before sampling)."""
    new = torch.ones(len(query_ids), dtype=torch.bool, device=query_ids.device)
    new[1:] = (query_ids[1:] != query_ids[:-1]).any(1) | (query_mask[1:] != query_mask[:-1]).any(1)
    return new.long().cumsum(0)


def _prompt_states(model, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None,
                   shared: SharedPrompts) -> dict:
    """Each distinct prompt of the rows run once and indexed per row, as keyword arguments of the model
    (or of `generate`): a causal model's KV cache of every prompt column but the last, (b, heads, P-1, d)
    per layer; an encoder-decoder's encoder output (b, P, H). ids, mask, positions: (b, P) the rows' prompts."""
    first = shared.first
    if getattr(model.config, "is_encoder_decoder", False):
        from transformers.modeling_outputs import BaseModelOutput

        encoded = model.get_encoder()(input_ids=ids[first], attention_mask=mask[first],
                                      return_dict=True).last_hidden_state  # (U, P, H)
        return {"encoder_outputs": BaseModelOutput(last_hidden_state=encoded[shared.row_prompt])}
    cache, cache_name = _new_cache(model), _cache_argument(model)
    prefix = slice(0, shared.prompt_width - 1)
    head = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}  # the prefix predicts nothing we read
    model(input_ids=ids[first, prefix], attention_mask=mask[first, prefix], position_ids=positions[first, prefix],
          use_cache=True, **{cache_name: cache}, **head)  # fills the cache: (U, heads, P - 1, d) per layer
    cache.batch_select_indices(shared.row_prompt)  # an index: in backward, a sum over each prompt's rows
    return {cache_name: cache}


@torch.no_grad()
def prefill(model, query_ids: torch.Tensor, query_mask: torch.Tensor, shared: SharedPrompts) -> dict:
    """For `generate` (keyword arguments): the rows' prompts (b, P) run once per distinct prompt; a causal
    model's generate then runs each row's last prompt token and samples from there."""
    mask = query_mask.long()
    return _prompt_states(model, query_ids, mask, (mask.cumsum(1) - 1).clamp(min=0), shared)


def logits(model, inputs: dict) -> torch.Tensor:
    """model(**inputs).logits; with a SharedPrompts under SHARED, each distinct prompt once: then a
    causal model returns (b, T, V) for the T columns that predict the response tokens only."""
    inputs = dict(inputs)
    shared = inputs.pop(SHARED, None)
    if shared is None:
        return model(**inputs, use_cache=False).logits
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    if getattr(model.config, "is_encoder_decoder", False):  # the rest: the decoder's inputs
        states = _prompt_states(model, ids, mask, None, shared)
        return model(attention_mask=mask, use_cache=False, **states, **inputs).logits  # (b, T, V)
    positions = inputs.pop("position_ids")  # ids, mask, positions: (b, P + T)
    P, end = shared.prompt_width, ids.shape[1] - 1  # the last response token predicts nothing
    states = _prompt_states(model, ids[:, :P], mask[:, :P], positions[:, :P], shared)
    out = model(input_ids=ids[:, P - 1 : end], attention_mask=mask[:, :end], position_ids=positions[:, P - 1 : end],
                use_cache=True, **states, **inputs)
    return out.logits  # (b, T, V)
