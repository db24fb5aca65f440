"""Token log-probs and entropies read at the LM head, without full-vocabulary logits for a batch.

A model's last matmul, hidden (b, t, H) -> logits (b, t, V), is where memory goes at large
vocabularies: at V = 128k, batch 8 and 1,024 tokens one float32 logits tensor is 4.2 GB, and the
plain path keeps several (the model's logits, their float32 copy scaled by the temperature, the
softmax of the entropy). What the losses need is two numbers per token: the sampled token's
log-prob and the entropy. So:

1. During the model's forward, the LM head is fed a zero-width slice of its input (a pre-hook) and
   the hidden states it would have projected are kept. The model returns (b, 0, V) logits: nothing
   vocabulary-sized is made.
2. The caller selects the hidden states of the positions it needs (the response columns), and
   `chunked_stats` projects them `chunk` positions at a time: logits, logsumexp, the gathered
   log-prob and the entropy of each chunk, then the chunk's logits are dropped. With autograd on,
   each chunk runs under activation checkpointing, so backward recomputes one chunk's logits at a
   time instead of keeping them all: peak memory is that of one chunk, whatever the vocabulary.
   When every position fits in one chunk nothing is recomputed (the same work as the plain path).

This is exact only where the model's logits ARE its head's output. Some models post-process them
(Gemma 2's soft-capping, Cohere's logit scale, BART's final_logits_bias): the first forward
through a model checks, by identity, that the logits it returns are the tensor its head produced,
and a model that fails the check is read from its full logits from then on (`plain_logits`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rlhf_cli.lm.logprobs import entropy_from_logits, logprobs_from_logits

# Up to WHOLE_LOGITS logits (64 MB in float32) are projected in one piece, as the plain path does:
# nothing is recomputed, and small vocabularies (the built-in 4k) never pay for chunking. Beyond it,
# chunks of CHUNK_LOGITS logits (16 MB: 32 positions at a 128k vocabulary, 128 at 32k) keep the
# working set (a chunk's logits, exponentials and gradient) near 100 MB. On a CPU chunks are
# CPU_CHUNK_LOGITS (64 MB): glibc's malloc serves blocks under its dynamic mmap threshold (at most
# 32 MB) from the heap, and a freed 16 MB chunk there is not reused cleanly, so the heap grew by
# about a chunk per chunk (2.1 GB for 64 chunks of a 128k x 2,048 read); blocks above it are mapped
# and given back when freed (measured: docs/performance.md, "Memory").
WHOLE_LOGITS = 1 << 24
CHUNK_LOGITS = 1 << 22
CPU_CHUNK_LOGITS = 1 << 24

# heads whose model does something to the head's output before returning it as its logits (found
# on first use): read from full logits
_POST_PROCESSED: weakref.WeakSet[nn.Module] = weakref.WeakSet()

Entropy = str  # "none" (not computed), "stat" (computed without grad), "grad" (part of the loss)


@dataclass
class TokenStats:
    logprobs: Tensor  # (b, T) float32 log-probs of the given tokens at the temperature (grad if any)
    entropy: Tensor | None = None  # (b, T) float32 entropy in nats; with grad only when asked for "grad"
    top1: Tensor | None = None  # (b, T) bool: the token is the most likely one (SFT's token accuracy)
    mean_logit: Tensor | None = None  # (b, T) float32 mean raw logit over the vocabulary, detached (DPO's logits/*)


def output_head(model: nn.Module) -> nn.Module | None:
    """The LM head (output projection) of an HF model, a PEFT model or a DDP wrapper of one."""
    inner = getattr(model, "module", model)
    return inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None


def stats_from_logits(logits: Tensor, tokens: Tensor, temperature: float, entropy: Entropy = "none",
                      top1: bool = False, mean_logit: bool = False) -> TokenStats:
    """The plain path: logits (b, T, V) -> TokenStats (b, T)."""
    stats = TokenStats(logprobs_from_logits(logits, tokens, temperature))
    if entropy == "grad":
        stats.entropy = entropy_from_logits(logits, temperature)
    with torch.no_grad():
        if entropy == "stat":
            stats.entropy = entropy_from_logits(logits.detach(), temperature)
        if top1:
            stats.top1 = logits.argmax(-1) == tokens
        if mean_logit:
            stats.mean_logit = logits.float().mean(-1)
    return stats


def chunked_stats(head: nn.Module, hidden: Tensor, tokens: Tensor, temperature: float, entropy: Entropy = "none",
                  top1: bool = False, mean_logit: bool = False) -> TokenStats:
    """hidden (b, T, H) at the head's input, tokens (b, T) -> TokenStats (b, T): in one piece up to
    WHOLE_LOGITS logits, else CHUNK_LOGITS // V positions at a time (CPU_CHUNK_LOGITS on a CPU),
    checkpointed per chunk when autograd records."""
    b, T = tokens.shape
    flat_hidden, flat_tokens = hidden.reshape(b * T, -1), tokens.reshape(b * T)
    vocab = head.weight.shape[0]
    rows = max(1, (CPU_CHUNK_LOGITS if hidden.device.type == "cpu" else CHUNK_LOGITS) // vocab)
    empty = torch.empty(0, device=tokens.device)

    def project(h: Tensor, t: Tensor) -> tuple[Tensor, ...]:  # (n,) each; empty where not asked for
        s = stats_from_logits(head(h), t, temperature, entropy, top1, mean_logit)
        return tuple(empty if x is None else x for x in (s.logprobs, s.entropy, s.top1, s.mean_logit))

    if flat_tokens.numel() * vocab <= WHOLE_LOGITS:
        parts = [project(flat_hidden, flat_tokens)]
    else:
        record = torch.is_grad_enabled() and flat_hidden.requires_grad
        parts = [checkpoint(project, h, t, use_reentrant=False) if record else project(h, t)
                 for h, t in zip(flat_hidden.split(rows), flat_tokens.split(rows), strict=True)]
    return TokenStats(*(torch.cat(p).view(b, T) if p[0].numel() else None for p in zip(*parts, strict=True)))


class _Capture:
    hidden: Tensor | None = None  # (b, k, H) what the head was given
    head_output: Tensor | None = None
    plain: bool = False  # the model returned head_output itself as its logits


@contextmanager
def _capture(model: nn.Module, head: nn.Module) -> Iterator[_Capture]:
    cap = _Capture()

    def keep_input(module, args):
        cap.hidden = args[0]
        return (args[0][..., :0, :], *args[1:])  # (b, 0, H): the head projects nothing

    def keep_output(module, args, output):
        # float32 (it is empty): accelerate's mixed-precision wrapper then passes it on as it is, so
        # only a model that does something to its logits returns another tensor
        cap.head_output = output.float()
        return cap.head_output

    def check_logits(module, args, kwargs, output):
        logits = output[0] if isinstance(output, tuple) else getattr(output, "logits", None)
        cap.plain = logits is not None and logits is cap.head_output

    inner = getattr(model, "module", model)
    handles = [head.register_forward_pre_hook(keep_input), head.register_forward_hook(keep_output),
               inner.register_forward_hook(check_logits, with_kwargs=True)]
    try:
        yield cap
    finally:
        for handle in handles:
            handle.remove()


def sharded(head: nn.Module) -> bool:
    """Whether an engine shards the head's weight between processes (DeepSpeed ZeRO-3 tags its
    parameters with `ds_id`; FSDP2 makes them DTensors; FSDP1 replaces them with plain tensors): the
    weight is then whole only inside the model's own forward, so the head must not be called after it."""
    weight = head.weight
    return hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor" or not isinstance(weight, nn.Parameter)


