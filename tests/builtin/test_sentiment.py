"""The gold scorer: VADER compound scores, and the PPO reward function built on them."""

import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_cli.builtin import sentiment
from rlhf_cli.builtin.sentiment import sentiment_reward, sentiment_scores


def test_scores_are_vader_compound_scores_in_range():
    texts = ["A wonderful, moving film!", "A dull and lazy mess.", "It runs two hours.", ""]
    reference = SentimentIntensityAnalyzer()
    scores = sentiment_scores(texts)
    assert scores == [reference.polarity_scores(t)["compound"] for t in texts]
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0 and scores[3] == 0
    assert all(-1 <= s <= 1 and isinstance(s, float) for s in scores)


@pytest.mark.parametrize(
    ("text", "sign"),
    [("The plot is not great.", -1), ("The plot wasn't bad.", 1), ("It never gets boring.", 1)],
)
def test_negation_flips_the_sign(text, sign):
    assert sign * sentiment_scores([text])[0] > 0


def test_one_analyzer_is_created_lazily_and_shared():
    assert sentiment._analyzer() is sentiment._analyzer()


def test_a_single_string_is_refused():
    with pytest.raises(TypeError, match="sequence of texts"):
        sentiment_scores("great")


def test_reward_scores_prompt_plus_response():
    prompts, responses = (
        ["I watched it, and it was", "I watched it, and it was"],
        [" not bad at all.", " bad."],
    )
    rewards = sentiment_reward(prompts, responses, label=["x", "y"])  # extra columns are ignored
    assert rewards == sentiment_scores([p + r for p, r in zip(prompts, responses, strict=True)])
    assert rewards[0] > 0 > rewards[1]


def test_reward_needs_one_response_per_prompt():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        sentiment_reward(["a", "b"], ["c"])
