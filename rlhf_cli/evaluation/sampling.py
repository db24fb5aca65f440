"""One evaluated model: load it, sample responses with fixed seeds, and take log-probs of the samples.

Every model samples batch b of the (prompt x sample) rows right after `torch.manual_seed(seed + b)`,
so two models differ only by their weights (identical weights give identical samples), and one
model's batch does not depend on how long the previous batch ran. With several samples per prompt,
a batch runs each prompt once (lm/shared_prompts.py), in sampling and in the KL's log-prob forwards.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cli.config.sections import GenerationConfig
from rlhf_cli.environments.rollout import environment_from_config
from rlhf_cli.errors import UserError
from rlhf_cli.evaluation.metrics import sequence_kl
from rlhf_cli.lm import shared_prompts
from rlhf_cli.lm.forward import innermost_model, model_inputs, response_slice
from rlhf_cli.lm.generation import (
    install_sampling_config,
    left_pad,
    sample_responses,
    stop_token_id,
)
from rlhf_cli.lm.head import read_tokens
from rlhf_cli.lm.masking import lengths_to_mask, truncate_after_stop
from rlhf_cli.lm.shared_prompts import PromptSharing, SharedPrompts, duplicate_rows, prefill
from rlhf_cli.models.dropout import disable_dropout
from rlhf_cli.models.loading import load_model, load_tokenizer
from rlhf_cli.models.policy import is_encoder_decoder

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """All responses of one model, N = prompts x samples_per_prompt rows, prompt-major."""

    prompts: list[str]  # the query as the model saw it (decoded; truncated prompts show their cut)
    responses: list[str]  # decoded up to the stop token, special tokens removed
    lengths: torch.Tensor  # (N,) response tokens, the stop token included
    stopped: torch.Tensor  # (N,) bool
    kls: torch.Tensor | None  # (N,) sequence KL to the reference, None without one
    episodes: list | None = None  # with a text environment: each row's Episode (environments/rollout.py)


def model_path(name: str) -> str:
    """Where a model name loads from: a checkpoint folder (`checkpoint-<step>/`, with trainer_state.json)
    holds its model in `model/`; everything else loads as it is named."""
    folder = Path(name)
    if (folder / "trainer_state.json").is_file() and (folder / "model").is_dir():
        return str(folder / "model")
    return name


def load_eval_tokenizer(name: str, key: str):
    return load_tokenizer(model_path(name), padding_side="left", config_key=key)


def same_vocabulary(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


class EvalModel:
    """A causal or seq2seq LM for inference (dropout off, no grad) with its left-padding tokenizer."""

    def __init__(self, name: str, device: torch.device, key: str, tokenizer=None):
        self.name, self.device = name, device
        self.tokenizer = tokenizer or load_eval_tokenizer(name, key)
        path = model_path(name)
        self.encoder_decoder = is_encoder_decoder(path)
        task = "seq2seq-lm" if self.encoder_decoder else "causal-lm"
        self.model = load_model(path, task=task, config_key=key).to(device).eval().requires_grad_(False)
        disable_dropout(self.model)
        self.config = innermost_model(self.model).config

    def encode_device(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def response_logprobs(self, query_ids, query_mask, response_ids, response_mask, temperature: float,
                          shared: SharedPrompts | None = None) -> torch.Tensor:
        """log softmax(logits / temperature) at each response token: (B, T) float32. `shared`: rows that
        hold the same prompt run it once (lm/shared_prompts.py; a causal model then returns the T
        response columns only)."""
        inputs = model_inputs(self.config, query_ids, query_mask, response_ids, response_mask)
        P, T = query_ids.shape[1], response_ids.shape[1]
        if shared is not None:
            inputs[shared_prompts.SHARED] = shared
        kept = shared is not None and not self.encoder_decoder

        def columns(x: torch.Tensor) -> torch.Tensor:  # (B, k, ...) -> (B, T, ...)
            return x[:, :T] if kept else response_slice(x, P, T, self.encoder_decoder)

        stats, _ = read_tokens(self.model, lambda: (shared_prompts.logits(self.model, inputs), None), columns,
                               response_ids, temperature)
        return stats.logprobs


@torch.no_grad()
def sample_model(
    lm: EvalModel, rows: list[list[int]], gen: GenerationConfig, seed: int, batch_size: int,
    reference: EvalModel | None = None, environment=None, tools=None,
) -> Samples:
    """Generate one response per row of prompt token ids; with a reference, the KL of each sample.

    With an `environment` section that lists tools, each response is a multi-turn episode with the
    tools in the loop (environments/rollout.py; `tools`: its tools, already loaded, or None to load them);
    its length and KL count the model's own tokens."""
    tokenizer, pad = lm.tokenizer, lm.tokenizer.pad_token_id
    stop_id = stop_token_id(gen, tokenizer)
    install_sampling_config(lm.model, gen, stop_id, pad)
    env = None
    if environment is not None and environment.tools:
        env = environment_from_config(environment, gen, lm.model, tokenizer, stop_id, lm.name, tools=tools)
    out = Samples([], [], [], [], [] if reference is not None else None, [] if env is not None else None)
    sharing = PromptSharing([lm.model] + ([reference.model] if reference is not None else []))
    forked = [lm.device] if lm.device.type == "cuda" else []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        q, m = lm.encode_device(rows[start : start + batch_size])
        # a prompt's samples are consecutive rows: each distinct prompt runs once (sampling draws the same tokens)
        shared = sharing.plan(duplicate_rows(q, m), q.shape[1], q.shape[1] + gen.response_length)
        with torch.random.fork_rng(devices=forked):
            torch.manual_seed(seed + b)
            if env is None:
                raw = sample_responses(lm.model, q, m, None if shared is None else prefill(lm.model, q, m, shared))
            else:
                exp = env.rollout(q, m)
        if env is None:
            responses, lengths, stopped = truncate_after_stop(raw, stop_id, pad)
            mask = own = lengths_to_mask(lengths, responses.shape[1])
        else:
            responses, mask, own, stopped = exp.response_ids, exp.response_mask, exp.loss_mask, exp.stopped
            lengths = own.sum(1)
            out.episodes += exp.episodes
        if reference is not None:
            logprobs = lm.response_logprobs(q, m, responses, mask, gen.temperature, shared)
            ref_logprobs = reference.response_logprobs(q, m, responses, mask, gen.temperature, shared)
            out.kls.append(sequence_kl(logprobs, ref_logprobs, own).cpu())
        out.prompts += tokenizer.batch_decode(q, skip_special_tokens=True)
        out.responses += tokenizer.batch_decode(responses.masked_fill(~mask, pad), skip_special_tokens=True)
        out.lengths.append(lengths.cpu())
        out.stopped.append(stopped.cpu())
    out.lengths, out.stopped = torch.cat(out.lengths), torch.cat(out.stopped)
    out.kls = torch.cat(out.kls) if out.kls is not None else None
    return out


def check_reference_vocabulary(model_tokenizer, reference_tokenizer, model: str, reference: str) -> None:
    """KL compares the probabilities of the same token ids, so both models must share a vocabulary."""
    if not same_vocabulary(model_tokenizer, reference_tokenizer):
        raise UserError(
            f"eval.reference_model: {reference!r} has another vocabulary than {model!r}; the KL compares "
            "token probabilities, so pick a reference with the same tokenizer, or set eval.reference_model: null."
        )
