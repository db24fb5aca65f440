"""The figures of `rlhf eval`, as pure functions of samples (documented in docs/eval.md).

Shapes: N samples (prompt x sample rows, prompt-major: row i * samples_per_prompt + j is sample j
of prompt i), T response tokens (right-padded).
"""

import math
from collections.abc import Sequence

from torch import Tensor

from rlhf_cli.lm.masking import masked_sum


def mean_std(values: Tensor) -> dict[str, float]:
    """Mean and standard deviation (population: divide by N) of a (N,) tensor."""
    values = values.double()
    return {"mean": values.mean().item(), "std": values.std(unbiased=False).item() if len(values) else 0.0}


def win_rate(scores: Tensor, baseline_scores: Tensor) -> float:
    """Fraction of paired samples where the model's score beats the baseline's; a tie counts half.

    scores, baseline_scores: (N,), row i of both is sample j of the same prompt (same seed offsets).
    """
    if scores.shape != baseline_scores.shape:
        raise ValueError(f"win_rate: {tuple(scores.shape)} scores paired with {tuple(baseline_scores.shape)}")
    wins = (scores > baseline_scores).double() + 0.5 * (scores == baseline_scores).double()
    return wins.mean().item()


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-sample KL estimate: sum over valid response tokens of log p_model - log p_ref.

    logprobs, ref_logprobs: (N, T) temperature-scaled log-probs of the sampled tokens; mask (N, T) bool
    -> (N,). Averaged over samples drawn from the model, this estimates KL(model || ref) of whole
    responses (the k1 estimator summed over a sequence, as PPO's `objective/kl`).
    """
    return masked_sum(logprobs - ref_logprobs, mask, dim=1)


def mean_kl(sequence_kls: Tensor) -> float:
    """The reported KL: the mean of the per-sample sequence estimates (N,)."""
    return sequence_kls.double().mean().item()


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over every response of a model (Li et al. 2016).

    Words are whitespace-separated pieces of the text as written (case and punctuation kept), so the
    figure is comparable between models with different tokenizers. N-grams never cross responses.
    0.0 when the responses hold no n-gram at all.
    """
    grams = [g for text in texts for g in ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp(token-weighted mean negative log-likelihood); every scored token weighs the same."""
    if num_tokens <= 0:
        raise ValueError("perplexity: no token was scored")
    return math.exp(min(nll_sum / num_tokens, 700.0))  # exp(>709) overflows a float


def mean_length(lengths: Tensor) -> float:
    """Mean response length in model tokens, the stop token included (as PPO's val/response_length)."""
    return lengths.double().mean().item()


def stop_rate(stopped: Tensor) -> float:
    """Fraction of responses that produced the stop token within response_length."""
    return stopped.double().mean().item()


def summarise(
    rewards: dict[str, Tensor], combined: Tensor, lengths: Tensor, stopped: Tensor, responses: Sequence[str],
    sequence_kls: Tensor | None,
) -> dict:
    """The per-model figures that need no other model (win rate and perplexity are added by the stage)."""
    return {
        "num_samples": len(responses),
        "rewards": {name: mean_std(values) for name, values in rewards.items()},
        "reward": mean_std(combined),
        "kl_to_reference": None if sequence_kls is None else mean_kl(sequence_kls),
        "response_length": mean_length(lengths),
        "stop_rate": stop_rate(stopped),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
    }
