"""What the online benchmarks (bench/ppo.py, bench/grpo.py, bench/rloo.py) share: the policy folder
both sides load, and the gold score of a trained policy on held-out prompts, computed the same way
for every side (same prompts, seed, sampling settings and code)."""

from __future__ import annotations

import functools
import statistics

import torch
from common import WORK

POLICY = WORK / "policy-small-gpt2"


def prepare_policy() -> None:
    """`builtin:small-gpt2` saved once to bench/.work/policy-small-gpt2, so every side loads the same weights."""
    from rlhf_cli.builtin.models import build_builtin

    if not (POLICY / "config.json").exists():
        model, tokenizer = build_builtin("builtin:small-gpt2", "causal-lm", seed=0)
        model.save_pretrained(POLICY)
        tokenizer.save_pretrained(POLICY)


def prepare_prompts(dataset, tokenizer, config, split: str):
    """rlhf_cli's prompt encoding (stages/online.py)."""
    from rlhf_cli.stages.online import prepare_prompts as prepare

    return prepare(dataset, tokenizer, config, split)


@functools.cache
def held_out_prompt_ids(max_prompt_length: int, response_length: int, temperature: float) -> tuple:
    """(tokenizer, generation config, encoded held-out prompts): made once per process."""
    from rlhf_cli.config.loader import build_stage
    from rlhf_cli.data.loading import load_splits
    from rlhf_cli.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(POLICY), padding_side="left")
    config = build_stage("ppo", {
        "reward": {"function": "builtin:sentiment"},
        "data": {"dataset_name": "builtin:review-prompts", "max_prompt_length": max_prompt_length},
        "generation": {"response_length": response_length, "temperature": temperature, "top_k": 0, "top_p": 1.0}})
    ids, _ = prepare_prompts(load_splits(config.data)[1], tokenizer, config, "test")
    return tokenizer, config, ids


@torch.no_grad()
def gold_score(model_dir: str, spec: dict, n: int, seed: int = 1234) -> float:
    """Mean builtin:sentiment of prompt + response on the first n held-out prompts (same for every side)."""
    from rlhf_cli.builtin.sentiment import sentiment_scores
    from rlhf_cli.lm.generation import install_sampling_config, left_pad, sample_responses
    from rlhf_cli.lm.masking import lengths_to_mask, truncate_after_stop
    from rlhf_cli.models.loading import load_model

    tokenizer, config, ids = held_out_prompt_ids(spec["max_prompt_length"], spec["response_length"],
                                                 spec["temperature"])
    ids = ids[:n]
    model = load_model(model_dir, task="causal-lm").eval()
    install_sampling_config(model, config.generation, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    texts = []
    for start in range(0, len(ids), 64):
        q, m = left_pad(ids[start : start + 64], tokenizer.pad_token_id)
        resp, lengths, _ = truncate_after_stop(sample_responses(model, q, m), tokenizer.eos_token_id,
                                               tokenizer.pad_token_id)
        resp = resp.masked_fill(~lengths_to_mask(lengths, resp.shape[1]), tokenizer.pad_token_id)
        prompts = tokenizer.batch_decode(q, skip_special_tokens=True)
        responses = tokenizer.batch_decode(resp, skip_special_tokens=True)
        texts += [p + r for p, r in zip(prompts, responses, strict=True)]
    return statistics.fmean(sentiment_scores(texts))
