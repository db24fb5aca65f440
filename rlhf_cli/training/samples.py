"""A few samples from a language model (causal or encoder-decoder) at the end of a run: what a user
reads to judge the model.

The prompts come tokenized (the stage knows its data format); they are sampled as one left-padded
batch with a fixed seed inside a forked RNG, so the samples are reproducible and drawing them
changes no random state of the run.
"""

import json
import logging
from pathlib import Path

import torch

from rlhf_cli.training.sharding import root_gathered, synced_generation

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids, attention_mask), both (batch, longest), padded on the left so that
    every prompt ends where generation starts."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return input_ids, attention_mask


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.7,
    top_k: int = 50,
    seed: int = 0,
) -> list[str]:
    """Sample one continuation per prompt (stopping at eos); returns the new text of each."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()  # dropout off; also switches gradient checkpointing off, so the cache can be used
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), root_gathered(model):
        torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_k=top_k,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
            synced_gpus=synced_generation(model),
        )
    model.train(was_training)
    # a causal LM returns prompt + continuation; an encoder-decoder the decoded sequence alone
    new_tokens = output if model.config.is_encoder_decoder else output[:, input_ids.shape[1] :]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def write_samples(output_dir: Path, step: int, prompts: list[str], responses: list[str]) -> list[dict]:
    """(prompt, response) rows to `<output_dir>/samples.jsonl` (replacing an earlier file), and the log."""
    rows = [{"step": step, "prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    with (Path(output_dir) / SAMPLES_FILE).open("w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    for i, row in enumerate(rows, 1):
        log.info("sample %d: [%s] %s", i, " ".join(row["prompt"].split()), " ".join(row["response"].split()))
    return rows
