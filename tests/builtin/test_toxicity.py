"""The built-in mild-insult reward of the detoxify twin."""

import pytest

from rlhf_cli.builtin.datasets import load_builtin_dataset
from rlhf_cli.builtin.toxicity import MILD_INSULTS, count_insults, mild_toxicity_reward
from rlhf_cli.rewards.function import FunctionReward


def test_counts_whole_words_case_insensitively():
    assert count_insults("A Stupid, stupid film. Pathetic!") == 3
    assert count_insults("stupidity and trashy lameness") == 0  # whole words only
    assert count_insults("") == 0


def test_reward_is_minus_the_insults_of_the_response_only():
    prompts = ["This stupid", "So", "It was"]
    responses = [" film was fine.", " dumb and lame.", " great."]
    assert mild_toxicity_reward(prompts, responses) == [0.0, -2.0, 0.0]
    with pytest.raises(ValueError):
        mild_toxicity_reward(["a"], [])


def test_registered_as_a_builtin_reward_function():
    scores = FunctionReward("builtin:mild-toxicity")(["x", "y"], [" useless", " fine"], {"label": ["a", "b"]})
    assert scores.tolist() == [-1.0, 0.0]


def test_the_built_in_reviews_hold_insults_to_learn_from():
    """Enough reviews say them that a model trained on the reviews writes them, and not most."""
    texts = load_builtin_dataset("reviews", num_train=2000, num_test=0)["train"]["text"]
    share = sum(count_insults(t) > 0 for t in texts) / len(texts)
    assert 0.05 < share < 0.4, share
    assert all(w == w.lower() and w.isalpha() for w in MILD_INSULTS)
