"""The gold sentiment scorer of the built-in world: VADER's compound score in [-1, 1].

VADER is a lexicon-and-rules scorer (negation, intensifiers, "but", exclamation marks), so it is
cheap, deterministic and needs no download -- and, like any fixed reward, it can be gamed
("great great great!!!"). The built-in review grammar is written so that every sentiment word it
uses is one VADER knows; see :mod:`rlhf_cli.builtin.lexicon`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer


@lru_cache(maxsize=1)
def _analyzer() -> SentimentIntensityAnalyzer:
    """One shared analyzer, created on first use (loading its lexicon takes ~0.1 s)."""
    return SentimentIntensityAnalyzer()


def sentiment_scores(texts: Sequence[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1] (> 0.05 reads positive, < -0.05 negative)."""
    if isinstance(texts, str):
        raise TypeError("sentiment_scores expects a sequence of texts, not a single string")
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def sentiment_reward(prompts: list[str], responses: list[str], **columns: object) -> list[float]:
    """Reward function for PPO: the gold score of ``prompt + response`` for each pair.

    The full text is scored, not the response alone, because in the built-in world the prompt is
    the opening of a review and the policy writes the rest: the reader judges the whole review,
    and a response must fit what the prompt already said ("... and it was not" + " bad at all").
    The prompt is neutral by construction, so the score still comes from the policy's words.
    Extra dataset columns (``**columns``) are accepted and ignored.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    return sentiment_scores([prompt + response for prompt, response in zip(prompts, responses, strict=True)])
