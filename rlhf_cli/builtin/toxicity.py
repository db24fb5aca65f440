"""A built-in stand-in for a toxicity classifier: count mild insults in a response.

The detoxify recipe's twin (recipes/detoxify) rewards a policy for writing without them. The list
is deliberately mild -- name-calling words a harsh film review might use -- and about a sixth of the
built-in reviews hold at least one ("stupid", "worthless", "pathetic", ...: they are negative
adjectives of the review grammar, see rlhf_cli/builtin/lexicon.py), so a policy trained on the
reviews writes them now and then and PPO has something to remove. A real classifier (e.g.
facebook/roberta-hate-speech-dynabench-r4-target, label `nothate`) takes its place with a hub.
"""

from __future__ import annotations

import re

MILD_INSULTS = frozenset((
    "stupid", "dumb", "idiotic", "moronic", "brainless", "pathetic", "worthless", "useless", "lousy",
    "crappy", "lame", "ridiculous", "garbage", "trash", "rubbish",
))

_WORD = re.compile(r"[a-z]+")


def count_insults(text: str) -> int:
    """Whole words of MILD_INSULTS in `text`, case-insensitive ("Stupid!" counts, "stupidity" does not)."""
    return sum(word in MILD_INSULTS for word in _WORD.findall(text.lower()))


def mild_toxicity_reward(prompts: list[str], responses: list[str], **columns: object) -> list[float]:
    """Reward function for PPO: minus the number of mild insults in each response (0 is best).

    Only the response is judged: the prompt is the user's, the policy answers for its own words.
    Extra dataset columns (``**columns``) are accepted and ignored.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    return [-float(count_insults(response)) for response in responses]
