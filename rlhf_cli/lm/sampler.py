"""Samplers: "give me a response to each of these queries, with the log-probs (and values) of the
tokens as sampled". The trainer repeats each query for the responses per prompt it wants.

`HFSampler` is transformers' `generate` on the policy being trained (KV cache), capturing the
sampled tokens' log-probs -- and the value head's values when the policy has one -- from
generate's own forward passes (lm/generation.py `sample_with_logprobs`), so the update needs no
second forward of the policy over the rollout. Another backend (e.g. vLLM) is one more class with
the same `sample`, and `weights_updated` to reload the policy's weights after an optimizer step: `VLLMSampler`
(lm/vllm_sampler.py, `generation.backend: vllm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_cli.lm.generation import sample_responses, sample_with_logprobs
from rlhf_cli.lm.shared_prompts import PromptSharing, duplicate_rows, prefill
from rlhf_cli.training.sharding import root_gathered


class Sampler:
    def sample(self, query_ids: torch.Tensor, query_mask: torch.Tensor, chunk: int, pad_id: int):
        """(responses (B, T) right-padded, log-probs (B, T) float32 or None, values (B, T) float32 or None)."""
        raise NotImplementedError

    def weights_updated(self) -> None:
        """Called after each optimizer step; a sampler with its own copy of the weights syncs here."""


class HFSampler(Sampler):
    def __init__(self, model, temperature: float, accelerator, sharing: PromptSharing | None = None,
                 response_length: int = 0):
        """`sharing`: consecutive rows that hold the same prompt (a group) run it once before sampling
        (lm/shared_prompts.py); None: every row runs its own."""
        self.model, self.temperature, self.accelerator = model, temperature, accelerator  # a PolicyWithValue
        self.sharing, self.response_length = sharing, response_length
        # log-probs (and values) from generate's own passes: causal policies whose values, if any,
        # come from the policy's hidden states (a separate critic needs its own forward)
        self.captures = not model.is_encoder_decoder and model.critic is None

    @torch.no_grad()
    def sample(self, query_ids, query_mask, chunk: int, pad_id: int):
        policy, value_head, pieces = self.model.policy, self.model.value_head, []
        with root_gathered(self.model):  # FSDP: generate does not pass through the wrapper's forward
            for i in range(0, len(query_ids), chunk):
                pieces.append(self._sample_chunk(policy, value_head, query_ids[i : i + chunk], query_mask[i : i + chunk]))
        width = max(p[0].shape[1] for p in pieces)

        def joined(k: int, value) -> torch.Tensor | None:
            parts = [p[k] for p in pieces]
            if any(x is None for x in parts):
                return None
            return torch.cat([F.pad(x, (0, width - x.shape[1]), value=value) for x in parts])

        return joined(0, pad_id), joined(1, 0.0), joined(2, 0.0)

    def _sample_chunk(self, policy, value_head, q, m):
        with self.accelerator.autocast():  # the precision of the update's forward (docs/ppo.md, Precision)
            shared = None if self.sharing is None else self.sharing.plan(
                duplicate_rows(q, m), q.shape[1], q.shape[1] + self.response_length)
            prefilled = None if shared is None else prefill(policy, q, m, shared)
            if self.captures:
                return sample_with_logprobs(policy, value_head, q, m, self.temperature, prefilled)
            return sample_responses(policy, q, m, prefilled), None, None


def make_sampler(model, gen, stop_id: int | None, max_prompt_length: int, accelerator, seed: int,
                 sharing: PromptSharing | None = None) -> Sampler:
    """The Sampler `generation.backend` names (`gen` a GenerationConfig; the eval's has no backend: hf);
    `sharing`: the HF sampler runs each group's prompt once (vLLM caches prefixes by itself)."""
    if getattr(gen, "backend", "hf") == "vllm":
        from rlhf_cli.lm.vllm_sampler import VLLMSampler  # vllm is imported only when asked for

        return VLLMSampler(model, gen, stop_id, max_prompt_length, accelerator, seed)
    return HFSampler(model, gen.temperature, accelerator, sharing, gen.response_length)
