"""Batched sampling of responses with a KV cache (Hugging Face `generate`), and prompt encoding.

Prompts are left-padded so every response starts at the same column; generation stops early once
every row has produced the stop token. The sampling settings are installed as the model's own
generation config, because `generate` fills unset fields (an absent stop token, say) from it.
"""

import logging
import random

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import GenerationConfig as HFGenerationConfig

from rlhf_cli.config.sections import GenerationConfig
from rlhf_cli.errors import UserError
from rlhf_cli.lm.forward import innermost_model
from rlhf_cli.training.sharding import synced_generation

log = logging.getLogger(__name__)


def stop_token_id(gen: GenerationConfig, tokenizer) -> int | None:
    """`eos` -> the tokenizer's EOS id; null -> never stop; other text -> that single token's id."""
    if gen.stop_token is None:
        return None
    if gen.stop_token == "eos":
        if tokenizer.eos_token_id is None:
            raise UserError("generation.stop_token: the tokenizer has no EOS token; name a stop token or use null.")
        return tokenizer.eos_token_id
    ids = tokenizer.encode(gen.stop_token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(
            f"generation.stop_token: {gen.stop_token!r} is {len(ids)} tokens for this tokenizer; it must be exactly one."
        )
    return ids[0]


def install_sampling_config(model, gen: GenerationConfig, stop_id: int | None, pad_id: int) -> None:
    inner = innermost_model(model)
    inner.generation_config = HFGenerationConfig(
        do_sample=True,
        temperature=gen.temperature,
        top_k=gen.top_k,  # 0 disables
        top_p=gen.top_p,
        max_new_tokens=gen.response_length,
        min_new_tokens=gen.min_response_length or None,
        eos_token_id=stop_id,
        pad_token_id=pad_id,
        bos_token_id=inner.config.bos_token_id,
        decoder_start_token_id=getattr(inner.config, "decoder_start_token_id", None),
        use_cache=True,
    )


@torch.no_grad()
def sample_responses(model, query_ids: torch.Tensor, query_mask: torch.Tensor, prefilled: dict | None = None) -> torch.Tensor:
    """(B, P) left-padded queries -> (B, T) sampled response tokens, T <= response_length.

    Rows that stopped early are padded on the right; callers truncate after the stop token.
    `prefilled`: what the prompts computed already (lm/shared_prompts.py `prefill`), passed to generate.
    """
    out = model.generate(input_ids=query_ids, attention_mask=query_mask, synced_gpus=synced_generation(model),
                         **(prefilled or {}))
    if getattr(innermost_model(model).config, "is_encoder_decoder", False):
        return out[:, 1:]  # drop the decoder start token
    return out[:, query_ids.shape[1] :]


def encode_prompts(prompts: list, tokenizer, max_prompt_length: int, long_prompts: str,
                   tools: list[dict] | None = None) -> tuple[list[list[int]], int]:
    """Prompts (strings, or lists of chat messages) -> token ids, and how many were cut.

    Long prompts keep their LAST tokens (the part next to the response) or are refused. `tools` (the tool
    schemas of `environment.protocol: chat`) are rendered into every conversation by the chat template,
    and then every prompt must be a conversation, and a long one is refused (its start holds the tool list).
    """
    encoded, cut = [], 0
    for i, prompt in enumerate(prompts):
        if tools is not None and not isinstance(prompt, list):
            raise UserError(
                f"data row {i}: environment.protocol is chat, which renders each prompt with its tools through the "
                f"chat template, so data.prompt_column must hold conversations (lists of messages), not {prompt!r:.60}; "
                "use a conversational dataset or environment.protocol: text."
            )
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False,
                                                tools=tools)
        elif isinstance(prompt, str) and prompt:
            ids = tokenizer.encode(prompt, add_special_tokens=False)
        else:
            raise UserError(f"data row {i}: the prompt must be a non-empty string or a list of messages, got {prompt!r:.80}.")
        if len(ids) > max_prompt_length:
            if tools:  # cutting the start would cut the tool list the template writes there
                raise UserError(
                    f"data row {i}: the prompt rendered with the tools' schemas (environment.protocol: chat) has "
                    f"{len(ids)} tokens, more than data.max_prompt_length ({max_prompt_length}); keeping its last "
                    "tokens would drop the tool list, so raise data.max_prompt_length."
                )
            if long_prompts == "reject":
                raise UserError(
                    f"data row {i}: the prompt has {len(ids)} tokens, more than data.max_prompt_length "
                    f"({max_prompt_length}); raise it or set data.long_prompts: truncate_left."
                )
            ids, cut = ids[-max_prompt_length:], cut + 1
        encoded.append(list(ids))
    return encoded, cut