def read_tokens(model: nn.Module, forward: Callable[[], tuple[Tensor, Any]], select: Callable[[Tensor], Tensor],
                tokens: Tensor, temperature: float, entropy: Entropy = "none", top1: bool = False,
                mean_logit: bool = False) -> tuple[TokenStats, Any]:
    """Run `forward()` -> (logits (b, k, V), anything) through `model` (the HF model whose head to
    read) and return TokenStats of `tokens` (b, T) with the other output. `select` maps a per-column
    tensor (b, k, ...) to the columns that predict `tokens` (b, T, ...); it is applied to the
    logits on the plain path and to the hidden states on the chunked one.

    Sharded heads (`sharded`) and models whose logits are not their head's output take the plain path."""
    head = output_head(model)
    if head is None or not hasattr(head, "weight") or sharded(head) or head in _POST_PROCESSED:
        logits, other = forward()
        return stats_from_logits(select(logits), tokens, temperature, entropy, top1, mean_logit), other
    with _capture(model, head) as cap:
        _, other = forward()
    if cap.plain:
        return chunked_stats(head, select(cap.hidden), tokens, temperature, entropy, top1, mean_logit), other
    _POST_PROCESSED.add(head)  # the plain path, now and from now on
    return read_tokens(model, forward, select, tokens, temperature, entropy, top1, mean_logit)