def encode_prompt_set(prompts: list, tokenizer, data, what: str = "prompts", tools: list[dict] | None = None) -> list[list[int]]:
    """Encode a whole prompt set as `data` (a PromptDataConfig) says: length limit, then openings; `tools`
    as in `encode_prompts`.

    With `prompt_opening_tokens: [min, max]` each prompt keeps only its first k tokens, k drawn per
    row from a generator seeded by `world_seed`, so every run and every model sees the same prompts.
    """
    ids, cut = encode_prompts(prompts, tokenizer, data.max_prompt_length, data.long_prompts, tools)
    if cut:
        log.warning("%d of %d %s were longer than %d tokens and keep their last tokens",
                    cut, len(ids), what, data.max_prompt_length)
    if data.prompt_opening_tokens:
        low, high = data.prompt_opening_tokens
        rng = random.Random(data.world_seed)
        ids = [row[: rng.randint(low, high)] for row in ids]
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, P), mask (B, P)) padded on the left."""
    tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
    ids = pad_sequence(tensors, batch_first=True, padding_value=pad_id, padding_side="left")
    mask = pad_sequence([torch.ones_like(t) for t in tensors], batch_first=True, padding_value=0, padding_side="left")
    return ids, mask


@torch.no_grad()
def sample_with_logprobs(model, value_head, query_ids: torch.Tensor, query_mask: torch.Tensor, temperature: float,
                         prefilled: dict | None = None):
    """`sample_responses`, and from the same forward passes: each sampled token's log-probability
    under softmax(logits / temperature) over the whole vocabulary and the value of the position that
    sampled it -- what a separate no-grad forward of the policy over the rollout would compute.

    Causal LMs only. Hooks watch `generate`'s own forward passes: one on the LM head's input keeps
    the value of the last position's final hidden state (B,) -- the state the logits come from, which
    is not the body's output where the model projects it first (OPT) -- and two on the LM keep the
    log-normaliser of the last position's logits (B,) and, one step later, when the sampled token
    comes back as the next input, that token's scaled logit. Memory: one (B, V) row of logits at a
    time, never (B, T, V). Returns (responses (B, T), logprobs (B, T) float32, values (B, T)
    float32; None without a value head), or logprobs/values None when the steps seen do not match
    the tokens returned. `prefilled`: as `sample_responses` (generate's first step then runs the last
    prompt token alone; the hooks see the same logits).
    """
    inner = innermost_model(model)
    lse, picked, values = [], [], []
    last = {}

    def before_head(module, args):  # args[0]: (B, t, H) final hidden states, t = 1 once the cache is warm
        values.append(value_head(args[0][:, -1]).float())

    def before_lm(module, args, kwargs):
        if "scaled" in last:  # this step's input is the token sampled from the previous step's logits
            ids = kwargs.get("input_ids")
            if ids is None:  # fed embeddings: the token is not visible here
                last["broken"] = True
                return
            picked.append(last.pop("scaled").gather(-1, ids[:, -1:]).squeeze(-1))

    def after_lm(module, args, kwargs, output):
        scaled = output.logits[:, -1].float() / temperature
        lse.append(torch.logsumexp(scaled, dim=-1))
        last["scaled"] = scaled

    handles = [inner.register_forward_pre_hook(before_lm, with_kwargs=True),
               inner.register_forward_hook(after_lm, with_kwargs=True)]
    if value_head is not None:
        handles.append(inner.get_output_embeddings().register_forward_pre_hook(before_head))
    try:
        responses = sample_responses(model, query_ids, query_mask, prefilled)
    finally:
        for handle in handles:
            handle.remove()
    T = responses.shape[1]
    if "scaled" in last:
        picked.append(last.pop("scaled").gather(-1, responses[:, -1:]).squeeze(-1))
    if "broken" in last or not (len(lse) == len(picked) == T and len(values) == (T if value_head is not None else 0)):
        log.debug("generation steps (%d) do not match the %d tokens returned; log-probs by a forward", len(lse), T)
        return responses, None, None
    return responses, torch.stack(picked, 1) - torch.stack(lse, 1), torch.stack(values, 1) if values else None
